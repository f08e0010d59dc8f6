"""The ``segpipe`` command line: parse options, call the library, print results.

Every user error prints one line ``error: <what>: <problem>`` and exits 2 (``--debug``
shows the traceback). ``segment`` exits 0 only when every image succeeded.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from segpipe.core.errors import ConfigError, SegpipeError

EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_BUG = 3


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SegpipeError and settings validation errors into one line; --debug re-raises.

    Anything else is a bug: it keeps its traceback (in the log file without ``--debug``) and
    the user gets one line pointing at it.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt, SystemExit):
            raise
        except SegpipeError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except ValidationError as e:
            if debug:
                raise
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            click.echo(f"error: {where}: {err['msg']}", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as e:  # noqa: BLE001 - a bug: keep the traceback, but in the log
            if debug:
                raise
            logging.getLogger("segpipe.cli.main").error("unexpected error", exc_info=True)
            where = f"; traceback in {_log_path}" if _log_path else ""
            click.echo(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       f"(a bug in segpipe{where}; --debug shows it)", err=True)
            sys.exit(EXIT_BUG)

    return wrapper


_log_path: str | None = None


class _TerminalWarnings(logging.Handler):
    """segpipe's own warnings on the terminal, one line each and without tracebacks."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING and record.name.startswith("segpipe"):
            click.echo(f"warning: {record.getMessage().splitlines()[0]}", err=True)


