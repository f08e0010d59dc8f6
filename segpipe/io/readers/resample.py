"""Any reader at a coarser resolution: the image a model trained at another pixel size expects.

A georeferenced raster has one pixel size; a model trained at 0.5 m must see 0.5 m pixels. GDAL
overviews come in powers of two, so the general case is a resampled read: output pixel ``i``
covers source pixels ``[i·f, (i+1)·f)`` (``f`` = source pixels per output pixel) and is their
area average (:func:`segpipe.io.readers.levels.area_resample`, the slide readers' rule) — or,
for class ids, the source pixel under its centre (nearest: labels are not averaged).
Every read is one source window of about ``f²`` times the output window: no whole image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from segpipe.core.geometry import Window
from segpipe.io.readers.base import ImageInfo, ImageReader
from segpipe.io.readers.levels import area_resample, resampled_size

#: relative difference under which two pixel sizes count as the same (no resampling)
SAME_SIZE_RTOL = 1e-3


def pixel_size(info: ImageInfo) -> float | None:
    """The side of one pixel in CRS units (square pixels), or None for an image without georeference."""
    if info.transform is None or not info.crs_wkt:
        return None
    a, b, _, d, e, _ = info.transform[:6]
    sx, sy = math.hypot(a, d), math.hypot(b, e)
    return (sx + sy) / 2 if sx > 0 and sy > 0 else None


def scaled_info(info: ImageInfo, factor: float) -> ImageInfo:
    """The header of ``info``'s image at ``factor`` source pixels per pixel: size, transform and mpp scaled."""
    t = info.transform
    transform = None if t is None else (t[0] * factor, t[1] * factor, t[2], t[3] * factor, t[4] * factor, t[5])
    return dataclasses.replace(
        info, height=resampled_size(info.height, factor), width=resampled_size(info.width, factor),
        transform=transform, mpp=None if info.mpp is None else info.mpp * factor,
        extra={**info.extra, "resampled_by": factor})


class ResampledReader:
    """``base`` at ``factor`` source pixels per output pixel (area average; ``labels=True``: nearest)."""

    def __init__(self, base: ImageReader, factor: float, labels: bool = False) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be positive, got {factor}")
        self.base, self.factor, self.labels = base, float(factor), labels
        self.info = scaled_info(base.info, self.factor)

    def _centres(self, start: int, count: int, lo: int, n: int) -> np.ndarray:
        """Indices, within a source block starting at ``lo`` of ``n`` pixels, of the source pixel under
        each output pixel's centre (nearest)."""
        idx = np.floor((start + np.arange(count) + 0.5) * self.factor).astype(np.int64) - lo
        return np.clip(idx, 0, n - 1)

    def _source(self, start: int, count: int) -> tuple[int, int]:
        lo = math.floor(start * self.factor)
        hi = math.ceil((start + count) * self.factor)
        return lo, max(hi, lo + 1)

    def read(self, window: Window) -> np.ndarray:
        """(bands, h, w) of the resampled image; outside the image the base reader reflects."""
        (y0, y1), (x0, x1) = self._source(window.y0, window.h), self._source(window.x0, window.w)
        block = self.base.read(Window(y0, x0, y1 - y0, x1 - x0))
        if self.labels:
            rows = self._centres(window.y0, window.h, y0, block.shape[1])
            cols = self._centres(window.x0, window.w, x0, block.shape[2])
            return block[:, rows[:, None], cols]
        out = area_resample(block, 1, window.y0, window.h, self.factor, y0)
        out = area_resample(out, 2, window.x0, window.w, self.factor, x0)
        if np.issubdtype(block.dtype, np.integer):
            info = np.iinfo(block.dtype)
            return np.clip(np.rint(out), info.min, info.max).astype(block.dtype)
        return out.astype(block.dtype)

    def read_valid(self, window: Window) -> np.ndarray | None:
        """Where the resampled pixels have data: the source mask under each pixel's centre (None = all)."""
        fn = getattr(self.base, "read_valid", None)
        if fn is None:
            return None
        (y0, y1), (x0, x1) = self._source(window.y0, window.h), self._source(window.x0, window.w)
        valid = fn(Window(y0, x0, y1 - y0, x1 - x0))
        if valid is None:
            return None
        rows = self._centres(window.y0, window.h, y0, valid.shape[0])
        cols = self._centres(window.x0, window.w, x0, valid.shape[1])
        return valid[rows[:, None], cols[None, :]]

    def __getattr__(self, name: str) -> Any:  # has_mask and other optional reader features
        return getattr(self.base, name)

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> ResampledReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def at_pixel_size(reader: ImageReader, gsd: float, uri: str, labels: bool = False) -> ImageReader:
    """``reader`` at a pixel size of ``gsd`` CRS units (its own when they agree within 0.1 %).

    A georeferenced image finer than ``gsd`` is area-averaged; one coarser is upsampled (the caller
    warns: the model then sees less detail than it was trained on). Images without a georeference
    cannot be read at a ground sample distance: :class:`~segpipe.core.errors.InputError`.
    """
    from segpipe.core.errors import InputError

    size = pixel_size(reader.info)
    if size is None:
        reader.close()
        raise InputError(uri, f"has no georeference, so it cannot be read at a ground sample distance of {gsd:g}; "
                              "use --level or --mpp, or a model without a recorded gsd")
    factor = gsd / size
    if abs(factor - 1) < SAME_SIZE_RTOL:
        return reader
    return ResampledReader(reader, factor, labels=labels)
