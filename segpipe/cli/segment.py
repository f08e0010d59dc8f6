"""``segpipe segment``: sources → OUT/<name>.zarr, with its progress bar, summary table and exports.

Exit codes: 0 when every image succeeded, 1 when any failed or none was found, 2 for a usage
error (see :mod:`segpipe.cli.common`).
"""

from __future__ import annotations

import sys
import time

import click

from segpipe.cli.common import (
    EXIT_FAILED_IMAGES,
    build_settings,
    console,
    debug_requested,
    handle_errors,
    preload,
    segment_options,
)
from segpipe.cli.logs import log_path, quiet_library_loggers


class RichProgress:
    """Progress bar: a planning phase, then image i/n and its name, chunks done, megapixels/s, time left."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
            TextColumn("{task.fields[mps]:.2f} MP/s"), TimeRemainingColumn(), TextColumn("{task.fields[image]}"),
            console=console(stderr=True), transient=False,
        )
        self._task = self._progress.add_task("planning", total=None, mps=0.0, image="reading image headers")
        self._mp = 0.0
        self._t0 = time.perf_counter()

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def plan(self, chunks: int, megapixels: float) -> None:
        # called from the planning thread, possibly after the first chunks were counted
        self._progress.update(self._task, total=chunks, description="segment")

    def image(self, index: int, count: int, name: str) -> None:
        self._progress.update(self._task, image=f"image {index + 1}/{count} {name}")

    def advance(self, chunks: int, megapixels: float) -> None:
        self._mp += megapixels
        mps = self._mp / max(time.perf_counter() - self._t0, 1e-9)
        self._progress.update(self._task, advance=chunks, mps=mps)


def print_summary(results: list) -> None:
    from rich.table import Table

    table = Table(title="segpipe segment", show_lines=False)
    for col in ("image", "size", "chunks", "skipped", "retries", "recomputed", "seconds", "MP/s", "status", "output"):
        table.add_column(col, overflow="fold")
    for r in results:
        size = f"{r.width}×{r.height}" if r.height else "-"
        status = {"done": "[green]done", "skipped": "[cyan]skipped", "failed": "[red]failed"}.get(r.status, r.status)
        computed = f"{r.chunks_computed}/{r.chunks}" if r.chunks else "-"
        table.add_row(r.source, size, computed, str(r.chunks_skipped or "-"), str(r.storage_retries or "-"),
                      str(r.recomputed or "-"), f"{r.seconds:.1f}",
                      f"{r.mp_per_s:.2f}" if r.mp_per_s else "-",
                      status, r.output or "-")
    console().print(table)


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--model", "model", required=True, help="Model folder, registry folder (its champion) or REGISTRY@vN.")
@click.option("--out", "out", required=True, help="Output folder or bucket URL.")
@segment_options
@click.option("--overwrite", is_flag=True,
              help="Replace complete outputs made with other settings (changed images and models are always redone).")
@click.option("--cog", is_flag=True, help="Also write OUT/<name>.tif: a COG with the class colours (+ .qml, .aux.xml).")
@click.option("--vector", type=click.Choice(["gpkg", "geojson", "shp", "fgb", "parquet"]), default=None,
              help="Also write class polygons OUT/<name>.<format>.")
@click.option("--preview", is_flag=True, help="Also write OUT/<name>.png: a colour preview with a legend.")
@click.option("--min-area", type=float, default=0.0, show_default=True,
              help="Polygons smaller than this (CRS units², or pixels) are merged into their neighbours.")
@click.option("--collections", default=None, help="STAC: comma-separated collection ids to search.")
@click.option("--bbox", default=None, help="STAC: west,south,east,north (WGS 84 degrees): items intersecting it.")
@click.option("--intersects", default=None, help="STAC: a GeoJSON file (WGS 84): items intersecting its geometry.")
@click.option("--datetime", "datetime_", default=None,
              help="STAC: RFC 3339 instant or interval, e.g. 2024-05-01/2024-06-01 or 2024-05-01T00:00:00Z/..")
@click.option("--query", multiple=True, help="STAC: property filter, e.g. 'eo:cloud_cover<10' or JSON (repeatable).")
@click.option("--max-items", type=click.IntRange(1), default=None,
              help="STAC: refuse a search matching more items than this (nothing is segmented).")
@click.option("--asset", default=None, help="STAC: asset key or role to segment [default: the item's image asset].")
@click.option("--stac/--no-stac", "stac_out", default=None,
              help="Write OUT/<name>.item.json (STAC label item) and OUT/<folder>/collection.json "
                   "[default: on for STAC sources].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-image results (status, chunks computed/resumed, storage retries, tasks "
                   "recomputed after a lost worker, seconds) as JSON.")
@click.option("--workers", type=int, default=None,
              help="Embedded cluster: worker count [default: 1, or one per GPU with dask-cuda].")
@click.option("--worker-threads", type=int, default=None, help="Embedded cluster: threads per worker.")
@click.option("--processes", is_flag=True, help="Embedded cluster: worker processes instead of threads.")
@click.option("--procs-per-device", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Embedded cluster: worker processes per GPU, each seeing only its GPU (without a GPU: "
                   "processes splitting the CPU's cores).")
@click.option("--wait-for-workers", type=click.FloatRange(0), default=600.0, show_default=True,
              help="With --dask-address: seconds to wait for a first worker when the cluster has none "
                   "(adaptive clusters start at 0 workers); 0: do not wait.")
@click.option("--task-seconds", type=float, default=None,
              help="Target device seconds per Dask tile task (fleets: fewer, larger tasks per scheduler) "
                   "[default: one forward batch per task].")
@handle_errors
def segment(sources: tuple[str, ...], model: str, out: str, chunk_size: int, halo: int, tile_size: int | None,
            batch_size: int | None,
            device: str, precision: str, runtime: str, tta: bool, probabilities: bool, bands: str | None, level: int | None,
            mpp: float | None, gsd: float | None, skip_empty: bool, background_class: int | None, max_pixels: float,
            dask_address: str | None, overwrite: bool, cog: bool, vector: str | None, preview: bool,
            min_area: float, collections: str | None, bbox: str | None, intersects: str | None,
            datetime_: str | None, query: tuple[str, ...], max_items: int | None, asset: str | None,
            stac_out: bool | None, no_progress: bool, report_json: str | None, workers: int | None,
            worker_threads: int | None, processes: bool, procs_per_device: int, wait_for_workers: float,
            task_seconds: float | None) -> None:
    """Segment SOURCES (files, folders, globs, fsspec URLs, STAC documents or STAC API searches) into
    OUT/<name>.zarr (STAC items: OUT/<collection>/<item id>.zarr).

    Distinct images never share an output: when two would (hopper.jpg, hopper.png), both keep
    their extension (hopper.jpg.zarr, hopper.png.zarr). A path that is not a segpipe output of
    the same image is never touched.
    """
    from segpipe.core.settings import ClusterSettings
    from segpipe.engine.cluster import check_device_pinning, dask_client
    from segpipe.engine.segment import segment_many
    from segpipe.export import Exports
    from segpipe.export.results import write_image_exports
    from segpipe.io.stac import list_sources, stac_search

    # STAC sources become their items' images (one line and nothing written when a search cannot be made)
    listing = list_sources(sources, stac_search(collections=collections, bbox=bbox, intersects=intersects,
                                                datetime=datetime_, query=query or None, max_items=max_items,
                                                asset=asset), bands)
    settings = build_settings(chunk_size, halo, batch_size, device, precision, tta, probabilities, listing.bands,
                              level, mpp, skip_empty, max_pixels, background_class, overwrite, tile_size=tile_size,
                              task_seconds=task_seconds, gsd=gsd, runtime=runtime)
    exports = Exports(cog=cog, vector=vector, preview=preview, min_area=min_area,
                      stac=listing.stac if stac_out is None else stac_out)
    cluster = ClusterSettings(address=dask_address, n_workers=workers, threads_per_worker=worker_threads,
                              processes=processes, procs_per_device=procs_per_device,
                              wait_for_workers=wait_for_workers)
    check_device_pinning(device, cluster)
    quiet_library_loggers(debug_requested())
    preload()
    with dask_client(cluster, device) as client:
        if not listing.sources:
            results = []
        elif no_progress:
            results = segment_many(listing.sources, model, out, settings, client)
        else:
            with RichProgress() as progress:
                results = segment_many(listing.sources, model, out, settings, client, progress)
    for r in results:
        write_image_exports(r, exports)
    results += listing.failed_results()
    print_summary(results)
    if report_json:
        import json

        from segpipe.core.results import summary_rows

        with open(report_json, "w") as f:
            json.dump(summary_rows(results), f, indent=2)
    for r in results:
        for note in r.notes:
            click.echo(f"note: {note}", err=True)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        click.echo(f"error: {r.error}", err=True)
    if not results:
        click.echo("error: no images found under " + ", ".join(sources), err=True)
        sys.exit(EXIT_FAILED_IMAGES)
    if failed:
        details = log_path()
        if any("unexpected" in (r.error or "") for r in failed) and details:
            click.echo(f"details: {details}", err=True)
        sys.exit(EXIT_FAILED_IMAGES)
