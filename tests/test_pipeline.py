"""The engine end to end on a real photograph, against the plain definition of chunked inference."""

import numpy as np
import pytest
import torch
import zarr

from segpipe.core.geometry import ChunkGrid, core_in_window, input_window
from segpipe.core.settings import InferenceSettings, SegmentSettings, TilingSettings
from segpipe.engine.job import check_model
from segpipe.engine.segment import segment_image, segment_many
from segpipe.io.storage import list_images
from segpipe.models.artifact import load_artifact


def settings(chunk=128, halo=16, tile=None, **inference) -> SegmentSettings:
    """Tiles default to the chunk (today's plain chunked definition) unless a test asks for more."""
    inference.setdefault("precision", "fp32")
    inference.setdefault("device", "cpu")
    return SegmentSettings(tiling=TilingSettings(chunk_size=chunk, halo=halo, tile_size=tile or chunk),
                           inference=InferenceSettings(**inference))


def plain_chunked_reference(image: np.ndarray, model_dir: str, chunk: int, halo: int) -> np.ndarray:
    """Every chunk predicted alone from its window (reflect padding outside), centre-cropped."""
    art = load_artifact(model_dir)
    net = art.network()
    spec = art.spec
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    _, h, w = image.shape
    margin = 4 * (chunk + 2 * halo)
    padded = np.pad(image, ((0, 0), (margin, margin), (margin, margin)), mode="reflect")
    out = np.zeros((h, w), np.uint8)
    for ch in ChunkGrid(h, w, chunk):
        win = input_window(ch, chunk, halo)
        tile = padded[:, win.y0 + margin: win.y1 + margin, win.x0 + margin: win.x1 + margin]
        x = (torch.from_numpy(tile[None].astype(np.float32)) / spec.input_scale - mean) / std
        with torch.inference_mode():
            labels = net(x).argmax(1)[0].numpy()
        ys, xs = core_in_window(ch, halo)
        out[ch.y0:ch.y0 + ch.h, ch.x0:ch.x0 + ch.w] = labels[ys, xs]
    return out


@pytest.mark.parametrize(("chunk", "tile", "halo", "batch"),
                         [(128, 128, 16, 3), (96, 96, 0, 1), (128, 256, 16, 1), (96, 288, 0, 2), (64, 192, 24, 1)])
def test_stitched_equals_plain_chunked_definition(tmp_path, photo, scene_tif, model_dir, client, chunk, tile, halo,
                                                  batch):
    """The output equals the plain chunked definition with the TILE as the unit, whatever the storage chunk."""
    ref = plain_chunked_reference(photo, model_dir, tile, halo)
    # the test is only meaningful if every class wins on a good share of pixels
    shares = np.bincount(ref.ravel(), minlength=4) / ref.size
    assert shares.min() > 0.03, shares
    ref_model, _ = check_model(model_dir)
    image = list_images(scene_tif)[0]
    result = segment_image(image, ref_model, str(tmp_path), settings(chunk, halo, tile, batch_size=batch), client)
    assert result.status == "done", result.error
    arr = zarr.open_array(result.output + "/0", mode="r")
    assert arr.chunks == (chunk, chunk)
    got = arr[:]
    agreement = (got == ref).mean()
    assert agreement >= 0.9999, agreement
    assert zarr.open_group(result.output, mode="r").attrs["segpipe"]["tile_size"] == tile


def test_output_contract(tmp_path, scene_tif, model_dir, client, photo):
    ref_model, _ = check_model(model_dir)
    image = list_images(scene_tif)[0]
    result = segment_image(image, ref_model, str(tmp_path), settings(probabilities=True), client)
    assert result.status == "done" and result.output == f"{tmp_path}/scene.zarr"
    g = zarr.open_group(result.output, mode="r")
    a0 = g["0"]
    assert a0.shape == photo.shape[1:] and a0.chunks == (128, 128) and a0.dtype == np.uint8
    assert a0.metadata.dimension_names == ("y", "x")
    probs = g["probabilities"]
    assert probs.shape == (4, *photo.shape[1:]) and probs.dtype == np.uint8
    p = probs[:, :128, :128].astype(int)
    assert np.abs(p.sum(0) - 255).max() <= 4  # probabilities × 255 sum to ~255
    attrs = dict(g.attrs)
    seg = attrs["segpipe"]
    assert seg["status"] == "complete"
    assert seg["source"] == scene_tif and seg["height"] == 433 and seg["width"] == 389
    assert seg["chunk_size"] == 128 and seg["halo"] == 16
    assert seg["model"]["weights_sha256"] == ref_model.sha256 and seg["model"]["architecture"] == "Unet"
    # georeference round trip
    assert "UTM zone 33N" in seg["crs_wkt"] or "32633" in seg["crs_wkt"]
    assert seg["transform"] == [0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0]
    ms = attrs["ome"]["multiscales"][0]
    assert attrs["ome"]["version"] == "0.5" and ms["datasets"][0]["path"] == "0"
    # four classes plus the reserved nodata label, transparent
    assert [c["label-value"] for c in attrs["ome"]["image-label"]["colors"]] == [0, 1, 2, 3, 255]
    assert attrs["ome"]["image-label"]["colors"][-1]["rgba"] == [0, 0, 0, 0]
    assert seg["nodata_label"] == 255 and len(seg["class_colors"]) == 4
    assert seg["settings"]["chunk_size"] == 128 and seg["settings"]["halo"] == 16


