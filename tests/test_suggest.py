"""Per-chunk uncertainty (computed with the labels, stored in the output) and ``segpipe suggest``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from segpipe.core.geometry import ChunkGrid
from segpipe.engine.tiled import TilePlan, infer_tiles, whole_image_work
from segpipe.evaluate.suggest import Candidate, select_regions
from segpipe.io.uncertainty import read_uncertainty, write_uncertainty
from tests.helpers import segment_to_zarr, write_geotiff
from tests.test_tiled import MemoryReader, RecordingSink

# ----------------------------------------------------------------------------- the value of one chunk


def _one_by_one_network(weight: np.ndarray, bias: np.ndarray):
    import torch

    net = torch.nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(weight[:, :, None, None].astype(np.float32)))
        net.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return net.eval()


@pytest.mark.parametrize("tta", [False, True])
def test_chunk_uncertainty_equals_the_entropy_computed_by_hand(tta):
    """Through the real predictor with a 1×1-convolution network (logits = W · pixel/255 + b): each
    chunk's value is the mean over its pixels with data of -Σ p log p / log K, the halo and the
    padding past the image edge excluded; a chunk without data gets none."""
    import torch

    from segpipe.core.settings import InferenceSettings
    from segpipe.engine.predictor import Predictor
    from segpipe.models.artifact import ModelSpec

    rng = np.random.default_rng(3)
    h, w, k = 100, 90, 3
    weight = rng.normal(0, 4, (k, 2))
    bias = np.array([0.3, -0.2, 0.0])
    ramp = np.linspace(0.05, 1.0, w)[None, None, :]  # weak inputs on the left (unsure), strong on the right
    image = (rng.integers(0, 256, (2, h, w)) * ramp).astype(np.uint8)
    valid = np.ones((h, w), bool)
    valid[:32, :32] = False  # chunk (0, 0): no data at all → skipped, no value
    valid[32:50, 40:60] = False  # chunk (1, 1): partly without data → the mean of the rest
    spec = ModelSpec(architecture="Unet", encoder="resnet18", in_channels=2, classes=["a", "b", "c"],
                     mean=[0.0, 0.0], std=[1.0, 1.0], input_scale=255.0)
    predictor = Predictor.from_network(_one_by_one_network(weight, bias), spec,
                                       InferenceSettings(device="cpu", precision="fp32", tta=tta),
                                       torch.device("cpu"))
    plan = TilePlan(h, w, 32, 64, 16)
    stats = infer_tiles(MemoryReader(image, valid), predictor, plan, whole_image_work(plan), RecordingSink(),
                        uncertainty=True)

    logits = np.einsum("kb,byx->kyx", weight, image / 255.0) + bias[:, None, None]
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    entropy = -(p * np.log(p)).sum(0) / math.log(k)
    grid = ChunkGrid(h, w, 32)
    expected = {}
    for c in grid:
        v = valid[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]
        if v.any():
            expected[c.key] = entropy[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w][v].mean()
    assert set(stats.uncertainty) == set(expected) == {c.key for c in grid} - {(0, 0)}
    for key, value in expected.items():
        assert stats.uncertainty[key] == pytest.approx(value, abs=2e-6), key
    # the values spread: a test whose chunks all had one value could not tell them apart
    assert np.ptp(list(expected.values())) > 0.05


# ----------------------------------------------------------------------------- the selection rule


def check_rule(picks: list[Candidate], candidates: list[Candidate], top: int, class_of, classes: int) -> None:
    """What :func:`select_regions` promises: no two picks touch; every region left out that scores higher
    than some pick touches a pick, or its image's or its class's quota was full with better picks."""
    images = len({c.image for c in candidates})
    per_image, per_class = math.ceil(top / images), math.ceil(top / classes)
    assert len(picks) == len(set(picks)) <= top
    for i, a in enumerate(picks):
        assert not any(a.touches(b) for b in picks[i + 1:]), (a, picks)
    assert [p.score for p in picks] == sorted((p.score for p in picks), reverse=True)
    lowest = min(p.score for p in picks)
    for u in candidates:
        if u in picks or u.score <= lowest:
            continue
        better = [p for p in picks if p.score > u.score]
        assert (any(u.touches(p) for p in picks)
                or sum(p.image == u.image for p in better) >= per_image
                or sum(class_of(p) == class_of(u) for p in better) >= per_class), u
    # and nothing could be added: every region left out touches a pick (or top is reached)
    if len(picks) < top:
        assert all(u in picks or any(u.touches(p) for p in picks) for u in candidates)


@pytest.mark.parametrize("seed,top", [(0, 8), (1, 12), (2, 30), (3, 200)])
def test_selection_rule(seed, top):
    rng = np.random.default_rng(seed)
    shapes = [(6, 7), (3, 4), (9, 5)]
    candidates = [Candidate(i, y, x, float(rng.random())) for i, (r, c) in enumerate(shapes)
                  for y in range(r) for x in range(c)]
    # one image far more uncertain than the others, one class more frequent: quotas must act
    candidates = [Candidate(c.image, c.iy, c.ix, c.score + (1.0 if c.image == 0 else 0.0)) for c in candidates]
    classes = {c: "abc"[int(rng.integers(0, 3))] if rng.random() < 0.5 else "a" for c in candidates}
    picks = select_regions(candidates, top, classes.__getitem__, 3)
    check_rule(picks, candidates, top, classes.__getitem__, 3)
    assert len({p.image for p in picks}) == 3  # spread over the images despite image 0's scores


def test_selection_without_quotas_is_the_best_non_touching():
    """One image, one class: the picks are the greedy best regions, each one's neighbours suppressed."""
    scores = np.array([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6], [0.3, 0.5, 0.4]])
    candidates = [Candidate(0, y, x, float(scores[y, x])) for y in range(3) for x in range(3)]
    picks = select_regions(candidates, 3, lambda c: "a", 1)
    assert [(p.iy, p.ix) for p in picks] == [(0, 0), (1, 2), (2, 0)]  # (0,1), (1,0), (1,1) touch (0,0)
    assert [p.score for p in select_regions(candidates, 9, lambda c: "a", 1)] == [0.9, 0.6, 0.3]


