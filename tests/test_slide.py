"""Whole-slide readers: detection by content, level/mpp choice, exact windows and reflection, tissue mask."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from scipy.ndimage import binary_dilation

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.geometry import Chunk, Window
from segpipe.core.grid import choose_level
from segpipe.io.readers import open_image
from segpipe.io.readers.levels import area_resample, area_weights
from segpipe.io.readers.raster import RasterioReader
from segpipe.io.readers.registry import READERS
from segpipe.io.readers.slide import OmeTiffReader, OpenSlideReader, open_slide, rgba_to_rgb
from segpipe.io.readers.tissue import chunk_has_tissue, otsu_threshold, tissue_mask

openslide = pytest.importorskip("openslide")

H, W = 1200, 1600  # level 0; levels 1 and 2 are 4× and 16× smaller


def block_mean(image: np.ndarray, f: int) -> np.ndarray:
    """Exact f×f area average (image sides are multiples of f), rounded half to even like the reader."""
    h, w = image.shape[0] // f, image.shape[1] // f
    return np.rint(image.reshape(h, f, w, f, -1).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)


def synthetic_slide(seed: int = 0) -> list[np.ndarray]:
    """Near-white background with a pink elliptical tissue blob centred at (700, 500); levels 0, 1, 2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    image = rng.integers(232, 248, (H, W, 3)).astype(np.uint8)
    tissue = ((yy - 700) / 250.0) ** 2 + ((xx - 500) / 350.0) ** 2 < 1
    pink = np.stack([rng.integers(170, 220, (H, W)), rng.integers(90, 140, (H, W)), rng.integers(140, 190, (H, W))], -1)
    image[tissue] = pink[tissue].astype(np.uint8)
    return [image, block_mean(image, 4), block_mean(image, 16)]


def write_aperio(path, levels: list[np.ndarray], mpp: float = 0.25) -> str:
    """An Aperio-style SVS: tiled RGB pages with the 'Aperio Image Library' description OpenSlide looks for."""
    h, w = levels[0].shape[:2]
    with tifffile.TiffWriter(str(path)) as tw:
        for level in levels:
            lh, lw = level.shape[:2]
            desc = (f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (256x256) -> {lw}x{lh} RAW"
                    f"|AppMag = 40|MPP = {mpp}")
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", description=desc, metadata=None)
    return str(path)


def write_generic_tiff(path, levels: list[np.ndarray]) -> str:
    with tifffile.TiffWriter(str(path), bigtiff=True) as tw:
        for i, level in enumerate(levels):
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None,
                     subfiletype=1 if i else 0)
    return str(path)


def write_ome(path, levels: list[np.ndarray], mpp: float, axes: str, photometric: str) -> str:
    with tifffile.TiffWriter(str(path), bigtiff=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), photometric=photometric, compression="zlib",
                 metadata={"axes": axes, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                           "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(256, 256), photometric=photometric, compression="zlib")
    return str(path)


@pytest.fixture(scope="module")
def slide_levels() -> list[np.ndarray]:
    return synthetic_slide()


@pytest.fixture(scope="module")
def svs(tmp_path_factory, slide_levels) -> str:
    return write_aperio(tmp_path_factory.mktemp("svs") / "slide.svs", slide_levels)


def chw(image: np.ndarray) -> np.ndarray:
    return np.moveaxis(image, -1, 0)


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("mpp", "expected"),
    [
        (0.25, (0, 1.0)),
        (1.0, (1, 1.0)),
        (1.004, (1, 1.0)),  # within the same-pixel-size tolerance of a level: no resampling
        (2.0, (1, 2.0)),  # between levels: the finer one, halved
        (0.5, (0, 2.0)),
        (8.0, (2, 2.0)),
        (0.1, (0, 0.4)),  # finer than level 0: upsampled from level 0
    ],
)
def test_choose_level(mpp, expected) -> None:
    shapes = [(1600, 1600), (400, 400), (100, 100)]  # downsamples 1, 4, 16 of a 0.25 µm slide
    chosen, ry, rx = choose_level(shapes, mpp / 0.25)
    assert (chosen, pytest.approx(ry), pytest.approx(rx)) == (expected[0], expected[1], expected[1])


