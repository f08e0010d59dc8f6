"""Flow ``segment-images``: ingest → one Prefect task per image → chunk tasks on Dask → Zarr.

Tiles are Dask tasks, never Prefect tasks (a Prefect task run costs 20–110 ms and ~20 KB of
database; a Dask task < 1 ms). Only URIs, settings and counters pass through Prefect.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Completed, Failed

from segpipe.cluster import client_for, dashboard_link, dask_client
from segpipe.config import ClusterSettings, InferenceSettings, ReadSettings, SegmentSettings, TilingSettings, parse_bands
from segpipe.errors import SegpipeError, TransientIOError
from segpipe.io.storage import SourceImage, ensure_writable, list_images
from segpipe.export import Exports, write_exports
from segpipe.pipeline import ImageResult, ModelRef, check_model, segment_image, summary_rows


def _transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try (network, throttling), never bad input."""
    try:
        state.result()
    except TransientIOError:
        return True
    except (ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(name="ingest", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def ingest(source: str) -> list[SourceImage]:
    """List the images under ``source`` with a fingerprint each (size + mtime/ETag)."""
    try:
        images = list_images(source)
    except (ConnectionError, TimeoutError, OSError) as e:
        if isinstance(e, SegpipeError):
            raise
        raise TransientIOError(source, f"listing failed ({e})") from e
    get_run_logger().info("found %d image(s) under %s", len(images), source)
    return images


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(model: str, out: str) -> ModelRef:
    """Resolve the model (artifact, registry champion or REGISTRY@vN), check it, and check OUT is writable."""
    ref, _ = check_model(model)
    ensure_writable(out)
    get_run_logger().info("model %s (%s/%s), weights %s", ref.uri, ref.spec.architecture, ref.spec.encoder,
                          ref.sha256[:12])
    return ref


@task(name="segment-image", task_run_name="segment {image.relative}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient)
def segment_one(image: SourceImage, model: ModelRef, out: str, settings: SegmentSettings,
                scheduler: str, exports: Exports) -> ImageResult:
    """One image: its chunk tasks run on Dask workers, which write their chunks straight into Zarr."""
    logger = get_run_logger()
    result = segment_image(image, model, out, settings, client_for(scheduler))
    if result.status == "failed":
        logger.error("%s", result.error)
        return result
    logger.info("%s %s: %d/%d chunks computed, %d skipped as empty, in %.1f s (%.2f MP/s) → %s", result.status,
                image.relative, result.chunks_computed, result.chunks, result.chunks_skipped, result.seconds,
                result.mp_per_s, result.output)
    try:
        result.extra["exports"] = write_exports(result.output, image.uri, exports,
                                                recompute=result.status == "done")
    except SegpipeError as e:
        result.status, result.error = "failed", f"export of {result.output}: {e}"
        logger.error("%s", result.error)
    return result


@flow(name="segment-images", log_prints=True)
def segment_images(
    source: str,
    model: str,
    out: str,
    chunk_size: int = 512,
    halo: int = 64,
    batch_size: int | None = None,
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    tta: bool = False,
    probabilities: bool = False,
    bands: str | None = None,
    dask_address: str | None = None,
    max_concurrent_images: int = 2,
    level: int | None = None,
    mpp: float | None = None,
    skip_empty: bool = True,
    cog: bool = False,
    vector: Literal["gpkg", "geojson"] | None = None,
    preview: bool = False,
    min_area: float = 0.0,
) -> list[dict]:
    """Segment every image under ``source`` into ``out``; skip complete outputs, resume partial ones.

    ``cog``/``vector``/``preview`` also write ``<output>.tif`` (COG), ``<output>.gpkg|.geojson``
    and ``<output>.png`` next to each Zarr output. Fails (after every other image finished)
    when any image failed.
    """
    logger = get_run_logger()
    settings = SegmentSettings(
        tiling=TilingSettings(chunk_size=chunk_size, halo=halo),
        read=ReadSettings(bands=parse_bands(bands), level=level, mpp=mpp, skip_empty=skip_empty),
        inference=InferenceSettings(device=device, precision=precision, batch_size=batch_size, tta=tta,
                                    probabilities=probabilities),
    )
    exports = Exports(cog=cog, vector=vector, preview=preview, min_area=min_area)
    images = ingest(source)
    ref = load_model(model, out)
    results: list[ImageResult] = []
    with dask_client(ClusterSettings(address=dask_address)) as client:
        if dashboard_link(client):
            logger.info("Dask dashboard: %s", dashboard_link(client))
        scheduler = client.scheduler.address
        # a few images at a time keep the workers busy between one image's last chunks and the next one's first
        for i in range(0, len(images), max(1, max_concurrent_images)):
            futures = [segment_one.submit(img, ref, out, settings, scheduler, exports)
                       for img in images[i:i + max_concurrent_images]]
            wait(futures)
            for img, fut in zip(images[i:i + max_concurrent_images], futures):
                state = fut.state
                if state.is_completed():
                    results.append(fut.result())
                else:
                    results.append(ImageResult(source=img.uri, output="", status="failed",
                                               error=str(state.message or "task failed")))
    rows = summary_rows(results)
    create_table_artifact(rows, key="segment-images-summary", description=f"segment-images over {source}")
    failed = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    create_markdown_artifact(
        f"**{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed** of {len(results)} "
        f"image(s) from `{source}` into `{out}`\n\n" + "\n".join(f"- {r.error}" for r in failed),
        key="segment-images-status",
    )
    payload = [r.as_dict() for r in results]
    if failed:
        return Failed(message=f"{len(failed)} of {len(results)} image(s) failed: " + "; ".join(r.error for r in failed),
                      data=payload)
    return Completed(message=f"{counts['done']} done, {counts['skipped']} skipped", data=payload)
