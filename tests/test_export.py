"""Exports: COG (valid, georeferenced, pixel-exact), vectors (exact areas, merged across seams), preview, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from skimage.measure import label as connected_components

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.geometry import ChunkGrid
from segpipe.engine.pyramid import build_pyramid
from segpipe.export import (
    export_cog,
    export_confidence,
    export_preview,
    export_vectors,
    read_output_meta,
)
from segpipe.export.preview import preview_shape
from segpipe.export.vectors import sieve_block
from segpipe.io.output import FORMAT, OutputTarget, finalize, ome_attrs, prepare_output, write_chunk

UTM33 = CRS.from_epsg(32633).to_wkt()
TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 5000000.0)
CLASSES = ["background", "building", "tree", "water"]
COLORS = ["#000000", "#ff0000", "#00ff00", "#0000ff"]


def scene(h: int = 1000, w: int = 1300, seed: int = 0) -> np.ndarray:
    """Class ids with a large ring-shaped building across many chunks, trees crossing seams, water specks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    labels = np.zeros((h, w), np.uint8)
    # one big building: a thick ring (hole in the middle) spanning chunk rows/cols 0..3
    r = np.hypot(yy - 400, xx - 520)
    labels[(r > 120) & (r < 330)] = 1
    # trees: discs on a grid, many straddling the 256-pixel seams
    for cy in range(30, h, 97):
        for cx in range(40, w, 89):
            if r[cy, cx] < 340:
                continue
            rad = rng.integers(4, 30)
            labels[np.hypot(yy - cy, xx - cx) < rad] = 2
    # water specks of 1–6 pixels
    for _ in range(300):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        if 110 < r[y, x] < 340:  # keep the ring solid: its only hole is the middle
            continue
        labels[y : y + rng.integers(1, 3), x : x + rng.integers(1, 4)] = 3
    # two buildings touching only at a corner where four chunks meet, (768, 1024): must stay 2 polygons
    labels[740:800, 990:1060] = 0
    labels[756:768, 1012:1024] = 1
    labels[768:780, 1024:1036] = 1
    return labels


def make_output(path, labels: np.ndarray, *, chunk: int = 256, georef: bool = True, probabilities=None,
                source: str | None = None, nodata: int | None = 255, reader: dict | None = None,
                ome_colors: list[str] | None = None, complete: bool = True) -> str:
    """A small output written through the output module, as the pipeline writes one.

    :func:`segpipe.io.output.prepare_output` creates the arrays (fill value = nodata label,
    zstd, the chunk grid), :func:`~segpipe.io.output.write_chunk` writes each chunk and
    :func:`~segpipe.io.output.finalize` marks it complete (``complete=False`` leaves it
    running). The root attributes are the pipeline's keys (``ome`` from
    :func:`~segpipe.io.output.ome_attrs`); ``ome_colors`` gives the NGFF ``image-label``
    colours other than ``segpipe.class_colors``. ``nodata=None`` leaves out ``segpipe.nodata_label``
    and the nodata entries of ``image-label``, like an output from before the nodata label existed.
    """
    h, w = labels.shape
    target = OutputTarget(str(path), h, w, chunk, len(CLASSES), probabilities is not None, uuid.uuid4().hex)
    assert nodata in (None, target.nodata_label)
    ome = ome_attrs("scene", CLASSES, ome_colors or COLORS, None)
    if nodata is None:
        for key in ("colors", "properties"):
            ome["image-label"][key] = [e for e in ome["image-label"][key] if e["label-value"] < len(CLASSES)]
    seg = {
        "format": FORMAT, "source": source or "scene.tif", "height": h, "width": w, "chunk_size": chunk,
        "tile_size": chunk, "halo": 16, "classes": CLASSES, "class_colors": COLORS,
        "crs_wkt": UTM33 if georef else None, "transform": list(TRANSFORM) if georef else None,
        "mpp": None, "run_id": target.run_id, "status": "running",
        **({"nodata_label": nodata} if nodata is not None else {}),
        **({"reader": reader} if reader is not None else {}),
    }
    prepare_output(target, {"ome": ome, "segpipe": seg})
    grid = ChunkGrid(h, w, chunk)
    for c in grid:
        ys, xs = slice(c.y0, c.y0 + c.h), slice(c.x0, c.x0 + c.w)
        write_chunk(target, c, labels[ys, xs], None if probabilities is None else probabilities[:, ys, xs])
    if complete:
        finalize(str(path), {"segpipe": {"chunks": len(grid)}})
    return str(path)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return scene()


