"""Whole-slide and OME-TIFF pyramid readers (the reader protocol of :mod:`segpipe.io.readers.raster`).

* :class:`OpenSlideReader` — Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF and
  tiled pyramidal TIFF, through OpenSlide.
* :class:`OmeTiffReader` — OME-TIFF pyramids through tifffile's Zarr store (one level is
  a Zarr array, so a window read decodes only the tiles it covers).

Both read one **pyramid level**, optionally resampled to a requested resolution:

* ``level`` given → that level as it is;
* ``mpp`` given → the coarsest level that is still at least as fine as ``mpp`` (its
  microns per pixel ≤ ``mpp``), then area-averaged by the remaining factor
  ``mpp / level_mpp`` (a level finer than every level is served from level 0, upsampled);
* neither → level 0.

The reader's image is that (possibly resampled) level: ``info.height``/``width`` are its
size, ``info.mpp`` its resolution, and windows outside it are filled by reflection exactly
like :class:`~segpipe.io.readers.raster.RasterioReader`.

Which files are ours (:func:`open_slide`, tried before rasterio by :mod:`segpipe.io.readers.registry`):
OME-TIFF by content; then anything OpenSlide recognises, except GeoTIFFs (georeferencing
is rasterio's job) and single-level generic TIFFs (rasterio reads those as well, with
their nodata and masks). Everything else returns None so the next opener is tried.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from segpipe.core.errors import ConfigError, InputError
from segpipe.io.readers.base import ImageInfo
from segpipe.io.readers.raster import select_bands
from segpipe.io.storage import has_scheme, strip_file_scheme
from segpipe.core.geometry import Chunk, Window, ceil_div, source_indices

#: relative tolerance under which a requested mpp counts as exactly a level's mpp
_MPP_RTOL = 1e-3
#: output rows per strip when a thumbnail is reduced from a level
_THUMB_STRIP = 256

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------- pure geometry


def choose_level(
    downsamples: Sequence[float], base_mpp: float | None, *, level: int | None, mpp: float | None, uri: str,
) -> tuple[int, float]:
    """(level, factor): the pyramid level to read and the level pixels per output pixel.

    ``downsamples[L]`` is level L's size relative to level 0 (1.0 first). See the module
    docstring for the rule; ``factor`` is 1.0 unless ``mpp`` falls between levels.
    """
    if level is not None and mpp is not None:
        raise ConfigError(uri, "choose a pyramid level or a resolution (mpp), not both")
    if mpp is None:
        chosen = 0 if level is None else level
        if not 0 <= chosen < len(downsamples):
            raise InputError(
                uri, f"has {len(downsamples)} pyramid level(s) (0–{len(downsamples) - 1}); level {chosen} does not exist",
            )
        return chosen, 1.0
    if mpp <= 0:
        raise ConfigError(uri, f"mpp must be positive, got {mpp}")
    if base_mpp is None:
        raise InputError(uri, "records no microns-per-pixel; choose a pyramid level instead of an mpp")
    level_mpps = [base_mpp * d for d in downsamples]
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= mpp * (1 + _MPP_RTOL)]
    chosen = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    factor = mpp / level_mpps[chosen]
    return chosen, (1.0 if abs(factor - 1) < _MPP_RTOL else factor)


def resampled_size(size: int, factor: float) -> int:
    """Output pixels along an axis of ``size`` level pixels at ``factor`` level pixels per output pixel."""
    return size if factor == 1.0 else max(1, round(size / factor))


def area_weights(start: int, count: int, factor: float, level_start: int, level_stop: int) -> np.ndarray:
    """(count, level_stop − level_start) weights of output pixels ``start … start+count`` over level pixels.

    Output pixel ``i`` covers level interval ``[i·f, (i+1)·f)``; its weight on level pixel
    ``j`` is the overlap of ``[j, j+1)`` with that interval, rows normalised to sum to 1
    (area averaging; the last output pixel may reach past the level's edge).
    """
    lo = (start + np.arange(count, dtype=np.float64))[:, None] * factor
    hi = lo + factor
    j = np.arange(level_start, level_stop, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    total = overlap.sum(axis=1, keepdims=True)
    return overlap / np.where(total > 0, total, 1.0)


def area_resample(block: np.ndarray, axis: int, start: int, count: int, factor: float, level_start: int) -> np.ndarray:
    """Area-average ``block`` along ``axis`` to output pixels ``start … start+count`` (float64).

    The same result as multiplying by :func:`area_weights`, in O(n) instead of O(n²): the
    integral of the level pixels up to a real position ``t`` is the prefix sum up to
    ``floor(t)`` plus the fraction ``t − floor(t)`` of the next pixel, and each output
    pixel is the difference of two such integrals over the length it covers.
    """
    n = block.shape[axis]
    f = int(round(factor))
    if f >= 1 and factor == f and start * f == level_start and n == count * f:  # whole f-pixel bins
        data = np.moveaxis(block, axis, -1)
        binned = data.reshape(data.shape[:-1] + (count, f)).mean(axis=-1, dtype=np.float64)
        return np.moveaxis(binned, -1, axis)
    lo = np.clip((start + np.arange(count, dtype=np.float64)) * factor - level_start, 0.0, n)
    hi = np.clip(lo + factor, 0.0, n)
    data = np.moveaxis(block, axis, -1).astype(np.float64)
    prefix = np.concatenate([np.zeros(data.shape[:-1] + (1,)), np.cumsum(data, axis=-1)], axis=-1)

    def integral(t: np.ndarray) -> np.ndarray:
        k = np.minimum(np.floor(t).astype(np.int64), n)
        return prefix[..., k] + (t - k) * data[..., np.minimum(k, n - 1)]

    out = (integral(hi) - integral(lo)) / np.maximum(hi - lo, 1e-12)
    return np.moveaxis(out, -1, axis)


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 RGBA → (h, w, 3) composited over white.

    OpenSlide returns transparent pixels (alpha 0) where a slide has no data; white is
    the background of a bright-field slide, so that is what the model should see.
    """
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


# --------------------------------------------------------------------------- shared reader logic


class _PyramidReader:
    """Windowed reads of one level of a pyramid, resampled by ``factor`` when it is not 1."""

    info: ImageInfo
    _level: int
    _factor: float
    _level_shapes: list[tuple[int, int]]

    def _read_level(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(bands, h, w) of ``level`` for an in-level box (implemented per format)."""
        raise NotImplementedError

    def _read_resampled(self, level: int, factor: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(bands, h, w) of ``level`` area-resampled by ``factor`` (output pixel box ``y0, x0, h, w``)."""
        if factor == 1.0:
            return self._read_level(level, y0, x0, h, w)
        lh, lw = self._level_shapes[level]
        ly0, lx0 = min(int(math.floor(y0 * factor)), lh - 1), min(int(math.floor(x0 * factor)), lw - 1)
        ly1, lx1 = min(int(math.ceil((y0 + h) * factor)), lh), min(int(math.ceil((x0 + w) * factor)), lw)
        ly1, lx1 = max(ly1, ly0 + 1), max(lx1, lx0 + 1)
        block = self._read_level(level, ly0, lx0, ly1 - ly0, lx1 - lx0)
        out = area_resample(area_resample(block, 1, y0, h, factor, ly0), 2, x0, w, factor, lx0)
        dtype = np.dtype(self.info.dtype)
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(dtype)

    def read(self, window: Window) -> np.ndarray:
        """Pixels of ``window`` as (bands, h, w); reflected outside the image."""
        info = self.info
        if window.inside(info.height, info.width):
            return self._read_resampled(self._level, self._factor, window.y0, window.x0, window.h, window.w)
        ys, xs = source_indices(window, info.height, info.width)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        block = self._read_resampled(self._level, self._factor, y0, x0, y1 - y0, x1 - x0)
        return block[:, (ys - y0)[:, None], (xs - x0)[None, :]]

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """(bands, h, w) of the whole image, at most ``max_side`` on its long side, from the coarsest level.

        Reduced by area averaging in strips, so even a large coarsest level is never held whole.
        """
        coarsest = len(self._level_shapes) - 1
        lh, lw = self._level_shapes[coarsest]
        factor = max(1.0, max(lh, lw) / max_side)
        h, w = resampled_size(lh, factor), resampled_size(lw, factor)
        strips = [self._read_resampled(coarsest, factor, y, 0, min(_THUMB_STRIP, h - y), w)
                  for y in range(0, h, _THUMB_STRIP)]
        return np.concatenate(strips, axis=1)

    def __enter__(self) -> _PyramidReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _resolution(level_shapes: list[tuple[int, int]], level: int, factor: float) -> tuple[int, int]:
    lh, lw = level_shapes[level]
    return resampled_size(lh, factor), resampled_size(lw, factor)


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(_PyramidReader):
    """Whole-slide images through OpenSlide: RGB uint8, transparent (no-data) pixels white."""

    def __init__(
        self, uri: str, bands: Sequence[int] | None = None, *, level: int | None = None, mpp: float | None = None,
    ) -> None:
        import openslide

        path = strip_file_scheme(uri)
        try:
            self._slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as e:
            raise InputError(uri, f"whole-slide image cannot be read ({e})") from None
        slide = self._slide
        props = slide.properties
        self._indexes = select_bands(3, bands, uri)
        self._downsamples = [float(d) for d in slide.level_downsamples]
        self._level_shapes = [(h, w) for w, h in slide.level_dimensions]
        base_mpp = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
        try:
            self._level, self._factor = choose_level(self._downsamples, base_mpp, level=level, mpp=mpp, uri=uri)
        except Exception:
            slide.close()
            raise
        height, width = _resolution(self._level_shapes, self._level, self._factor)
        level_mpp = base_mpp * self._downsamples[self._level] if base_mpp else None
        self.info = ImageInfo(
            uri=uri, height=height, width=width, count=len(self._indexes), dtype="uint8",
            mpp=(level_mpp * self._factor if level_mpp else None), driver="openslide",
            extra={
                "level": self._level,
                "level_count": slide.level_count,
                "resample_factor": self._factor,
                # what maps output pixels back to level 0 (QuPath vectors): level0 = output × downsample × factor
                "downsample": self._downsamples[self._level],
                "level0_height": self._level_shapes[0][0],
                "level0_width": self._level_shapes[0][1],
                "objective_power": _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
                "vendor": props.get(openslide.PROPERTY_NAME_VENDOR),
            },
        )

    def _read_level(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        import openslide

        ds = self._downsamples[level]
        try:
            region = self._slide.read_region((int(round(x0 * ds)), int(round(y0 * ds))), level, (w, h))
        except openslide.OpenSlideError as e:
            raise InputError(self.info.uri, f"corrupt or truncated slide ({e})") from None
        rgb = rgba_to_rgb(np.asarray(region))
        return np.moveaxis(rgb, -1, 0)[[i - 1 for i in self._indexes]]

    def close(self) -> None:
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
            self._slide = None


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


# --------------------------------------------------------------------------- OME-TIFF

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_physical(xml: str) -> tuple[float | None, float | None]:
    """(µm per pixel along x, objective magnification) from the first OME Image, when recorded."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    mpp = magnification = None
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels" and mpp is None:
            size = _float(el.get("PhysicalSizeX"))
            unit = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"))
            mpp = size * unit if size and unit else None
        elif tag == "Objective" and magnification is None:
            magnification = _float(el.get("NominalMagnification"))
    return mpp, magnification


class OmeTiffReader(_PyramidReader):
    """OME-TIFF pyramids (series 0) read window by window from tifffile's Zarr store.

    Axes: Y and X, an optional band axis (S for interleaved RGB or C for channels), other
    axes of size 1. tifffile ≥ 2025 returns a Zarr-3 store: ``zarr.open(series.aszarr(level=L))``.
    """

    def __init__(
        self, uri: str, bands: Sequence[int] | None = None, *, level: int | None = None, mpp: float | None = None,
        tiff: Any = None,
    ) -> None:
        import tifffile

        path = strip_file_scheme(uri)
        try:
            self._tiff = tiff if tiff is not None else tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError) as e:
            raise InputError(uri, f"OME-TIFF cannot be read ({e})") from None
        try:
            self._setup(uri, bands, level, mpp)
        except Exception:
            self._tiff.close()
            raise

    def _setup(self, uri: str, bands: Sequence[int] | None, level: int | None, mpp: float | None) -> None:
        series = self._tiff.series[0]
        self._series = series
        axes = series.axes
        if "Y" not in axes or "X" not in axes:
            raise InputError(uri, f"OME-TIFF series has axes {axes!r}; expected Y and X")
        band_axes = [a for a in axes if a in "SC" and series.shape[axes.index(a)] > 1]
        extra = [a for a in axes if a not in "YXSC" and series.shape[axes.index(a)] > 1]
        if len(band_axes) > 1 or extra:
            raise InputError(uri, f"OME-TIFF series has axes {axes!r} of shape {series.shape}; "
                             "segpipe reads 2-D images with one band axis")
        self._band_axis = band_axes[0] if band_axes else None
        count = series.shape[axes.index(self._band_axis)] if self._band_axis else 1
        self._indexes = select_bands(count, bands, uri)
        self._level_shapes = []
        for lvl in series.levels:
            self._level_shapes.append((lvl.shape[lvl.axes.index("Y")], lvl.shape[lvl.axes.index("X")]))
        base_h, base_w = self._level_shapes[0]
        downsamples = [base_w / w for _, w in self._level_shapes]
        base_mpp, magnification = _ome_physical(self._tiff.ome_metadata or "")
        self._level, self._factor = choose_level(downsamples, base_mpp, level=level, mpp=mpp, uri=uri)
        height, width = _resolution(self._level_shapes, self._level, self._factor)
        level_mpp = base_mpp * downsamples[self._level] if base_mpp else None
        self._arrays: dict[int, Any] = {}
        self.info = ImageInfo(
            uri=uri, height=height, width=width, count=len(self._indexes), dtype=str(series.dtype),
            mpp=(level_mpp * self._factor if level_mpp else None), driver="ome-tiff",
            extra={
                "level": self._level,
                "level_count": len(self._level_shapes),
                "resample_factor": self._factor,
                "downsample": downsamples[self._level],
                "level0_height": base_h,
                "level0_width": base_w,
                "objective_power": magnification,
                "vendor": "ome-tiff",
            },
        )

    def _array(self, level: int) -> Any:
        arr = self._arrays.get(level)
        if arr is None:
            import zarr

            arr = zarr.open(self._series.aszarr(level=level), mode="r")
            self._arrays[level] = arr
        return arr

    def _read_level(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        axes = self._series.levels[level].axes
        selection: list[Any] = []
        for a in axes:
            if a == "Y":
                selection.append(slice(y0, y0 + h))
            elif a == "X":
                selection.append(slice(x0, x0 + w))
            elif a == self._band_axis:
                selection.append([i - 1 for i in self._indexes])
            else:
                selection.append(0)
        try:
            block = self._array(level).get_orthogonal_selection(tuple(selection))
        except (ValueError, OSError, RuntimeError) as e:
            raise InputError(self.info.uri, f"corrupt or truncated OME-TIFF ({e})") from None
        kept = [a for a, s in zip(axes, selection) if not isinstance(s, int)]
        if self._band_axis is None:
            return np.asarray(block)[None, ...]
        return np.moveaxis(np.asarray(block), kept.index(self._band_axis), 0)

    def close(self) -> None:
        if getattr(self, "_tiff", None) is not None:
            self._arrays = {}
            self._tiff.close()
            self._tiff = None


# --------------------------------------------------------------------------- opener


def _is_tiff(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def open_slide(
    uri: str, bands: Sequence[int] | None = None, level: int | None = None, mpp: float | None = None,
) -> OpenSlideReader | OmeTiffReader | None:
    """A slide reader for ``uri`` when the content is a slide or OME-TIFF pyramid, else None.

    Local files only (OpenSlide cannot read buckets). Detection is by content, never by
    extension alone; see the module docstring for what is declined.
    """
    if has_scheme(uri):
        return None
    path = strip_file_scheme(uri)
    if not os.path.isfile(path):
        return None
    if _is_tiff(path):
        import tifffile

        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # corrupt TIFF: let the next opener give its error
            return None
        try:
            if tiff.is_ome:
                reader = OmeTiffReader(uri, bands, level=level, mpp=mpp, tiff=tiff)
                tiff = None  # the reader owns the handle now
                return reader
            if tiff.pages and tiff.pages.first.is_geotiff:
                return None  # georeferenced: rasterio keeps the CRS and transform
        finally:
            if tiff is not None:
                tiff.close()
    try:
        import openslide
    except ImportError:  # OpenSlide library missing: rasterio still reads tiled TIFFs
        return None
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except (openslide.OpenSlideError, OSError):
        return None
    if vendor is None:
        return None
    reader = OpenSlideReader(uri, bands, level=level, mpp=mpp)
    if vendor == "generic-tiff" and reader.info.extra["level_count"] == 1:
        reader.close()  # a plain tiled TIFF: rasterio serves it (nodata, masks, georeference)
        return None
    return reader




# --------------------------------------------------------------------------- tissue


class TissueMask(NamedTuple):
    """Low-resolution tissue mask and its ``scale`` (reader pixels per mask pixel)."""

    mask: np.ndarray
    scale: float


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (the same histogram rule as ``skimage.filters.threshold_otsu``)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / np.maximum(w1, 1)
    m2 = (np.cumsum((counts * centers)[::-1]) / np.maximum(w2[::-1], 1))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.argmax(between))])


def _strided_thumbnail(reader: Any, max_side: int) -> np.ndarray:
    """Nearest-neighbour thumbnail of any reader, read in bounded tiles (for readers without levels)."""
    info = reader.info
    step = max(1, ceil_div(max(info.height, info.width), max_side))
    tile = step * max(1, 2048 // step)
    rows = []
    for y in range(0, info.height, tile):
        cols = []
        for x in range(0, info.width, tile):
            h, w = min(tile, info.height - y), min(tile, info.width - x)
            cols.append(reader.read(Window(y, x, h, w))[:, ::step, ::step])
        rows.append(np.concatenate(cols, axis=2))
    return np.concatenate(rows, axis=1)


def tissue_mask(reader: Any, *, max_side: int = 1024, max_threshold: float = 0.15) -> TissueMask:
    """Where the slide has tissue, from one low-resolution thumbnail (computed once per slide).

    Tissue is coloured, background is white/grey: the score is HSV saturation (for RGB;
    darkness for one band), thresholded at ``min(Otsu, max_threshold)``. The cap keeps a
    slide that is all tissue from losing half of it to Otsu's split; the result is dilated
    by one mask pixel so skipping a chunk is always conservative.
    """
    thumb = reader.thumbnail(max_side) if hasattr(reader, "thumbnail") else _strided_thumbnail(reader, max_side)
    pixels = thumb.astype(np.float32)
    if np.dtype(reader.info.dtype).kind in "ui":
        pixels /= float(np.iinfo(np.dtype(reader.info.dtype)).max)
    if pixels.shape[0] >= 3:
        rgb = pixels[:3]
        top, bottom = rgb.max(axis=0), rgb.min(axis=0)
        score = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0)
    else:
        score = 1.0 - pixels[0] / max(float(pixels[0].max()), 1e-6)
    threshold = min(otsu_threshold(score), max_threshold)
    mask = score > threshold
    grown = mask.copy()  # 3×3 dilation without scipy
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return TissueMask(grown, reader.info.width / mask.shape[1])


def chunk_has_tissue(mask: np.ndarray, chunk: Chunk, scale: float) -> bool:
    """True when any mask pixel overlapping ``chunk`` (reader pixels; ``scale`` per mask pixel) is tissue."""
    h, w = mask.shape
    y0, x0 = int(math.floor(chunk.y0 / scale)), int(math.floor(chunk.x0 / scale))
    y1, x1 = int(math.ceil((chunk.y0 + chunk.h) / scale)), int(math.ceil((chunk.x0 + chunk.w) / scale))
    y0, x0 = min(max(y0, 0), h - 1), min(max(x0, 0), w - 1)
    y1, x1 = max(min(y1, h), y0 + 1), max(min(x1, w), x0 + 1)
    return bool(mask[y0:y1, x0:x1].any())
