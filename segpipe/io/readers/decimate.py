"""Every ``step``-th pixel of an image, read strip by strip: a view for reports without the whole image.

A reader returns any window; a decimated view of a 50,000² scene must not ask for the whole
window at once (7.5 GB of RGB). Strips of whole rows, a multiple of ``step`` rows high, keep
each read under ``max_pixels`` source pixels; only the kept rows and columns stay in memory.
"""

from __future__ import annotations

import numpy as np

from segpipe.core.geometry import Window
from segpipe.io.readers.base import ImageReader

#: source pixels one strip read may cover (16 MP: 48 MB of uint8 RGB)
STRIP_PIXELS = 1 << 24


def read_decimated(reader: ImageReader, step: int, bands: int | None = None,
                   max_pixels: int | None = None) -> np.ndarray:
    """(bands, ceil(h/step), ceil(w/step)) = ``reader.read(whole image)[:bands, ::step, ::step]``,
    read in strips of at most ``max_pixels`` source pixels (at least ``step`` rows)."""
    h, w = reader.info.height, reader.info.width
    step = max(1, int(step))
    rows = max(step, ((max_pixels or STRIP_PIXELS) // max(w, 1)) // step * step)
    strips = []
    for y0 in range(0, h, rows):
        strip = reader.read(Window(y0, 0, min(rows, h - y0), w))
        strips.append(strip[:bands, ::step, ::step])
    return np.concatenate(strips, axis=1)
