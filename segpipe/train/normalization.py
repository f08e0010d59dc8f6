"""Input normalisation of training images: what pixels are divided by, and per-band mean and std.

The values found here go into the model artifact (``input_scale``, ``mean``, ``std``), so
inference normalises exactly as training did.
"""

from __future__ import annotations

import numpy as np

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window
from segpipe.labels.dataset import Dataset, open_item_image


def default_input_scale(dtype: str) -> float:
    """What pixels are divided by first: the dtype's maximum for 8/16-bit integers, 1 otherwise."""
    dt = np.dtype(dtype)
    if dt == np.uint8:
        return 255.0
    if dt in (np.uint16, np.int16):
        return float(np.iinfo(dt).max)
    return 1.0


def band_statistics(dataset: Dataset, input_scale: float, *, window: int = 512, windows_per_image: int = 4,
                    stride: int = 2, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-band mean and std of ``pixel / input_scale`` over the images (windowed and subsampled).

    Each image contributes up to ``windows_per_image`` seeded random ``window``² windows of its
    grid, every ``stride``-th pixel of them, so the cost is bounded for any image size.
    A band with zero spread gets std 1 (it carries no information; don't blow it up).
    """
    if not dataset.items:
        raise DatasetError(dataset.root, "no images to compute band statistics from")
    rng = np.random.default_rng(seed)
    bands = dataset.in_channels
    s = np.zeros(bands, dtype=np.float64)
    ss = np.zeros(bands, dtype=np.float64)
    n = 0
    for item in dataset.items:
        grid = [(y, x) for y in range(0, item.height, window) for x in range(0, item.width, window)]
        if len(grid) > windows_per_image:
            grid = [grid[j] for j in sorted(rng.choice(len(grid), windows_per_image, replace=False))]
        reader = open_item_image(item)
        try:
            for y0, x0 in grid:
                h, w = min(window, item.height - y0), min(window, item.width - x0)
                px = reader.read(Window(y0, x0, h, w))[:, ::stride, ::stride].astype(np.float64) / input_scale
                px = px.reshape(bands, -1)
                s += px.sum(axis=1)
                ss += np.square(px).sum(axis=1)
                n += px.shape[1]
        finally:
            reader.close()
    mean = s / n
    var = np.maximum(ss / n - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0
    return [float(v) for v in mean], [float(v) for v in std]
