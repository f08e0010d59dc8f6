"""Where a slide has tissue: a low-resolution mask computed once per slide, and the chunk test.

:func:`tissue_mask` thresholds one thumbnail (HSV saturation, Otsu's split capped so an
all-tissue slide keeps its tissue; :func:`otsu_threshold`) and dilates the result so that
skipping a chunk is always conservative; :func:`chunk_has_tissue` says whether a chunk of the
reader's image overlaps it. Works with any reader: slides give a thumbnail from their
coarsest pyramid level (:meth:`segpipe.io.readers.slide.OpenSlideReader.thumbnail`), other
readers are decimated tile by tile. Used by :mod:`segpipe.engine.segment` to skip empty chunks,
and by the tile tasks (:func:`tissue_pixels`) to give the glass inside a computed chunk the
background (or nodata) label too: background is removed per pixel, not per chunk.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from segpipe.core.geometry import Chunk, Window, ceil_div


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


def tissue_pixels(mask: np.ndarray, chunk: Chunk, scale: float) -> np.ndarray:
    """(chunk.h, chunk.w) bool: the low-resolution ``mask`` upsampled (nearest) onto ``chunk``'s pixels.

    Pixel (r, c) of the image takes mask pixel ``(floor((r + 0.5) / scale), floor((c + 0.5) / scale))``,
    clipped to the mask: the mask pixel whose footprint holds the pixel's centre.
    """
    h, w = mask.shape
    rows = np.minimum(((np.arange(chunk.y0, chunk.y0 + chunk.h) + 0.5) / scale).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(chunk.x0, chunk.x0 + chunk.w) + 0.5) / scale).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def chunk_has_tissue(mask: np.ndarray, chunk: Chunk, scale: float) -> bool:
    """True when any mask pixel overlapping ``chunk`` (reader pixels; ``scale`` per mask pixel) is tissue."""
    h, w = mask.shape
    y0, x0 = int(math.floor(chunk.y0 / scale)), int(math.floor(chunk.x0 / scale))
    y1, x1 = int(math.ceil((chunk.y0 + chunk.h) / scale)), int(math.ceil((chunk.x0 + chunk.w) / scale))
    y0, x0 = min(max(y0, 0), h - 1), min(max(x0, 0), w - 1)
    y1, x1 = max(min(y1, h), y0 + 1), max(min(x1, w), x0 + 1)
    return bool(mask[y0:y1, x0:x1].any())
