"""The per-chunk uncertainty of an output: a small Zarr array ``uncertainty`` beside the class ids.

One value per output chunk, shape (chunk rows, chunk cols), float32: the mean over the chunk's
pixels with data of the softmax entropy normalised by log(K) (0 = certain, 1 = every class equally
likely; see :meth:`segpipe.engine.predictor.Predictor.predict_uncertain`), computed by the tile
tasks from the same forward as the labels. NaN where no value was computed: chunks skipped as
nodata or slide background, and chunks not computed yet.

Unlike the class ids, this array has exactly one writer, the driver of the run (which holds the
output's lock): the tile tasks return their chunks' values with their counters, and
:class:`ChunkUncertainty` gathers them and rewrites the array periodically and at the end. A resumed
run starts from the values in the store, so the values of chunks computed by an earlier run are kept.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from segpipe.core.errors import SegpipeError
from segpipe.core.retry import RetryPolicy
from segpipe.io.chunks import MISSING, RawChunks, plain_array_meta
from segpipe.io.storage import filesystem, join, output_errors, storage_error, strip_file_scheme, write_atomic

UNCERTAINTY = "uncertainty"
#: what ``segpipe.uncertainty`` in an output's root attributes says (docs/outputs.md)
MEASURE = "normalised_entropy"
#: cells per stored chunk of the uncertainty array (a 200,000² image at chunk 512: 391² cells, 4 chunks)
CELLS_PER_CHUNK = 256
#: seconds between two rewrites during a run (a killed run loses at most the values of this long)
FLUSH_SECONDS = 30.0

log = logging.getLogger("segpipe.io.uncertainty")


def uncertainty_attrs(chunk_size: int) -> dict[str, Any]:
    """The record of the array in the output's ``segpipe`` root attributes."""
    return {"array": UNCERTAINTY, "measure": MEASURE, "chunk_size": chunk_size,
            "definition": "mean over the chunk's pixels with data of -sum(p log p) / log(K) of the softmax; "
                          "NaN where not computed"}


def read_uncertainty(uri: str) -> np.ndarray | None:
    """The output's uncertainty array (chunk rows, chunk cols) as float32, or None when it has none."""
    import zarr

    plain, why = RawChunks.probe(uri, UNCERTAINTY)  # the plain layout segpipe writes: no zarr-python machinery
    if why == MISSING:
        return None
    if plain is not None and len(plain.shape) == 2:
        with output_errors(uri, "read"):
            return plain.read((slice(0, plain.shape[0]), slice(0, plain.shape[1]))).astype(np.float32, copy=False)
    try:
        arr = zarr.open_array(strip_file_scheme(join(uri, UNCERTAINTY)), mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError):  # zarr raises these for a missing array
        return None
    except OSError as e:  # a bucket's fault is never "no array": the run would start from NaN
        raise storage_error(uri, e, "read") from None
    with output_errors(uri, "read"):
        return np.asarray(arr[...], dtype=np.float32)


def write_uncertainty(uri: str, values: np.ndarray, chunk_size: int) -> None:
    """Write the whole uncertainty array (creating it when missing). The caller is its only writer.

    Written chunk by chunk straight into the store (:class:`segpipe.io.chunks.RawChunks`) when the array
    is missing or plain: zarr-python's array creation and write cost several ms per image, most of a
    small chip's per-image work (docs/benchmarks.md, issue 22); an array of another layout goes through zarr."""
    import zarr

    path = strip_file_scheme(join(uri, UNCERTAINTY))
    plain, why = RawChunks.probe(uri, UNCERTAINTY)
    if why == MISSING or (plain is not None and plain.shape != values.shape):
        plain = _create_plain(uri, values.shape, chunk_size, replace=why != MISSING)
    if plain is not None:
        with output_errors(uri):
            _write_plain(plain, values.astype(np.float32, copy=False))
        return
    with output_errors(uri):
        try:
            arr = zarr.open_array(path, mode="r+", zarr_format=3)
            if arr.shape != values.shape:
                raise ValueError("shape changed")
        except (FileNotFoundError, ValueError, KeyError):
            cells = (min(CELLS_PER_CHUNK, values.shape[0]), min(CELLS_PER_CHUNK, values.shape[1]))
            arr = zarr.create_array(path, shape=values.shape, chunks=cells, dtype="float32", fill_value=math.nan,
                                    dimension_names=["chunk_y", "chunk_x"], zarr_format=3, overwrite=True,
                                    attributes={"segpipe": uncertainty_attrs(chunk_size)})
        arr[...] = values.astype(np.float32, copy=False)


