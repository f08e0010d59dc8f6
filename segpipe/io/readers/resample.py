"""A reader on a pixel grid: any source served on the :class:`~segpipe.core.grid.PixelGrid` chosen for it.

:func:`on_grid` is the one way an image, a mask or a label reader is put on a grid:

* the grid's pixels come from the coarsest pyramid level / COG overview at or finer than the
  grid (:func:`segpipe.core.grid.choose_level`; the level read as it is when it *is* the grid);
* the remaining factor is area-averaged (:func:`segpipe.io.readers.levels.area_resample`) — or,
  for class ids (``labels=True``), the source pixel under each grid pixel's centre; labels are read
  from level 0 (a mask's overviews, when it has any, were averaged or decimated by some other rule);
* a read is done in strips of grid rows whose source block stays under a budget tied to the
  window, so the memory of one read is a small constant multiple of its output at any factor (a
  1,152² window at 6.7× no longer makes a 7,700² block and float64 copies of it);
* windows past the grid's edge are reflected on the grid, as every reader reflects on its own pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from segpipe.core.geometry import Window, gather, source_indices
from segpipe.core.grid import PixelGrid, choose_level, residual
from segpipe.io.readers.base import ImageInfo, ImageReader
from segpipe.io.readers.levels import accumulator_dtype, area_resample, nearest_indices, source_span

#: source pixels (per band) one strip of a resampled read may hold, at least: small windows read in one go
STRIP_MIN_PIXELS = 1 << 18


def grid_info(info: ImageInfo, grid: PixelGrid, **extra: Any) -> ImageInfo:
    """``info`` (a source's header) as served on ``grid``: the grid's size, georeference and resolution."""
    return dataclasses.replace(info, height=grid.height, width=grid.width, crs_wkt=grid.crs_wkt,
                               transform=grid.transform, mpp=grid.mpp, on_grid=grid,
                               extra={**info.extra, **extra})


class GridReader:
    """``base`` (one pyramid level of the source) served on ``grid``: ``ry`` × ``rx`` base pixels per grid
    pixel, area-averaged (images) or nearest (``labels``); see the module docstring."""

    def __init__(self, base: ImageReader, grid: PixelGrid, ry: float, rx: float, *, labels: bool = False,
                 level: int = 0) -> None:
        if ry <= 0 or rx <= 0:
            raise ValueError(f"factors must be positive, got {ry}, {rx}")
        self.base, self.grid, self.ry, self.rx, self.labels = base, grid, float(ry), float(rx), labels
        self.info = grid_info(base.info, grid, level=level, grid_factor=[self.ry, self.rx])

    @property
    def factor(self) -> float:
        return self.rx

    def _rows_per_strip(self, h: int, w: int) -> int:
        # source pixels per grid row ≈ ry · rx · w: a strip's block holds about an eighth of the output's pixels
        per_row = max(1.0, self.ry * self.rx * w)
        return max(1, min(h, int(max(h * w // 8, STRIP_MIN_PIXELS) // per_row)))

    def _read_inside(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        (lx0, lx1) = source_span(x0, w, self.rx)
        if self.ry == 1.0 and self.rx == 1.0:
            return self.base.read(Window(y0, x0, h, w))
        out: np.ndarray | None = None
        step = self._rows_per_strip(h, w)
        for s0 in range(0, h, step):
            sh = min(step, h - s0)
            ly0, ly1 = source_span(y0 + s0, sh, self.ry)
            block = self.base.read(Window(ly0, lx0, ly1 - ly0, lx1 - lx0))
            if out is None:
                out = np.empty((block.shape[0], h, w), dtype=block.dtype)
            if self.labels:
                rows = nearest_indices(y0 + s0, sh, self.ry, ly0, block.shape[1])
                cols = nearest_indices(x0, w, self.rx, lx0, block.shape[2])
                out[:, s0:s0 + sh] = block[:, rows[:, None], cols]
                continue
            acc = accumulator_dtype(block.dtype)
            part = area_resample(block, 1, y0 + s0, sh, self.ry, ly0, acc)
            del block
            part = area_resample(part, 2, x0, w, self.rx, lx0, acc)
            if np.issubdtype(out.dtype, np.integer):
                lim = np.iinfo(out.dtype)
                np.rint(part, out=part)
                np.clip(part, lim.min, lim.max, out=part)
            out[:, s0:s0 + sh] = part
        assert out is not None
        return out

    def read(self, window: Window) -> np.ndarray:
        """(bands, h, w) on the grid; outside the grid, reflected on the grid."""
        g = self.grid
        if window.inside(g.height, g.width):
            return self._read_inside(window.y0, window.x0, window.h, window.w)
        ys, xs = source_indices(window, g.height, g.width)
        y0, x0 = int(ys.min()), int(xs.min())
        block = self._read_inside(y0, x0, int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1)
        return gather(block, ys - y0, xs - x0)

    def read_valid(self, window: Window) -> np.ndarray | None:
        """Where the grid's pixels have data: the source's valid mask under each pixel's centre (None = all)."""
        fn = getattr(self.base, "read_valid", None)
        if fn is None or (self.ry == 1.0 and self.rx == 1.0 and window.inside(self.grid.height, self.grid.width)):
            return None if fn is None else fn(window)
        g = self.grid
        ys, xs = source_indices(window, g.height, g.width)
        y0, x0 = int(ys.min()), int(xs.min())
        h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
        (ly0, ly1), (lx0, lx1) = source_span(y0, h, self.ry), source_span(x0, w, self.rx)
        valid = fn(Window(ly0, lx0, ly1 - ly0, lx1 - lx0))
        if valid is None:
            return None
        rows = nearest_indices(y0, h, self.ry, ly0, valid.shape[0])
        cols = nearest_indices(x0, w, self.rx, lx0, valid.shape[1])
        return gather(valid[rows[:, None], cols[None, :]], ys - y0, xs - x0)

    def __getattr__(self, name: str) -> Any:  # has_mask, thumbnail and other optional reader features
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> GridReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def on_grid(reader: ImageReader, grid: PixelGrid, *, labels: bool = False, reopen_level: Any = None) -> ImageReader:
    """``reader`` (a source at its level 0) served on ``grid`` — the one way any reader is put on a grid.

    ``reopen_level(level)`` opens the same source at a pyramid level (readers of files with
    overviews or levels); without it, or for ``labels``, every grid is served from level 0.
    The reader returned owns ``reader`` (closing it closes both).
    """
    info = reader.info
    if grid.level0 != (info.height, info.width):
        reader.close()
        raise ValueError(f"a grid over {grid.level0[1]}×{grid.level0[0]} pixels cannot serve a "
                         f"{info.width}×{info.height} image")
    if grid.is_native:
        reader.info = dataclasses.replace(info, on_grid=grid)
        return reader
    shapes = info.levels if (reopen_level is not None and not labels) else (info.levels[0],)
    level = choose_level(shapes, grid.scale)[0]
    base = reader
    if level:
        base = reopen_level(level)
        reader.close()
    ry, rx = residual(grid.scale, (base.info.height, base.info.width), grid.level0)
    if ry == 1.0 and rx == 1.0 and (base.info.height, base.info.width) == grid.shape:
        return _Regridded(base, grid, level=level)
    return GridReader(base, grid, ry, rx, labels=labels, level=level)


class _Regridded:
    """A reader whose pixels already are the grid's: only its header says so."""

    def __init__(self, base: ImageReader, grid: PixelGrid, level: int = 0) -> None:
        self.base, self.grid = base, grid
        self.info = grid_info(base.info, grid, level=level)

    def read(self, window: Window) -> np.ndarray:
        return self.base.read(window)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> _Regridded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