# ----------------------------------------------------------------------------- stored in the output


def _settings(**kw):
    from segpipe.core.settings import segment_settings

    return segment_settings(**{"chunk_size": 128, "halo": 16, "device": "cpu", "precision": "fp32", **kw})


@pytest.mark.slow
def test_segment_stores_uncertainty_nan_where_not_computed_and_resume_keeps_it(tmp_path, photo, model_dir, client):
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images

    image = photo.copy()
    image[:, :200, :150] = 0  # nodata: chunk (0, 0) of 128² has no data at all, its neighbours some
    tif = write_geotiff(tmp_path / "nd.tif", image, nodata=0)
    ref, _ = check_model(model_dir)
    src = list_images(str(tif))[0]
    first = segment_image(src, ref, str(tmp_path / "out"), _settings(), client)
    assert first.status == "done" and first.chunks_skipped == 1, first.error
    u = read_uncertainty(first.output)
    assert u.shape == (4, 4) and u.dtype == np.float32
    assert np.isnan(u).tolist() == [[True] + [False] * 3] + [[False] * 4] * 3
    finite = u[np.isfinite(u)]
    assert ((finite > 0) & (finite <= 1)).all()
    seg = zarr.open_group(first.output, mode="r").attrs["segpipe"]
    assert seg["uncertainty"]["array"] == "uncertainty" and seg["uncertainty"]["measure"] == "normalised_entropy"

    # an interrupted run: two chunks missing (and their values never stored), the others' values known
    out = Path(first.output)
    sentinel = np.arange(16, dtype=np.float32).reshape(4, 4) / 100 + 0.005
    sentinel[0, 0] = np.nan
    sentinel[2, 1] = sentinel[3, 3] = np.nan
    write_uncertainty(first.output, sentinel, 128)
    for key in ("0/c/2/1", "0/c/3/3"):
        (out / key).unlink()
    shutil.rmtree(out / "1", ignore_errors=True)
    g = zarr.open_group(first.output, mode="r+")
    g.attrs["segpipe"] = {**g.attrs["segpipe"], "status": "running"}
    resumed = segment_image(src, ref, str(tmp_path / "out"), _settings(), client)
    assert resumed.status == "done" and resumed.chunks_computed == 2 and resumed.chunks_resumed == 14
    u2 = read_uncertainty(first.output)
    kept = np.isfinite(sentinel)
    np.testing.assert_array_equal(u2[kept], sentinel[kept])  # resumed chunks keep the stored values
    np.testing.assert_allclose(u2[[2, 3], [1, 3]], u[[2, 3], [1, 3]], rtol=1e-6)  # recomputed: the same
    assert np.isnan(u2[0, 0])


# ----------------------------------------------------------------------------- segpipe suggest


