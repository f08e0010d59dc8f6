"""Pyramid levels as pure geometry: which level serves a requested resolution, and area resampling.

* ``level`` given → that level as it is;
* ``mpp`` given → the coarsest level that is still at least as fine as ``mpp`` (its microns per
  pixel ≤ ``mpp``), then area-averaged by the remaining factor ``mpp / level_mpp`` (a level finer
  than every level is served from level 0, upsampled);
* neither → level 0.

No I/O here: :mod:`segpipe.io.readers.slide` reads the level and calls :func:`area_resample`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segpipe.core.errors import ConfigError, InputError

#: relative tolerance under which a requested mpp counts as exactly a level's mpp
_MPP_RTOL = 1e-3


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
