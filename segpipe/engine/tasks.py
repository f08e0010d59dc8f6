"""The worker side: Dask tasks that run tiles through the engine and write their chunks, and the
driver loop that submits them with a bounded number in flight.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.errors import SegpipeError
from segpipe.core.geometry import Chunk, strip_order
from segpipe.core.results import ImageResult, Progress
from segpipe.core.scheduling import TaskBudget
from segpipe.engine import stop
from segpipe.engine.fence import Fenced, RunTasks, cancelled, retried_task, wait_for_started
from segpipe.engine.job import ChunkJob, TileWork
from segpipe.engine.sizing import TASKS_PER_DEVICE, TaskSizer, TimedPredictor
from segpipe.engine.tiled import TilePlan, TileStats, infer_tiles
from segpipe.io.output import (
    OutputTarget,
    write_chunk,
)
from segpipe.io.readers import shared_reader, thread_reader
from segpipe.io.readers.tissue import TissueMask, tissue_mask, tissue_pixels
from segpipe.io.uncertainty import ChunkUncertainty

if TYPE_CHECKING:
    from distributed import Client


log = logging.getLogger("segpipe.engine.segment")


def _write_fill(job: ChunkJob, chunk: Chunk, value: int | None) -> np.ndarray:
    """A chunk the model does not see: ``value`` everywhere (probability 1 for it), or nodata (all 0)."""
    label = job.target.nodata_label if value is None else value
    labels = np.full((chunk.h, chunk.w), label, dtype=job.target.label_dtype)
    probs = None
    if job.target.probabilities:
        probs = np.zeros((job.target.num_classes, chunk.h, chunk.w), np.uint8)
        if value is not None:
            probs[value] = 255
    write_chunk(job.target, chunk, labels, probs)
    return labels

PARALLEL_READ_BATCH = 4

def run_tiles(job: ChunkJob, work: TileWork, fill: bool = False) -> dict[str, Any]:
    """Dask task: predict a few tiles and write their chunks, retrying storage faults that may pass.

    Bad input (:class:`InputError`) and permanent storage errors are never retried; a fault that may pass
    (:class:`TransientIOError`: a bucket's 5xx or 403, a chunk PUT's ``EREMOTEIO``, a dropped connection,
    a time-out) is, with the run's :class:`~segpipe.core.retry.RetryPolicy` (``job.retry``), until the
    task is cancelled (the fence). Re-running is safe: each chunk is written whole, by this task only.
    The counters say how many retries it took (``storage_retries``, with the last fault's line).

    A SegpipeError (bad input, a fault that outlasted the retries) is *returned* as ``{"error": e}``,
    detached from its cause (see :meth:`SegpipeError.detached`): a task that raises makes every Dask worker
    log a "Compute Failed" block with a traceback, while an input error deserves one line, printed once by
    the driver. Anything else (a bug) still raises, with its traceback.
    """
    counters = retried_task(partial(_run_tiles, job, work), job.retry, fill)
    return {**counters.pop("value", {}), **counters}

class _ZarrSink:
    """Merged chunks into the output: one writer per chunk, class ids last (the completion record).

    Pyramid level 1 from memory: when this task writes every chunk of a tile and the tile is an
    even number of chunks wide (the default tile is 2 × 2 chunks: exactly one level-1 chunk), the
    tile's labels are gathered as its chunks go by and its level-1 chunks are written at once,
    so the pyramid pass starts at level 2 instead of reading level 0 back. Other tiles (resumed
    ones, slide background, odd tile sizes) are left to the pyramid pass, which computes every
    level-1 chunk not in the store.
    """

    def __init__(self, job: ChunkJob, plan: TilePlan, items: list[tuple[Chunk, list[Chunk]]],
                 tissue: TissueMask | None = None) -> None:
        self.target = job.target
        self.tissue, self.background = tissue, job.background_class
        self.tiles: dict[tuple[int, int], tuple[Chunk, np.ndarray, set[tuple[int, int]]]] = {}
        if self.target.has_level1 and (plan.tile_size // plan.chunk_size) % 2 == 0:
            for tile, chunks in items:
                if len(chunks) == len(plan.chunks(tile)):  # this task writes all of the tile
                    canvas = np.empty((tile.h, tile.w), dtype=self.target.label_dtype)
                    entry = (tile, canvas, {c.key for c in chunks})  # one entry, shared by the tile's chunks
                    self.tiles.update({c.key: entry for c in chunks})

    def write(self, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None) -> None:
        if cancelled():
            raise Fenced(chunk.key)
        if self.tissue is not None:
            glass = ~tissue_pixels(self.tissue.mask, chunk, self.tissue.scale)
            if glass.any():
                labels = labels.copy()
                labels[glass] = self.target.nodata_label if self.background is None else self.background
                if probs is not None:
                    probs = probs.copy()
                    probs[:, glass] = 0
                    if self.background is not None:
                        probs[self.background][glass] = 255
        write_chunk(self.target, chunk, labels, probs)
        self._gather(chunk, labels)

    def fill(self, job: ChunkJob, chunk: Chunk, value: int | None) -> None:
        if cancelled():
            raise Fenced(chunk.key)
        labels = _write_fill(job, chunk, value)
        self._gather(chunk, labels)

    def _gather(self, chunk: Chunk, labels: np.ndarray) -> None:
        entry = self.tiles.pop(chunk.key, None)
        if entry is None:
            return
        tile, canvas, missing = entry
        canvas[chunk.y0 - tile.y0:chunk.y0 - tile.y0 + chunk.h, chunk.x0 - tile.x0:chunk.x0 - tile.x0 + chunk.w] = labels
        missing.discard(chunk.key)
        if not missing:
            self._write_level1(tile, canvas)

    def _write_level1(self, tile: Chunk, labels: np.ndarray) -> None:
        from segpipe.engine.pyramid import downsample_mode
        from segpipe.io.output import write_level1_chunk

        c = self.target.chunk_size
        down = downsample_mode(labels, self.target.num_classes)  # the pyramid's own reduction
        y1, x1 = tile.y0 // 2, tile.x0 // 2  # level-1 origin of the tile (tile.y0 is a multiple of 2c)
        for iy in range(y1 // c, (y1 + down.shape[0] + c - 1) // c):
            for ix in range(x1 // c, (x1 + down.shape[1] + c - 1) // c):
                block = down[iy * c - y1:(iy + 1) * c - y1, ix * c - x1:(ix + 1) * c - x1]
                if not write_level1_chunk(self.target, (iy, ix), block):
                    return

_tissue_cache: dict[tuple[Any, ...], TissueMask] = {}
_tissue_lock = threading.Lock()


def worker_tissue_mask(reader: Any, source: str, fingerprint: str, read: Any) -> TissueMask:
    """This process's tissue mask of an image: computed from one thumbnail on first use, then reused
    by every tile task of the image (a few recent images are kept)."""
    key = (source, fingerprint, read.bands, reader.info.grid)
    with _tissue_lock:
        hit = _tissue_cache.get(key)
    if hit is None:
        hit = tissue_mask(reader)  # the driver's rule, so skipped chunks and glass pixels agree
        with _tissue_lock:
            while len(_tissue_cache) >= 8:
                _tissue_cache.pop(next(iter(_tissue_cache)))
            _tissue_cache[key] = hit
    return hit


_pinned = threading.local()


def _run_tiles(job: ChunkJob, work: TileWork, fill: bool) -> dict[str, Any]:
    """Predict ``work``'s tiles through the engine and write their chunks (or write them as fill)."""
    from segpipe.engine.predictor import cached_predictor, pin_thread

    plan = TilePlan.of(job.tiling, job.target.height, job.target.width)
    grid, tiles = plan.grid, plan.tiles
    items = [(tiles.chunk(*tk), [grid.chunk(*ck) for ck in cks]) for tk, cks in work]
    megapixels = sum(c.h * c.w for _, cks in items for c in cks) / 1e6
    if fill:  # slide background outside the tissue mask
        n = 0
        for _, cks in items:
            for c in cks:
                if cancelled():
                    raise Fenced(c.key)
                _write_fill(job, c, job.background_class)
                n += 1
        return {"chunks": n, "skipped": n, "megapixels": megapixels, "stats": TileStats()}
    t0 = time.perf_counter()
    r = job.read
    # one tile per task (CPU): one shared handle, each block decoded once; several (GPU): a
    # handle per thread so batches are read in parallel (overlaps within a tile stay cached)
    open_reader = thread_reader if len(work) >= PARALLEL_READ_BATCH else shared_reader
    reader = open_reader(job.source, r.bands, grid=job.grid, fingerprint=job.fingerprint)
    predictor = cached_predictor(job.model.uri, job.model.sha256, job.inference)
    if predictor.cpu is not None and predictor.cpu.host_cores and not getattr(_pinned, "done", False):
        pin_thread(predictor.cpu.host_cores)  # this worker thread reads and writes beside the forward's cores
        _pinned.done = True
    timed = TimedPredictor(predictor)
    tissue = worker_tissue_mask(reader, job.source, job.fingerprint, r) if job.tissue else None
    sink = _ZarrSink(job, plan, items, tissue)
    stats = infer_tiles(reader, timed, plan, items, sink, norm=job.norm,
                        nodata=job.target.nodata_label, batch_size=job.forward_batch or max(1, len(work)),
                        skip_empty=r.skip_empty, fill=lambda c, v: sink.fill(job, c, v), uncertainty=True)
    values, stats.uncertainty = stats.uncertainty, {}  # the driver stores them (io.uncertainty), not the totals
    rate = predictor.seconds_per_megapixel
    return {"chunks": stats.chunks, "skipped": stats.skipped, "megapixels": megapixels, "stats": stats,
            "seconds_per_megapixel": rate, "uncertainty": values,
            # what this task gave the device (its windows at the worker's rate), and its own host time
            # (everything but waiting for its forwards): the driver sizes the device share from them
            "device_seconds": timed.pixels / 1e6 * rate if rate else 0.0,
            "host_seconds": max(0.0, time.perf_counter() - t0 - timed.seconds)}


def tile_work(plan: TilePlan, done: set[tuple[int, int]], background: set[tuple[int, int]]
               ) -> tuple[Iterator[Any], Iterator[Any]]:
    """Lazily, the (tile, chunks) to compute and the (tile, chunks) to write as background fill.

    Tiles are visited in column strips (see :func:`strip_order`) so a window's neighbours were
    decoded moments ago; only chunks not yet in the store are written (resume), and a tile whose
    missing chunks are all slide background is not computed.
    """
    tiles = plan.tiles

    def split() -> Iterator[tuple[bool, tuple[tuple[int, int], list[tuple[int, int]]]]]:
        for tk in strip_order(tiles, strip=max(1, 8 * plan.chunk_size // plan.tile_size)):
            missing = [c.key for c in plan.chunks(tiles.chunk(*tk)) if c.key not in done]
            bg = [k for k in missing if k in background]
            todo = [k for k in missing if k not in background]
            if todo:
                yield True, (tk, todo)
            if bg:
                yield False, (tk, bg)

    if not background:
        return (w for _, w in split()), iter(())
    items = list(split())  # slides: the tile grid of a slide level is small
    return (w for c, w in items if c), (w for c, w in items if not c)

_budgets: dict[str, TaskBudget] = {}
_budgets_lock = threading.Lock()


def task_budget(client: Client, threads: int) -> TaskBudget:
    """This process's :class:`TaskBudget` for the cluster of ``client``, sized to its ``threads`` now
    (workers join and leave adaptive clusters): every image this process drives there shares it."""
    key = str(getattr(getattr(client, "scheduler", None), "address", None) or id(client))
    limit = TaskBudget.for_threads(threads)
    with _budgets_lock:
        budget = _budgets.get(key)
        if budget is None:
            if len(_budgets) > 16:
                _budgets.clear()
            budget = _budgets[key] = TaskBudget(limit)
    if budget.limit != limit:
        budget.resize(limit)
    return budget


def _next_finished(finished: queue.SimpleQueue[Any]) -> Any:
    """The next task Dask finished; raises KeyboardInterrupt in the meantime if the run was told to stop."""
    while True:
        try:
            return finished.get(timeout=0.25)
        except queue.Empty:
            stop.check()


def run_tile_tasks(client: Client, job: ChunkJob, work_batches: Iterator[TileWork], fill_batches: Iterator[TileWork],
               result: ImageResult, progress: Progress | None, gpu_workers: bool, threads: int,
               sizer: TaskSizer | None = None, uncertainty: ChunkUncertainty | None = None,
               shared: Callable[[TileWork, dict[str, float] | None], Any] | None = None) -> TileStats:
    """Run the tile tasks with a bounded number in flight; returns merged counters.

    ``shared``: a small image's one task of tile work goes there instead of its own Dask task
    (``shared(work, resources)`` returns a future-like value: :mod:`segpipe.engine.groups`); fill tasks
    never do.

    The chunks' uncertainty values go to ``uncertainty`` as tasks finish (written periodically, and
    once more when the loop ends, also on an error: resumed chunks keep their values).

    Submitting an image's whole graph at once makes the driver's memory grow with the number
    of chunks (a 200,000² image: 152,000 tasks, GBs before the first chunk is written), so
    tasks are submitted as earlier ones finish, and the tasks pending over *every* image this process
    drives on the cluster are bounded by its :func:`task_budget` (a small multiple of the worker threads),
    whatever the number and size of the images.
    """
    from segpipe.engine.cluster import is_in_process, trim_memory

    # a tile task takes a share of a GPU, not all of it: several run on one device at once, one in the
    # forward while the others read their windows and write their chunks (the predictor runs one
    # forward at a time and merges small requests); a whole GPU per task left the device idle during
    # every task's reads and writes (simulated device at half the host's floor: busy 0.65 of the time)
    # (the share is re-derived from the tasks' measured host and device time: tasks_per_device)
    gpu = job.inference.device != "cpu" and gpu_workers
    run = job.target.run_id[:8]
    budget = task_budget(client, threads)
    me = object()  # this image, as a holder of the budget's slots
    running: dict[Any, Any] = {}  # key → future: submitted, not yet processed here
    finished: queue.SimpleQueue[Any] = queue.SimpleQueue()  # futures, as Dask finishes them

    def submit(batch: TileWork, fill: bool) -> None:
        kind = "fill" if fill else "tiles"
        ty, tx = batch[0][0]
        share = (sizer.device_share() if sizer is not None else 1 / TASKS_PER_DEVICE)
        resources = {"GPU": share} if gpu and not fill else None
        if shared is not None and not fill:
            fut = shared(batch, resources)
        else:
            fut = client.submit(run_tiles, job, batch, fill, pure=False, resources=resources,
                                key=f"segpipe-{kind}-{run}-{ty}-{tx}-{uuid.uuid4().hex[:6]}")
        running[fut.key] = fut
        fut.add_done_callback(finished.put)  # called in a Dask client thread

    batches = itertools.chain(((b, False) for b in work_batches), ((b, True) for b in fill_batches))
    upcoming = list(itertools.islice(batches, 1))  # one batch cut ahead: is there more work?

    def top_up() -> None:
        """Submit as many batches as the budget grants: waiting for a slot only when none of this
        image's tasks runs (it could not go on otherwise)."""
        while upcoming:
            if shared is not None and not upcoming[0][1]:  # a share of a shared task: no slot of its own
                submit(*upcoming.pop())
                upcoming.extend(itertools.islice(batches, 1))
                continue
            n = budget.take(me, 1 << 30, wait=not running)
            if not n:
                return
            for _ in range(n):
                if not upcoming:
                    budget.give(me)
                    continue
                submit(*upcoming.pop())
                upcoming.extend(itertools.islice(batches, 1))  # cut when submitted: it takes the sizer's size now

    stats = TileStats()
    trim = is_in_process(client)
    try:
        top_up()
        i = 0
        while running:
            fut = _next_finished(finished)
            if running.pop(fut.key, None) is None:
                continue
            budget.give(me)
            i += 1
            if trim and i % 16 == 15:
                trim_memory()
            if fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, SegpipeError):
                    raise exc.detached()
                raise exc.with_traceback(fut.traceback())
            counters = fut.result()
            fut.release()
            result.add_retries(int(counters.get("storage_retries", 0)), counters.get("retried"))
            if "error" in counters:
                raise counters["error"]
            if sizer is not None:
                sizer.observe(counters)  # before the next batch is cut: it takes the new size
            result.device_seconds += float(counters.get("device_seconds", 0.0))
            top_up()
            result.chunks_computed += int(counters["chunks"] - counters["skipped"])
            result.chunks_skipped += int(counters["skipped"])
            stats.add(counters["stats"])
            if uncertainty is not None:
                uncertainty.record(counters.get("uncertainty") or {})
            if progress:
                progress.advance(int(counters["chunks"]), float(counters["megapixels"]))
    finally:
        budget.leave(me)
        left = list(running.values())
        for f in left:
            f.cancel()  # a started shared task is waited for here (engine.groups.SharedItem.cancel)
        if uncertainty is not None:
            uncertainty.flush(quiet=True)
        if left:  # the lock is released after this: no task of this run may write after it
            wait_for_started(client, (f"segpipe-tiles-{run}-", f"segpipe-fill-{run}-"))
    return stats


def build_output_pyramids(target: OutputTarget, client: Client, tasks: RunTasks) -> None:
    from segpipe.engine.pyramid import build_probability_pyramid, build_pyramid

    if target.height <= target.chunk_size and target.width <= target.chunk_size:
        return  # one chunk: no lower level to build (levels stop at about one chunk)
    build_pyramid(target.uri, num_classes=target.num_classes, client=client, keep_written=True, tasks=tasks)
    if target.probabilities:
        build_probability_pyramid(target.uri, client=client, tasks=tasks)