def test_choose_grid_errors() -> None:
    from segpipe.io.readers.base import ImageInfo
    from segpipe.io.readers.registry import choose_grid

    info = ImageInfo("s", 1600, 1600, 3, "uint8", mpp=0.25, level_shapes=((1600, 1600), (400, 400)))
    with pytest.raises(ConfigError, match="choose one"):
        choose_grid(info, level=0, mpp=1.0)
    with pytest.raises(InputError, match="level 3 does not exist"):
        choose_grid(info, level=3)
    with pytest.raises(InputError, match="no microns-per-pixel"):
        choose_grid(ImageInfo("s", 1600, 1600, 3, "uint8"), mpp=1.0)
    assert choose_grid(info, level=1).scale == 4.0 and choose_grid(info, mpp=1.0).shape == (400, 400)


def test_area_weights() -> None:
    np.testing.assert_allclose(area_weights(0, 2, 2.0, 0, 4), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    w = area_weights(3, 5, 1.5, 4, 13)  # fractional overlaps, rows normalised
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(w[0, :2], [0.5 / 1.5, 1 / 1.5])  # output 3 covers [4.5, 6)
    np.testing.assert_allclose(area_weights(0, 1, 3.0, 0, 2), [[0.5, 0.5]])  # past the edge: renormalised


@pytest.mark.parametrize(
    ("start", "count", "factor", "level_start"),
    [(0, 10, 2.0, 0), (3, 7, 1.5, 4), (5, 9, 0.4, 2), (2, 4, 3.3, 6), (2, 9, 6.7, 5), (1, 6, 4.5, 0), (0, 7, 3.0, 0)],
)
def test_area_resample_equals_the_weight_matrix(start, count, factor, level_start) -> None:
    rng = np.random.default_rng(int(factor * 10))
    n = int(np.ceil((start + count) * factor)) - level_start
    block = rng.integers(0, 256, (2, n, 5)).astype(np.uint8)
    expected = np.einsum("ij,bjk->bik", area_weights(start, count, factor, level_start, level_start + n), block)
    np.testing.assert_allclose(area_resample(block, 1, start, count, factor, level_start, np.float64), expected,
                               atol=1e-9)
    # uint8 accumulates in float32 by default: within a rounding of the exact average
    got = area_resample(block, 1, start, count, factor, level_start)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_rgba_to_rgb_composites_over_white() -> None:
    rgba = np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [100, 0, 200, 128]]], np.uint8)
    out = rgba_to_rgb(rgba)
    assert out.tolist() == [[[255, 255, 255], [10, 20, 30], [177, 127, 227]]]


def test_otsu_matches_skimage() -> None:
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.05, 0.02, 5000), rng.normal(0.4, 0.1, 2000)])
    assert otsu_threshold(values) == pytest.approx(threshold_otsu(values), rel=1e-9)
    assert otsu_threshold(np.full(10, 0.3)) == 0.3


# ----------------------------------------------------------------------------- OpenSlide


def test_slides_are_tried_before_rasterio() -> None:
    # a fixed registry: importing a reader module registers nothing
    assert [o.__name__ for o in READERS] == ["open_slide", "open_omezarr", "_rasterio"]


def test_aperio_slide_is_opened_by_content(svs, tmp_path) -> None:
    assert openslide.OpenSlide.detect_format(svs) == "aperio"
    with open_image(svs) as reader:
        assert isinstance(reader, OpenSlideReader)
        info = reader.info
        assert (info.height, info.width, info.count, info.dtype) == (H, W, 3, "uint8")
        assert info.mpp == pytest.approx(0.25)
        assert info.extra["vendor"] == "aperio"
        assert info.extra["objective_power"] == 40
        assert info.extra["level"] == 0 and info.extra["level_count"] == 3
        assert info.crs_wkt is None and info.transform is None
    renamed = tmp_path / "slide.dat"
    shutil.copy(svs, renamed)
    with open_image(str(renamed)) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.info.extra["vendor"] == "aperio"


