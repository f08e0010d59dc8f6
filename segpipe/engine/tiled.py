"""The one tiled-inference engine: split → predict → merge → sink.

Production segmentation (``segment``), ``segpipe evaluate`` and validation during training all
run images through :func:`infer_tiles`; only the sink differs (Zarr chunks, an in-memory array,
a confusion matrix). Normalisation happens in one place, the predictor.

Vocabulary (see :mod:`segpipe.core.geometry`): a **chunk** is one cell of the output grid and
one Zarr chunk; a **tile** is what the model sees at once: ``k × k`` chunks (``tile_size = k ·
chunk_size``) plus the **halo** on every side, read as one **window**. Tiles are cells of the
grid with ``chunk_size = tile_size``, so the labels of any output equal the plain chunked
definition with the tile as the unit, whatever the storage chunk; each chunk lies in exactly
one tile, so it has exactly one writer.

- **split**: :meth:`TilePlan.window` of a tile (reflection outside the image, by the reader);
- **predict**: the predictor maps a batch of windows to labels (and probabilities);
- **merge**: :func:`merge` crops each chunk's core out of its tile's prediction and applies
  the valid-data mask (pixels without data take the nodata label) — pure, no I/O, no model;
- **sink**: receives ``(chunk, labels, probabilities)``; it never sees the model.

With ``uncertainty``, each computed chunk also gets one number from the same forward: the mean over
its pixels with data of the softmax entropy normalised by log(K) (:func:`chunk_uncertainty`), returned
in :attr:`TileStats.uncertainty`; ``segment`` stores it in the output for active learning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from segpipe.core.geometry import (
    Chunk,
    ChunkGrid,
    Window,
    chunk_in_tile_window,
    chunks_in_tile,
    effective_tile_size,
    input_window,
    tile_side,
)
from segpipe.core.settings import TilingSettings


@dataclass(frozen=True)
class TilePlan:
    """The chunk grid and the tile grid of one image."""

    height: int
    width: int
    chunk_size: int
    tile_size: int  #: effective for this image (never larger than the image in whole chunks)
    halo: int
    multiple_of: int = 32

    @classmethod
    def of(cls, tiling: TilingSettings, height: int, width: int) -> TilePlan:
        tile = effective_tile_size(tiling.tile, tiling.chunk_size, height, width)
        return cls(height, width, tiling.chunk_size, tile, tiling.halo, tiling.multiple_of)

    @property
    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.height, self.width, self.chunk_size)

    @property
    def tiles(self) -> ChunkGrid:
        return ChunkGrid(self.height, self.width, self.tile_size)

    @property
    def window_side(self) -> int:
        return tile_side(self.tile_size, self.halo, self.multiple_of)

    def window(self, tile: Chunk) -> Window:
        """The model input window of ``tile``: its core plus the halo, padded to ``multiple_of``."""
        return input_window(tile, self.tile_size, self.halo, self.multiple_of)

    def chunks(self, tile: Chunk) -> list[Chunk]:
        return chunks_in_tile(tile, self.grid, self.tile_size)


class ChunkSink(Protocol):
    """Where merged chunks go (Zarr, an array, a confusion matrix)."""

    def write(self, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None) -> None: ...


class Predicts(Protocol):
    """What the engine needs from a predictor: raw windows (N, bands, T, T) → labels (N, T, T), probabilities."""

    def predict(self, tiles: np.ndarray, norm: Any = None,
                crop: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]: ...


class PredictsUncertainty(Predicts, Protocol):
    """A predictor that also gives each pixel's normalised entropy (N, T, T) from the same forward."""

    def predict_uncertain(self, tiles: np.ndarray, norm: Any = None, crop: tuple[int, int] | None = None,
                          ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]: ...


