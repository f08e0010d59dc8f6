"""Decoded blocks of tiled rasters, shared by every reader of a process: each block decoded once.

A window of tile + halo reaches into its neighbours' blocks: with 512² blocks, a 1,152² window touches
16 blocks for 4 of its own, so decoding per window costs up to 4× the image's blocks (measured 3.2× on
a deflate GeoTIFF, docs/benchmarks.md). GDAL's block cache is per dataset handle, and the GPU path reads a
batch's windows through one handle per thread (in parallel), so overlaps read by another thread were
decoded again. Here a window is assembled from whole blocks kept in one bounded LRU per process, keyed
by the file's identity: a block is decoded by the first reader that needs it (the others wait for that
decode rather than repeat it), then copied out for every window that overlaps it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import partial

import numpy as np

#: decoded bytes kept (a strip of tiles' block rows: 4 tiles of 1,024 + halo over 512² RGB blocks is ~28 MiB)
MAX_BYTES = 32 * 2**20


class BlockCache:
    """An LRU of decoded blocks bounded in bytes; :meth:`get` decodes a missing block once, whoever asks."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._decoding: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The block ``key`` (read-only), decoded by ``decode()`` unless it is cached or being decoded."""
        while True:
            with self._lock:
                block = self._blocks.get(key)
                if block is not None:
                    self._blocks.move_to_end(key)
                    return block
                pending = self._decoding.get(key)
                if pending is None:
                    pending = self._decoding[key] = threading.Event()
                    break
            pending.wait()  # another reader decodes it: take its result (or decode it if that failed)
        try:
            block = decode()
            block.flags.writeable = False  # shared: windows copy out of it
        finally:
            with self._lock:
                del self._decoding[key]
            pending.set()
        with self._lock:
            if key not in self._blocks and block.nbytes <= self.max_bytes:
                self._blocks[key] = block
                self.bytes += block.nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._blocks.popitem(last=False)[1].nbytes
        return block


_cache = BlockCache()


def shared_blocks() -> BlockCache:
    """This process's block cache."""
    return _cache


def assemble(key: Hashable, y0: int, x0: int, h: int, w: int, block: tuple[int, int], size: tuple[int, int],
             decode: Callable[[int, int, int, int], np.ndarray]) -> np.ndarray:
    """The box (y0, x0, h, w), as (bands, h, w), of a raster of ``size`` (height, width) tiled in ``block``
    (height, width) blocks, from the shared cache; ``decode(y0, x0, h, w)`` reads one block's box when it is
    missing; ``key`` names the raster (the file's identity and the bands read)."""
    bh, bw = block
    height, width = size
    out: np.ndarray | None = None
    for by in range(y0 // bh, (y0 + h - 1) // bh + 1):
        ty0, ty1 = by * bh, min(height, (by + 1) * bh)
        for bx in range(x0 // bw, (x0 + w - 1) // bw + 1):
            tx0, tx1 = bx * bw, min(width, (bx + 1) * bw)
            data = _cache.get((key, by, bx), partial(decode, ty0, tx0, ty1 - ty0, tx1 - tx0))
            if out is None:
                out = np.empty((data.shape[0], h, w), dtype=data.dtype)
            oy0, oy1 = max(y0, ty0), min(y0 + h, ty1)
            ox0, ox1 = max(x0, tx0), min(x0 + w, tx1)
            out[:, oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0] = data[:, oy0 - ty0:oy1 - ty0, ox0 - tx0:ox1 - tx0]
    assert out is not None
    return out
