"""One pixel grid per image: the pure value (segpipe.core.grid) and every reader opened on it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from segpipe.core.geometry import Window
from segpipe.core.grid import PixelGrid, choose_level, grid_at, same_pixel_size
from segpipe.io.readers import open_image
from tests.helpers import write_geotiff


@pytest.mark.parametrize(("a", "b", "same"), [
    (0.2527, 0.25, True),  # an Aperio slide that records 0.2527 µm is a 0.25 µm slide
    (0.2270, 0.2527, False),  # two scanners
    (0.5, 0.6, False),
    (1.0, 1.0199, True),
    (1.0, 1.021, False),
])
def test_one_tolerance_for_the_same_pixel_size(a, b, same):
    assert same_pixel_size(a, b) is same and same_pixel_size(b, a) is same


def test_a_grid_at_another_resolution_scales_its_georeference_and_round_trips():
    native = PixelGrid.native(1000, 800, crs_wkt="EPSG:32633", transform=(0.5, 0, 100.0, 0, -0.5, 200.0))
    g = grid_at(native, gsd=1.2)
    assert g.scale == pytest.approx(2.4) and (g.height, g.width) == (417, 333)
    assert g.pixel_size == pytest.approx(1.2) and g.transform[2:3] == (100.0,)
    assert PixelGrid.from_dict(g.as_dict()) == g
    assert g.native_grid() == native
    assert grid_at(native, gsd=0.505) is native  # within the tolerance: the image's own pixels
    # a level with the asked pixel size is that level exactly (its own shape)
    lv = grid_at(native, gsd=1.0, level_shapes=[(1000, 800), (500, 400), (250, 200)])
    assert (lv.shape, lv.scale) == ((500, 400), 2.0)
    with pytest.raises(ValueError, match="records no microns"):
        grid_at(native, mpp=0.5)


def test_the_level_that_serves_a_grid_is_never_coarser_than_it():
    shapes = [(7700, 7700), (3850, 3850), (1925, 1925), (963, 963)]
    assert choose_level(shapes, 6.7)[0] == 2  # 4× overview, then 1.675× area averaging
    level, ry, rx = choose_level(shapes, 8.0)
    assert (level, ry, rx) == (3, 1.0, 1.0)  # 8 × 963 / 7700 = 1.0005: the 8× overview as it is
    assert choose_level(shapes, 1.5) == (0, 1.5, 1.5)


def _peak_of(fn) -> tuple[int, np.ndarray]:
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_one_resampled_read_stays_within_a_small_multiple_of_its_window(tmp_path):
    """A 1,024² window at 6.7× and 8× the pixel size, from a file without overviews (the worst case: every
    source pixel is read): the read's own peak allocations stay ≤ 3× the window it returns."""
    side = 8200
    yy = np.arange(side, dtype=np.uint16)[:, None]
    xx = np.arange(side, dtype=np.uint16)[None, :]
    band = ((yy * 7 + xx * 3) % 251).astype(np.uint8)[None]
    path = write_geotiff(tmp_path / "big.tif", band, pixel=0.5)
    for gsd in (3.35, 4.0):
        with open_image(str(path), gsd=gsd) as r:
            out_bytes = 1024 * 1024
            peak, got = _peak_of(lambda r=r: r.read(Window(0, 0, 1024, 1024)))
            assert got.shape == (1, 1024, 1024) and got.dtype == np.uint8
            assert peak <= 3 * out_bytes, f"factor {gsd / 0.5}: peak {peak / out_bytes:.2f}× the window"
    with open_image(str(path), gsd=4.0) as r:  # and the values are the 8×8 block means
        want = band[0, :64, :64].reshape(8, 8, 8, 8).astype(np.float64).mean(axis=(1, 3))
        np.testing.assert_array_equal(r.read(Window(0, 0, 8, 8))[0], np.rint(want).astype(np.uint8))