def log_file_path() -> str:
    """``$SEGPIPE_LOG_DIR`` (default ``$XDG_STATE_HOME/segpipe/logs``) / ``segpipe-<time>-<pid>.log``."""
    import os

    base = os.environ.get("SEGPIPE_LOG_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "segpipe", "logs")
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, f"segpipe-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def configure_logging(debug: bool) -> None:
    """``--debug``: everything on stderr. Otherwise library noise (GDAL, tifffile, Dask's
    "Compute Failed" blocks, Python warnings) goes to a log file and the terminal shows only
    segpipe's one-line errors and warnings."""
    global _log_path
    logging.captureWarnings(True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if debug:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        root.setLevel(logging.DEBUG)
    else:
        try:
            _log_path = log_file_path()
            handler = logging.FileHandler(_log_path, delay=True)
        except OSError:  # no writable state folder: drop the noise rather than print it
            handler = logging.NullHandler()
        root.setLevel(logging.INFO)
        root.addHandler(_TerminalWarnings())
    handler.setFormatter(fmt)
    root.addHandler(handler)
    quiet_library_loggers(debug)


def quiet_library_loggers(debug: bool) -> None:
    """distributed installs its own stderr handlers when imported: route them through ours."""
    import distributed  # noqa: F401 - importing it installs the handlers we replace

    for name in ("distributed", "bokeh", "tornado", "rasterio", "tifffile", "fsspec", "s3fs", "prefect"):
        lg = logging.getLogger(name)
        if not debug:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    level = logging.INFO if debug else logging.WARNING
    for name in ("distributed", "segpipe"):  # distributed sets INFO on its own loggers
        logging.getLogger(name).setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs on the terminal.")
@click.version_option(package_name="segpipe")
def main(debug: bool) -> None:
    """segpipe: batch semantic segmentation of large images into Zarr masks."""
    configure_logging(debug)


# ----------------------------------------------------------------------------- segment

class RichProgress:
    """Progress bar: a planning phase, then image i/n and its name, chunks done, megapixels/s, time left."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
            TextColumn("{task.fields[mps]:.2f} MP/s"), TimeRemainingColumn(), TextColumn("{task.fields[image]}"),
            console=_console(stderr=True), transient=False,
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
        self._progress.update(self._task, total=chunks, description="segment", image="")
        self._t0 = time.perf_counter()

    def image(self, index: int, count: int, name: str) -> None:
        self._progress.update(self._task, image=f"image {index + 1}/{count} {name}")

    def advance(self, chunks: int, megapixels: float) -> None:
        self._mp += megapixels
        mps = self._mp / max(time.perf_counter() - self._t0, 1e-9)
        self._progress.update(self._task, advance=chunks, mps=mps)


def segment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``segment`` and the commands that run the segmentation engine."""
    opts = [
        click.option("--chunk-size", type=int, default=512, show_default=True, help="Output chunk side (pixels)."),
        click.option("--halo", type=int, default=64, show_default=True, help="Context pixels on each side of a chunk."),
        click.option("--batch-size", type=int, default=None, help="Tiles per forward pass [default: 1 CPU, 16 GPU]."),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto = bf16 where the device runs it natively."),
        click.option("--tta", is_flag=True, help="Flip test-time augmentation (4 passes)."),
        click.option("--probabilities", is_flag=True, help="Also write class probabilities (uint8)."),
        click.option("--bands", default=None, help="1-based bands to read, e.g. 1,2,3 [default: all]."),
        click.option("--level", type=int, default=None, help="Pyramid level to segment (slides, COG overviews)."),
        click.option("--mpp", type=float, default=None, help="Microns per pixel to segment at (slides)."),
        click.option("--skip-empty/--no-skip-empty", default=True, show_default=True,
                     help="Skip chunks that are all nodata (written as the nodata label) or slide background."),
        click.option("--background-class", type=int, default=None,
                     help="Class for slide background outside the tissue [default: the nodata label]."),
        click.option("--max-pixels", type=float, default=1e11, show_default=True,
                     help="Refuse images declaring more pixels than this."),
        click.option("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def build_settings(chunk_size: int, halo: int, batch_size: int | None, device: str, precision: str, tta: bool,
                   probabilities: bool, bands: str | None, level: int | None = None, mpp: float | None = None,
                   skip_empty: bool = True, max_pixels: float = 1e11, background_class: int | None = None,
                   overwrite: bool = False):
    """The CLI's options → :func:`segpipe.core.settings.segment_settings` (the flow calls the same builder)."""
    from segpipe.core.settings import segment_settings

    try:
        return segment_settings(chunk_size=chunk_size, halo=halo, batch_size=batch_size, device=device,
                                precision=precision, tta=tta, probabilities=probabilities, bands=bands, level=level,
                                mpp=mpp, skip_empty=skip_empty, max_pixels=max_pixels,
                                background_class=background_class, overwrite=overwrite)
    except ConfigError as e:  # name the option as the user typed it
        raise ConfigError(f"--{e.subject}", e.problem) from None


def print_summary(results: list) -> None:
    from rich.table import Table

    table = Table(title="segpipe segment", show_lines=False)
    for col in ("image", "size", "chunks", "skipped", "seconds", "MP/s", "status", "output"):
        table.add_column(col, overflow="fold")
    for r in results:
        size = f"{r.width}×{r.height}" if r.height else "-"
        status = {"done": "[green]done", "skipped": "[cyan]skipped", "failed": "[red]failed"}.get(r.status, r.status)
        computed = f"{r.chunks_computed}/{r.chunks}" if r.chunks else "-"
        table.add_row(r.source, size, computed, str(r.chunks_skipped or "-"), f"{r.seconds:.1f}", f"{r.mp_per_s:.2f}" if r.mp_per_s else "-",
                      status, r.output or "-")
    _console().print(table)


@main.command()
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
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-image results (status, chunks computed/resumed, seconds) as JSON.")
@click.option("--workers", type=int, default=None,
              help="Embedded cluster: worker count [default: 1, or one per GPU with dask-cuda].")
@click.option("--worker-threads", type=int, default=None, help="Embedded cluster: threads per worker.")
@click.option("--processes", is_flag=True, help="Embedded cluster: worker processes instead of threads.")
@handle_errors
def segment(sources: tuple[str, ...], model: str, out: str, chunk_size: int, halo: int, batch_size: int | None,
            device: str, precision: str, tta: bool, probabilities: bool, bands: str | None, level: int | None,
            mpp: float | None, skip_empty: bool, background_class: int | None, max_pixels: float,
            dask_address: str | None, overwrite: bool, cog: bool, vector: str | None, preview: bool,
            min_area: float, no_progress: bool, report_json: str | None, workers: int | None,
            worker_threads: int | None, processes: bool) -> None:
    """Segment SOURCES (files, folders, globs or fsspec URLs) into OUT/<name>.zarr.

    Distinct images never share an output: when two would (hopper.jpg, hopper.png), both keep
    their extension (hopper.jpg.zarr, hopper.png.zarr). A path that is not a segpipe output of
    the same image is never touched.
    """
    from segpipe.engine.cluster import dask_client
    from segpipe.core.settings import ClusterSettings
    from segpipe.export.exports import Exports
    from segpipe.engine.segment import segment_many, write_image_exports

    settings = build_settings(chunk_size, halo, batch_size, device, precision, tta, probabilities, bands, level, mpp,
                              skip_empty, max_pixels, background_class, overwrite)
    exports = Exports(cog=cog, vector=vector, preview=preview, min_area=min_area)
    cluster = ClusterSettings(address=dask_address, n_workers=workers, threads_per_worker=worker_threads,
                              processes=processes)
    quiet_library_loggers(click.get_current_context().find_root().params.get("debug", False))
    with dask_client(cluster) as client:
        if no_progress:
            results = segment_many(list(sources), model, out, settings, client)
        else:
            with RichProgress() as progress:
                results = segment_many(list(sources), model, out, settings, client, progress)
    for r in results:
        write_image_exports(r, exports)
    print_summary(results)
    if report_json:
        import json

        from segpipe.engine.segment import summary_rows

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
        if any("unexpected" in (r.error or "") for r in failed) and _log_path:
            click.echo(f"details: {_log_path}", err=True)
        sys.exit(EXIT_FAILED_IMAGES)


# ----------------------------------------------------------------------------- model

@main.group()
def model() -> None:
    """Create and inspect model artifacts."""


@model.command("create")
@click.option("--arch", default="Unet", show_default=True, help="smp architecture (Unet, FPN, DeepLabV3Plus, …).")
@click.option("--encoder", default="resnet18", show_default=True, help="smp encoder (resnet18, resnet34, …).")
@click.option("--classes", required=True, help="Comma-separated class names, index = class id.")
@click.option("--in-channels", type=int, default=3, show_default=True)
@click.option("--out", required=True, help="Artifact folder to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def model_create(arch: str, encoder: str, classes: str, in_channels: int, out: str, seed: int) -> None:
    """Write a randomly initialised artifact (for smoke runs and benchmarks)."""
    from segpipe.models.artifact import create_artifact

    names = [c.strip() for c in classes.split(",") if c.strip()]
    spec = create_artifact(out, arch, encoder, names, in_channels=in_channels, seed=seed)
    click.echo(f"wrote {out}: {spec.architecture}/{spec.encoder}, {spec.in_channels} band(s), "
               f"{spec.num_classes} classes")


@model.command("info")
@click.argument("path")
@handle_errors
def model_info(path: str) -> None:
    """Print an artifact's spec, weights hash and parameter count."""
    import json

    from segpipe.models.artifact import load_artifact
    from segpipe.models.registry import resolve

    art = load_artifact(resolve(path))
    n_params = sum(int(t.numel()) for t in art.weights.values())
    info = {"uri": art.uri, **art.spec.dump(), "weights_sha256": art.sha256, "parameters": n_params}
    for key in ("training",):
        if key in info and isinstance(info[key], dict):
            info[key] = {k: v for k, v in info[key].items() if k != "history"}
    click.echo(json.dumps(info, indent=2))


# ----------------------------------------------------------------------------- train / evaluate / retrain

@main.command()
@click.option("--data", required=True, help="Dataset root (images/, masks/, classes.json[, split.json]).")
@click.option("--out", required=True, help="Artifact folder to write.")
@click.option("--arch", default="Unet", show_default=True)
@click.option("--encoder", default="resnet34", show_default=True)
@click.option("--encoder-weights", default=None, help="e.g. imagenet (needs a network); default: from scratch.")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--patch-size", type=int, default=256, show_default=True)
@click.option("--patches-per-epoch", type=int, default=None)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--class-balanced/--no-class-balanced", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUT/checkpoint/.")
@handle_errors
def train(data: str, out: str, arch: str, encoder: str, encoder_weights: str | None, epochs: int, batch_size: int,
          patch_size: int, patches_per_epoch: int | None, lr: float, class_balanced: bool, device: str,
          precision: str, seed: int, resume: bool) -> None:
    """Train a model on a dataset and write an artifact."""
    from segpipe.train.loop import TrainSettings, train as run_train

    settings = TrainSettings(architecture=arch, encoder=encoder, encoder_weights=encoder_weights, epochs=epochs,
                             batch_size=batch_size, patch_size=patch_size, lr=lr, class_balanced=class_balanced,
                             device=device, precision=precision, seed=seed,
                             **({"patches_per_epoch": patches_per_epoch} if patches_per_epoch else {}))
    result = run_train(data, out, settings, resume=resume)
    click.echo(f"wrote {result.uri}: {result.epochs_run} epoch(s), best epoch {result.best_epoch}, "
               f"val mean IoU {result.metrics.get('val_mean_iou')} ({result.stop_reason})")


@main.command()
@click.option("--model", "model", required=True, help="Model folder, registry folder or REGISTRY@vN.")
@click.option("--data", required=True, help="Dataset root.")
@click.option("--split", default="val", show_default=True, help="train | val | a split named in split.json.")
@click.option("--out", required=True, help="Folder for metrics.json, report.html, report.md, predictions/.")
@segment_options
@handle_errors
def evaluate(model: str, data: str, split: str, out: str, chunk_size: int, halo: int, batch_size: int | None,
             device: str, precision: str, tta: bool, probabilities: bool, bands: str | None, level: int | None,
             mpp: float | None, skip_empty: bool, background_class: int | None, max_pixels: float,
             dask_address: str | None) -> None:
    """Predict a split with the production engine and write metrics and a report."""
    from segpipe.engine.cluster import dask_client
    from segpipe.core.settings import ClusterSettings
    from segpipe.train.dataset import load_dataset
    from segpipe.evaluate.evaluation import evaluate as run_evaluate, write_evaluation_report

    # predictions/ under OUT is evaluate's own scratch: a rerun with other settings replaces it
    settings = build_settings(chunk_size, halo, batch_size, device, precision, tta, probabilities, bands, level, mpp,
                              skip_empty, max_pixels, background_class, overwrite=True)
    ds = load_dataset(data, split)
    with dask_client(ClusterSettings(address=dask_address)) as client:
        ev = run_evaluate(model, ds, out, settings, client, split=split)
    html, _ = write_evaluation_report(out, ev, title=f"evaluation of {ev.model.uri}")  # the model's colours = its outputs'
    from segpipe.evaluate.reports import markdown_table

    click.echo(markdown_table(ev.metrics))
    click.echo(f"metrics: {out}/metrics.json\nreport:  {html}")


@main.command()
@click.option("--data", required=True, help="Dataset root.")
@click.option("--registry", required=True, help="Registry folder or bucket URL.")
@click.option("--arch", default="Unet", show_default=True)
@click.option("--encoder", default="resnet18", show_default=True)
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--patch-size", type=int, default=256, show_default=True)
@click.option("--patches-per-epoch", type=int, default=None)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--margin", type=float, default=0.005, show_default=True,
              help="Promote only when challenger mean IoU ≥ champion's + margin.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dask-address", default=None)
@handle_errors
def retrain(data: str, registry: str, arch: str, encoder: str, epochs: int, batch_size: int, patch_size: int,
            patches_per_epoch: int | None, lr: float, margin: float, device: str, precision: str, seed: int,
            dask_address: str | None) -> None:
    """Train a challenger, compare it with the champion on the same split, promote if better."""
    import json

    from segpipe.core.settings import segment_settings
    from segpipe.evaluate.retrain import retrain as run_retrain
    from segpipe.train.loop import TrainSettings

    tsettings = TrainSettings(architecture=arch, encoder=encoder, epochs=epochs, batch_size=batch_size,
                              patch_size=patch_size, lr=lr, class_balanced=True, device=device, precision=precision, seed=seed,
                              **({"patches_per_epoch": patches_per_epoch} if patches_per_epoch else {}))
    ssettings = segment_settings(device=device, precision=precision)
    result = run_retrain(data, registry, tsettings, ssettings, margin=margin, dask_address=dask_address)
    click.echo(json.dumps(result.as_dict(), indent=2))


# ----------------------------------------------------------------------------- models (registry)

@main.group()
def models() -> None:
    """List, inspect and promote registered model versions."""


@models.command("list")
@click.argument("registry")
@handle_errors
def models_list(registry: str) -> None:
    """List the versions of REGISTRY (the champion is starred)."""
    from rich.table import Table

    from segpipe.models.registry import list_versions

    table = Table(title=registry)
    for col in ("", "version", "created", "model", "val mean IoU", "weights"):
        table.add_column(col)
    for v in list_versions(registry):
        miou = f"{v.val_mean_iou:.4f}" if v.val_mean_iou is not None else "-"
        table.add_row("*" if v.is_champion else "", v.version, v.created or "-", f"{v.architecture}/{v.encoder}",
                      miou, v.weights_sha256[:12])
    _console().print(table)


@models.command("show")
@click.argument("model")
@handle_errors
def models_show(model: str) -> None:
    """Show a version (REGISTRY@vN), a registry's champion (REGISTRY) or an artifact folder."""
    import json

    from segpipe.models.artifact import load_artifact
    from segpipe.models.registry import resolve

    art = load_artifact(resolve(model))
    info = {"uri": art.uri, "weights_sha256": art.sha256, **art.spec.dump()}
    training = info.get("training")
    if isinstance(training, dict):
        info["training"] = {k: v for k, v in training.items() if k != "history"}
    click.echo(json.dumps(info, indent=2, default=str))


@models.command("promote")
@click.argument("registry")
@click.argument("version")
@click.option("--reason", default="promoted by hand", show_default=True)
@handle_errors
def models_promote(registry: str, version: str, reason: str) -> None:
    """Make VERSION the champion of REGISTRY (atomic pointer replace)."""
    from segpipe.models.registry import promote

    promote(registry, version, reason)
    click.echo(f"{registry}: champion is now {version}")


# ----------------------------------------------------------------------------- export

@main.command()
@click.argument("output")
@click.option("--cog", default=None, help="Write a Cloud-Optimized GeoTIFF of the class ids here.")
@click.option("--vector", default=None, help="Write polygons here (.gpkg, .geojson/.json, .shp, .fgb, .parquet).")
@click.option("--preview", default=None, help="Write a PNG preview here.")
@click.option("--confidence", default=None, help="Write a max-probability COG here (needs --probabilities).")
@click.option("--min-area", type=float, default=0.0, show_default=True, help="Drop polygons smaller than this.")
@click.option("--sieve", type=int, default=0, show_default=True, help="Remove regions under N pixels first.")
@handle_errors
def export(output: str, cog: str | None, vector: str | None, preview: str | None, confidence: str | None,
           min_area: float, sieve: int) -> None:
    """Export a segpipe OUTPUT.zarr to COG, vectors, a preview or a confidence COG."""
    from segpipe.export import exports as ex

    if not any((cog, vector, preview, confidence)):
        raise click.UsageError("name at least one of --cog, --vector, --preview, --confidence")
    if cog:
        click.echo(f"cog: {ex.export_cog(output, cog)}")
    if vector:
        click.echo(f"vector: {ex.export_vectors(output, vector, min_area=min_area, sieve=sieve)}")
    if preview:
        click.echo(f"preview: {ex.export_preview(output, preview)}")
    if confidence:
        click.echo(f"confidence: {ex.export_confidence(output, confidence)}")


# ----------------------------------------------------------------------------- demo

@main.command()
@click.option("--out", default="demo-output", show_default=True, help="Folder for everything the demo makes.")
@click.option("--quick", is_flag=True, help="Tiny sizes (for tests and smoke runs): seconds, not minutes.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def demo(out: str, quick: bool, seed: int) -> None:
    """Generate data, retrain + register a model, segment a large scene, evaluate it, print where it all is."""
    from segpipe.demo import run_demo

    run_demo(out, quick=quick, seed=seed, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