@pytest.fixture(scope="module")
def scored_output(tmp_path_factory, scene_tif, model_dir, client) -> str:
    """A segmented georeferenced output (7 × 7 chunks of 64²) whose uncertainty the tests then set."""
    return segment_to_zarr(scene_tif, model_dir, tmp_path_factory.mktemp("scored"), client, chunk=64, halo=16)


def _copy_with_scores(src: str, dst: Path, seed: int) -> tuple[str, np.ndarray]:
    shutil.copytree(src, dst)
    scores = np.random.default_rng(seed).permutation(49).reshape(7, 7).astype(np.float32) / 49 + seed / 1000
    scores[6, 6] = np.nan  # a chunk without a value is never suggested
    write_uncertainty(str(dst), scores, 64)
    return str(dst), scores


def _majority(uri: str, iy: int, ix: int) -> str:
    g = zarr.open_group(uri, mode="r")
    block = g["0"][iy * 64:(iy + 1) * 64, ix * 64:(ix + 1) * 64].ravel()
    block = block[block != 255]
    return g.attrs["segpipe"]["classes"][int(np.bincount(block).argmax())]


def _suggest(*args: str):
    from segpipe.cli.main import main

    return CliRunner().invoke(main, ["suggest", *args])


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_suggest_picks_the_most_uncertain_regions_as_a_geopackage_in_the_output_crs(tmp_path, scored_output):
    import pyogrio
    import shapely
    from rasterio.crs import CRS

    a, sa = _copy_with_scores(scored_output, tmp_path / "a.zarr", 1)
    b, sb = _copy_with_scores(scored_output, tmp_path / "b.zarr", 2)
    top = 9
    r = _suggest(a, b, "--top", str(top), "--out", str(tmp_path / "s.gpkg"))
    assert r.exit_code == 0, r.output + r.stderr
    info = pyogrio.read_info(tmp_path / "s.gpkg", layer="suggestions")
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32633) and info["features"] == top
    meta, _, geoms, fields = pyogrio.raw.read(tmp_path / "s.gpkg", layer="suggestions")
    props = dict(zip(meta["fields"], fields))
    assert {"image", "score", "rank", "class"} <= set(props)
    assert list(props["rank"]) == list(range(1, top + 1))
    # which chunk each polygon is: invert the output's transform (0.5 m pixels from (500000, 4100000))
    scores = {a: sa, b: sb}
    picks = []
    for poly, out, score in zip(shapely.from_wkb(geoms), props["output"], props["score"]):
        x0, y0, x1, y1 = poly.bounds
        ix, iy = round((x0 - 500000.0) / 0.5 / 64), round((4100000.0 - y1) / 0.5 / 64)
        assert (x1 - x0, y1 - y0) == (32.0, 32.0) or ix == 6 or iy == 6  # 64 px at 0.5 m; edge chunks smaller
        picks.append(Candidate([a, b].index(out), iy, ix, float(scores[out][iy, ix])))
        assert score == pytest.approx(scores[out][iy, ix])
    classes = {0: {}, 1: {}}

    def class_of(c: Candidate) -> str:
        uri = [a, b][c.image]
        if (c.iy, c.ix) not in classes[c.image]:
            classes[c.image][c.iy, c.ix] = _majority(uri, c.iy, c.ix)
        return classes[c.image][c.iy, c.ix]

    for cls, p in zip(props["class"], picks):
        assert cls == class_of(p)
    candidates = [Candidate(i, y, x, float(s[y, x])) for i, s in enumerate((sa, sb))
                  for y in range(7) for x in range(7) if np.isfinite(s[y, x])]
    check_rule(picks, candidates, top, class_of, 4)
    assert {p.image for p in picks} == {0, 1}
    # the best region of all is always the first
    best = max(candidates, key=lambda c: c.score)
    assert picks[0] == best


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["geojson", "shp", "fgb", "parquet"])
def test_suggest_formats_by_extension(tmp_path, scored_output, ext):
    import pyarrow.parquet as pq
    import pyogrio

    a, _ = _copy_with_scores(scored_output, tmp_path / "a.zarr", 1)
    path = tmp_path / f"s.{ext}"
    r = _suggest(a, "--top", "4", "--out", str(path))
    assert r.exit_code == 0, r.stderr
    if ext == "parquet":
        table = pq.read_table(path)
        assert table.num_rows == 4 and table.column("rank").to_pylist() == [1, 2, 3, 4]
        geo = json.loads(table.schema.metadata[b"geo"])
        assert geo["columns"]["geometry"]["crs"]["id"]["code"] == 32633
    else:
        assert pyogrio.read_info(path)["features"] == 4