def test_window_reads_equal_the_tiff_levels(svs, slide_levels) -> None:
    with tifffile.TiffFile(svs) as tf:
        stored = [p.asarray() for p in tf.pages]
    for level in range(3):
        np.testing.assert_array_equal(stored[level], slide_levels[level])
        with open_slide(svs, level=level) as reader:
            lh, lw = stored[level].shape[:2]
            assert (reader.info.height, reader.info.width) == (lh, lw)
            assert reader.info.mpp == pytest.approx(0.25 * 4**level)
            for y0, x0, h, w in [(0, 0, 64, 64), (lh - 40, lw - 50, 40, 50), (13, 29, lh // 2, lw // 3)]:
                expected = chw(stored[level][y0 : y0 + h, x0 : x0 + w])
                np.testing.assert_array_equal(reader.read(Window(y0, x0, h, w)), expected)


def test_reflection_outside_equals_numpy_pad(svs, slide_levels) -> None:
    pad = 40
    for level in (1, 2):
        full = chw(slide_levels[level])
        padded = np.pad(full, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        with open_slide(svs, level=level) as reader:
            lh, lw = full.shape[1:]
            boxes = [(-pad, -pad, 96, 96), (lh - 50, lw - 30, 50 + pad, 30 + pad), (-pad, -pad, lh + 2 * pad, lw + 2 * pad)]
            for y0, x0, h, w in boxes:
                expected = padded[:, y0 + pad : y0 + pad + h, x0 + pad : x0 + pad + w]
                np.testing.assert_array_equal(reader.read(Window(y0, x0, h, w)), expected)


def test_mpp_between_levels_is_area_averaged(svs, slide_levels) -> None:
    with open_image(svs, mpp=2.0) as reader:
        assert reader.info.extra["level"] == 1 and reader.info.grid.scale == 8.0
        assert (reader.info.height, reader.info.width) == (150, 200)
        assert reader.info.mpp == pytest.approx(2.0)
        expected = chw(block_mean(slide_levels[1], 2))
        np.testing.assert_array_equal(reader.read(Window(0, 0, 150, 200)), expected)
        np.testing.assert_array_equal(reader.read(Window(33, 71, 40, 50)), expected[:, 33:73, 71:121])
        padded = np.pad(expected, ((0, 0), (8, 8), (8, 8)), mode="reflect")
        np.testing.assert_array_equal(reader.read(Window(-8, -8, 60, 60)), padded[:, :60, :60])
    with open_image(svs, mpp=4.0) as reader:  # exactly level 2, read as it is
        assert reader.info.extra["level"] == 2 and "grid_factor" not in reader.info.extra
    with open_image(svs, mpp=0.1) as reader:
        assert (reader.info.height, reader.info.width) == (3000, 4000)
        # upsampled 2.5×: output pixel (1, 1) covers level-0 [0.4, 0.8)² — inside pixel (0, 0)
        np.testing.assert_array_equal(reader.read(Window(1, 1, 1, 1))[:, 0, 0], slide_levels[0][0, 0])
    with pytest.raises(InputError, match="level 5 does not exist"):
        open_slide(svs, level=5)


def test_band_selection(svs, slide_levels) -> None:
    with open_image(svs, bands=[3, 1]) as reader:
        assert reader.info.count == 2
        np.testing.assert_array_equal(reader.read(Window(5, 5, 8, 8)), chw(slide_levels[0][5:13, 5:13])[[2, 0]])
    with pytest.raises(InputError, match="has 3 band"):
        open_image(svs, bands=[4])


def test_generic_pyramidal_tiff_goes_to_openslide_plain_ones_to_rasterio(tmp_path, slide_levels) -> None:
    pyramid = write_generic_tiff(tmp_path / "pyr.tif", slide_levels)
    assert openslide.OpenSlide.detect_format(pyramid) == "generic-tiff"
    with open_image(pyramid) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.info.extra["vendor"] == "generic-tiff" and reader.info.mpp is None
        np.testing.assert_array_equal(reader.read(Window(100, 200, 30, 40)), chw(slide_levels[0][100:130, 200:240]))
    single = write_generic_tiff(tmp_path / "single.tif", slide_levels[:1])
    assert openslide.OpenSlide.detect_format(single) == "generic-tiff"
    assert open_slide(single) is None
    with open_image(single) as reader:
        assert isinstance(reader, RasterioReader)


def test_geotiff_stays_with_rasterio(tmp_path, slide_levels) -> None:
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling

    path = str(tmp_path / "geo.tif")
    with rasterio.open(path, "w", driver="GTiff", height=H, width=W, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, crs="EPSG:32633",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 5000000)) as ds:
        ds.write(chw(slide_levels[0]))
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([4, 16], Resampling.average)
    assert openslide.OpenSlide.detect_format(path) == "generic-tiff"  # OpenSlide would take it
    assert open_slide(path) is None
    with open_image(path) as reader:
        assert isinstance(reader, RasterioReader)
        assert reader.info.crs_wkt is not None


def test_file_no_reader_accepts_is_a_one_line_input_error(tmp_path) -> None:
    bogus = tmp_path / "notes.tif"
    bogus.write_text("these are not pixels\n")
    assert open_slide(str(bogus)) is None
    with pytest.raises(InputError) as err:
        open_image(str(bogus))
    assert str(bogus) in str(err.value) and "\n" not in str(err.value)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)  # TIFF magic, no valid IFD
    assert open_slide(str(broken)) is None
    with pytest.raises(InputError):
        open_image(str(broken))


# ----------------------------------------------------------------------------- OME-TIFF


def test_ome_tiff_pyramid(tmp_path, slide_levels) -> None:
    levels = [slide_levels[0], block_mean(slide_levels[0], 2), block_mean(slide_levels[0], 4)]
    path = write_ome(tmp_path / "slide.ome.tif", levels, mpp=0.5, axes="YXS", photometric="rgb")
    with open_image(path) as reader:
        assert isinstance(reader, OmeTiffReader)
        info = reader.info
        assert (info.height, info.width, info.count, info.dtype, info.mpp) == (H, W, 3, "uint8", 0.5)
        assert info.extra["vendor"] == "ome-tiff" and info.extra["level_count"] == 3
        np.testing.assert_array_equal(reader.read(Window(700, 900, 100, 120)), chw(levels[0][700:800, 900:1020]))
    with open_image(path, mpp=1.0) as reader:
        assert reader.info.extra["level"] == 1 and (reader.info.height, reader.info.width) == (600, 800)
        np.testing.assert_array_equal(reader.read(Window(10, 20, 50, 60)), chw(levels[1][10:60, 20:80]))
    with open_slide(path, level=2) as reader:
        full = chw(levels[2])
        padded = np.pad(full, ((0, 0), (16, 16), (16, 16)), mode="reflect")
        np.testing.assert_array_equal(reader.read(Window(-16, -16, 332, 432)), padded)


def test_ome_tiff_multichannel_uint16(tmp_path) -> None:
    rng = np.random.default_rng(2)
    base = rng.integers(0, 4000, (2, 512, 640)).astype(np.uint16)
    levels = [base, base[:, ::2, ::2].copy()]
    path = write_ome(tmp_path / "fluo.ome.tif", levels, mpp=0.65, axes="CYX", photometric="minisblack")
    with open_image(path, bands=[2]) as reader:
        assert isinstance(reader, OmeTiffReader)
        assert (reader.info.count, reader.info.dtype) == (1, "uint16")
        np.testing.assert_array_equal(reader.read(Window(30, 40, 64, 64)), base[1:2, 30:94, 40:104])
    with open_slide(path, level=1) as reader:
        assert reader.info.mpp == pytest.approx(1.3)
        np.testing.assert_array_equal(reader.read(Window(0, 0, 256, 320)), levels[1])


# ----------------------------------------------------------------------------- tissue


def test_tissue_mask_finds_the_blob(svs) -> None:
    yy, xx = np.mgrid[0:H, 0:W]
    truth = ((yy - 700) / 250.0) ** 2 + ((xx - 500) / 350.0) ** 2 < 1
    for level in (0, 1):
        with open_slide(svs, level=level) as reader:
            mask, scale = tissue_mask(reader, max_side=200)
            assert max(mask.shape) <= 200
            assert scale == pytest.approx(reader.info.width / mask.shape[1])
            f = 4**level
            step = int(round(scale * f))  # level-0 pixels per mask pixel
            blocks = truth.reshape(H // step, step, W // step, step)
            all_tissue, any_tissue = blocks.all(axis=(1, 3)), blocks.any(axis=(1, 3))
            assert mask.shape == all_tissue.shape and all_tissue.sum() > 500
            assert mask[all_tissue].all()  # every tissue pixel is kept (the mask is conservative)
            assert not (mask & ~binary_dilation(any_tissue, np.ones((3, 3)))).any()  # grown by the 3×3 dilation only
            side = 256 // f
            centre = Chunk(0, 0, 700 // f - side // 2, 500 // f - side // 2, side, side)
            corner = Chunk(0, 0, 0, (W - 256) // f, side, side)
            assert chunk_has_tissue(mask, centre, scale)
            assert not chunk_has_tissue(mask, corner, scale)


def test_tissue_mask_of_a_plain_reader(tmp_path) -> None:
    from PIL import Image

    image = np.full((300, 400, 3), 240, np.uint8)
    image[100:200, 150:300] = (180, 60, 120)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    with open_image(str(path)) as reader:
        assert isinstance(reader, RasterioReader)
        mask, scale = tissue_mask(reader, max_side=100)
    assert scale == pytest.approx(4.0)
    assert mask[30:45, 45:70].all() and not mask[:20].any()
    assert chunk_has_tissue(mask, Chunk(0, 0, 120, 160, 32, 32), scale)
    assert not chunk_has_tissue(mask, Chunk(0, 0, 0, 0, 64, 64), scale)


def test_glass_inside_a_computed_chunk_is_background_too(svs, model_dir, client, tmp_path) -> None:
    """Background is removed per pixel: a chunk that holds tissue and glass gives the glass the nodata
    label (or the background class), not a class of the model — a QuPath export then outlines the tissue."""
    import zarr

    from segpipe.core.classes import nodata_label
    from segpipe.core.settings import segment_settings
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.readers.tissue import tissue_pixels
    from segpipe.io.storage import list_images

    ref, _ = check_model(model_dir)
    image = list_images(svs)[0]
    with open_image(svs) as reader:
        mask, scale = tissue_mask(reader)
    whole = Chunk(0, 0, 0, 0, H, W)
    tissue = tissue_pixels(mask, whole, scale)
    for background, expected in ((None, nodata_label(ref.spec.num_classes)), (0, 0)):
        settings = segment_settings(chunk_size=256, halo=16, precision="fp32", device="cpu",
                                    background_class=background)
        out = tmp_path / f"bg{background}"
        result = segment_image(image, ref, str(out), settings, client)
        assert result.status == "done", result.error
        assert 0 < result.chunks_skipped < result.chunks  # some chunks skipped whole, some computed
        labels = zarr.open_array(str(out / "slide.zarr" / "0"), mode="r")[:]
        assert (labels[~tissue] == expected).all()  # glass, also inside computed chunks
        # the chunks that were computed hold glass as well: the rule applies inside them
        computed = np.zeros_like(tissue)
        for iy in range(0, H, 256):
            for ix in range(0, W, 256):
                if tissue[iy:iy + 256, ix:ix + 256].any():
                    computed[iy:iy + 256, ix:ix + 256] = True
        assert (computed & ~tissue).sum() > 10_000
    truth = ((np.mgrid[0:H, 0:W][0] - 700) / 250.0) ** 2 + ((np.mgrid[0:H, 0:W][1] - 500) / 350.0) ** 2 < 1
    assert tissue[truth].all()  # no tissue pixel is lost to the rule (the mask is dilated)
