"""One image end to end: read → tile → infer → write, as chunk tasks on Dask.

The driver (a Prefect task, the CLI, or library code) only handles small values:
URIs, chunk indices and counters. Each Dask task reads its own windows, runs the
worker's cached predictor and writes its own Zarr chunks.
"""

from __future__ import annotations

import itertools
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segpipe import __version__
from segpipe.core.classes import class_colors, colors_from_spec, nodata_label
from segpipe.engine.cluster import worker_capacity
from segpipe.core.settings import InferenceSettings, ReadSettings, SegmentSettings, TilingSettings
from segpipe.core.errors import InputError, OutputError, SegpipeError, TransientIOError
from segpipe.io.locks import OutputLock
from segpipe.io.locks import acquire as acquire_lock
from segpipe.io.readers import ImageInfo, open_image, shared_reader, thread_reader
from segpipe.io.storage import SourceImage, list_images, output_error, output_uri
from segpipe.models.registry import resolve as resolve_model
from segpipe.models.artifact import Artifact, ModelSpec, load_artifact
from segpipe.models.normalization import InputNorm, check_input, image_normalization
from segpipe.io.output import (
    FORMAT, Existing, OutputTarget, done_chunks, finalize, inspect_output, now_iso, ome_attrs, prepare_output,
    read_attrs, write_chunk,
)
from segpipe.core.geometry import Chunk, ChunkGrid, strip_order
from segpipe.engine.tiled import TilePlan, TileStats, infer_tiles

if TYPE_CHECKING:
    from distributed import Client

    from segpipe.export import Exports

log = logging.getLogger("segpipe.engine.segment")

class Progress(Protocol):
    """Receives totals once (``plan``) and increments as chunk tasks finish (``advance``)."""

    def plan(self, chunks: int, megapixels: float) -> None: ...

    def advance(self, chunks: int, megapixels: float) -> None: ...


@dataclass(frozen=True)
class ModelRef:
    """What chunk tasks need to load the model on a worker: where it is and which weights."""

    uri: str
    sha256: str
    spec: ModelSpec


def check_model(model: str) -> tuple[ModelRef, Artifact]:
    """Resolve and load an artifact and build its network once, so a bad model fails before any image."""
    artifact = load_artifact(resolve_model(model))
    artifact.network()  # validates every tensor's name and shape
    return ModelRef(artifact.uri, artifact.sha256, artifact.spec), artifact


@dataclass(frozen=True)
class ChunkJob:
    """Everything a chunk task needs, all small and picklable."""

    source: str
    read: ReadSettings
    model: ModelRef
    inference: InferenceSettings
    tiling: TilingSettings
    target: OutputTarget
    background_class: int | None = None
    fingerprint: str = ""
    #: the image's input normalisation (fixed per pixel type, or a percentile stretch computed once)
    norm: InputNorm | None = None


def _write_fill(job: ChunkJob, chunk: Chunk, value: int | None) -> None:
    """A chunk the model does not see: ``value`` everywhere (probability 1 for it), or nodata (all 0)."""
    label = job.target.nodata_label if value is None else value
    labels = np.full((chunk.h, chunk.w), label, dtype=job.target.label_dtype)
    probs = None
    if job.target.probabilities:
        probs = np.zeros((job.target.num_classes, chunk.h, chunk.w), np.uint8)
        if value is not None:
            probs[value] = 255
    write_chunk(job.target, chunk, labels, probs)


PARALLEL_READ_BATCH = 4

#: a task's work: (tile key, [chunk keys of that tile to write])
TileWork = list[tuple[tuple[int, int], list[tuple[int, int]]]]


def run_tiles(job: ChunkJob, work: TileWork, fill: bool = False, attempts: int = 4) -> dict[str, Any]:
    """Dask task: predict a few tiles and write their chunks, retrying transient storage errors.

    Bad input (:class:`InputError`) is never retried; a network hiccup or bucket throttling
    (:class:`TransientIOError`, ``ConnectionError``, ``TimeoutError``) is, after 1, 2, 4 s.
    Re-running is safe: each chunk is written whole, by this task only. A SegpipeError leaves
    detached from its cause (see :meth:`SegpipeError.detached`) so it reaches the driver as itself.
    """
    error: SegpipeError | None = None
    for attempt in range(attempts):
        try:
            return _run_tiles(job, work, fill)
        except (TransientIOError, ConnectionError, TimeoutError) as e:
            if attempt == attempts - 1:
                error = e.detached() if isinstance(e, SegpipeError) else None
                if error is None:
                    raise
                break
            log.warning("transient error on %s tiles %s, retrying", job.source, [w[0] for w in work[:2]],
                        exc_info=True)
            time.sleep(2**attempt)
        except SegpipeError as e:
            log.debug("tiles %s of %s failed", [w[0] for w in work[:2]], job.source, exc_info=True)
            error = e.detached()  # raised below, outside this block, so it has no chained context
            break
    assert error is not None
    raise error