def _slide_copy_with_scores(scored_output, dest):
    """A scored copy of the output recorded as segmented at level 1 of a slide whose level 0 is 4× larger
    (1 µm pixels, no CRS): (uri, scores)."""
    c, sc = _copy_with_scores(scored_output, dest, 3)
    g = zarr.open_group(c, mode="r+")
    seg = {k: v for k, v in g.attrs["segpipe"].items() if k not in ("crs_wkt", "transform")}
    seg.update(mpp=1.0, reader={"driver": "openslide", "level": 1},
               grid={"height": 433, "width": 389, "level0": [433 * 4, 389 * 4], "scale": 4.0, "mpp": 1.0})
    g.attrs["segpipe"] = seg
    return c, sc


@pytest.mark.slow
def test_suggest_for_a_slide_writes_qupath_rectangles_in_level0_pixels(tmp_path, scored_output):
    c, sc = _slide_copy_with_scores(scored_output, tmp_path / "slide.zarr")
    r = _suggest(c, "--top", "3", "--out", str(tmp_path / "s.geojson"))
    assert r.exit_code == 0, r.stderr
    doc = json.loads((tmp_path / "s.geojson").read_text())
    assert "crs" not in doc and len(doc["features"]) == 3
    first = doc["features"][0]
    assert first["properties"]["objectType"] == "annotation" and first["properties"]["rank"] == 1
    iy, ix = np.unravel_index(np.nanargmax(sc), sc.shape)
    x0, y0 = ix * 64 * 4, iy * 64 * 4
    x1, y1 = min((ix + 1) * 64, 389) * 4, min((iy + 1) * 64, 433) * 4
    assert first["geometry"]["type"] == "Polygon"
    ring = first["geometry"]["coordinates"][0]
    assert {tuple(p) for p in ring} == {(x0, y0), (x1, y0), (x1, y1), (x0, y1)}
    assert first["properties"]["score"] == pytest.approx(float(sc[iy, ix]))
    # a slide and a georeferenced output cannot share one file
    a, _ = _copy_with_scores(scored_output, tmp_path / "a.zarr", 1)
    r = _suggest(a, c, "--out", str(tmp_path / "mixed.gpkg"))
    assert r.exit_code == 2 and len(_errors(r.stderr)) == 1 and "georeferenced" in r.stderr


@pytest.mark.slow
def test_suggest_bad_inputs_give_one_line(tmp_path, scored_output):
    a, _ = _copy_with_scores(scored_output, tmp_path / "a.zarr", 1)
    old = tmp_path / "old.zarr"
    shutil.copytree(scored_output, old)
    shutil.rmtree(old / "uncertainty")  # written before segment stored uncertainty
    r = _suggest(str(old), "--out", str(tmp_path / "s.gpkg"))
    assert r.exit_code == 2 and _errors(r.stderr) == [r.stderr.strip()]
    assert f"{old}: has no uncertainty array" in r.stderr and "re-run `segpipe segment`" in r.stderr
    assert "--overwrite" in r.stderr and "Traceback" not in r.output + r.stderr
    # a folder: outputs without uncertainty are left out with a note, the others ranked
    r = _suggest(str(tmp_path), "--top", "2", "--out", str(tmp_path / "f.gpkg"))
    assert r.exit_code == 0 and "note:" in r.stderr and "old.zarr" in r.stderr, r.stderr
    assert "suggestions: 2 region(s)" in r.output
    for args, words in [
        ([str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "s.gpkg")], "does not exist"),
        ([a, "--out", str(tmp_path / "s.txt")], "unknown vector format '.txt'"),
        ([a, "--top", "0", "--out", str(tmp_path / "s.gpkg")], "--top: must be at least 1"),
    ]:
        r = _suggest(*args)
        assert r.exit_code == 2 and len(_errors(r.stderr)) == 1 and words in r.stderr, (args, r.stderr)
    g = zarr.open_group(a, mode="r+")
    g.attrs["segpipe"] = {**g.attrs["segpipe"], "status": "running"}
    r = _suggest(a, "--out", str(tmp_path / "s.gpkg"))
    assert r.exit_code == 2 and "is not finished" in r.stderr and len(_errors(r.stderr)) == 1


# ----------------------------------------------------------------------------- bounded memory, fewer, units


