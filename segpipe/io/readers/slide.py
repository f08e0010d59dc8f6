"""Whole-slide and OME-TIFF pyramid readers (the reader protocol of :mod:`segpipe.io.readers.raster`).

* :class:`OpenSlideReader` — Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF and
  tiled pyramidal TIFF, through OpenSlide.
* :class:`OmeTiffReader` — OME-TIFF pyramids through tifffile's Zarr store (one level is
  a Zarr array, so a window read decodes only the tiles it covers).

Both read one **pyramid level** as it is (``info.level_shapes`` lists them all): a resolution
between levels is a pixel grid served by :func:`segpipe.io.readers.resample.on_grid` from the
level this reader opens, like every other source's.

The reader's image is that level: ``info.height``/``width`` are its size, ``info.mpp`` its
resolution, and windows outside it are filled by reflection exactly like
:class:`~segpipe.io.readers.raster.RasterioReader`.

Which files are ours (:func:`open_slide`, tried before rasterio by :mod:`segpipe.io.readers.registry`):
OME-TIFF by content; then anything OpenSlide recognises, except GeoTIFFs (georeferencing
is rasterio's job) and single-level generic TIFFs (rasterio reads those as well, with
their nodata and masks). Everything else returns None so the next opener is tried.

The tissue mask that lets a run skip empty slide chunks is in :mod:`segpipe.io.readers.tissue`.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import InputError
from segpipe.core.geometry import Window, gather, source_indices
from segpipe.core.grid import resampled_size
from segpipe.io.readers.base import ImageInfo
from segpipe.io.readers.levels import area_resample
from segpipe.io.readers.raster import select_bands
from segpipe.io.storage import has_scheme, strip_file_scheme

#: output rows per strip when a thumbnail is reduced from a level
_THUMB_STRIP = 256

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------- pixels


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 RGBA → (h, w, 3) composited over white.

    OpenSlide returns transparent pixels (alpha 0) where a slide has no data; white is
    the background of a bright-field slide, so that is what the model should see.
    """
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


# --------------------------------------------------------------------------- shared reader logic


class PyramidReader:
    """Windowed reads of one level of a pyramid, as it is."""

    info: ImageInfo
    _level: int
    _level_shapes: list[tuple[int, int]]

    def _read_level(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(bands, h, w) of ``level`` for an in-level box (implemented per format)."""
        raise NotImplementedError

    def read(self, window: Window) -> np.ndarray:
        """Pixels of ``window`` as (bands, h, w); reflected outside the image."""
        info = self.info
        if window.inside(info.height, info.width):
            return self._read_level(self._level, window.y0, window.x0, window.h, window.w)
        ys, xs = source_indices(window, info.height, info.width)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        block = self._read_level(self._level, y0, x0, y1 - y0, x1 - x0)
        return gather(block, ys - y0, xs - x0)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """(bands, h, w) of the whole image, at most ``max_side`` on its long side, from the coarsest level.

        Reduced by area averaging in strips, so even a large coarsest level is never held whole.
        """
        coarsest = len(self._level_shapes) - 1
        lh, lw = self._level_shapes[coarsest]
        factor = max(1.0, max(lh, lw) / max_side)
        h, w = resampled_size(lh, factor), resampled_size(lw, factor)
        dtype = np.dtype(self.info.dtype)
        strips = []
        for y in range(0, h, _THUMB_STRIP):
            sh = min(_THUMB_STRIP, h - y)
            ly0 = min(int(math.floor(y * factor)), lh - 1)
            ly1 = max(min(int(math.ceil((y + sh) * factor)), lh), ly0 + 1)
            block = self._read_level(coarsest, ly0, 0, ly1 - ly0, lw)
            out = area_resample(area_resample(block, 1, y, sh, factor, ly0), 2, 0, w, factor, 0)
            if dtype.kind in "ui":
                out = np.clip(np.rint(out), np.iinfo(dtype).min, np.iinfo(dtype).max)
            strips.append(out.astype(dtype))
        return np.concatenate(strips, axis=1)

    def __enter__(self) -> PyramidReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def check_level(uri: str, level: int | None, count: int) -> int:
    chosen = 0 if level is None else level
    if not 0 <= chosen < count:
        raise InputError(uri, f"has {count} pyramid level(s) (0–{count - 1}); level {chosen} does not exist")
    return chosen


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(PyramidReader):
    """Whole-slide images through OpenSlide: RGB uint8, transparent (no-data) pixels white."""

    def __init__(self, uri: str, bands: Sequence[int] | None = None, *, level: int | None = None) -> None:
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
            self._level = check_level(uri, level, slide.level_count)
        except Exception:
            slide.close()
            raise
        height, width = self._level_shapes[self._level]
        self.info = ImageInfo(
            uri=uri, height=height, width=width, count=len(self._indexes), dtype="uint8",
            mpp=(base_mpp * self._downsamples[self._level] if base_mpp else None), driver="openslide",
            level_shapes=tuple(self._level_shapes),
            extra={
                "level": self._level,
                "level_count": slide.level_count,
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


class OmeTiffReader(PyramidReader):
    """OME-TIFF pyramids (series 0) read window by window from tifffile's Zarr store.

    Axes: Y and X, an optional band axis (S for interleaved RGB or C for channels), other
    axes of size 1. tifffile ≥ 2025 returns a Zarr-3 store: ``zarr.open(series.aszarr(level=L))``.
    """

    def __init__(self, uri: str, bands: Sequence[int] | None = None, *, level: int | None = None,
                 tiff: Any = None) -> None:
        import tifffile

        path = strip_file_scheme(uri)
        try:
            self._tiff = tiff if tiff is not None else tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError) as e:
            raise InputError(uri, f"OME-TIFF cannot be read ({e})") from None
        try:
            self._setup(uri, bands, level)
        except Exception:
            self._tiff.close()
            raise

    def _setup(self, uri: str, bands: Sequence[int] | None, level: int | None) -> None:
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
        base_w = self._level_shapes[0][1]
        downsamples = [base_w / w for _, w in self._level_shapes]
        base_mpp, magnification = _ome_physical(self._tiff.ome_metadata or "")
        self._level = check_level(uri, level, len(self._level_shapes))
        height, width = self._level_shapes[self._level]
        self._arrays: dict[int, Any] = {}
        self.info = ImageInfo(
            uri=uri, height=height, width=width, count=len(self._indexes), dtype=str(series.dtype),
            mpp=(base_mpp * downsamples[self._level] if base_mpp else None), driver="ome-tiff",
            level_shapes=tuple(self._level_shapes),
            extra={
                "level": self._level,
                "level_count": len(self._level_shapes),
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


def _magic(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


#: PNG and JPEG files are never slides (OpenSlide reads Hamamatsu's JPEGs through their .vms index):
#: OpenSlide's format detection is skipped for them (~0.15 ms a file, a tenth of a chip's per-image work)
_NOT_SLIDES = (b"\x89PNG", b"\xff\xd8\xff")


def open_slide(
    uri: str, bands: Sequence[int] | None = None, level: int | None = None,
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
    magic = _magic(path)
    if magic.startswith(_NOT_SLIDES):
        return None
    if magic in _TIFF_MAGIC:
        import tifffile

        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # corrupt TIFF: let the next opener give its error
            return None
        try:
            if tiff.is_ome:
                reader = OmeTiffReader(uri, bands, level=level, tiff=tiff)
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
    reader = OpenSlideReader(uri, bands, level=level)
    if vendor == "generic-tiff" and reader.info.extra["level_count"] == 1:
        reader.close()  # a plain tiled TIFF: rasterio serves it (nodata, masks, georeference)
        return None
    return reader