def test_rerun_skips_and_resume_computes_only_missing(tmp_path, scene_tif, model_dir, client):
    ref_model, _ = check_model(model_dir)
    image = list_images(scene_tif)[0]
    s = settings()
    first = segment_image(image, ref_model, str(tmp_path), s, client)
    assert first.status == "done" and first.chunks_computed == first.chunks == 16
    full = zarr.open_array(first.output + "/0", mode="r")[:]
    again = segment_image(image, ref_model, str(tmp_path), s, client)
    assert again.status == "skipped" and again.chunks_computed == 0
    # simulate an interrupted run: status back to running, three chunks missing
    g = zarr.open_group(first.output, mode="r+")
    g.attrs["segpipe"] = {**g.attrs["segpipe"], "status": "running"}
    import shutil

    for key in ("0/c/0/0", "0/c/2/1", "0/c/3/3"):
        (tmp_path / "scene.zarr" / key).unlink()
    shutil.rmtree(tmp_path / "scene.zarr" / "1", ignore_errors=True)
    resumed = segment_image(image, ref_model, str(tmp_path), s, client)
    assert resumed.status == "done" and resumed.chunks_computed == 3 and resumed.chunks_resumed == 13
    np.testing.assert_array_equal(zarr.open_array(first.output + "/0", mode="r")[:], full)
    # other settings: a complete output is kept, with one line saying what changed ...
    refused = segment_image(image, ref_model, str(tmp_path), settings(halo=8), client)
    assert refused.status == "failed" and "halo 16 → 8" in refused.error and "--overwrite" in refused.error
    assert "\n" not in refused.error
    np.testing.assert_array_equal(zarr.open_array(first.output + "/0", mode="r")[:], full)
    # ... and replaced only when asked, saying so
    s8 = settings(halo=8)
    s8 = s8.model_copy(update={"output": s8.output.model_copy(update={"overwrite": True})})
    other = segment_image(image, ref_model, str(tmp_path), s8, client)
    assert other.status == "done" and other.chunks_computed == 16, other.error
    assert any("replacing the complete output (halo 16 → 8)" in n for n in other.notes)


def test_tta_and_bf16_run(tmp_path, scene_tif, model_dir, client):
    ref_model, _ = check_model(model_dir)
    image = list_images(scene_tif)[0]
    plain = segment_image(image, ref_model, str(tmp_path / "a"), settings(), client)
    tta = segment_image(image, ref_model, str(tmp_path / "b"), settings(tta=True), client)
    bf16 = segment_image(image, ref_model, str(tmp_path / "c"), settings(precision="bf16"), client)
    a = zarr.open_array(plain.output + "/0", mode="r")[:]
    b = zarr.open_array(tta.output + "/0", mode="r")[:]
    c = zarr.open_array(bf16.output + "/0", mode="r")[:]
    # TTA changes some labels but not most; bf16 agrees with fp32 on the bulk of pixels
    assert 0.5 < (a == b).mean() < 1.0
    assert (a == c).mean() > 0.9


def test_folder_with_good_and_bad_images(tmp_path, photo, model_dir, client):
    from tests.helpers import write_geotiff, write_png

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_geotiff(src / "good.tif", photo[:, :200, :150])
    write_png(src / "sub" / "good2.png", photo[:, :100, :120])
    (src / "empty.tif").write_bytes(b"")
    (src / "text.png").write_text("not a png")
    write_geotiff(src / "gray.tif", photo[:1, :50, :50])
    results = segment_many([str(src)], model_dir, str(tmp_path / "out"), settings(), client)
    by_name = {r.source.rsplit("/", 1)[-1]: r for r in results}
    assert {k: v.status for k, v in by_name.items()} == {
        "good.tif": "done", "good2.png": "done", "empty.tif": "failed", "text.png": "failed", "gray.tif": "failed"}
    assert "is empty (0 bytes)" in by_name["empty.tif"].error
    assert "not an image" in by_name["text.png"].error
    assert "has 1 band(s) but the model expects 3" in by_name["gray.tif"].error
    assert (tmp_path / "out" / "sub" / "good2.zarr" / "zarr.json").exists()
    for bad in ("empty", "text", "gray"):  # no failed image leaves an output marked complete
        assert not (tmp_path / "out" / f"{bad}.zarr").exists()