def chunk_uncertainty(entropy: np.ndarray, tile: Chunk, chunk: Chunk, valid: np.ndarray | None = None) -> float:
    """Uncertainty of ``chunk``: the mean of the per-pixel normalised entropy over its core pixels with data.

    ``entropy`` is the tile's map cropped to the tile core (it starts at the tile's origin, so the
    halo and the padding past the image edge never count); ``valid`` is the tile core's valid-data
    mask (None: all valid). NaN when the chunk has no pixel with data.
    """
    e = entropy[chunk.y0 - tile.y0:chunk.y0 - tile.y0 + chunk.h, chunk.x0 - tile.x0:chunk.x0 - tile.x0 + chunk.w]
    if valid is not None:
        e = e[_core(valid, tile, chunk)]
    return float(e.mean(dtype=np.float64)) if e.size else float("nan")


def merge(plan: TilePlan, tile: Chunk, labels: np.ndarray, probs: np.ndarray | None, chunks: Iterable[Chunk],
          valid: np.ndarray | None = None, nodata: int = 255, cropped: bool = False,
          ) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray | None]]:
    """Crop each of ``chunks`` (cells of ``tile``) out of the tile's window-shaped prediction
    (``cropped``: a prediction that starts at the tile core's origin, the halo already cut).

    ``valid`` is the tile core's valid-data mask (core.h, core.w) or None (all valid): pixels
    without data take the ``nodata`` label and probability 0 for every class.
    """
    for c in chunks:
        ys, xs = chunk_in_tile_window(c, tile, 0 if cropped else plan.halo)
        lab = labels[ys, xs]
        p = None if probs is None else probs[:, ys, xs]
        if valid is not None:
            v = _core(valid, tile, c)
            if not v.all():
                lab = np.where(v, lab, nodata).astype(lab.dtype)
                if p is not None:
                    p = p.copy()
                    p[:, ~v] = 0
        yield c, lab, p


def _core(valid: np.ndarray, tile: Chunk, chunk: Chunk) -> np.ndarray:
    """``chunk``'s part of its tile core's valid mask."""
    return valid[chunk.y0 - tile.y0:chunk.y0 - tile.y0 + chunk.h, chunk.x0 - tile.x0:chunk.x0 - tile.x0 + chunk.w]


@dataclass
class TileStats:
    """Counters of one run of :func:`infer_tiles` (small: they travel back through Dask)."""

    chunks: int = 0
    skipped: int = 0  #: chunks written without the model (no data / background)
    content: bool = False  #: some window had more than one pixel value
    min_label: int = 1 << 30
    max_label: int = -1
    #: chunk key → uncertainty (:func:`chunk_uncertainty`) of each chunk computed with ``uncertainty``
    uncertainty: dict[tuple[int, int], float] = field(default_factory=dict)

    def labels_seen(self, lab: np.ndarray, nodata: int) -> None:
        # min/max of the class ids (nodata excluded): one class everywhere ⇔ min == max
        lo = int(lab.min()) if lab.size else nodata
        if lo == nodata:
            return  # only nodata here (the label is the dtype's maximum)
        hi = int(lab.max())
        if hi == nodata:
            hi = int(lab[lab != nodata].max())
        self.min_label, self.max_label = min(self.min_label, lo), max(self.max_label, hi)

    def add(self, other: TileStats) -> None:
        self.chunks += other.chunks
        self.skipped += other.skipped
        self.content |= other.content
        self.min_label = min(self.min_label, other.min_label)
        self.max_label = max(self.max_label, other.max_label)
        self.uncertainty.update(other.uncertainty)