@pytest.fixture(scope="module")
def output(tmp_path_factory, labels) -> str:
    # NGFF image-label colours other than segpipe.class_colors: the exports must take the latter
    return make_output(tmp_path_factory.mktemp("out") / "scene.zarr", labels, ome_colors=["#090909"] * 4)


# ----------------------------------------------------------------------------- COG


def assert_valid_cog(path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            assert ds.driver == "GTiff"
            assert ds.profile["tiled"] and ds.profile["blockxsize"] == 512
            assert ds.overviews(1), "a COG of this size needs overviews"
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


def test_cog_is_valid_georeferenced_and_pixel_exact(output, labels, tmp_path) -> None:
    path = export_cog(output, str(tmp_path / "scene.tif"))
    assert_valid_cog(path)
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4]
        assert ds.crs == CRS.from_wkt(UTM33)
        assert tuple(ds.transform)[:6] == TRANSFORM
        np.testing.assert_array_equal(ds.read(1), labels)
        assert ds.colormap(1)[1] == (255, 0, 0, 255)  # segpipe.class_colors win over image-label colours
        assert ds.nodata == 255 and ds.colormap(1)[255] == (0, 0, 0, 0)  # the nodata label: NoData, transparent
        assert json.loads(ds.tags()["CLASSES"]) == CLASSES
        assert ds.tags(1)["CLASS_3"] == "water"
        assert ds.descriptions == ("class_id",)
        # overviews are class ids (mode), never averages
        assert set(np.unique(ds.read(1, out_shape=(250, 325)))) <= {0, 1, 2, 3}
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_cog_of_a_pyramid_level_scales_the_transform(tmp_path, labels) -> None:
    uri = make_output(tmp_path / "lvl.zarr", labels)
    build_pyramid(uri, num_classes=4)
    path = export_cog(uri, str(tmp_path / "lvl1.tif"), level="1")
    with rasterio.open(path) as ds:
        assert tuple(ds.transform)[:6] == (1.0, 0.0, 500000.0, 0.0, -1.0, 5000000.0)
        np.testing.assert_array_equal(ds.read(1), zarr.open_group(uri)["1"][:])
    with pytest.raises(InputError, match="no level '9'"):
        export_cog(uri, str(tmp_path / "x.tif"), level="9")


