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

    An output pixel touches at most ``K = ceil(f) + 1`` source pixels, so the result is a sum of ``K``
    weighted gathers: memory is the output plus one gather, whatever the factor (no prefix sums over
    the whole axis, no weight matrix).
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
    first = np.minimum(np.floor(lo).astype(np.int64), n - 1)
    span = np.maximum(hi - lo, 1e-12)
    shape = list(block.shape)
    shape[axis] = count
    out = np.zeros(shape, dtype=acc)
    bshape = [1] * block.ndim
    bshape[axis] = count
    for k in range(math.ceil(factor) + 1):
        j = first + k
        w = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None) / span
        if not w.any():
            break
        out += np.take(block, np.minimum(j, n - 1), axis=axis) * w.astype(acc).reshape(bshape)
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
