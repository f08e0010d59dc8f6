"""One image end to end: read → tile → infer → write, as chunk tasks on Dask.

The driver (a Prefect task, the CLI, or library code) only handles small values:
URIs, chunk indices and counters. Each Dask task reads its own windows, runs the
worker's cached predictor and writes its own Zarr chunks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segpipe import __version__
from segpipe.config import InferenceSettings, ReadSettings, SegmentSettings, TilingSettings
from segpipe.errors import InputError, SegpipeError, TransientIOError
from segpipe.io.readers import ImageInfo, open_image, shared_reader, thread_reader
from segpipe.io.storage import SourceImage, list_images, output_uri
from segpipe.models import Artifact, ModelSpec, load_artifact
from segpipe.stitching import (
    OutputTarget, done_chunks, finalize, now_iso, ome_attrs, prepare_output, read_attrs, write_chunk,
)
from segpipe.tiling import Chunk, ChunkGrid, Window, batches, core_in_window, input_window, strip_order

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("segpipe.pipeline")

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
    artifact = load_artifact(model)
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
    fill_class: int = 0
    fingerprint: str = ""


def _write_fill(job: ChunkJob, chunk: Chunk) -> None:
    """A chunk with no data: the fill class everywhere (probability 1 for it)."""
    labels = np.full((chunk.h, chunk.w), job.fill_class, dtype=job.target.label_dtype)
    probs = None
    if job.target.probabilities:
        probs = np.zeros((job.target.num_classes, chunk.h, chunk.w), np.uint8)
        probs[job.fill_class] = 255
    write_chunk(job.target, chunk, labels, probs)


PARALLEL_READ_BATCH = 4


def run_chunks(job: ChunkJob, keys: Sequence[tuple[int, int]], fill: bool = False,
               attempts: int = 4) -> dict[str, float]:
    """Dask task: predict and write a batch of chunks, retrying transient storage errors with backoff.

    Bad input (:class:`InputError`) is never retried; a network hiccup or bucket throttling
    (:class:`TransientIOError`, ``ConnectionError``, ``TimeoutError``) is, after 1, 2, 4 s.
    Re-running a batch is safe: each chunk is written whole, by this task only.
    """
    for attempt in range(attempts):
        try:
            return _run_chunks(job, keys, fill)
        except (TransientIOError, ConnectionError, TimeoutError):
            if attempt == attempts - 1:
                raise
            log.warning("transient error on %s chunks %s, retrying", job.source, keys[:2], exc_info=True)
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def _run_chunks(job: ChunkJob, keys: Sequence[tuple[int, int]], fill: bool) -> dict[str, float]:
    """Predict and write a batch of chunks (or write them as fill). Returns counters only.

    With ``read.skip_empty``, chunks whose core is all nodata (the raster's nodata value, mask
    band or alpha) skip the model; nodata pixels inside computed chunks get the fill class.
    """
    from segpipe.inference import cached_predictor

    t = job.tiling
    grid = ChunkGrid(job.target.height, job.target.width, t.chunk_size)
    chunks = [grid.chunk(iy, ix) for iy, ix in keys]
    counters = {"chunks": len(chunks), "skipped": 0, "megapixels": sum(c.h * c.w for c in chunks) / 1e6}
    if fill:
        for c in chunks:
            _write_fill(job, c)
        counters["skipped"] = len(chunks)
        return counters
    r = job.read
    # small batches (CPU): one shared handle, each block decoded once; large batches (GPU): a
    # handle per thread so batches are read in parallel (overlaps within a batch stay cached)
    open_reader = thread_reader if len(keys) >= PARALLEL_READ_BATCH else shared_reader
    reader = open_reader(job.source, r.bands, r.level, r.mpp, job.fingerprint)
    valid: dict[tuple[int, int], np.ndarray | None] = {}
    if r.skip_empty and getattr(reader, "has_mask", False):
        for c in list(chunks):
            v = reader.read_valid(Window(c.y0, c.x0, c.h, c.w))
            if v is not None and not v.any():
                _write_fill(job, c)
                chunks.remove(c)
                counters["skipped"] += 1
            elif v is not None and not v.all():
                valid[c.key] = v
    if not chunks:
        return counters
    tiles = np.stack([reader.read(input_window(c, t.chunk_size, t.halo, t.multiple_of)) for c in chunks])
    predictor = cached_predictor(job.model.uri, job.model.sha256, job.inference)
    labels, probs = predictor.predict(tiles)
    del tiles
    for i, c in enumerate(chunks):
        ys, xs = core_in_window(c, t.halo)
        lab = labels[i, ys, xs]
        p = None if probs is None else probs[i, :, ys, xs]
        v = valid.get(c.key)
        if v is not None:  # nodata pixels take the fill class
            lab = np.where(v, lab, job.fill_class).astype(lab.dtype)
            if p is not None:
                p = p.copy()
                p[:, ~v] = 0
                p[job.fill_class, ~v] = 255
        write_chunk(job.target, c, lab, p)
    return counters


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
               run_id: str) -> dict[str, Any]:
    """The ``segpipe`` root attributes written when an output is created."""
    t = settings.tiling
    return {
        "format": "segpipe-output/1",
        "version": __version__,
        "source": image.uri,
        "source_fingerprint": image.fingerprint,
        "height": info.height,
        "width": info.width,
        "bands": list(settings.read.bands) if settings.read.bands else None,
        "chunk_size": t.chunk_size,
        "halo": t.halo,
        "multiple_of": t.multiple_of,
        "settings_key": settings.output_key(),
        "tta": settings.inference.tta,
        "model": {**model.spec.core(), "uri": model.uri, "weights_sha256": model.sha256},
        "classes": model.spec.classes,
        "class_colors": model.spec.model_extra.get("class_colors") if model.spec.model_extra else None,
        "crs_wkt": info.crs_wkt,
        "transform": list(info.transform) if info.transform else None,
        "mpp": info.mpp,
        "reader": {"driver": info.driver, **info.extra},
        "run_id": run_id,
        "started": now_iso(),
        "status": "running",
    }


def _same_output(attrs: dict[str, Any] | None, image: SourceImage, model: ModelRef, settings: SegmentSettings) -> bool:
    seg = (attrs or {}).get("segpipe", {})
    return (seg.get("source_fingerprint") == image.fingerprint
            and seg.get("model", {}).get("weights_sha256") == model.sha256
            and seg.get("settings_key") == settings.output_key())


def _batch_size(settings: InferenceSettings, gpu_workers: bool) -> int:
    from segpipe.inference import default_batch_size

    if settings.batch_size:
        return settings.batch_size
    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and gpu_workers)
    return default_batch_size("cuda" if gpu else "cpu")


def segment_image(image: SourceImage, model: ModelRef, out: str, settings: SegmentSettings, client: Client,
                  progress: Progress | None = None) -> ImageResult:
    """Segment one image into ``OUT/<relative>.zarr``; skips a complete identical output, resumes a partial one.

    Never raises: bad input gives ``failed`` with one line in ``error``; anything unexpected
    (a storage error, a bug) also fails only this image — with its traceback in the log — so
    the other images of a nightly run still finish. The output is never marked complete.
    """
    t0 = time.perf_counter()
    target_uri = output_uri(out, image.relative)
    result = ImageResult(source=image.uri, output=target_uri)
    r = settings.read
    from segpipe.cluster import has_gpu_workers

    try:
        reader = open_image(image.uri, r.bands, level=r.level, mpp=r.mpp)
        try:
            info = reader.info
            background = _background_chunks(reader, settings) if r.skip_empty else set()
        finally:
            reader.close()
        result.height, result.width = info.height, info.width
        if info.count != model.spec.in_channels:
            raise InputError(image.uri, f"has {info.count} band(s) but model expects {model.spec.in_channels} "
                             f"(choose bands with --bands)")
        grid = ChunkGrid(info.height, info.width, settings.tiling.chunk_size)
        result.chunks = len(grid)
        attrs = read_attrs(target_uri)
        same = _same_output(attrs, image, model, settings)
        if same and attrs["segpipe"].get("status") == "complete":
            result.status = "skipped"
            result.seconds = time.perf_counter() - t0
            return result
        if same:
            run_id = attrs["segpipe"]["run_id"]
            done = done_chunks(target_uri)
        else:
            run_id = uuid.uuid4().hex
            done = set()
        target = OutputTarget(target_uri, info.height, info.width, settings.tiling.chunk_size,
                              model.spec.num_classes, settings.inference.probabilities, run_id,
                              settings.output.zstd_level)
        if not same:
            name = image.relative.rsplit(".", 1)[0]
            prepare_output(target, {
                "ome": ome_attrs(name, model.spec.classes, (model.spec.model_extra or {}).get("class_colors"), info.mpp),
                "segpipe": provenance(image, info, model, settings, run_id),
            })
        result.chunks_resumed = len(done)
        if progress and done:
            progress.advance(len(done), sum(c.h * c.w for c in grid if c.key in done) / 1e6)
        todo = [k for k in strip_order(grid) if k not in done and k not in background]
        fill = [c.key for c in grid if c.key not in done and c.key in background]
        job = ChunkJob(image.uri, settings.read, model, settings.inference, settings.tiling, target,
                       settings.output.fill_class, image.fingerprint)
        gpu_workers = has_gpu_workers(client)  # one scheduler round trip per image
        _run_tasks(client, job, batches(todo, _batch_size(settings.inference, gpu_workers)), batches(fill, 256),
                   result, progress, gpu_workers)
        if settings.output.pyramid:
            _build_pyramid(target, client)
        finalize(target_uri, {"segpipe": {"chunks": len(grid), "chunks_resumed": len(done),
                                          "chunks_skipped": result.chunks_skipped,
                                          "seconds": round(time.perf_counter() - t0, 3)}})
        result.status = "done"
    except SegpipeError as e:
        result.status = "failed"
        result.error = str(e) if image.uri in str(e) or target_uri in str(e) else f"{image.uri}: {e}"
        log.debug("image failed", exc_info=True)
    except Exception as e:  # noqa: BLE001 - one image must not stop the others
        result.status = "failed"
        result.error = f"{image.uri}: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.exception("unexpected error on %s (the other images go on)", image.uri)
    result.seconds = time.perf_counter() - t0
    return result


def _background_chunks(reader: Any, settings: SegmentSettings) -> set[tuple[int, int]]:
    """Chunks outside a slide's tissue mask (computed once at low resolution); empty for other readers."""
    if not hasattr(reader, "thumbnail"):
        return set()
    from segpipe.io.slide import chunk_has_tissue, tissue_mask

    tm = tissue_mask(reader)
    grid = ChunkGrid(reader.info.height, reader.info.width, settings.tiling.chunk_size)
    return {c.key for c in grid if not chunk_has_tissue(tm.mask, c, tm.scale)}