@pytest.mark.parametrize("seed", range(6))
def test_streaming_best_candidates_pick_what_a_full_sort_picks(seed):
    """The bounded heap keeps only scan_limit(top) chunks of all the outputs, and the picks are those of
    the full candidate list (ties broken alike: scores are rounded to make many)."""
    from segpipe.evaluate.suggest import best_candidates, scan_limit

    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(int(rng.integers(5, 40))):
        a = np.round(rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))), 2).astype(np.float32)
        a[rng.random(a.shape) < 0.2] = np.nan
        arrays.append(a)
    top = int(rng.integers(1, 30))
    everything = [Candidate(i, int(y), int(x), float(a[y, x])) for i, a in enumerate(arrays)
                  for y, x in zip(*np.nonzero(np.isfinite(a)))]
    kept, total = best_candidates(enumerate(arrays), scan_limit(top))
    assert total == len(everything) and len(kept) == min(total, scan_limit(top))
    classes = {c: "abc"[(c.iy * 7 + c.ix + c.image) % 3] for c in everything}
    assert select_regions(kept, top, classes.__getitem__, 3) == select_regions(everything, top,
                                                                                classes.__getitem__, 3)
    small, _ = best_candidates(enumerate(arrays), 50)
    order = sorted(everything, key=lambda c: (-c.score, c.image, c.iy, c.ix))
    assert sorted(small, key=lambda c: (-c.score, c.image, c.iy, c.ix)) == order[:50]


@pytest.mark.slow
def test_suggest_keeps_a_bounded_number_of_candidates(tmp_path, scored_output, monkeypatch):
    """One Python object per chunk of every output was held to keep a top 20: the memory grew with the
    outputs. Now at most scan_limit(top) candidates exist at once, whatever the number of outputs."""
    import segpipe.evaluate.suggest as S

    for i in range(4):
        _copy_with_scores(scored_output, tmp_path / f"o{i}.zarr", i + 1)  # 4 × 48 chunks with a value
    made = []

    class Counted(Candidate):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(1)

    monkeypatch.setattr(S, "Candidate", Counted)
    monkeypatch.setattr(S, "scan_limit", lambda top: 12)
    regions = S.suggest_regions([str(tmp_path)], top=3)
    assert len(regions) == 3 and len(made) <= 12, len(made)


@pytest.mark.slow
def test_suggest_says_why_it_returns_fewer_than_top_and_prints_the_files_units(tmp_path, scored_output):
    a, sa = _copy_with_scores(scored_output, tmp_path / "a.zarr", 1)
    r = _suggest(a, "--top", "60", "--out", str(tmp_path / "s.gpkg"))
    assert r.exit_code == 0, r.stderr
    found = sum(1 for line in r.output.splitlines() if line[:3].strip().isdigit())  # 7 × 7 chunks: ≤ 16 apart
    assert found <= 16 and f"note: {found} region(s) instead of --top 60: the 1 output(s) ranked have 48 chunk(s) " \
                           "with an uncertainty value in all" in r.stderr, r.stderr
    r = _suggest(a, "--top", "20", "--out", str(tmp_path / "s.gpkg"))
    assert (f"note: {found} region(s) instead of --top 20: the other {48 - found} chunk(s) with a value each touch "
            "a picked region") in r.stderr, r.stderr
    # georeferenced: the map coordinates of the file, with its CRS (0.5 m pixels from (500000, 4100000))
    iy, ix = np.unravel_index(np.nanargmax(sa), sa.shape)
    x0, y1 = 500000.0 + ix * 32.0, 4100000.0 - iy * 32.0
    first = next(line for line in r.output.splitlines() if line.startswith("  1 "))
    assert first.endswith(f"x {x0:.2f}–{min(x0 + 32.0, 500000.0 + 389 * 0.5):.2f}, "
                          f"y {max(y1 - 32.0, 4100000.0 - 433 * 0.5):.2f}–{y1:.2f} (EPSG:32633)"), first
    # a slide segmented at level 1 (4× smaller than level 0, 1 µm pixels): level-0 pixels and µm
    c, sc = _slide_copy_with_scores(scored_output, tmp_path / "slide.zarr")
    r = _suggest(c, "--top", "1", "--out", str(tmp_path / "s.geojson"))
    assert r.exit_code == 0, r.stderr
    iy, ix = np.unravel_index(np.nanargmax(sc), sc.shape)
    x0, y0 = ix * 64 * 4, iy * 64 * 4
    x1, y1 = min((ix + 1) * 64, 389) * 4, min((iy + 1) * 64, 433) * 4
    first = next(line for line in r.output.splitlines() if line.startswith("  1 "))
    assert first.endswith(f"level-0 px x {x0}–{x1}, y {y0}–{y1} (µm x {x0 / 4:.1f}–{x1 / 4:.1f}, "
                          f"y {y0 / 4:.1f}–{y1 / 4:.1f})"), first
