"""Tiling geometry: pure functions over small frozen values, no I/O.

Glossary (the same words are used everywhere in segpipe):

* **chunk** – one cell of the output grid, ``chunk_size`` × ``chunk_size`` pixels
  (smaller at the right/bottom edges). A chunk's pixels are its **core**, and one chunk
  is exactly one Zarr chunk, written once by one writer.
* **halo** – context pixels added on every side of a core before inference and cropped
  afterwards, so predictions near chunk borders see their neighbours.
* **window** – the model input region for a chunk, in image coordinates. It always has
  the same size ``T = ceil((chunk_size + 2·halo) / m)·m`` (``m`` = ``multiple_of``), so
  tiles batch together::

      window.y0 = core.y0 - halo        window.h = T
      window.x0 = core.x0 - halo        window.w = T

  The core sits at ``[halo, halo + core.h)`` inside the window. Pixels of the window
  outside the image are filled by **reflection** about the image edge, exactly as
  ``numpy.pad(image, mode="reflect")`` would (period ``2·(size-1)``; a 1-pixel axis
  repeats its only pixel).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """One output chunk: grid index (iy, ix) and its core in image pixels."""

    iy: int
    ix: int
    y0: int
    x0: int
    h: int
    w: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.iy, self.ix)


@dataclass(frozen=True)
class Window:
    """A rectangle in image pixels; may extend past the image on any side (but never has a negative size)."""

    y0: int
    x0: int
    h: int
    w: int

    def __post_init__(self) -> None:
        if self.h < 0 or self.w < 0:
            raise ValueError(f"a window cannot have a negative size, got {self.h}×{self.w}")

    @property
    def y1(self) -> int:
        return self.y0 + self.h

    @property
    def x1(self) -> int:
        return self.x0 + self.w

    def inside(self, height: int, width: int) -> bool:
        """True when the window lies entirely within a ``height`` × ``width`` image."""
        return self.y0 >= 0 and self.x0 >= 0 and self.y1 <= height and self.x1 <= width


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tile_side(chunk_size: int, halo: int, multiple_of: int = 32) -> int:
    """Model input side ``T = ceil((chunk_size + 2·halo) / multiple_of) · multiple_of``."""
    return ceil_div(chunk_size + 2 * halo, multiple_of) * multiple_of


@dataclass(frozen=True)
class ChunkGrid:
    """The output chunk grid of a ``height`` × ``width`` image."""

    height: int
    width: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image must be at least 1×1 pixels, got {self.height}×{self.width}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")

    @property
    def rows(self) -> int:
        return ceil_div(self.height, self.chunk_size)

    @property
    def cols(self) -> int:
        return ceil_div(self.width, self.chunk_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def __len__(self) -> int:
        return self.rows * self.cols

    def chunk(self, iy: int, ix: int) -> Chunk:
        if not (0 <= iy < self.rows and 0 <= ix < self.cols):
            raise IndexError(f"chunk ({iy}, {ix}) outside grid {self.rows}×{self.cols}")
        y0, x0 = iy * self.chunk_size, ix * self.chunk_size
        return Chunk(iy, ix, y0, x0, min(self.chunk_size, self.height - y0), min(self.chunk_size, self.width - x0))

    def __iter__(self) -> Iterator[Chunk]:
        for iy in range(self.rows):
            for ix in range(self.cols):
                yield self.chunk(iy, ix)


def input_window(chunk: Chunk, chunk_size: int, halo: int, multiple_of: int = 32) -> Window:
    """The model input window of ``chunk`` (see the module docstring for the formula)."""
    side = tile_side(chunk_size, halo, multiple_of)
    return Window(chunk.y0 - halo, chunk.x0 - halo, side, side)


def effective_tile_size(tile_size: int, chunk_size: int, height: int, width: int) -> int:
    """The inference tile side for one image: ``tile_size`` (a multiple of ``chunk_size``), but no
    larger than the image rounded up to whole chunks — a 256² chip with 512 chunks and 1,536 tiles
    is computed as one 512 tile, not a 1,536 one mostly made of reflection.

    ``effective = min(tile_size, ceil(max(height, width) / chunk_size) · chunk_size)``
    """
    if tile_size < chunk_size or tile_size % chunk_size:
        raise ValueError(f"tile_size must be a positive multiple of chunk_size {chunk_size}, got {tile_size}")
    return min(tile_size, ceil_div(max(height, width), chunk_size) * chunk_size)


def chunks_in_tile(tile: Chunk, grid: ChunkGrid, tile_size: int) -> list[Chunk]:
    """The storage chunks whose cores make up ``tile``'s core (tiles are cells of the grid with
    ``chunk_size = tile_size``; ``tile_size`` is a multiple of ``grid.chunk_size``, so every chunk
    lies in exactly one tile: each chunk has exactly one writer)."""
    k = tile_size // grid.chunk_size
    return [grid.chunk(iy, ix)
            for iy in range(tile.iy * k, min((tile.iy + 1) * k, grid.rows))
            for ix in range(tile.ix * k, min((tile.ix + 1) * k, grid.cols))]


def tile_of(chunk: Chunk, grid: ChunkGrid, tile_size: int) -> tuple[int, int]:
    """The (ty, tx) index of the tile holding ``chunk``: ``(iy // k, ix // k)``, ``k = tile_size / chunk_size``."""
    k = tile_size // grid.chunk_size
    return (chunk.iy // k, chunk.ix // k)


def chunk_in_tile_window(chunk: Chunk, tile: Chunk, halo: int) -> tuple[slice, slice]:
    """Slices that crop ``chunk``'s core out of its tile's window-shaped prediction:
    rows ``[chunk.y0 − tile.y0 + halo, … + chunk.h)``, likewise columns."""
    y, x = chunk.y0 - tile.y0 + halo, chunk.x0 - tile.x0 + halo
    return slice(y, y + chunk.h), slice(x, x + chunk.w)


def core_in_window(chunk: Chunk, halo: int) -> tuple[slice, slice]:
    """Slices that crop a chunk's core out of its window-shaped prediction."""
    return slice(halo, halo + chunk.h), slice(halo, halo + chunk.w)


def reflect_index(coords: np.ndarray, size: int) -> np.ndarray:
    """Map pixel coordinates (possibly outside ``[0, size)``) to source pixels by reflection.

    ``reflect(i) = p - |(i mod 2p) - p|`` with period ``2p``, ``p = size - 1``: the same
    pixels ``numpy.pad(a, n, mode="reflect")`` uses for any ``n``; a 1-pixel axis maps to 0.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if size < 1:
        raise ValueError("size must be positive")
    if size == 1:
        return np.zeros_like(coords)
    period = 2 * (size - 1)
    m = np.mod(coords, period)
    return (size - 1) - np.abs(m - (size - 1))


def source_indices(window: Window, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Image rows and columns that fill each row/column of ``window`` (reflection outside)."""
    ys = reflect_index(np.arange(window.y0, window.y1), height)
    xs = reflect_index(np.arange(window.x0, window.x1), width)
    return ys, xs


#: more runs than this on one axis (a window many times its image's size): one fancy-index gather instead
_MAX_RUNS = 16


def index_runs(idx: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``idx`` cut into runs of consecutive indices, as ``(out_start, out_stop, first_index, step)``, step ±1.

    A reflected axis (:func:`reflect_index`) is at most three runs for a halo narrower than the image:
    the mirrored margin before it (step −1), the inside (+1) and the mirrored margin after it (−1).
    """
    n = len(idx)
    if n == 0:
        return []
    d = np.diff(np.asarray(idx, dtype=np.int64))
    # a run breaks before element j when the step into it is not ±1 or differs from the step before it
    breaks = np.flatnonzero((np.abs(d) != 1) | np.concatenate(([False], d[1:] != d[:-1]))) + 1
    bounds = [0, *breaks.tolist(), n]
    return [(a, b, int(idx[a]), int(d[a]) if b - a > 1 else 1) for a, b in zip(bounds[:-1], bounds[1:])]


def gather(block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``block[..., rows[:, None], cols[None, :]]`` (the last two axes), copied run by run.

    A reflected window is a few rectangular runs of its source block (:func:`index_runs`): one slice
    copy each instead of a per-pixel gather, several times faster (docs/benchmarks.md, "Design measurements").
    """
    ry, rx = index_runs(rows), index_runs(cols)
    if len(ry) > _MAX_RUNS or len(rx) > _MAX_RUNS:
        return np.ascontiguousarray(block[..., np.asarray(rows)[:, None], np.asarray(cols)[None, :]])
    out = np.empty((*block.shape[:-2], len(rows), len(cols)), dtype=block.dtype)
    for y0, y1, sy, dy in ry:
        src_y = _run_slice(sy, y1 - y0, dy)
        for x0, x1, sx, dx in rx:
            out[..., y0:y1, x0:x1] = block[..., src_y, _run_slice(sx, x1 - x0, dx)]
    return out


def _run_slice(first: int, n: int, step: int) -> slice:
    stop = first + step * n
    return slice(first, None if stop < 0 else stop, step)


def strip_order(grid: ChunkGrid, strip: int = 8) -> Iterator[tuple[int, int]]:
    """Chunk keys in column strips ``strip`` chunks wide, each strip top to bottom, row by row.

    A window reaches into the blocks of the chunk rows above and below it; visiting a narrow
    strip row by row means those blocks were decoded moments ago and are still in the reader's
    bounded block cache, whatever the image width: sort key ``(ix // strip, iy, ix)``.
    """
    if strip < 1:
        raise ValueError("strip must be positive")
    return _strips(grid.rows, grid.cols, strip)


def _strips(rows: int, cols: int, strip: int) -> Iterator[tuple[int, int]]:
    # lazy: a 200,000² image has 152,000 chunks; its order is never held as a list
    for x0 in range(0, cols, strip):
        for iy in range(rows):
            for ix in range(x0, min(x0 + strip, cols)):
                yield (iy, ix)


def batches(items: list, size: int) -> list[list]:
    """Split ``items`` into consecutive lists of at most ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError("batch size must be positive")
    return [items[i : i + size] for i in range(0, len(items), size)]