class _ZarrSink:
    """Merged chunks into the output: one writer per chunk, class ids last (the completion record)."""

    def __init__(self, target: OutputTarget) -> None:
        self.target = target

    def write(self, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None) -> None:
        write_chunk(self.target, chunk, labels, probs)


def _run_tiles(job: ChunkJob, work: TileWork, fill: bool) -> dict[str, Any]:
    """Predict ``work``'s tiles through the engine and write their chunks (or write them as fill)."""
    from segpipe.engine.predictor import cached_predictor

    plan = TilePlan.of(job.tiling, job.target.height, job.target.width)
    grid, tiles = plan.grid, plan.tiles
    items = [(tiles.chunk(*tk), [grid.chunk(*ck) for ck in cks]) for tk, cks in work]
    megapixels = sum(c.h * c.w for _, cks in items for c in cks) / 1e6
    if fill:  # slide background outside the tissue mask
        n = 0
        for _, cks in items:
            for c in cks:
                _write_fill(job, c, job.background_class)
                n += 1
        return {"chunks": n, "skipped": n, "megapixels": megapixels, "stats": TileStats()}
    r = job.read
    # one tile per task (CPU): one shared handle, each block decoded once; several (GPU): a
    # handle per thread so batches are read in parallel (overlaps within a tile stay cached)
    open_reader = thread_reader if len(work) >= PARALLEL_READ_BATCH else shared_reader
    reader = open_reader(job.source, r.bands, r.level, r.mpp, job.fingerprint)
    predictor = cached_predictor(job.model.uri, job.model.sha256, job.inference)
    stats = infer_tiles(reader, predictor, plan, items, _ZarrSink(job.target), norm=job.norm,
                        nodata=job.target.nodata_label, batch_size=max(1, len(work)), skip_empty=r.skip_empty,
                        fill=lambda c, v: _write_fill(job, c, v))
    return {"chunks": stats.chunks, "skipped": stats.skipped, "megapixels": megapixels, "stats": stats}


@dataclass
class ImageResult:
    """The outcome of one image (a row of the run summary)."""

    source: str
    output: str
    status: str = "pending"  #: done | skipped | failed
    height: int = 0
    width: int = 0
    chunks: int = 0
    chunks_computed: int = 0
    chunks_resumed: int = 0
    chunks_skipped: int = 0  #: empty (nodata / background) chunks written as fill, no model run
    seconds: float = 0.0
    error: str | None = None
    #: one-line notices for the user (an output replaced and why, a single-class mask, a busy output)
    notes: list[str] = field(default_factory=list)
    #: the failure was a storage error that may pass when retried (a Prefect task retries it)
    transient: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 and self.status == "done" else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["megapixels"] = round(self.megapixels, 3)
        d["mp_per_s"] = round(self.mp_per_s, 3)
        return d


def provenance(image: SourceImage, info: ImageInfo, model: ModelRef, settings: SegmentSettings,
               run_id: str, norm: InputNorm | None = None) -> dict[str, Any]:
    """The ``segpipe`` root attributes written when an output is created."""
    t = settings.tiling
    num_classes = model.spec.num_classes
    return {
        "format": FORMAT,
        "version": __version__,
        "source": image.uri,
        "source_fingerprint": image.fingerprint,
        "height": info.height,
        "width": info.width,
        "bands": list(settings.read.bands) if settings.read.bands else None,
        "chunk_size": t.chunk_size,
        "tile_size": TilePlan.of(t, info.height, info.width).tile_size,
        "halo": t.halo,
        "multiple_of": t.multiple_of,
        "settings_key": settings.output_key(),
        "settings": settings.output_settings(),
        "tta": settings.inference.tta,
        "model": {**model.spec.core(), "uri": model.uri, "weights_sha256": model.sha256},
        "classes": model.spec.classes,
        "class_colors": class_colors(num_classes, colors_from_spec(model.spec.model_extra)),
        "nodata_label": nodata_label(num_classes),
        "background_class": settings.output.background_class,
        "crs_wkt": info.crs_wkt,
        "transform": list(info.transform) if info.transform else None,
        "mpp": info.mpp,
        "reader": {"driver": info.driver, **info.extra},
        "input": {"dtype": info.dtype, "normalization": norm.as_dict() if norm else None},
        "run_id": run_id,
        "started": now_iso(),
        "status": "running",
    }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=list)


