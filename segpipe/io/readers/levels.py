"""Area resampling and nearest sampling along one axis: pure array functions, no I/O.

Output pixel ``i`` (of ``start … start+count``) covers source interval ``[i·f, (i+1)·f)`` (``f`` =
source pixels per output pixel, positions relative to a block starting at ``block_start``):

* **area average** (images): the mean of the source pixels weighted by how much of each the interval
  covers, renormalised where it reaches past the block's edge (:func:`area_weights` is the
  definition as a matrix; :func:`area_resample` computes it without one);
* **nearest** (class ids, never averaged): the source pixel under the output pixel's centre,
  ``floor((i + ½)·f)`` (:func:`nearest_indices`).

Which pyramid level a resolution is read from is :func:`segpipe.core.grid.choose_level`.
"""

from __future__ import annotations

import math

import numpy as np


def area_weights(start: int, count: int, factor: float, level_start: int, level_stop: int) -> np.ndarray:
    """(count, level_stop − level_start) weights of output pixels ``start … start+count`` over source pixels.

    Output pixel ``i`` covers source interval ``[i·f, (i+1)·f)``; its weight on source pixel ``j``
    is the overlap of ``[j, j+1)`` with that interval, rows normalised to sum to 1 (area averaging;
    the last output pixel may reach past the source's edge).
    """
    lo = (start + np.arange(count, dtype=np.float64))[:, None] * factor
    hi = lo + factor
    j = np.arange(level_start, level_stop, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    total = overlap.sum(axis=1, keepdims=True)
    return overlap / np.where(total > 0, total, 1.0)


#: factors from which area averages are one pass of sums (np.add.reduceat) instead of ceil(f) + 1 weighted gathers
PREFIX_FACTOR = 3.0


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for pixel types it holds exactly enough (≤ 16-bit integers, float16/32), else float64."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b" or (dtype.kind in "ui" and dtype.itemsize <= 2) or (dtype.kind == "f" and dtype.itemsize <= 4):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def area_resample(block: np.ndarray, axis: int, start: int, count: int, factor: float, level_start: int,
                  dtype: np.dtype | None = None) -> np.ndarray:
    """Area-average ``block`` along ``axis`` to output pixels ``start … start+count`` (= multiplying by
    :func:`area_weights`), in ``dtype`` (default :func:`accumulator_dtype` of the block).

    An output pixel touches at most ``K = ceil(f) + 1`` source pixels, so below :data:`PREFIX_FACTOR` the
    result is a sum of ``K`` weighted gathers (memory: the output plus one gather); above it, one pass of
    segment sums plus the two cut pixels of each interval (:func:`_area_by_sums`). No weight matrix
    and no float copy of the block either way.
    """
    n = block.shape[axis]
    acc = np.dtype(dtype) if dtype is not None else accumulator_dtype(block.dtype)
    f = int(round(factor))
    if f >= 1 and factor == f and start * f == level_start and n == count * f:  # whole f-pixel bins
        data = np.moveaxis(block, axis, -1)
        binned = data.reshape(data.shape[:-1] + (count, f)).mean(axis=-1, dtype=acc)
        return np.moveaxis(binned, -1, axis)
    lo = np.clip((start + np.arange(count, dtype=np.float64)) * factor - level_start, 0.0, n)
    hi = np.clip(lo + factor, 0.0, n)
    span = np.maximum(hi - lo, 1e-12)
    if factor >= PREFIX_FACTOR and hi[-1] - lo[-1] >= factor - 1e-9 and lo[0] >= 0:  # intervals inside the block
        return _area_by_sums(block, axis, lo, hi, span, acc)
    first = np.minimum(np.floor(lo).astype(np.int64), n - 1)
    shape = list(block.shape)
    shape[axis] = count
    out = np.zeros(shape, dtype=acc)
    term = np.empty(shape, dtype=acc)  # one buffer for every weighted gather
    bshape = [1] * block.ndim
    bshape[axis] = count
    for k in range(math.ceil(factor) + 1):
        j = first + k
        w = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None) / span
        if not w.any():
            break
        np.multiply(np.take(block, np.minimum(j, n - 1), axis=axis), w.astype(acc).reshape(bshape), out=term)
        out += term
    return out


def _area_by_sums(block: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, span: np.ndarray,
                  acc: np.dtype) -> np.ndarray:
    """Area averages for factors ≥ :data:`PREFIX_FACTOR` in one pass over the block: the sum of the whole
    source pixels inside each interval (``np.add.reduceat``), plus the covered fractions of the two pixels
    its ends cut, over its length. Only for intervals that lie inside the block (each then holds at least
    two whole pixels, the first of them before the block's last pixel)."""
    n = block.shape[axis]
    a = np.ceil(lo).astype(np.int64)  # first whole pixel
    b = np.floor(hi).astype(np.int64)  # one past the last whole pixel
    bounds = np.stack([a, np.minimum(b, n - 1)], axis=1).ravel()
    sums = np.add.reduceat(block, bounds, axis=axis, dtype=acc)
    out = np.take(sums, np.arange(0, len(bounds), 2), axis=axis)
    last = b >= n  # reduceat's segment [a, n-1) misses the last pixel when the interval reaches the edge
    bshape = [1] * block.ndim
    bshape[axis] = len(lo)
    extra = (np.where(last, 1.0, 0.0), np.minimum(b, n - 1))
    left = (a - lo, np.maximum(a - 1, 0))
    right = (np.where(b < n, hi - b, 0.0), np.minimum(b, n - 1))
    for weight, pixel in (extra, left, right):
        if weight.any():
            out += np.take(block, pixel, axis=axis) * weight.astype(acc).reshape(bshape)
    out /= span.astype(acc).reshape(bshape)
    return out


def nearest_indices(start: int, count: int, factor: float, block_start: int, n: int) -> np.ndarray:
    """Indices, within a block of ``n`` source pixels starting at ``block_start``, of the source pixel under
    the centre of each output pixel ``start … start+count``: ``floor((i + ½)·f) − block_start``, clipped."""
    idx = np.floor((start + np.arange(count) + 0.5) * factor).astype(np.int64) - block_start
    return np.clip(idx, 0, n - 1)


def source_span(start: int, count: int, factor: float) -> tuple[int, int]:
    """[lo, hi) of the source pixels that output pixels ``start … start+count`` at ``factor`` touch."""
    lo = math.floor(start * factor)
    hi = math.ceil((start + count) * factor)
    return lo, max(hi, lo + 1)
