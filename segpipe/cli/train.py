"""``segpipe train``, ``evaluate`` and ``retrain``: make a model, measure it, replace the champion.

``evaluate`` predicts with the production engine, so it takes the same engine options as
``segment`` (:func:`segpipe.cli.common.segment_options`).
"""

from __future__ import annotations

import click

from segpipe.cli.common import build_settings, handle_errors, segment_options
from segpipe.train.settings import TRAIN_DEFAULTS as D

#: what --data holds (every command that reads a dataset says the same)
DATA_HELP = ("Dataset root: images/, and per image masks/ (raster class ids) or labels/ (vector labels: "
             "GeoPackage, GeoJSON, Shapefile, QuPath, COCO, …), optional regions/; classes.json[, split.json] "
             "(docs/labels.md).")


@click.command()
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--out", required=True, help="Artifact folder to write.")
@click.option("--arch", default=D["architecture"], show_default=True)
@click.option("--encoder", default=D["encoder"], show_default=True)
@click.option("--encoder-weights", default=None, help="e.g. imagenet (needs a network); default: from scratch.")
@click.option("--epochs", type=int, default=D["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=D["batch_size"], show_default=True)
@click.option("--patch-size", type=int, default=D["patch_size"], show_default=True)
@click.option("--patches-per-epoch", type=int, default=None)
@click.option("--lr", type=float, default=D["lr"], show_default=True)
@click.option("--class-balanced/--no-class-balanced", default=D["class_balanced"], show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mpp", type=float, default=None,
              help="Train on slides at this many microns per pixel (recorded in model.json; segment reads at it).")
@click.option("--gsd", type=float, default=None,
              help="Train on georeferenced rasters at this pixel size in CRS units (recorded in model.json).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUT/checkpoint/.")
@handle_errors
def train(data: str, out: str, arch: str, encoder: str, encoder_weights: str | None, epochs: int, batch_size: int,
          patch_size: int, patches_per_epoch: int | None, lr: float, class_balanced: bool, device: str,
          precision: str, seed: int, mpp: float | None, gsd: float | None, resume: bool) -> None:
    """Train a model on a dataset and write an artifact.

    The dataset gives each image's truth as a raster mask (masks/) or vector labels (labels/:
    polygons from QGIS, QuPath or CVAT), optionally with labelled regions (regions/).
    """
    import sys

    from segpipe.train.loop import epoch_line
    from segpipe.train.loop import train as run_train
    from segpipe.train.settings import train_settings

    settings = train_settings(architecture=arch, encoder=encoder, encoder_weights=encoder_weights, epochs=epochs,
                              batch_size=batch_size, patch_size=patch_size, patches_per_epoch=patches_per_epoch, lr=lr,
                              class_balanced=class_balanced, device=device, precision=precision, seed=seed,
                              mpp=mpp, gsd=gsd)
    # a progress bar needs a terminal; piped into a file or a CI log it shows nothing useful, so
    # there each epoch is one plain line
    tty = sys.stdout.isatty()
    result = run_train(data, out, settings, resume=resume, progress=tty,
                       on_epoch=None if tty else lambda entry: click.echo(epoch_line(entry, settings.epochs)))
    miou = result.metrics.get("val_mean_iou")
    click.echo(f"wrote {result.uri}: {result.epochs_run} epoch(s), best epoch {result.best_epoch}, "
               f"val mean IoU {'n/a' if miou is None else f'{miou:.4f}'} ({result.stop_reason})")


@click.command()
@click.option("--model", "model", required=True, help="Model folder, registry folder or REGISTRY@vN.")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--split", default="val", show_default=True, help="train | val | a split named in split.json.")
@click.option("--out", required=True, help="Folder for metrics.json, report.html, report.md, predictions/.")
@segment_options
@handle_errors
def evaluate(model: str, data: str, split: str, out: str, chunk_size: int, halo: int, tile_size: int | None,
             batch_size: int | None,
             device: str, precision: str, runtime: str, tta: bool, probabilities: bool, bands: str | None,
             level: int | None, mpp: float | None, gsd: float | None, skip_empty: bool, background_class: int | None,
             max_pixels: float, dask_address: str | None) -> None:
    """Predict a split with the production engine and write metrics and a report."""
    from segpipe.core.settings import ClusterSettings
    from segpipe.engine.cluster import dask_client
    from segpipe.evaluate.evaluation import evaluate as run_evaluate
    from segpipe.evaluate.evaluation import write_evaluation_report
    from segpipe.labels.dataset import load_dataset

    # predictions/ under OUT is evaluate's own scratch: a rerun with other settings replaces it
    settings = build_settings(chunk_size, halo, batch_size, device, precision, tta, probabilities, bands, level, mpp,
                              skip_empty, max_pixels, background_class, overwrite=True, tile_size=tile_size, gsd=gsd,
                              runtime=runtime)
    ds = load_dataset(data, split)
    with dask_client(ClusterSettings(address=dask_address), device) as client:
        ev = run_evaluate(model, ds, out, settings, client, split=split)
    html, _ = write_evaluation_report(out, ev, title=f"evaluation of {ev.model.uri}")  # the model's colours = its outputs'
    from segpipe.evaluate.reports import markdown_table

    click.echo(markdown_table(ev.metrics))
    click.echo(f"metrics: {out}/metrics.json\nreport:  {html}")


@click.command()
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--registry", required=True, help="Registry folder or bucket URL.")
@click.option("--arch", default=D["architecture"], show_default=True)
@click.option("--encoder", default=D["encoder"], show_default=True)
@click.option("--epochs", type=int, default=D["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=D["batch_size"], show_default=True)
@click.option("--patch-size", type=int, default=D["patch_size"], show_default=True)
@click.option("--patches-per-epoch", type=int, default=None)
@click.option("--lr", type=float, default=D["lr"], show_default=True)
@click.option("--class-balanced/--no-class-balanced", default=D["class_balanced"], show_default=True)
@click.option("--margin", type=float, default=0.005, show_default=True,
              help="Promote only when challenger mean IoU ≥ champion's + margin (below 0: refused, see next).")
@click.option("--allow-negative-margin", is_flag=True,
              help="Accept a --margin below 0, which promotes a challenger that scores worse than the champion.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dask-address", default=None)
@click.option("--mpp", type=float, default=None, help="Train the challenger on slides at this many microns per pixel.")
@click.option("--gsd", type=float, default=None,
              help="Train the challenger on georeferenced rasters at this pixel size in CRS units.")
@click.option("--baseline", default=None,
              help="Folder of segpipe outputs that corrected label files without a record (GeoJSON, Shapefile "
                   "exports) were exported from; GeoPackage exports carry their model labels themselves. Files "
                   "without segpipe's output columns are never counted as corrections.")
@click.option("--skip-unchanged", is_flag=True,
              help="Do nothing when data, labels, champion and settings are those of the last completed round "
                   "(the weekly deployment's default).")
@handle_errors
def retrain(data: str, registry: str, arch: str, encoder: str, epochs: int, batch_size: int, patch_size: int,
            patches_per_epoch: int | None, lr: float, class_balanced: bool, margin: float, allow_negative_margin: bool,
            device: str, precision: str,
            seed: int, dask_address: str | None, mpp: float | None, gsd: float | None, baseline: str | None,
            skip_unchanged: bool) -> None:
    """Train a challenger, compare it with the champion on the same split, promote if better."""
    import json

    from segpipe.core.settings import segment_settings
    from segpipe.evaluate.retrain import retrain as run_retrain
    from segpipe.train.settings import train_settings

    tsettings = train_settings(architecture=arch, encoder=encoder, epochs=epochs, batch_size=batch_size,
                               patch_size=patch_size, patches_per_epoch=patches_per_epoch, lr=lr,
                               class_balanced=class_balanced, device=device, precision=precision, seed=seed,
                               mpp=mpp, gsd=gsd)
    ssettings = segment_settings(device=device, precision=precision)
    result = run_retrain(data, registry, tsettings, ssettings, margin=margin,
                         allow_negative_margin=allow_negative_margin, dask_address=dask_address,
                         skip_unchanged=skip_unchanged, baseline=baseline)
    click.echo(json.dumps(result.as_dict(), indent=2))