def output_changes(seg: dict[str, Any], image: SourceImage, model: ModelRef, settings: SegmentSettings,
                   norm: InputNorm | None = None) -> list[str]:
    """What differs between an existing output's provenance and this run, in words ([] = same output)."""
    changes: list[str] = []
    old_norm = (seg.get("input") or {}).get("normalization")
    if norm is not None and old_norm is not None and _canonical(old_norm) != _canonical(norm.as_dict()):
        changes.append(f"model input normalization {old_norm} → {norm.as_dict()}")
    if seg.get("source_fingerprint") != image.fingerprint:
        changes.append("the source image changed")
    old_model = seg.get("model") or {}
    if old_model.get("weights_sha256") != model.sha256:
        changes.append(f"model weights {str(old_model.get('weights_sha256'))[:12]} → {model.sha256[:12]}")
    for key, value in model.spec.core().items():
        if key in old_model and _canonical(old_model[key]) != _canonical(value):
            changes.append(f"model {key} {old_model[key]} → {value}")
    old_settings = seg.get("settings")
    new_settings = settings.output_settings()
    if not isinstance(old_settings, dict) and "chunk_size" in seg:
        # written before settings were recorded by name: what was recorded, tiles = chunks then
        old_settings = {**new_settings, "chunk_size": seg.get("chunk_size"), "halo": seg.get("halo"),
                        "multiple_of": seg.get("multiple_of", 32), "tile_size": seg.get("chunk_size"),
                        "bands": seg.get("bands"), "tta": seg.get("tta", False)}
    if isinstance(old_settings, dict):
        for key, value in new_settings.items():
            if _canonical(old_settings.get(key)) != _canonical(value):
                changes.append(f"{key} {old_settings.get(key)} → {value}")
    elif seg.get("settings_key") != settings.output_key():
        changes.append("settings changed")
    return changes


@dataclass(frozen=True)
class OutputPlan:
    """What a run does with an output path: new | skip | resume | replace | refuse, and why."""

    action: str
    reason: str = ""


def plan_output(existing: Existing, image: SourceImage, model: ModelRef, settings: SegmentSettings,
                norm: InputNorm | None = None) -> OutputPlan:
    """Decide from what is at the output path; never touches anything the user owns.

    Outputs follow their inputs: a changed source image or model is recomputed (with a note).
    A complete output whose only difference is the settings is kept unless ``overwrite``.
    Files, foreign folders and outputs of other images are refused.
    """
    if existing.kind == "none":
        return OutputPlan("new")
    if existing.kind in ("file", "foreign"):
        what = "a file" if existing.kind == "file" else "a folder"
        return OutputPlan("refuse", f"exists and is not a segpipe output ({what}); it was left untouched: "
                                    "move it away or choose another --out")
    seg = existing.provenance
    if seg.get("source") != image.uri:
        return OutputPlan("refuse", f"holds the output of another image ({seg.get('source')}); it was left "
                                    "untouched: choose another --out")
    complete = seg.get("status") == "complete"
    changes = output_changes(seg, image, model, settings, norm)
    if not changes:
        return OutputPlan("skip" if complete else "resume")
    what = "; ".join(changes)
    if not complete:
        return OutputPlan("replace", f"replacing an unfinished output ({what})")
    inputs_changed = any(c.startswith(("the source", "model ")) for c in changes)
    if inputs_changed or settings.output.overwrite:
        return OutputPlan("replace", f"replacing the complete output ({what})")
    return OutputPlan("refuse", f"is complete with other settings ({what}); it was kept: pass --overwrite "
                                "(flow parameter overwrite=True) to replace it")


def _batch_size(settings: InferenceSettings, gpu_workers: bool) -> int:
    from segpipe.engine.predictor import default_batch_size

    if settings.batch_size:
        return settings.batch_size
    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and gpu_workers)
    return default_batch_size("cuda" if gpu else "cpu")