def infer_tiles(reader: Any, predictor: Predicts, plan: TilePlan, work: Sequence[tuple[Chunk, list[Chunk]]],
                sink: ChunkSink, *, norm: Any = None, nodata: int = 255, batch_size: int = 1,
                skip_empty: bool = True, fill: Any = None, uncertainty: bool = False) -> TileStats:
    """Predict each ``(tile, chunks to write)`` of ``work`` in batches and hand the chunks to ``sink``.

    With ``uncertainty`` (a predictor with ``predict_uncertain``), every chunk sent to the model gets
    its :func:`chunk_uncertainty` in the returned :attr:`TileStats.uncertainty`; skipped chunks get none.

    With ``skip_empty`` and a reader that has a valid-data mask, a tile whose core has no data
    is not sent to the model: its chunks are written as ``nodata`` (through ``fill``, a callable
    ``fill(chunk, value)``, or as plain arrays to the sink).
    """
    stats = TileStats()
    pending: list[tuple[Chunk, list[Chunk], np.ndarray | None]] = []
    has_mask = skip_empty and bool(getattr(reader, "has_mask", False))
    for tile, chunks in work:
        stats.chunks += len(chunks)
        valid = None
        if has_mask:
            valid = reader.read_valid(Window(tile.y0, tile.x0, tile.h, tile.w))
            if valid is not None and not valid.all():
                # chunks without any data are written as nodata without the model
                empty = [c for c in chunks if not _core(valid, tile, c).any()]
                for c in empty:
                    _write_empty(sink, c, nodata, fill)
                stats.skipped += len(empty)
                chunks = [c for c in chunks if c not in empty]
                if not chunks:
                    continue
            elif valid is not None:
                valid = None
        pending.append((tile, chunks, valid))
        if len(pending) == batch_size:
            _predict_batch(reader, predictor, plan, pending, sink, norm, nodata, stats, uncertainty)
            pending = []
    if pending:
        _predict_batch(reader, predictor, plan, pending, sink, norm, nodata, stats, uncertainty)
    return stats


def _write_empty(sink: ChunkSink, chunk: Chunk, nodata: int, fill: Any) -> None:
    if fill is not None:
        fill(chunk, None)
    else:
        sink.write(chunk, np.full((chunk.h, chunk.w), nodata, np.uint8 if nodata <= 255 else np.uint16), None)


def _predict_batch(reader: Any, predictor: Predicts, plan: TilePlan,
                   batch: list[tuple[Chunk, list[Chunk], np.ndarray | None]], sink: ChunkSink, norm: Any,
                   nodata: int, stats: TileStats, uncertainty: bool = False) -> None:
    windows = [reader.read(plan.window(tile)) for tile, _, _ in batch]
    stack = windows[0][None] if len(windows) == 1 else np.stack(windows)
    del windows
    stats.content |= bool(stack.min() != stack.max())
    # only the tile cores come back: the halo's predictions are never used
    crop = (plan.halo, plan.tile_size)
    entropy = None
    if uncertainty:
        labels, probs, entropy = predictor.predict_uncertain(stack, norm, crop=crop)  # type: ignore[attr-defined]
    else:
        labels, probs = predictor.predict(stack, norm, crop=crop)
    del stack
    for i, (tile, chunks, valid) in enumerate(batch):
        for c, lab, p in merge(plan, tile, labels[i], None if probs is None else probs[i], chunks, valid, nodata,
                               cropped=True):
            stats.labels_seen(lab, nodata)
            if entropy is not None:
                stats.uncertainty[c.key] = chunk_uncertainty(entropy[i], tile, c, valid)
            sink.write(c, lab, p)


class ArraySink:
    """Merged chunks into one in-memory label array (small images: validation, tests)."""

    def __init__(self, height: int, width: int, dtype: Any = np.uint8, fill: int = 255) -> None:
        self.labels = np.full((height, width), fill, dtype=dtype)

    def write(self, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None) -> None:
        self.labels[chunk.y0:chunk.y0 + chunk.h, chunk.x0:chunk.x0 + chunk.w] = labels


def whole_image_work(plan: TilePlan) -> list[tuple[Chunk, list[Chunk]]]:
    """Every tile of an image with all of its chunks (nothing done yet)."""
    return [(t, plan.chunks(t)) for t in plan.tiles]