def test_a_coarser_grid_is_read_from_the_nearest_finer_overview(tmp_path):
    import rasterio

    rng = np.random.default_rng(3)
    a = rng.integers(0, 255, (3, 512, 512), dtype=np.uint8)
    path = write_geotiff(tmp_path / "cog.tif", a, pixel=0.5)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], rasterio.enums.Resampling.average)
    with open_image(str(path), gsd=3.0) as r:  # 6×: the 4× overview, then 1.5× area averaging
        assert r.info.extra["level"] == 2 and r.info.grid.scale == 6.0
        assert (r.info.height, r.info.width) == (85, 85)
    with open_image(str(path), gsd=1.0) as r:  # exactly the 2× overview, read as it is
        assert r.info.extra["level"] == 1 and "grid_factor" not in r.info.extra
        with rasterio.open(path, overview_level=0) as ov:
            np.testing.assert_array_equal(r.read(Window(0, 0, 256, 256)), ov.read())


def test_training_at_an_mpp_reads_the_slides_pyramid_level(tmp_path):
    import json

    import tifffile

    from segpipe.labels.dataset import at_resolution, load_dataset, open_item_image
    from segpipe.labels.truth import open_truth
    from tests.test_slide import block_mean, write_aperio

    rng = np.random.default_rng(4)
    level0 = rng.integers(0, 255, (512, 768, 3), dtype=np.uint8)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    write_aperio(root / "images" / "s.svs", [level0, block_mean(level0, 4)], mpp=0.25)
    labels = (np.arange(512)[:, None] // 64 + np.arange(768)[None, :] // 64) % 3
    tifffile.imwrite(root / "masks" / "s.tif", labels.astype(np.uint8))
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": n} for n in "abc"]}))
    ds = load_dataset(str(root))
    item = at_resolution(ds, mpp=1.0).items[0]  # exactly level 1: read as it is, not from level 0
    with open_item_image(item) as r:
        assert r.info.extra["level"] == 1 and (r.info.height, r.info.width) == (128, 192)
        np.testing.assert_array_equal(r.read(Window(0, 0, 128, 192)), block_mean(level0, 4).transpose(2, 0, 1))
    with open_truth(ds, item) as t:  # the mask on the same grid: the class under each pixel's centre
        np.testing.assert_array_equal(t.read(Window(0, 0, 128, 192))[0], labels[2::4, 2::4])
    item = at_resolution(ds, mpp=1.6).items[0]  # between levels: level 1, then 1.6× area averaging
    with open_item_image(item) as r:
        assert r.info.extra["level"] == 1 and r.info.grid.scale == pytest.approx(6.4)
        assert r.info.extra["grid_factor"] == [pytest.approx(1.6), pytest.approx(1.6)]


@pytest.mark.slow
def test_training_segment_evaluation_and_corrections_read_the_same_pixels(tmp_path, model_dir, photo, client):
    """One image, one model resolution: the grid training reads, the grid segment reads, and the grid the
    output records (evaluation and corrections open the truth on it) are one value, and read the same pixels."""
    import json
    import shutil

    from segpipe.core.settings import InferenceSettings, SegmentSettings, TilingSettings
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import at_model_resolution, segment_image
    from segpipe.evaluate.evaluation import output_grid
    from segpipe.io.storage import list_images
    from segpipe.labels.dataset import at_resolution, load_dataset, open_item_image
    from segpipe.train.synthetic import write_dataset

    data = write_dataset(tmp_path / "d", 1, 200, seed=9)  # 0.5 m pixels
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    spec = json.loads((model / "model.json").read_text())
    spec["resolution"] = {"gsd": 0.6}
    (model / "model.json").write_text(json.dumps(spec))
    ref = check_model(str(model))[0]
    train_item = at_resolution(load_dataset(str(data)), gsd=0.6).items[0]
    image = list_images(train_item.image_uri)[0]
    settings = SegmentSettings(tiling=TilingSettings(chunk_size=64, halo=16),
                               inference=InferenceSettings(precision="fp32", device="cpu"))
    with open_image(train_item.image_uri) as native:
        segment_grid = at_model_resolution(native.info, ref, settings, image.uri)[1]
    result = segment_image(image, ref, str(tmp_path / "out"), settings, client)
    assert result.status == "done", result.error
    recorded = output_grid(result.output)
    assert train_item.grid == segment_grid == recorded and recorded.scale == pytest.approx(1.2)
    with open_item_image(train_item) as a, open_image(image.uri, grid=recorded) as b:
        np.testing.assert_array_equal(a.read(Window(-8, -8, 180, 180)), b.read(Window(-8, -8, 180, 180)))
