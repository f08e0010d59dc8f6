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