def _create_plain(uri: str, shape: tuple[int, ...], chunk_size: int, replace: bool) -> RawChunks:
    """A new, empty uncertainty array of ``shape`` (``replace``: one of another shape is removed first)."""
    fs, root = filesystem(strip_file_scheme(uri))
    path = join(root, UNCERTAINTY)
    cells = [min(CELLS_PER_CHUNK, shape[0]), min(CELLS_PER_CHUNK, shape[1])]
    meta = plain_array_meta(list(shape), cells, "float32", "NaN", 3, ["chunk_y", "chunk_x"],
                            {"segpipe": uncertainty_attrs(chunk_size)})
    with output_errors(uri):
        if replace:
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        write_atomic(fs, join(path, "zarr.json"), json.dumps(meta).encode(), durable=False)
    return RawChunks(fs, path, meta)


def _write_plain(plain: RawChunks, values: np.ndarray) -> None:
    ch, cw = plain.chunks
    for iy in range(0, values.shape[0], ch):
        for ix in range(0, values.shape[1], cw):
            plain.write((iy // ch, ix // cw), values[iy:iy + ch, ix:ix + cw])


class ChunkUncertainty:
    """The driver's copy of one output's uncertainty array: values recorded as tile tasks finish,
    written back every :data:`FLUSH_SECONDS` and by :meth:`flush`.

    Starts from what the store holds (a resumed run keeps the earlier run's values), else all NaN. Reads
    and writes are retried with ``retry`` (default: no retry), and ``retried(error)`` is told of each retry.
    """

    def __init__(self, uri: str, rows: int, cols: int, chunk_size: int, every: float = FLUSH_SECONDS,
                 retry: RetryPolicy | None = None, retried: Callable[[BaseException], None] | None = None) -> None:
        self.uri, self.chunk_size, self.every = uri, chunk_size, every
        self.retry, self.retried = retry or RetryPolicy(attempts=1), retried
        stored = self.retry.call(lambda: read_uncertainty(uri), retried=retried)
        if stored is not None and stored.shape == (rows, cols):
            self.values = stored
        else:
            if stored is not None:
                log.warning("%s: uncertainty array of shape %s does not fit the %d × %d chunk grid; restarted",
                            uri, stored.shape, rows, cols)
            self.values = np.full((rows, cols), np.nan, np.float32)
        self.dirty = stored is None or stored.shape != (rows, cols)
        self._last = time.monotonic()

    def record(self, values: Mapping[tuple[int, int], float]) -> None:
        """Store the values of some chunks (chunk key → uncertainty); rewrites the array when it is due."""
        for (iy, ix), v in values.items():
            self.values[iy, ix] = v
        self.dirty |= bool(values)
        if self.dirty and time.monotonic() - self._last >= self.every:
            self.flush()

    def flush(self, quiet: bool = False) -> None:
        """Write the array now (when anything changed since the last write).

        ``quiet``: a storage error is logged, not raised (the end of a run's task loop, where an error may
        already be on its way; the flush before finalize raises it, named once)."""
        if self.dirty:
            try:
                self.retry.call(lambda: write_uncertainty(self.uri, self.values, self.chunk_size),
                                retried=self.retried)
            except (SegpipeError, OSError):
                if not quiet:
                    raise
                log.warning("%s: the uncertainty array could not be written", self.uri, exc_info=True)
                return
            self.dirty = False
        self._last = time.monotonic()

    @property
    def attrs(self) -> dict[str, Any]:
        return uncertainty_attrs(self.chunk_size)