def check_image(uri: str, info: ImageInfo, model: ModelRef, settings: SegmentSettings) -> InputNorm | None:
    """Refuse an image the model cannot read, or one that declares an absurd size, with one line.

    Returns the fixed input normalisation for its pixel type, or None when the model's is per
    image (percentile stretch: :func:`segpipe.models.artifact.image_normalization`).
    """
    pixels = info.height * info.width
    if pixels > settings.read.max_pixels:
        raise InputError(uri, f"declares {info.width:,} × {info.height:,} pixels, more than --max-pixels "
                              f"{settings.read.max_pixels:,.0f}; raise --max-pixels if the size is real")
    return check_input(model.spec, info, uri)


def segment_image(image: SourceImage, model: ModelRef, out: str, settings: SegmentSettings, client: Client,
                  progress: Progress | None = None, target_uri: str | None = None) -> ImageResult:
    """Segment one image into ``target_uri`` (default ``OUT/<relative>.zarr``).

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
    lock: OutputLock | None = None
    try:
        info, background, norm = _read_header(image, model, settings)
        result.height, result.width = info.height, info.width
        grid = ChunkGrid(info.height, info.width, settings.tiling.chunk_size)
        result.chunks = len(grid)
        if progress is not None and hasattr(progress, "start_image"):
            progress.start_image(len(grid))
        plan = plan_output(inspect_output(target_uri), image, model, settings, norm)
        if plan.action == "skip":
            result.status = "skipped"
            return result
        if plan.action == "refuse":
            raise OutputError(target_uri, plan.reason)
        held = acquire_lock(target_uri)
        if not isinstance(held, OutputLock):
            result.status = "skipped"
            result.notes.append(f"{target_uri}: being written by another run ({held.describe()}); left to it")
            return result
        lock = held
        plan = plan_output(inspect_output(target_uri), image, model, settings, norm)  # the holder may have finished
        if plan.action in ("skip", "refuse"):
            if plan.action == "refuse":
                raise OutputError(target_uri, plan.reason)
            result.status = "skipped"
            return result
        if plan.reason:
            result.notes.append(f"{target_uri}: {plan.reason}")
        if plan.action == "resume":
            attrs = read_attrs(target_uri) or {}
            run_id = attrs["segpipe"]["run_id"]
            done = done_chunks(target_uri)
        else:
            run_id = uuid.uuid4().hex
            done = set()
        target = OutputTarget(target_uri, info.height, info.width, settings.tiling.chunk_size,
                              model.spec.num_classes, settings.inference.probabilities, run_id,
                              settings.output.zstd_level)
        if plan.action in ("new", "replace"):
            name = posixpath.splitext(posixpath.basename(image.relative))[0]
            colors = colors_from_spec(model.spec.model_extra)
            prepare_output(target, {
                "ome": ome_attrs(name, model.spec.classes, colors, info.mpp),
                "segpipe": provenance(image, info, model, settings, run_id, norm),
            }, replace=plan.action == "replace")
        result.chunks_resumed = len(done)
        if progress and done:
            progress.advance(len(done), sum(c.h * c.w for c in grid if c.key in done) / 1e6)
        tplan = TilePlan.of(settings.tiling, info.height, info.width)
        job = ChunkJob(image.uri, settings.read, model, settings.inference, settings.tiling, target,
                       settings.output.background_class, image.fingerprint, norm)
        gpu_workers, threads = worker_capacity(client)  # one scheduler round trip per image
        compute, fill = _tile_work(tplan, done, background)
        per_task = _tiles_per_task(settings.inference, gpu_workers, tplan.window_side)
        stats = _run_tasks(client, job, batched(compute, per_task), batched(fill, 32), result, progress,
                           gpu_workers, threads)
        if stats.content and 0 <= stats.min_label == stats.max_label:
            cls = stats.min_label
            name = model.spec.classes[cls] if cls < len(model.spec.classes) else str(cls)
            result.notes.append(f"{image.uri}: the model predicted one class ({name}) everywhere; check the "
                                "model and the input's pixel type and bands")
        if settings.output.pyramid:
            _build_pyramid(target, client)
        finalize(target_uri, {"segpipe": {"chunks": len(grid), "chunks_resumed": len(done),
                                          "chunks_skipped": result.chunks_skipped,
                                          "seconds": round(time.perf_counter() - t0, 3)}})
        result.status = "done"
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
        if lock is not None:
            lock.release()
        result.seconds = time.perf_counter() - t0
    return result


def _read_header(image: SourceImage, model: ModelRef, settings: SegmentSettings
                 ) -> tuple[ImageInfo, set[tuple[int, int]], InputNorm]:
    """Header, checks, slide background and the image's input normalisation, with one open reader."""
    r = settings.read
    reader = open_image(image.uri, r.bands, level=r.level, mpp=r.mpp)
    try:
        info = reader.info
        norm = check_image(image.uri, info, model, settings)
        if norm is None:
            norm = image_normalization(model.spec, reader, image.uri)
        background = _background_chunks(reader, settings) if r.skip_empty else set()
    finally:
        reader.close()
    return info, background, norm


