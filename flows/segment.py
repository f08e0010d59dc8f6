"""Flow ``segment-images``: ingest → one Prefect task per image → chunk tasks on Dask → Zarr.

Tiles are Dask tasks, never Prefect tasks (a Prefect task run costs a hundred times a Dask task and
a database row: docs/benchmarks.md, "Design measurements"). Only URIs, settings and counters pass
through Prefect.
"""

from __future__ import annotations

import re
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed, wait
from prefect.states import Completed, Failed, State

from flows.devices import DEVICE_LIMIT, device_slot
from flows.failures import install_one_line_failures
from flows.logs import forward_library_logs
from segpipe.core.errors import SegpipeError
from segpipe.core.results import ImageResult, summary_rows
from segpipe.core.retry import RetryPolicy
from segpipe.core.scheduling import ImagesInFlight, sliding_window
from segpipe.core.settings import ClusterSettings, SegmentSettings, segment_settings
from segpipe.engine.cluster import (
    WAIT_FOR_WORKERS_S,
    check_device_pinning,
    client_for,
    dask_client,
    recent_worker_capacity,
)
from segpipe.engine.job import ModelRef, check_model
from segpipe.engine.ownership import assign_outputs
from segpipe.engine.segment import segment_image
from segpipe.evaluate.suggest import DEFAULT_TOP, suggest_regions
from segpipe.export import Exports
from segpipe.export.results import write_image_exports
from segpipe.io.stac import StacListing, StacSearch, is_stac_source, list_sources, stac_search
from segpipe.io.storage import SourceImage, ensure_writable, list_images


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(source: str, retry: RetryPolicy) -> list[SourceImage]:
    """List the images under ``source`` with a fingerprint each (size + mtime/ETag); a bucket's fault that
    may pass is retried with the run's policy (the one of every storage call of the run)."""
    images = retry.call(lambda: list_images(source))
    get_run_logger().info("found %d image(s) under %s", len(images), source)
    return images


@task(name="ingest-stac", cache_policy=NO_CACHE)
def ingest_stac(source: str, search: StacSearch, bands: str | None, retry: RetryPolicy) -> StacListing:
    """The items a STAC document or STAC API search selects, as images (band names resolved); a fault that may
    pass is retried with the run's policy."""
    listing = retry.call(lambda: list_sources([source], search, bands))
    get_run_logger().info("STAC: %d item(s) from %s, %d that cannot be segmented", len(listing.images), source,
                          len(listing.problems))
    return listing


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(model: str, out: str, retry: RetryPolicy) -> ModelRef:
    """Resolve the model (artifact, registry champion or REGISTRY@vN), check it, and check OUT is writable."""
    ref, _ = check_model(model)
    retry.call(lambda: ensure_writable(out))
    get_run_logger().info("model %s (%s/%s), weights %s", ref.uri, ref.spec.architecture, ref.spec.encoder,
                          ref.sha256[:12])
    return ref


_OPTION = re.compile(r"--([a-z][a-z-]*)(?: (\d[\w.,]*))?")