def test_cog_without_georeference(tmp_path, labels) -> None:
    uri = make_output(tmp_path / "plain.zarr", labels, georef=False)
    path = export_cog(uri, str(tmp_path / "plain.tif"))
    assert_valid_cog(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            assert ds.crs is None
            assert ds.transform.is_identity
            np.testing.assert_array_equal(ds.read(1), labels)


def test_confidence_cog_is_max_probability(tmp_path, labels) -> None:
    rng = np.random.default_rng(1)
    probs = rng.integers(0, 256, (3, 600, 700)).astype(np.uint8)
    uri = make_output(tmp_path / "p.zarr", labels[:600, :700], probabilities=probs)
    path = export_confidence(uri, str(tmp_path / "conf.tif"))
    assert_valid_cog(path)
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(ds.read(1), probs.max(axis=0))
        assert ds.scales == (pytest.approx(1 / 255),)
        assert ds.crs == CRS.from_wkt(UTM33)
    with pytest.raises(InputError, match="--probabilities"):
        export_confidence(make_output(tmp_path / "np.zarr", labels), str(tmp_path / "c.tif"))


def test_unfinished_output_is_refused(tmp_path, labels) -> None:
    uri = make_output(tmp_path / "run.zarr", labels[:64, :64], complete=False)  # prepared, never finalized
    assert zarr.open_group(uri, mode="r").attrs["segpipe"]["status"] == "running"
    with pytest.raises(InputError, match="not finished"):
        export_cog(uri, str(tmp_path / "r.tif"))
    with pytest.raises(InputError, match="not a segpipe output"):
        read_output_meta(str(tmp_path / "missing.zarr"))


@pytest.mark.slow
def test_exports_of_a_pipeline_output(tmp_path, scene_tif, model_dir, client) -> None:
    """An output made by segment_image (not by hand): the exports read exactly what the pipeline wrote."""
    from PIL import Image

    from segpipe.core.classes import class_colors, parse_color
    from segpipe.core.settings import segment_settings
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images
    from segpipe.models.artifact import load_artifact

    ref, _ = check_model(model_dir)
    settings = segment_settings(chunk_size=64, halo=16, precision="fp32", device="cpu")
    r = segment_image(list_images(scene_tif)[0], ref, str(tmp_path / "out"), settings, client)
    assert r.status == "done", r.error
    labels = zarr.open_array(r.output + "/0", mode="r")[:]
    classes = load_artifact(model_dir).spec.classes
    assert len(np.unique(labels)) >= 3  # the model really segments: every export below has content

    meta = read_output_meta(r.output)
    assert meta.classes == tuple(classes) and meta.nodata == 255 and meta.source == scene_tif
    with rasterio.open(scene_tif) as src:
        scene_crs, scene_transform, shape = src.crs, src.transform, (src.height, src.width)
    assert labels.shape == shape

    path = export_cog(r.output, str(tmp_path / "mask.tif"))
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(ds.read(1), labels)
        assert ds.crs == scene_crs and ds.transform == scene_transform
        assert ds.nodata == 255 and json.loads(ds.tags()["CLASSES"]) == classes
        for i, color in enumerate(class_colors(len(classes))):
            assert ds.colormap(1)[i] == parse_color(color)

    n = export_vectors(r.output, str(tmp_path / "mask.gpkg"))
    meta_v, geoms, fields = read_vectors(str(tmp_path / "mask.gpkg"))
    assert len(geoms) == n and CRS.from_user_input(meta_v["crs"]) == scene_crs
    burned = rasterize(zip(geoms, fields["class_id"].tolist()), out_shape=labels.shape, transform=scene_transform,
                       fill=255, dtype="uint8")
    np.testing.assert_array_equal(burned, labels)
    assert {k: int((fields["class_id"] == k).sum()) for k in np.unique(fields["class_id"])} == \
        component_counts(labels)

    png = export_preview(r.output, str(tmp_path / "p.png"), max_size=200)
    ph, pw = preview_shape(*labels.shape, 200)
    assert max(ph, pw) == 200 and np.asarray(Image.open(png)).shape[1:] == (pw, 4)


# ----------------------------------------------------------------------------- vectors


def read_vectors(path: str):
    from pyogrio.raw import read

    meta, _, wkb, fields = read(path)
    import shapely

    names = list(meta["fields"])
    return meta, shapely.from_wkb(wkb), {n: fields[i] for i, n in enumerate(names)}


def component_counts(labels: np.ndarray) -> dict[int, int]:
    return {int(k): int(connected_components(labels == k, connectivity=1).max()) for k in np.unique(labels)}


def test_vectors_are_exact_and_merged_across_chunks(output, labels, tmp_path) -> None:
    path = str(tmp_path / "scene.gpkg")
    n = export_vectors(output, path)
    meta, geoms, fields = read_vectors(path)
    assert len(geoms) == n
    assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(32633)
    assert list(meta["fields"]) == ["class_id", "class_name", "area"]
    ids = fields["class_id"]
    # one polygon per 4-connected region: nothing is cut at the 256-pixel chunk seams
    assert {k: int((ids == k).sum()) for k in np.unique(ids)} == component_counts(labels)
    assert (ids == 1).sum() == 3  # the ring (crossing 4×4 chunks) + the two corner-touching squares
    ring = geoms[(ids == 1) & (fields["area"] > 1000)]
    assert len(ring) == 1 and len(ring[0].interiors) == 1
    # areas: pixel count × 0.25 m²
    for k in range(4):
        total = fields["area"][ids == k].sum()
        assert total == pytest.approx((labels == k).sum() * 0.25, rel=1e-6)
    assert set(fields["class_name"][ids == 2]) == {"tree"}
    # burning the polygons back gives the raster exactly
    burned = rasterize(zip(geoms, ids.tolist()), out_shape=labels.shape, transform=Affine(*TRANSFORM),
                       fill=255, dtype="uint8")
    np.testing.assert_array_equal(burned, labels)


def test_vectors_tiled_equal_one_block(output, labels, tmp_path) -> None:
    """The invariant: blocks of 256 (and uneven 300) give the same polygons as one whole-image block."""
    import shapely

    results = []
    for block in (256, 300, 2048):
        path = str(tmp_path / f"b{block}.gpkg")
        export_vectors(output, path, block_size=block, classes=[1, 2])
        _, geoms, fields = read_vectors(path)
        bounds = shapely.bounds(geoms)
        order = np.lexsort((bounds[:, 1], bounds[:, 0], fields["area"], fields["class_id"]))
        results.append((fields["class_id"][order], shapely.normalize(geoms[order])))
    ids0, geoms0 = results[-1]
    for ids, geoms in results[:-1]:
        np.testing.assert_array_equal(ids, ids0)
        assert all(a.equals(b) for a, b in zip(geoms, geoms0))


def test_vectors_pixel_coordinates_geojson_and_min_area(tmp_path, labels) -> None:
    uri = make_output(tmp_path / "plain.zarr", labels, georef=False)
    path = str(tmp_path / "plain.geojson")
    export_vectors(uri, path, classes=[1, 2, 3])
    meta, geoms, fields = read_vectors(path)
    assert "EPSG:32633" not in str(meta["crs"])  # GDAL reports any crs-less GeoJSON as EPSG:4326
    export_vectors(uri, str(tmp_path / "plain.gpkg"), classes=[1])
    assert read_vectors(str(tmp_path / "plain.gpkg"))[0]["crs"] is None  # GeoPackage: undefined SRS
    xmin, ymin, xmax, ymax = np.array([g.bounds for g in geoms]).T
    assert xmin.min() >= 0 and ymin.min() >= 0 and xmax.max() <= 1300 and ymax.max() <= 1000
    for k in (1, 2, 3):
        assert fields["area"][fields["class_id"] == k].sum() == pytest.approx((labels == k).sum(), rel=1e-6)
    assert 0 not in set(fields["class_id"])
    # min_area in pixels² here: drops all specks (≤ 6 px) but keeps the trees (≥ 37 px)
    export_vectors(uri, str(tmp_path / "big.geojson"), classes=[2, 3], min_area=10)
    _, _, big = read_vectors(str(tmp_path / "big.geojson"))
    assert set(big["class_id"]) == {2} and (big["area"] >= 10).all()
    assert (big["class_id"] == 2).sum() == (fields["class_id"] == 2).sum()


def test_vectors_bad_extension_and_empty_result(output, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown vector format '\.kml'; use one of \.gpkg, \.geojson, .*\.parquet"):
        export_vectors(output, str(tmp_path / "x.kml"))
    uri = make_output(tmp_path / "empty.zarr", np.zeros((100, 100), np.uint8))
    assert export_vectors(uri, str(tmp_path / "e.gpkg"), classes=[1]) == 0
    _, geoms, _ = read_vectors(str(tmp_path / "e.gpkg"))
    assert len(geoms) == 0


def test_sieve_per_block_removes_what_a_whole_image_sieve_removes(tmp_path) -> None:
    from rasterio.features import sieve

    rng = np.random.default_rng(3)
    labels = np.zeros((300, 340), np.uint8)
    labels[40:200, 30:250] = 1  # a large region across seams (64-pixel blocks)
    for _ in range(80):  # specks of 1–4 pixels inside and outside it, some on seams
        y, x = rng.integers(0, 298), rng.integers(0, 338)
        labels[y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = 2
    whole = sieve(labels, size=5, connectivity=4)
    read = lambda y0, x0, h, w: labels[y0 : y0 + h, x0 : x0 + w]  # noqa: E731
    tiled = np.zeros_like(labels)
    for y0 in range(0, 300, 64):
        for x0 in range(0, 340, 64):
            h, w = min(64, 300 - y0), min(64, 340 - x0)
            tiled[y0 : y0 + h, x0 : x0 + w] = sieve_block(read, 300, 340, y0, x0, h, w, 5)
    assert (labels == 2).any() and not (whole == 2).any()
    np.testing.assert_array_equal(tiled, whole)  # single-neighbour specks: exact
    uri = make_output(tmp_path / "s.zarr", labels, chunk=64)
    export_vectors(uri, str(tmp_path / "s.gpkg"), sieve=5)
    _, _, fields = read_vectors(str(tmp_path / "s.gpkg"))
    assert 2 not in set(fields["class_id"])


# ----------------------------------------------------------------------------- preview


def test_preview_sizes_and_colours(output, labels, tmp_path) -> None:
    from PIL import Image

    assert preview_shape(1000, 1300, 1024) == (788, 1024)
    assert preview_shape(100, 50, 1024) == (100, 50)
    path = export_preview(output, str(tmp_path / "p.png"), max_size=400)  # source "scene.tif" is missing
    full = np.asarray(Image.open(path))
    assert full.shape[0] > 308 and full.shape[1:] == (400, 4)  # the map, then the legend below it
    image = full[:308, :, :3]
    assert (full[:308, :, 3] == 255).all()  # no nodata in this scene: opaque
    # no source: pure class colours; the ring centre-right is building red, the hole background black
    assert tuple(image[int(400 * 0.308), int(520 * 0.308 + 70)]) == (255, 0, 0)
    assert tuple(image[int(400 * 0.308), int(520 * 0.308)]) == (0, 0, 0)


def test_preview_blends_over_the_source_and_uses_the_pyramid(tmp_path, labels) -> None:
    from PIL import Image

    src = str(tmp_path / "scene.tif")
    with rasterio.open(src, "w", driver="GTiff", height=1000, width=1300, count=3, dtype="uint8",
                       crs=UTM33, transform=Affine(*TRANSFORM), tiled=True) as ds:
        ds.write(np.full((3, 1000, 1300), 200, np.uint8))
    uri = make_output(tmp_path / "blend.zarr", labels, source=src)
    build_pyramid(uri, num_classes=4)
    zarr.open_group(uri)["0"][:] = 3  # spoil level 0: the preview must come from level 2 (250×325)
    path = export_preview(uri, str(tmp_path / "b.png"), max_size=300, alpha=0.5)
    full = np.asarray(Image.open(path)).astype(int)
    assert full.shape[1:] == (300, 4)
    image = full[:231, :, :3]
    y, x = int(400 * 0.231), int(520 * 0.231 + 60)
    assert np.abs(image[y, x] - (228, 100, 100)).max() <= 1  # 0.5·200 + 0.5·(255, 0, 0)
    assert np.abs(image[y, int(520 * 0.231)] - (100, 100, 100)).max() <= 1  # over black background
    with pytest.raises(ConfigError):
        export_preview(uri, str(tmp_path / "c.png"), alpha=2.0)


# ----------------------------------------------------------------------------- memory

_MEMORY_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import segpipe.export as export

    def vm(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    warmup, uri, out = sys.argv[1:4]
    # warm up on a small output so library initialisation (GDAL drivers, sqlite, PIL) is not counted
    export.export_cog(warmup, out + "/w.tif")
    export.export_vectors(warmup, out + "/w.gpkg", classes=[1, 2, 3])
    export.export_preview(warmup, out + "/w.png")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = vm("VmRSS:")
    export.export_cog(uri, out + "/m.tif")
    n = export.export_vectors(uri, out + "/m.gpkg", classes=[1, 2, 3])
    export.export_preview(uri, out + "/m.png")
    print(json.dumps({"growth_kb": vm("VmHWM:") - before, "features": n}))
    """
)


def write_blobs(path, side: int, chunk: int = 512, period: int = 2048) -> str:
    """A ``side``² output of jittered discs (classes 1–3, ~1 per 64² cell) repeating every ``period`` pixels."""
    yy, xx = np.mgrid[0:period, 0:period]
    pattern = np.zeros((period, period), np.uint8)
    cell = 64
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cy, cx = yy // cell + dy, xx // cell + dx
            h = (cy * 73856093 ^ cx * 19349663) & 0xFFFF
            centre_y = cy * cell + 32 + (h % 17) - 8
            centre_x = cx * cell + 32 + (h // 17 % 17) - 8
            inside = (yy - centre_y) ** 2 + (xx - centre_x) ** 2 < (12 + h % 30) ** 2
            pattern[inside] = (1 + h % 3)[inside]
    assert period % chunk == 0
    classes = ["bg", "a", "b", "c"]
    target = OutputTarget(str(path), side, side, chunk, len(classes), False, uuid.uuid4().hex, zstd_level=1)
    prepare_output(target, {"ome": ome_attrs("blobs", classes, None, None),
                            "segpipe": {"format": FORMAT, "source": None, "classes": classes, "crs_wkt": UTM33,
                                        "transform": list(TRANSFORM), "nodata_label": target.nodata_label,
                                        "run_id": target.run_id, "status": "running"}})
    for c in ChunkGrid(side, side, chunk):
        y0, x0 = c.y0 % period, c.x0 % period
        write_chunk(target, c, pattern[y0:y0 + c.h, x0:x0 + c.w])
    finalize(str(path), {})
    return str(path)


def measure_export(tmp_path, side: int) -> dict:
    warmup = tmp_path / "warmup.zarr"
    if not warmup.exists():
        write_blobs(warmup, 1024, period=1024)
    uri = write_blobs(tmp_path / f"blobs{side}.zarr", side)
    out = tmp_path / f"exp{side}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(warmup), uri, str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_export_memory_does_not_grow_with_the_raster(tmp_path) -> None:
    """COG + vectors + preview of 8192² (64 MB of class ids) vs 4096² (16 MB), in a child process.

    Peak RSS growth must stay well below the large raster itself and must not follow the
    4× growth of its area. What may grow is the state along one row of blocks (polygons still
    open at the row's lower edge), which follows the raster's *width*: 2× here.
    (Measured: 22–46 MB at 4096², 27–48 MB at 8192².)
    """
    small = measure_export(tmp_path, 4096)
    large = measure_export(tmp_path, 8192)
    print(f"peak RSS growth: 4096² {small}; 8192² {large}")
    raster_kb = 8192 * 8192 // 1024
    assert large["features"] > 3.5 * small["features"]  # the work really scaled 4×
    # ~35 MB of the growth is size-independent (codec and GDAL buffers, first-use allocations), so
    # holding the 64 MB raster once would land near 100 MB
    assert large["growth_kb"] < raster_kb
    assert large["growth_kb"] <= 2.5 * small["growth_kb"] + 8 * 1024  # area ×4, width ×2


def test_kept_exports_are_whole_ones_and_truncated_ones_are_rewritten(tmp_path, labels) -> None:
    """Defect 10: write_exports(recompute=False) kept any file at an export's path, a truncated COG too
    (a crash or a full disk while it was written). Whole exports are still kept as they are."""
    from segpipe.export import Exports, export_is_whole, write_exports

    zarr_uri = make_output(tmp_path / "scene.zarr", labels)
    exports = Exports(cog=True, vector="gpkg", preview=True)
    paths = write_exports(zarr_uri, None, exports)
    kinds = ("cog", "vector", "preview")
    whole = {k: Path(paths[k]).read_bytes() for k in kinds}
    assert all(export_is_whole(k, paths[k], zarr_uri) for k in kinds)
    stamps = {k: os.stat(paths[k]).st_mtime_ns for k in kinds}
    write_exports(zarr_uri, None, exports, recompute=False)
    assert {k: os.stat(paths[k]).st_mtime_ns for k in kinds} == stamps  # whole ones are kept
    for k in kinds:
        Path(paths[k]).write_bytes(whole[k][: len(whole[k]) * 2 // 3])
        assert not export_is_whole(k, paths[k], zarr_uri)
    write_exports(zarr_uri, None, exports, recompute=False)
    assert_valid_cog(paths["cog"])
    with rasterio.open(paths["cog"]) as ds:
        np.testing.assert_array_equal(ds.read(1), labels)
    assert all(export_is_whole(k, paths[k], zarr_uri) for k in kinds)
    assert Path(paths["preview"]).read_bytes() == whole["preview"]


def test_an_export_edited_in_place_is_never_replaced(tmp_path, labels) -> None:
    """Annotators correct the nightly GeoPackage in place; the next recompute (a promotion) used to write the
    new export over their edits. The edited file is kept, byte for byte, and the new export goes beside it."""
    import sqlite3

    from segpipe.export import Exports, write_exports

    zarr_uri = make_output(tmp_path / "scene.zarr", labels)
    exports = Exports(cog=True, vector="gpkg")
    paths = write_exports(zarr_uri, None, exports)
    notes: list[str] = []
    again = write_exports(zarr_uri, None, exports, notes=notes)  # nothing edited: replaced as before
    assert again == paths and notes == []
    with sqlite3.connect(paths["vector"]) as db:  # a reclassification, as QGIS saves it (attributes only)
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            db.execute(f'DROP TRIGGER "{name}"')  # GDAL's R-tree triggers call SpatiaLite functions
        db.execute("UPDATE segments SET class_name = 'water', class_id = 2 WHERE fid = 1")
    edited = Path(paths["vector"]).read_bytes()
    after = write_exports(zarr_uri, None, exports, notes=notes)
    assert Path(paths["vector"]).read_bytes() == edited
    assert after["vector"] == str(tmp_path / "scene.new.gpkg") and Path(after["vector"]).exists()
    assert after["cog"] == paths["cog"]  # the COG was not touched by anyone: replaced
    assert len(notes) == 1 and notes[0] == (f"{paths['vector']}: changed since segpipe wrote it (edited?): kept; "
                                            f"the new export is {after['vector']}")


def test_geopackages_are_gpkg_1_2_which_gdal_3_6_opens_without_a_warning(output, tmp_path) -> None:
    """Defect: GeoPackages were GPKG 1.4, which GDAL 3.6 / QGIS 3.22 LTR warn 'may only be partially supported'
    about on every open. Both writers: the polygons and the small feature files (suggestions)."""
    import shutil
    import sqlite3

    import shapely

    from segpipe.export.features import write_features

    polygons, small = str(tmp_path / "scene.gpkg"), str(tmp_path / "small.gpkg")
    export_vectors(output, polygons)
    write_features(small, [shapely.box(0, 0, 1, 1)], {"rank": [1]}, UTM33)
    for path in (polygons, small):
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
            assert db.execute("PRAGMA user_version").fetchone()[0] == 10200
        if shutil.which("ogrinfo"):  # Debian's gdal-bin (GDAL 3.6), the oracle where installed
            p = subprocess.run(["ogrinfo", "-so", "-al", path], capture_output=True, text=True, check=True)
            assert "partially supported" not in p.stderr and "Warning" not in p.stderr, p.stderr