def _run_tasks(client: Client, job: ChunkJob, key_batches: list[list[tuple[int, int]]],
               fill_batches: list[list[tuple[int, int]]], result: ImageResult, progress: Progress | None,
               gpu_workers: bool) -> None:
    from distributed import as_completed

    if not key_batches and not fill_batches:
        return
    resources = {"GPU": 1} if job.inference.device != "cpu" and gpu_workers else None
    run = job.target.run_id[:8]
    futures = client.map(run_chunks, [job] * len(key_batches), key_batches, pure=False, resources=resources,
                         key=[f"segpipe-chunks-{run}-{b[0][0]}-{b[0][1]}-{uuid.uuid4().hex[:6]}" for b in key_batches])
    futures += client.map(run_chunks, [job] * len(fill_batches), fill_batches, [True] * len(fill_batches),
                          pure=False, key=[f"segpipe-fill-{run}-{b[0][0]}-{b[0][1]}-{uuid.uuid4().hex[:6]}"
                                           for b in fill_batches])
    from segpipe.cluster import is_in_process, trim_memory

    trim = is_in_process(client)
    try:
        for i, fut in enumerate(as_completed(futures)):
            if trim and i % 16 == 15:
                trim_memory()
            if fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, SegpipeError):
                    raise exc
                raise exc.with_traceback(fut.traceback())
            counters = fut.result()
            result.chunks_computed += int(counters["chunks"] - counters["skipped"])
            result.chunks_skipped += int(counters["skipped"])
            if progress:
                progress.advance(int(counters["chunks"]), float(counters["megapixels"]))
            fut.release()
    finally:
        for f in futures:
            if not f.done():
                f.cancel()


def _build_pyramid(target: OutputTarget, client: Client) -> None:
    from segpipe.pyramid import build_probability_pyramid, build_pyramid

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


def segment_many(sources: Sequence[str], model: str, out: str, settings: SegmentSettings, client: Client,
                 progress: Progress | None = None) -> list[ImageResult]:
    """List every source, check the model once, then segment the images one after another.

    Listing errors and failed images become ``failed`` results; the other images still run.
    Model errors raise (nothing can run without a model).
    """
    from segpipe.cluster import is_in_process
    from segpipe.inference import prime_predictor
    from segpipe.io.storage import ensure_writable

    images: list[SourceImage] = []
    results: list[ImageResult] = []
    for s in sources:
        try:
            images.extend(list_images(s))
        except SegpipeError as e:
            results.append(ImageResult(source=s, output="", status="failed", error=str(e)))
    ref, artifact = check_model(model)
    ensure_writable(out)
    if is_in_process(client):
        prime_predictor(artifact, settings.inference)
    del artifact  # the predictor holds the network; the raw weights need not stay in memory
    if progress:
        progress.plan(*_plan(images, settings))
    for image in images:
        results.append(segment_image(image, ref, out, settings, client, progress))
    return results


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