def _tile_work(plan: TilePlan, done: set[tuple[int, int]], background: set[tuple[int, int]]
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


def _tiles_per_task(settings: InferenceSettings, gpu_workers: bool, window_side: int) -> int:
    """Tiles per Dask task (= per forward batch): ``--batch-size``, else 1 on CPU and, on a GPU, as
    many as keep a batch near 16 windows of 640² (6.5 MP) whatever the tile size."""
    if settings.batch_size:
        return settings.batch_size
    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and gpu_workers)
    return max(1, (16 * 640 * 640) // (window_side * window_side)) if gpu else 1


def batched(keys: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` items, produced lazily (an image's plan is never materialised)."""
    batch: list[Any] = []
    for k in keys:
        batch.append(k)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _background_chunks(reader: Any, settings: SegmentSettings) -> set[tuple[int, int]]:
    """Chunks outside a slide's tissue mask (computed once at low resolution); empty for other readers."""
    if not hasattr(reader, "thumbnail"):
        return set()
    from segpipe.io.readers.tissue import chunk_has_tissue, tissue_mask

    tm = tissue_mask(reader)
    grid = ChunkGrid(reader.info.height, reader.info.width, settings.tiling.chunk_size)
    return {c.key for c in grid if not chunk_has_tissue(tm.mask, c, tm.scale)}


def _run_tasks(client: Client, job: ChunkJob, work_batches: Iterator[TileWork], fill_batches: Iterator[TileWork],
               result: ImageResult, progress: Progress | None, gpu_workers: bool, threads: int) -> TileStats:
    """Run the tile tasks with a bounded number in flight; returns merged counters.

    Submitting an image's whole graph at once makes the driver's memory grow with the number
    of chunks (a 200,000² image: 152,000 tasks, GBs before the first chunk is written), so
    tasks are submitted as earlier ones finish: at most a few per worker thread are pending.
    """
    from distributed import as_completed

    from segpipe.engine.cluster import is_in_process, trim_memory

    resources = {"GPU": 1} if job.inference.device != "cpu" and gpu_workers else None
    run = job.target.run_id[:8]
    in_flight = max(8, 4 * max(threads, 1))

    def submit(batch: TileWork, fill: bool) -> Any:
        kind = "fill" if fill else "tiles"
        ty, tx = batch[0][0]
        return client.submit(run_tiles, job, batch, fill, pure=False, resources=None if fill else resources,
                             key=f"segpipe-{kind}-{run}-{ty}-{tx}-{uuid.uuid4().hex[:6]}")

    pending = itertools.chain(((b, False) for b in work_batches), ((b, True) for b in fill_batches))
    stats = TileStats()
    queue = as_completed([submit(b, f) for b, f in itertools.islice(pending, in_flight)])
    trim = is_in_process(client)
    try:
        for i, fut in enumerate(queue):
            if trim and i % 16 == 15:
                trim_memory()
            if fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, SegpipeError):
                    raise exc.detached()
                raise exc.with_traceback(fut.traceback())
            counters = fut.result()
            fut.release()
            for b, f in itertools.islice(pending, 1):
                queue.add(submit(b, f))
            result.chunks_computed += int(counters["chunks"] - counters["skipped"])
            result.chunks_skipped += int(counters["skipped"])
            stats.add(counters["stats"])
            if progress:
                progress.advance(int(counters["chunks"]), float(counters["megapixels"]))
    finally:
        for f in list(queue.futures):
            f.cancel()
    return stats


def _build_pyramid(target: OutputTarget, client: Client) -> None:
    from segpipe.engine.pyramid import build_probability_pyramid, build_pyramid

    build_pyramid(target.uri, num_classes=target.num_classes, client=client)
    if target.probabilities:
        build_probability_pyramid(target.uri, client=client)


def _plan(images: Sequence[SourceImage], settings: SegmentSettings) -> tuple[int, float]:
    """Total chunks and megapixels of a run, from image headers only (for progress and ETA)."""
    chunks, mp = 0, 0.0
    for image in images:
        try:
            reader = open_image(image.uri, settings.read.bands, level=settings.read.level, mpp=settings.read.mpp)
        except SegpipeError:
            continue  # reported when the image itself runs
        info = reader.info
        reader.close()
        chunks += len(ChunkGrid(info.height, info.width, settings.tiling.chunk_size))
        mp += info.megapixels
    return chunks, mp


def assign_outputs(images: Sequence[SourceImage], out: str) -> dict[str, str]:
    """Output URI per image URI, unique within the run.

    Rule: ``OUT/<relative path, extension → .zarr>``. When several images map to the same
    name (``hopper.jpg`` and ``hopper.png``; names are compared case-insensitively), they
    keep their extension (``hopper.jpg.zarr``, ``hopper.png.zarr``) — except the one that
    already owns the plain name from an earlier run, which keeps it, so names stay stable.
    """
    by_name: dict[str, list[SourceImage]] = {}
    for image in images:
        by_name.setdefault(output_uri(out, image.relative).casefold(), []).append(image)
    names: dict[str, str] = {}
    for group in by_name.values():
        if len(group) == 1:
            names[group[0].uri] = output_uri(out, group[0].relative)
            continue
        plain = output_uri(out, group[0].relative)
        existing = inspect_output(plain)
        owner = existing.provenance.get("source") if existing.kind == "segpipe" else None
        for image in group:
            if image.uri == owner:
                names[image.uri] = plain
            else:
                names[image.uri] = output_uri(out, image.relative, keep_extension=True)
    return names


def segment_many(sources: Sequence[str], model: str, out: str, settings: SegmentSettings, client: Client,
                 progress: Progress | None = None) -> list[ImageResult]:
    """List every source, check the model once, then segment the images one after another.

    Listing errors and failed images become ``failed`` results; the other images still run.
    Model errors raise (nothing can run without a model).
    """
    from segpipe.engine.cluster import is_in_process
    from segpipe.engine.predictor import prime_predictor
    from segpipe.io.storage import ensure_writable

    images: list[SourceImage] = []
    results: list[ImageResult] = []
    for s in sources:
        try:
            images.extend(list_images(s))
        except SegpipeError as e:
            results.append(ImageResult(source=s, output="", status="failed", error=str(e)))
    images = _unique(images)
    ref, artifact = check_model(model)
    ensure_writable(out)
    if is_in_process(client):
        prime_predictor(artifact, settings.inference)
    del artifact  # the predictor holds the network; the raw weights need not stay in memory
    names = assign_outputs(images, out)
    if progress:
        progress.plan(*_plan(images, settings))
    for i, image in enumerate(images):
        if progress and hasattr(progress, "image"):
            progress.image(i, len(images), image.relative)
        results.append(segment_image(image, ref, out, settings, client, progress, target_uri=names[image.uri]))
    return results


def _unique(images: Sequence[SourceImage]) -> list[SourceImage]:
    """Each image once, even when two sources (a folder and a glob) both list it."""
    seen: set[str] = set()
    return [i for i in images if not (i.uri in seen or seen.add(i.uri))]


def write_image_exports(result: ImageResult, exports: Exports) -> None:
    """COG / vectors / preview next to a finished output (CLI and flow alike); a failure fails the image."""
    if not exports or result.status not in ("done", "skipped") or not result.output:
        return
    from segpipe.export import write_exports

    try:
        result.extra["exports"] = write_exports(result.output, result.source, exports,
                                                recompute=result.status == "done")
    except SegpipeError as e:
        result.status, result.error = "failed", f"export of {result.output}: {e}"
    except OSError as e:
        err = output_error(result.output, e)
        if err is None:
            raise
        result.status, result.error = "failed", f"export of {result.output}: {err}"


def summary_rows(results: Sequence[ImageResult]) -> list[dict[str, Any]]:
    """One row per image for run summaries (CLI table, Prefect table artifact, JSON report)."""
    return [{
        "image": r.source,
        "size": f"{r.width}x{r.height}" if r.height else "",
        "chunks": r.chunks,
        "computed": r.chunks_computed,
        "resumed": r.chunks_resumed,
        "skipped": r.chunks_skipped,
        "seconds": round(r.seconds, 2),
        "mp_per_s": round(r.mp_per_s, 3),
        "status": r.status,
        "output": r.output,
        "error": r.error or "",
    } for r in results]