def test_transient_errors_are_retried_bad_input_is_not(monkeypatch):
    import segpipe.engine.tasks as T
    from segpipe.core.errors import InputError, TransientIOError
    from segpipe.core.retry import RetryPolicy

    calls = []

    def flaky(job, keys, fill):
        calls.append(keys)
        if len(calls) < 3:
            raise TransientIOError("s3://b/x.tif", "read failed (HTTP 503 Slow Down)")
        return {"chunks": 1, "skipped": 0, "megapixels": 0.1}

    monkeypatch.setattr(T, "_run_tiles", flaky)
    job = type("Job", (), {"source": "s3://b/x.tif", "retry": RetryPolicy(backoff=0)})()
    counters = T.run_tiles(job, [((0, 0), [(0, 0)])])
    assert counters["chunks"] == 1 and len(calls) == 3
    assert counters["storage_retries"] == 2 and counters["retried"] == "s3://b/x.tif: read failed (HTTP 503 Slow Down)"

    calls.clear()

    def bad(job, keys, fill):
        calls.append(keys)
        raise InputError("x.tif", "corrupt or truncated image")

    monkeypatch.setattr(T, "_run_tiles", bad)
    # returned, not raised: a raising task makes the Dask worker log a "Compute Failed" traceback
    error = T.run_tiles(job, [((0, 0), [(0, 0)])])["error"]
    assert isinstance(error, InputError) and error.problem == "corrupt or truncated image"
    assert len(calls) == 1


def test_unexpected_error_fails_only_that_image(tmp_path, photo, model_dir, client, monkeypatch):
    import segpipe.engine.segment as P
    from tests.helpers import write_geotiff

    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "a.tif", photo[:, :100, :100])
    write_geotiff(src / "b.tif", photo[:, :120, :100])
    real_prepare = P.prepare_output

    def flaky_prepare(target, attrs, replace=False):
        if target.uri.endswith("a.zarr"):
            raise RuntimeError("a bug")
        return real_prepare(target, attrs, replace)

    monkeypatch.setattr(P, "prepare_output", flaky_prepare)
    results = P.segment_many([str(src)], model_dir, str(tmp_path / "out"), settings(chunk=64), client)
    by = {r.source.rsplit("/", 1)[-1]: r for r in results}
    assert by["a.tif"].status == "failed" and by["a.tif"].error.endswith("unexpected RuntimeError: a bug")
    assert by["b.tif"].status == "done"


@pytest.mark.parametrize(("tile", "pyramid_computes"), [(128, 0), (256, 0), (192, 16)])
def test_level1_from_the_tiles_equals_the_mode_of_level0(tmp_path, scene_tif, model_dir, client, monkeypatch, tile,
                                                         pyramid_computes):
    """Tiles an even number of chunks wide write pyramid level 1 from their labels in memory: it equals
    the 2×2 mode of level 0, and the pyramid pass computes only the level-1 chunks the tiles could not
    (all 16 for a tile 3 chunks wide; after a resume, the one whose tile was incomplete)."""
    from segpipe.engine import pyramid
    from segpipe.engine.pyramid import downsample_mode

    # Dask pickles the task function by value (a closure here), so the spy records to a file
    record = tmp_path / "level1-computed-by-the-pyramid.txt"
    record.write_text("")
    original = pyramid._downsample_batch

    def spy(group_uri, src, dst, reduction, num_classes, keys):
        if dst == "1":
            with open(record, "a") as f:
                f.writelines(f"{k[0]} {k[1]}\n" for k in keys)
        return original(group_uri, src, dst, reduction, num_classes, keys)

    def computed() -> list[tuple[int, int]]:
        return [tuple(int(v) for v in line.split()) for line in record.read_text().splitlines()]

    monkeypatch.setattr(pyramid, "_downsample_batch", spy)
    ref_model, _ = check_model(model_dir)
    image = list_images(scene_tif)[0]
    s = settings(chunk=64, halo=16, tile=tile)
    result = segment_image(image, ref_model, str(tmp_path), s, client)
    assert result.status == "done", result.error
    level0 = zarr.open_array(result.output + "/0", mode="r")[:]
    level1 = zarr.open_array(result.output + "/1", mode="r")
    assert level1.shape == (217, 195) and level1.chunks == (64, 64)
    np.testing.assert_array_equal(level1[:], downsample_mode(level0, 4))
    assert len(computed()) == pyramid_computes
    if tile != 128:
        return
    # an interrupted run: one level-0 chunk and its level-1 chunk missing; the resumed task writes one
    # chunk of that tile, so its level 1 is left to the pyramid pass
    g = zarr.open_group(result.output, mode="r+")
    g.attrs["segpipe"] = {**g.attrs["segpipe"], "status": "running"}
    (tmp_path / "scene.zarr" / "0" / "c" / "2" / "3").unlink()
    (tmp_path / "scene.zarr" / "1" / "c" / "1" / "1").unlink()
    record.write_text("")
    resumed = segment_image(image, ref_model, str(tmp_path), s, client)
    assert resumed.status == "done" and resumed.chunks_computed == 1, resumed.error
    assert computed() == [(1, 1)]
    np.testing.assert_array_equal(zarr.open_array(result.output + "/1", mode="r")[:], level1[:])
