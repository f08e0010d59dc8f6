"""One image end to end, and many: header → checks → output decision → tile tasks → pyramid → finalize.

The driver (a Prefect task, the CLI, or library code) only handles small values:
URIs, chunk indices and counters. Each Dask task reads its own windows, runs the
worker's cached predictor and writes its own Zarr chunks.

Why this module is long: one image's life (header, checks, output decision, lock, tile tasks, pyramid,
finalize and the release of its lock and pinned reader on every exit) is one sequence, and the loop over
many images shares its model, output names and images-in-flight window; split, an image's lock would be
taken in one module and released in another.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.classes import colors_from_spec
from segpipe.core.errors import InputError, OutputError, SegpipeError, TransientIOError
from segpipe.core.geometry import ChunkGrid
from segpipe.core.grid import PixelGrid, same_pixel_size
from segpipe.core.results import ImageResult, Progress
from segpipe.core.retry import describe
from segpipe.core.scheduling import ImagesInFlight, sliding_window
from segpipe.core.settings import SegmentSettings
from segpipe.engine import stop
from segpipe.engine.cluster import recent_worker_capacity, resolve_run_precision
from segpipe.engine.fence import RunTasks, task_prefixes, watch_lost_workers
from segpipe.engine.groups import is_small, share_tasks
from segpipe.engine.job import ChunkJob, ModelRef, check_model
from segpipe.engine.ownership import OutputPlan, assign_outputs, plan_output, provenance
from segpipe.engine.runtime import resolve_run_runtime
from segpipe.engine.sizing import TaskSizer, batched, tiles_per_task
from segpipe.engine.tasks import build_output_pyramids, run_tile_tasks, tile_work
from segpipe.engine.tiled import TilePlan
from segpipe.io.locks import OutputLock
from segpipe.io.locks import acquire as acquire_lock
from segpipe.io.output import (
    OutputTarget,
    done_chunks,
    finalize,
    inspect_output,
    ome_attrs,
    output_arrays_exist,
    prepare_output,
    read_attrs,
)
from segpipe.io.readers import ImageInfo, open_image, shared_reader, unpin_reader
from segpipe.io.readers.registry import choose_grid
from segpipe.io.storage import SourceImage, list_images, output_uri
from segpipe.io.uncertainty import ChunkUncertainty, read_uncertainty
from segpipe.models.normalization import InputNorm, check_input, image_normalization

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("segpipe.engine.segment")


def check_image(uri: str, info: ImageInfo, model: ModelRef, settings: SegmentSettings) -> InputNorm | None:
    """Refuse an image the model cannot read, or one that declares an absurd size, with one line.

    Returns the fixed input normalisation for its pixel type, or None when the model's is per
    image (percentile stretch: :func:`segpipe.models.normalization.image_normalization`).
    """
    pixels = info.height * info.width
    if pixels > settings.read.max_pixels:
        raise InputError(uri, f"declares {info.width:,} × {info.height:,} pixels, more than --max-pixels "
                              f"{settings.read.max_pixels:,.0f}; raise --max-pixels if the size is real")
    return check_input(model.spec, info, uri)

def at_model_resolution(info: ImageInfo, model: ModelRef, settings: SegmentSettings, uri: str
                        ) -> tuple[SegmentSettings, PixelGrid, str | None]:
    """(the settings, the pixel grid ``uri`` is segmented on, a warning line or None): the image's grid at the
    pixel size its model was trained at (``info``: its full-resolution header), decided once per image.

    ``--level``, ``--mpp`` or ``--gsd`` given by the user win; a model without a recorded resolution,
    or an image without the matching kind of pixel size (mpp for slides, a georeference for ``gsd``),
    is read as it is. The warning says when the image is coarser than the model's pixels (it is then
    upsampled: the model sees less detail than in training).
    """
    r, res = settings.read, model.spec.resolution
    native = info.grid
    have = want = None
    if res is not None and r.level is None and r.mpp is None and r.gsd is None:
        if res.mpp is not None and native.mpp is not None:
            settings = settings.model_copy(update={"read": r.model_copy(update={"mpp": res.mpp})})
            have, want, unit = native.mpp, res.mpp, "µm per pixel"
        elif res.gsd is not None and native.pixel_size is not None:
            settings = settings.model_copy(update={"read": r.model_copy(update={"gsd": res.gsd})})
            have, want, unit = native.pixel_size, res.gsd, "CRS units per pixel"
    r = settings.read
    grid = choose_grid(info, level=r.level, mpp=r.mpp, gsd=r.gsd)
    note = None
    if have is not None and want is not None and have > want and not same_pixel_size(have, want):
        note = (f"{uri}: its pixels ({have:g} {unit}) are coarser than the model's ({want:g}); it is upsampled, "
                "so the model sees less detail than it was trained on")
    return settings, grid, note


def segment_image(image: SourceImage, model: ModelRef, out: str, settings: SegmentSettings, client: Client,
                  progress: Progress | None = None, target_uri: str | None = None) -> ImageResult:
    """Segment one image into ``target_uri`` (default ``OUT/<relative>.zarr``), trying it again while it
    fails on a storage fault that may pass (``settings.retry``; each try resumes from the chunks in the store).

    Storage faults are retried where they happen first (lock, tile and pyramid tasks, the uncertainty
    array); one that outlasts those retries, or strikes elsewhere (the output's metadata, finalize), fails
    the try, and the image is tried again. After the last try it fails with one line naming the fault. The
    row counts every retry (``storage_retries``, with a note naming the last fault) and the tasks a lost
    worker had in hand (``recomputed``). See :func:`_segment_once` for the rest.
    """
    t0 = time.perf_counter()
    first: ImageResult | None = None
    carried, recomputed, last, notes, tries = 0, 0, None, [], _Tries()
    for delay in [*settings.retry.delays(), None]:
        result = _segment_once(image, model, out, settings, client, progress, target_uri, tries)
        result.storage_retries += carried
        result.recomputed += recomputed
        result.retried = result.retried or last
        result.notes = list(dict.fromkeys([*notes, *result.notes]))
        if first is not None:  # chunks an earlier try wrote are this run's work, not resumed from before it
            result.chunks_computed += result.chunks_resumed - first.chunks_resumed
            result.chunks_resumed = first.chunks_resumed
        if result.status != "failed" or not result.transient or delay is None:
            break
        log.warning("%s; the image is tried again in %.1f s", result.error, delay)
        carried, recomputed, last, notes = result.storage_retries + 1, result.recomputed, result.error, result.notes
        first = first or result
        time.sleep(delay)
    if result.storage_retries:
        result.notes.append(f"{result.output or image.uri}: {result.storage_retries} storage fault(s) tried again "
                            f"(last: {result.retried})")
    if result.recomputed:
        result.notes.append(f"{result.output or image.uri}: {result.recomputed} task(s) ran again after a worker "
                            "was lost")
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class _Tries:
    """What the tries of one image share."""

    #: the chunks in the store when the first try planned (written before this run)
    done_before: set[tuple[int, int]] | None = None


def _with_values(uri: str, done: set[tuple[int, int]], before: set[tuple[int, int]], shape: tuple[int, int],
                 settings: SegmentSettings, count: Any) -> set[tuple[int, int]]:
    """The chunks of ``done`` to keep on a later try: those from before the run, and those whose uncertainty
    reached the store. A tile task cut short at the fence when a try failed may have written chunks whose
    values never came back (the driver is the array's only writer): computing them again writes the same
    class ids and gives their values (an empty chunk among them costs a read)."""
    values = settings.retry.call(lambda: read_uncertainty(uri), retried=count)
    if values is None or values.shape != shape:  # never written (or unusable): no chunk since has its value
        return done & before
    return {k for k in done if k in before or bool(np.isfinite(values[k]))}


def _segment_once(image: SourceImage, model: ModelRef, out: str, settings: SegmentSettings, client: Client,
                  progress: Progress | None = None, target_uri: str | None = None,
                  tries: _Tries | None = None) -> ImageResult:
    """Segment one image into ``target_uri`` (default ``OUT/<relative>.zarr``): one try.

    Skips a complete identical output, resumes a partial one, and never touches a path that
    is not a segpipe output of the same image (see :func:`plan_output`). An output being
    written by another run is left to it (one note). Never raises: bad input gives
    ``failed`` with one line in ``error``; anything unexpected (a bug) also fails only this
    image — with its traceback in the log — so the other images of a nightly run still
    finish. A failed image is never marked complete.
    """
    t0 = time.perf_counter()
    target_uri = target_uri or output_uri(out, image.relative)
    result = ImageResult(source=image.uri, output=target_uri)
    tries = tries or _Tries()
    lock: OutputLock | None = None
    pinned: list[Any] = []  # the reader its tile tasks use, held open while the image is in progress
    tasks: RunTasks | None = None  # this try's Dask tasks (key prefix, retries they report)
    lost = watch_lost_workers(client)  # this try's tasks that a lost worker had in hand

    def count(e: BaseException) -> None:  # a storage fault retried here, on the driver (lock, uncertainty)
        result.add_retries(1, describe(e))
    try:
        # the resolved precision is part of the output's identity (auto is bf16 here, fp32 there)
        auto_precision = settings.inference.precision == "auto"
        settings = settings.with_precision(resolve_run_precision(client, settings.inference))
        settings = settings.with_runtime(resolve_run_runtime(client, settings.inference))  # so is the runtime
        # the model's pixel size (model.json resolution) unless --level/--mpp/--gsd says otherwise
        # pinned from the first look: with many images in flight an unpinned handle is evicted before the
        # header read below, and the image opened twice
        pinned.append(shared_reader(image.uri, settings.read.bands, fingerprint=image.fingerprint, pin=True))
        native = pinned[0].info
        settings, grid_px, coarser = at_model_resolution(native, model, settings, image.uri)
        if coarser:
            result.notes.append(coarser)
        gpu_workers, threads = recent_worker_capacity(client)  # a scheduler round trip at most every 10 s
        info, background, norm, tissue = _read_header(image, model, settings, grid_px, pinned)
        result.height, result.width = info.height, info.width
        grid = ChunkGrid(info.height, info.width, settings.tiling.chunk_size)
        result.chunks = len(grid)
        if progress is not None and hasattr(progress, "start_image"):
            progress.start_image(len(grid))
        plan = plan_output(inspect_output(target_uri), image, model, settings, norm, auto_precision)
        if plan.action == "skip":
            result.status = "skipped"
            if plan.reason:  # kept, and why (made in another precision than tonight's auto)
                result.notes.append(f"{target_uri}: {plan.reason}")
            return result
        # the lock comes before any refusal: a folder another run is creating looks foreign until its
        # metadata is written, and a live lock says whose it is
        held = acquire_lock(target_uri, retry=settings.retry, retried=count)
        if not isinstance(held, OutputLock):
            result.status = "skipped"
            result.notes.append(f"{target_uri}: being written by another run ({held.describe()}); left to it")
            return result
        lock = held
        plan = plan_output(inspect_output(target_uri), image, model, settings, norm,  # the holder may have finished
                           auto_precision)
        if plan.action in ("skip", "refuse"):
            if plan.action == "refuse":
                raise OutputError(target_uri, plan.reason)
            result.status = "skipped"
            if plan.reason:
                result.notes.append(f"{target_uri}: {plan.reason}")
            return result
        if plan.reason:
            result.notes.append(f"{target_uri}: {plan.reason}")
        if plan.action == "resume" and not output_arrays_exist(target_uri, settings.inference.probabilities):
            plan = OutputPlan("replace", "replacing an output whose creation was interrupted")
            result.notes.append(f"{target_uri}: {plan.reason}")
        if plan.action == "resume":
            attrs = read_attrs(target_uri) or {}
            run_id = attrs["segpipe"]["run_id"]
            done = done_chunks(target_uri)
            if tries.done_before is not None:  # a later try: redo what a failed try wrote without its values
                done = _with_values(target_uri, done, tries.done_before, grid.shape, settings, count)
        else:
            run_id = uuid.uuid4().hex
            done = set()
        if tries.done_before is None:
            tries.done_before = done
        tasks = RunTasks(run_id, settings.retry)
        target = OutputTarget(target_uri, info.height, info.width, settings.tiling.chunk_size,
                              model.spec.num_classes, settings.inference.probabilities, run_id,
                              settings.output.zstd_level, settings.output.pyramid)
        if plan.action in ("new", "replace"):
            name = posixpath.splitext(posixpath.basename(image.relative))[0]
            colors = colors_from_spec(model.spec.model_extra)
            prepare_output(target, {
                "ome": ome_attrs(name, model.spec.classes, colors, info.mpp),
                "segpipe": provenance(image, info, model, settings, run_id, norm, merged_batches=gpu_workers),
            }, replace=plan.action == "replace")
        result.chunks_resumed = len(done)
        if progress and done:
            progress.advance(len(done), sum(c.h * c.w for c in grid if c.key in done) / 1e6)
        tplan = TilePlan.of(settings.tiling, info.height, info.width)
        per_task = tiles_per_task(settings.inference, gpu_workers, tplan.window_side)
        job = ChunkJob(image.uri, settings.read, model, settings.inference, settings.tiling, target,
                       settings.output.background_class, image.fingerprint, norm, tissue=tissue,
                       forward_batch=per_task, grid=grid_px, retry=settings.retry)
        compute, fill = tile_work(tplan, done, background)
        sizer = TaskSizer(settings.inference.task_seconds, per_task, tplan.window_side, len(tplan.tiles), threads,
                          (model.sha256, settings.inference.device))
        uncertainty = ChunkUncertainty(target_uri, grid.rows, grid.cols, grid.chunk_size,  # resumed: kept
                                       retry=settings.retry, retried=count)
        shared = None
        if is_small(len(tplan.tiles), sizer.size(), bool(background)):  # its tile work shares a Dask task
            shared = share_tasks(client, job, threads)
            result.extra["shared_task"] = True
        t_tasks = time.perf_counter()
        stats = run_tile_tasks(client, job, batched(compute, sizer.size), batched(fill, 32), result, progress,
                           gpu_workers, threads, sizer, uncertainty, shared)
        t_tasks = time.perf_counter() - t_tasks
        uncertainty.flush()  # already written at the loop's end unless that failed: then this names the error
        if stats.content and 0 <= stats.min_label == stats.max_label:
            cls = stats.min_label
            name = model.spec.classes[cls] if cls < len(model.spec.classes) else str(cls)
            result.notes.append(f"{image.uri}: the model predicted one class ({name}) everywhere; check the "
                                "model and the input's pixel type and bands")
        if settings.output.pyramid:
            build_output_pyramids(target, client, tasks)
        finalize(target_uri, {"segpipe": {"chunks": len(grid), "chunks_resumed": len(done),
                                          "chunks_skipped": result.chunks_skipped,
                                          "uncertainty": uncertainty.attrs,
                                          "seconds": round(time.perf_counter() - t0, 3)}})
        result.status = "done"
        result.host_seconds = time.perf_counter() - t0 - t_tasks  # per-image work: the device got nothing
    except SegpipeError as e:
        result.status = "failed"
        result.error = str(e) if image.uri in str(e) or target_uri in str(e) else f"{image.uri}: {e}"
        result.transient = isinstance(e, TransientIOError)
        log.debug("image failed", exc_info=True)
    except Exception as e:  # noqa: BLE001 - one image must not stop the others
        result.status = "failed"
        result.error = f"{image.uri}: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.exception("unexpected error on %s (the other images go on)", image.uri)
    finally:
        if lock is not None and (problem := lock.release()) is not None:
            result.notes.append(problem)  # the image's own result stands
        if tasks is not None:
            result.add_retries(tasks.storage_retries, tasks.retried)
            result.recomputed += lost.recomputed(task_prefixes(tasks.run_id))
        lost.close()
        for reader in pinned:
            unpin_reader(reader)
        result.seconds = time.perf_counter() - t0
    return result

def _read_header(image: SourceImage, model: ModelRef, settings: SegmentSettings, grid: PixelGrid,
                 pinned: list[Any] | None = None) -> tuple[ImageInfo, set[tuple[int, int]], InputNorm, bool]:
    """Header, checks, slide background, the image's input normalisation, and whether its background is
    removed per pixel (a slide with ``skip_empty``), with one open reader.

    The reader is the process's shared one for this image (:func:`shared_reader`, same key as the
    tile tasks'): on the embedded cluster the tasks then read through it instead of opening the
    image a second time (a decode of a PNG chip; a header request per remote COG). With ``pinned``, it
    stays open until the caller unpins it (appended there), however many images are in flight.
    """
    r = settings.read
    reader = shared_reader(image.uri, r.bands, grid=grid, fingerprint=image.fingerprint, pin=pinned is not None)
    if pinned is not None:
        pinned.append(reader)
    info = reader.info
    norm = check_image(image.uri, info, model, settings)
    if norm is None:
        norm = image_normalization(model.spec, reader, image.uri)
    tissue = r.skip_empty and hasattr(reader, "thumbnail")
    background = _background_chunks(reader, settings) if tissue else set()
    return info, background, norm, tissue

def _background_chunks(reader: Any, settings: SegmentSettings) -> set[tuple[int, int]]:
    """Chunks outside a slide's tissue mask (computed once at low resolution); empty for other readers."""
    if not hasattr(reader, "thumbnail"):
        return set()
    from segpipe.io.readers.tissue import chunk_has_tissue, tissue_mask

    tm = tissue_mask(reader)
    grid = ChunkGrid(reader.info.height, reader.info.width, settings.tiling.chunk_size)
    return {c.key for c in grid if not chunk_has_tissue(tm.mask, c, tm.scale)}

def _plan(images: Sequence[SourceImage], model: ModelRef, settings: SegmentSettings) -> tuple[int, float]:
    """Total chunks and megapixels of a run, from image headers only (for progress and ETA): each image on
    the grid it is segmented on (:func:`at_model_resolution`)."""
    chunks, mp = 0, 0.0
    for image in images:
        try:
            with open_image(image.uri, settings.read.bands) as reader:
                grid = at_model_resolution(reader.info, model, settings, image.uri)[1]
        except SegpipeError:
            continue  # reported when the image itself runs
        chunks += len(ChunkGrid(grid.height, grid.width, settings.tiling.chunk_size))
        mp += grid.pixels / 1e6
    return chunks, mp

def segment_many(sources: Sequence[str | SourceImage], model: str, out: str, settings: SegmentSettings, client: Client,
                 progress: Progress | None = None, max_concurrent_images: int | None = None) -> list[ImageResult]:
    """List every source (or take it as listed: a :class:`SourceImage`), check the model once, then segment the
    images, a few at a time.

    Listing errors and failed images become ``failed`` results; the other images still run.
    Model errors raise (nothing can run without a model). Several images are in progress at once, in a
    sliding window (:func:`segpipe.core.scheduling.sliding_window`, the flow's policy too), so one image's
    header reads, output creation and scheduler round trips overlap the others' tiles (a folder of small
    chips is mostly such per-image work). Its width is ``max_concurrent_images``, or by default derived
    from what finished images measured (:class:`segpipe.core.scheduling.ImagesInFlight`: per-image host
    time against the device time of its windows);
    results keep the order of the listing. The progress total is counted from the image headers
    in a background thread while the first images already run.
    """
    import threading
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from segpipe.engine.cluster import is_in_process
    from segpipe.engine.predictor import prime_predictor
    from segpipe.io.storage import ensure_writable

    images: list[SourceImage] = []
    results: list[ImageResult] = []
    for s in sources:
        if isinstance(s, SourceImage):  # already listed (a STAC search: segpipe.io.stac)
            images.append(s)
            continue
        try:
            images.extend(settings.retry.call(lambda s=s: list_images(s)))
        except SegpipeError as e:
            results.append(ImageResult(source=s, output="", status="failed", error=str(e)))
    images = _unique(images)
    ref, artifact = check_model(model)
    settings.retry.call(lambda: ensure_writable(out))
    # resolved once here for the whole run (cached per client); each image is given the settings as asked,
    # so it knows when its precision is what ``auto`` resolved to (an output made in another is then kept)
    resolved = settings.with_precision(resolve_run_precision(client, settings.inference))
    resolved = resolved.with_runtime(resolve_run_runtime(client, resolved.inference))
    if is_in_process(client):
        prime_predictor(artifact, resolved.inference)
    del artifact  # the predictor holds the network; the raw weights need not stay in memory
    names = assign_outputs(images, out)
    planner = None
    if progress:
        planner = threading.Thread(target=lambda: progress.plan(*_plan(images, ref, settings)), daemon=True,
                                   name="segpipe-plan")
        planner.start()

    def one(i: int) -> ImageResult:
        stop.check()  # an image not started when the run was told to stop does not start
        if progress and hasattr(progress, "image"):
            progress.image(i, len(images), images[i].relative)
        return segment_image(images[i], ref, out, settings, client, progress, target_uri=names[images[i].uri])

    done: dict[int, ImageResult] = {}
    width = ImagesInFlight(recent_worker_capacity(client)[1], max_concurrent_images)
    try:
        with ThreadPoolExecutor(width.pool_size, thread_name_prefix="segpipe-image") as pool:
            try:
                for i, fut in sliding_window(range(len(images)), lambda i: pool.submit(one, i),
                                             lambda fs: next(iter(wait(fs, return_when=FIRST_COMPLETED).done)), width):
                    done[i] = fut.result()
                    if done[i].status == "done":
                        width.observe(done[i].host_seconds, done[i].device_seconds,
                                      bool(done[i].extra.get("shared_task")))
            except BaseException:
                # Ctrl-C reaches this thread only: the images in flight stop at their next task and release
                # their locks, or leaving the pool would wait for every one of them to finish
                stop.request()
                raise
    finally:
        stop.clear()
    results.extend(done[i] for i in range(len(images)))
    if planner is not None:
        planner.join()
    return results


def _unique(images: Sequence[SourceImage]) -> list[SourceImage]:
    """Each image once, even when two sources (a folder and a glob) both list it."""
    seen: set[str] = set()
    return [i for i in images if not (i.uri in seen or seen.add(i.uri))]