def flow_wording(line: str) -> str:
    """A one-line message in the words of this flow: ``--bands 1,1,1`` → ``bands='1,1,1'``,
    ``--max-pixels`` → ``max_pixels``, ``pass --overwrite (flow parameter overwrite=True)`` →
    ``set overwrite=True`` (the library speaks the CLI's option names)."""
    line = line.replace("pass --overwrite (flow parameter overwrite=True)", "set overwrite=True")

    def repl(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        return f"{name}={m.group(2)!r}" if m.group(2) else f"parameter {name}"

    return _OPTION.sub(repl, line)


class ImagesFailed(SegpipeError):
    """Some images of a run failed; carries every image's row so callers still get the summary."""

    def __init__(self, subject: str | None, problem: str, rows: list[dict] | None = None) -> None:
        super().__init__(subject, problem)
        self.args = (subject, problem, rows)
        self.rows = rows or []

    def detached(self) -> ImagesFailed:
        return ImagesFailed(self.subject, self.problem, self.rows)


class PrefectProgress:
    """A progress artifact per image, updated as its chunks finish (at most every 2 s)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.total = 0
        self.done = 0
        self.artifact = None
        self._last = 0.0

    def start_image(self, chunks: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total, self.done = chunks, 0
        self.artifact = create_progress_artifact(0.0, description=f"chunks of {self.name}")

    def plan(self, chunks: int, megapixels: float) -> None:  # the flow plans per image (start_image)
        pass

    def advance(self, chunks: int, megapixels: float) -> None:
        import time

        from prefect.artifacts import update_progress_artifact

        self.done += chunks
        now = time.monotonic()
        if self.artifact is None or not self.total or (now - self._last < 2.0 and self.done < self.total):
            return
        self._last = now
        update_progress_artifact(self.artifact, min(100.0, 100.0 * self.done / self.total))


@task(name="segment-image", task_run_name="segment {image.relative}", cache_policy=NO_CACHE)
def segment_one(image: SourceImage, model: ModelRef, out: str, settings: SegmentSettings,
                scheduler: str, exports: Exports, target_uri: str | None = None) -> ImageResult | State:
    """One image: its chunk tasks run on Dask workers, which write their chunks straight into Zarr.

    A failed image ends this task run *Failed* (red in the run graph, so task-failure
    automations fire) with the image's one-line error as the state message. Storage faults that may
    pass were already retried by the engine with ``settings.retry`` (and the image tried again from
    its chunks in the store): Prefect does not retry the task on top of that.
    """
    logger = get_run_logger()
    result = segment_image(image, model, out, settings, client_for(scheduler), PrefectProgress(image.relative),
                           target_uri=target_uri)
    result.notes = [flow_wording(n) for n in result.notes]
    for note in result.notes:
        logger.warning("%s", note)
    write_image_exports(result, exports)
    if result.status == "failed":
        result.error = flow_wording(result.error or "")
        logger.error("%s", result.error)
        return Failed(message=result.error, data=result)
    logger.info("%s %s: %d/%d chunks computed, %d skipped as empty, %d storage retries, %d recomputed after a "
                "lost worker, in %.1f s (%.2f MP/s) → %s", result.status, image.relative, result.chunks_computed,
                result.chunks, result.chunks_skipped, result.storage_retries, result.recomputed, result.seconds,
                result.mp_per_s, result.output)
    return result


def publish_suggestions(results: list[ImageResult], top: int, source: str, retry: RetryPolicy | None = None
                        ) -> list[dict]:
    """The ``top`` regions to label next among the run's finished outputs, as the table artifact
    ``segment-images-suggestions``; returns its rows. Outputs without uncertainty (written by an
    older segpipe) or unreadable now are left out with a log line.

    Never fails the run: the images are done when this runs, and suggestions are advice. Any error here —
    bad input, a storage fault, a bug — is one warning line (a bug's traceback at debug level)."""
    logger = get_run_logger()
    outputs = [r.output for r in results if r.status in ("done", "skipped") and r.output]
    if not outputs:
        return []
    notes: list[str] = []
    try:
        regions = suggest_regions(outputs, top, notes, strict=False, retry=retry)
        rows = [s.as_row() for s in regions]
        if rows:
            create_table_artifact(rows, key="segment-images-suggestions",
                                  description=f"where to label next: the {len(rows)} most uncertain regions of "
                                              f"segment-images over {source} (segpipe suggest)")
    except SegpipeError as e:
        logger.warning("no suggestions: %s", e)
        return []
    except Exception as e:  # noqa: BLE001 - advice must never turn a successful run into a failed one
        logger.warning("no suggestions: unexpected %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        logger.debug("suggestions failed", exc_info=True)
        return []
    for note in notes:
        logger.info("suggestions: %s", note)
    return rows


@flow(name="segment-images", log_prints=True)
def segment_images(
    source: str,
    model: str,
    out: str,
    chunk_size: int = 512,
    halo: int = 64,
    tile_size: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    runtime: Literal["auto", "torch", "onnx"] = "auto",
    tta: bool = False,
    probabilities: bool = False,
    bands: str | None = None,
    dask_address: str | None = None,
    wait_for_workers: float = WAIT_FOR_WORKERS_S,
    device_limit: str | None = DEVICE_LIMIT,
    max_concurrent_images: int | None = None,
    task_seconds: float | None = None,
    procs_per_device: int = 1,
    level: int | None = None,
    mpp: float | None = None,
    gsd: float | None = None,
    skip_empty: bool = True,
    background_class: int | None = None,
    max_pixels: float = 1e11,
    overwrite: bool = False,
    cog: bool = False,
    vector: Literal["gpkg", "geojson", "shp", "fgb", "parquet"] | None = None,
    preview: bool = False,
    min_area: float = 0.0,
    suggestions: int = DEFAULT_TOP,
    collections: list[str] | str | None = None,
    bbox: list[float] | str | None = None,
    intersects: str | None = None,
    datetime: str | None = None,
    query: list[str] | dict | None = None,
    max_items: int | None = None,
    asset: str | None = None,
    stac: bool | None = None,
) -> list[dict] | State:
    """Segment every image under ``source`` into ``out``; skip complete outputs, resume partial ones.

    The parameters are ``segpipe segment``'s options (same names, same settings builder).
    ``cog``/``vector``/``preview`` also write ``<output>.tif`` (COG + .qml + .aux.xml),
    ``<output>.<vector>`` and ``<output>.png`` next to each Zarr output. Each failed image's
    task run ends Failed; the flow run ends Failed after every other image finished.
    The ``suggestions`` regions of the run's outputs where labels would help most (as ``segpipe suggest``)
    are published as the table artifact ``segment-images-suggestions`` (0: none).
    ``wait_for_workers``: seconds to wait for a first worker of ``dask_address`` when it has none (adaptive
    clusters start at 0). ``device_limit``: the Prefect global concurrency limit whose slot the run holds
    while its embedded cluster computes on this machine (shared with the weekly retrain; None: none).
    A STAC ``source`` (a ``.json`` document, or an API URL with ``collections``/``bbox``/``intersects``/
    ``datetime``/``query``/``max_items``) segments the items it selects; items whose ``updated`` time has a
    complete output are skipped, so a nightly run does the new items only. ``stac`` writes a STAC item per
    output and a collection per output folder (default: for STAC sources).
    """
    logger = get_run_logger()
    install_one_line_failures()  # a Failed run with failed images logs one line, not the engine's traceback
    forward_library_logs()  # which cluster, waiting for workers, …: in the run's logs
    search = stac_search(collections=collections, bbox=bbox, intersects=intersects, datetime=datetime, query=query,
                         max_items=max_items, asset=asset)
    # the run's retry policy is the default one (settings need the bands the listing resolves)
    stac_listing = ingest_stac(source, search, bands, RetryPolicy()) if is_stac_source(source, search) else None
    bands = stac_listing.bands if stac_listing is not None else bands
    settings = segment_settings(chunk_size=chunk_size, halo=halo, tile_size=tile_size, batch_size=batch_size, device=device,
                                precision=precision, runtime=runtime, tta=tta, probabilities=probabilities, bands=bands,
                                level=level,
                                mpp=mpp, gsd=gsd, skip_empty=skip_empty, max_pixels=max_pixels,
                                background_class=background_class, overwrite=overwrite, task_seconds=task_seconds)
    exports = Exports(cog=cog, vector=vector, preview=preview, min_area=min_area,
                      stac=stac_listing is not None if stac is None else stac)
    cluster = ClusterSettings(address=dask_address, procs_per_device=procs_per_device,
                              wait_for_workers=wait_for_workers)
    check_device_pinning(device, cluster)
    results: list[ImageResult] = []
    listing = ingest.submit(source, settings.retry) if stac_listing is None else None
    ref = load_model(model, out, settings.retry)
    if listing is None:  # a STAC source: its items were listed above
        assert stac_listing is not None
        images = stac_listing.images
        results.extend(stac_listing.failed_results())
    else:
        wait([listing])
        if listing.state.is_completed():
            images = listing.result()
        else:  # the source cannot be listed: that source fails, with its one line
            images = []
            error = listing.state.result(raise_on_failure=False)
            results.append(ImageResult(source=source, output="", status="failed",
                                       error=str(error) if isinstance(error, SegpipeError)
                                       else str(listing.state.message)))
    names = assign_outputs(images, out)
    # the embedded cluster computes on this machine: one slot of the devices' limit (an address: the cluster's own)
    with device_slot(None if dask_address else device_limit, logger, "segment-images"), \
            dask_client(cluster, device) as client:
        scheduler = client.scheduler.address
        # a sliding window of images (the CLI's policy): the next image starts as soon as any one finishes,
        # so the workers stay busy between one image's last chunks and the next one's first
        # its width: max_concurrent_images, or derived from what finished images measured (ImagesInFlight)
        by_index: dict[int, ImageResult] = {}
        width = ImagesInFlight(recent_worker_capacity(client)[1], max_concurrent_images)
        for i, fut in sliding_window(
                images, lambda img: segment_one.submit(img, ref, out, settings, scheduler, exports, names[img.uri]),
                lambda running: next(as_completed(running)), width):
            img = images[i]
            fut.wait()  # as_completed may yield before the future holds its final state
            value = fut.state.result(raise_on_failure=False)
            if isinstance(value, ImageResult):
                by_index[i] = value
                if value.status == "done":
                    width.observe(value.host_seconds, value.device_seconds, bool(value.extra.get("shared_task")))
            else:
                by_index[i] = ImageResult(source=img.uri, output=names[img.uri], status="failed",
                                          error=str(value) if isinstance(value, SegpipeError)
                                          else str(fut.state.message or "task failed"))
        results.extend(by_index[i] for i in range(len(images)))
    rows = summary_rows(results)
    create_table_artifact(rows, key="segment-images-summary", description=f"segment-images over {source}")
    if suggestions:
        publish_suggestions(results, suggestions, source, settings.retry)
    failed = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    create_markdown_artifact(
        f"**{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed** of {len(results)} "
        f"image(s) from `{source}` into `{out}`\n\n" + "\n".join(f"- {r.error}" for r in failed),
        key="segment-images-status",
    )
    payload = [r.as_dict() for r in results]
    if failed:
        message = f"{len(failed)} of {len(results)} image(s) failed: " + "; ".join(r.error or "" for r in failed)
        # the data of a Failed state must be an exception (Prefect raises it for callers); it carries the rows
        return Failed(message=message, data=ImagesFailed(source, message, payload))
    return Completed(message=f"{counts['done']} done, {counts['skipped']} skipped", data=payload)
