"""Evaluation: predict whole images with the production engine, score one confusion matrix.

The predictions are made exactly as ``segment`` makes them (same chunk size, halo and
chunk tasks on Dask) into ``OUT/predictions/<name>.zarr``; truth and prediction are then
compared chunk by chunk, so evaluation images can be as large as production images.

Everything is compared on the **prediction's pixel grid** (:mod:`segpipe.core.grid`, recorded in the
output): a model with a recorded resolution segments an image at its own pixel size, and the truth
(mask or vector labels) and the report's thumbnails are then read on that same grid.

Not scored: truth pixels holding the mask's ignore value (:data:`segpipe.labels.dataset.IGNORE_INDEX`)
or the nodata label; ``metrics.json`` records how many under ``data.unscored_pixels``. A labelled
pixel the prediction left as nodata (outside a slide's tissue, the source's no-data) is a miss for its
class, counted per class as ``unpredicted`` (:mod:`segpipe.core.metrics`), never left out silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.classes import colors_from_spec
from segpipe.core.errors import DatasetError
from segpipe.core.geometry import ChunkGrid, Window
from segpipe.core.grid import PixelGrid
from segpipe.core.metrics import ConfusionMatrix
from segpipe.core.settings import SegmentSettings
from segpipe.engine.job import ModelRef, check_model
from segpipe.engine.segment import segment_image
from segpipe.io.meta import open_output_group, output_meta
from segpipe.io.metrics import write_metrics_json
from segpipe.io.output import open_labels, read_attrs
from segpipe.io.readers import ImageReader, open_image
from segpipe.io.readers.decimate import read_decimated
from segpipe.io.storage import SourceImage, join, list_images
from segpipe.labels.dataset import IGNORE_INDEX, Dataset, load_dataset, open_mask_on
from segpipe.labels.truth import open_truth

if TYPE_CHECKING:
    from distributed import Client

    from segpipe.evaluate.overlays import Sample

log = logging.getLogger("segpipe.evaluate.evaluation")

SAMPLE_SIDE = 512


@dataclass
class Evaluation:
    """Metrics of one model on one split, and where its files are."""

    metrics: dict[str, Any]
    out: str
    model: ModelRef
    samples: list[Sample]
    images: int


def _source(item_uri: str, name: str) -> SourceImage:
    found = list_images(item_uri)[0]
    ext = item_uri.rsplit(".", 1)[-1] if "." in item_uri.rsplit("/", 1)[-1] else "tif"
    return SourceImage(found.uri, f"{name}.{ext}", found.fingerprint, found.size)


def _sample(name: str, image_uri: str, grid: PixelGrid, truth: ImageReader, pred) -> Sample:
    """A decimated view (≤ SAMPLE_SIDE px) of image | truth | prediction for the report, all three on the
    prediction's pixel grid."""
    from segpipe.evaluate.overlays import Sample

    step = max(1, -(-max(grid.height, grid.width) // SAMPLE_SIDE))
    with open_image(image_uri, grid=grid) as r:  # strip by strip: evaluation images may be as large as production
        bands = min(3, r.info.count)
        img = read_decimated(r, step, bands)
    if img.dtype != np.uint8:  # stretch other dtypes to 0..255 for display
        lo, hi = np.percentile(img, (1, 99))
        img = np.clip((img - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    if bands == 1:
        img = np.repeat(img, 3, axis=0)
    with truth as r:  # a reader of class ids on the same grid (segpipe.labels.truth.open_truth), closed here
        ids = read_decimated(r, step, 1)[0]
    return Sample(name, np.ascontiguousarray(img.transpose(1, 2, 0)), ids.astype(np.int64),
                  np.asarray(pred[::step, ::step]).astype(np.int64))


def output_grid(output_uri: str) -> PixelGrid:
    """The pixel grid a segpipe output was computed on (what its truth must be opened on)."""
    meta = output_meta(output_uri, open_output_group(output_uri))
    assert meta.grid is not None
    return meta.grid


def score_output(output_uri: str, truth: str | ImageReader, num_classes: int) -> ConfusionMatrix:
    """Confusion matrix of a segpipe output against its truth, one output chunk at a time.

    ``truth``: a mask's URI (read on the output's pixel grid, nearest class ids), or a reader of class ids
    already on that grid (:func:`segpipe.labels.truth.open_truth` with ``grid=``:func:`output_grid`), which is
    closed here. Truth pixels equal to :data:`~segpipe.labels.dataset.IGNORE_INDEX` (ignored names, outside
    every labelled region) or to the nodata label are not counted; a labelled pixel predicted as nodata is
    counted as unpredicted (a miss).
    """
    grid = output_grid(output_uri)
    pred = open_labels(output_uri)
    height, width = pred.shape
    reader: ImageReader = open_mask_on(truth, grid) if isinstance(truth, str) else truth
    with reader as masks:
        if (masks.info.height, masks.info.width) != (height, width):
            raise DatasetError(masks.info.uri, f"is read on {masks.info.grid.describe()}, but the prediction "
                                               f"{output_uri} is on {grid.describe()}")
        cm = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, nodata="auto")
        for ch in ChunkGrid(height, width, pred.chunks[0]):
            ids = masks.read(Window(ch.y0, ch.x0, ch.h, ch.w))[0]
            cm.update(ids, pred[ch.y0:ch.y0 + ch.h, ch.x0:ch.x0 + ch.w])
    return cm


def evaluate(model: str, data: str | Dataset, out: str, settings: SegmentSettings, client: Client, *,
             split: str | None = "val", n_samples: int = 4, model_ref: ModelRef | None = None) -> Evaluation:
    """Predict every image of ``split`` with the tiled engine and write ``OUT/metrics.json``."""
    ds = data if isinstance(data, Dataset) else load_dataset(data, split)
    if not ds.items:
        raise DatasetError(ds.root, f"the {split} split holds no images")
    ref = model_ref or check_model(model)[0]
    if ref.spec.num_classes != ds.num_classes:
        raise DatasetError(ds.root, f"has {ds.num_classes} classes but model {ref.uri} predicts "
                           f"{ref.spec.num_classes}")
    cm = ConfusionMatrix(ds.num_classes, ignore_index=IGNORE_INDEX, nodata="auto")
    samples: list[Sample] = []
    preds_root = join(out, "predictions")
    # OUT/predictions is evaluation's own scratch: a rerun with other settings replaces it
    settings = settings.model_copy(update={"output": settings.output.model_copy(update={"overwrite": True})})
    not_scored: list[dict[str, str]] = []
    scored, pixels = 0, 0
    for item in ds.items:
        result = segment_image(_source(item.image_uri, item.name), ref, preds_root, settings, client)
        if result.status == "failed":
            raise DatasetError(item.image_uri, result.error or "prediction failed")
        # "skipped" is a complete prediction of the same image and settings, or one that another run is
        # still writing (its lock is live): only a complete one is scored
        status = ((read_attrs(result.output) or {}).get("segpipe") or {}).get("status")
        if status != "complete":
            reason = "; ".join(result.notes) or f"{result.output}: not complete (status {status!r})"
            not_scored.append({"image": item.image_uri, "reason": reason})
            log.warning("not scored: %s", reason)
            continue
        # the truth and the thumbnails on the prediction's own pixel grid (the model's resolution)
        grid = output_grid(result.output)
        cm = cm + score_output(result.output, open_truth(ds, item, grid), ds.num_classes)
        scored, pixels = scored + 1, pixels + grid.pixels
        if len(samples) < n_samples:
            samples.append(_sample(item.name, item.image_uri, grid, open_truth(ds, item, grid),
                                   open_labels(result.output)))
    if not scored:
        raise DatasetError(ds.root, f"no image of the {split} split could be scored: {not_scored[0]['reason']}")
    metrics = cm.scores(ds.classes)
    metrics["model"] = {"uri": ref.uri, "weights_sha256": ref.sha256}
    metrics["data"] = {"root": ds.root, "split": split, "images": scored, "pixels": pixels,
                       # ignored or nodata truth: not scored (labelled pixels without a prediction are
                       # scored, as misses: unpredicted_pixels)
                       "unscored_pixels": pixels - cm.total,
                       "unpredicted_pixels": int(cm.unpredicted.sum()),
                       # predictions another run was writing: left out, and said so
                       "not_scored": not_scored}
    write_metrics_json(join(out, "metrics.json"), metrics)
    log.info("evaluated %s on %d image(s): mean IoU %s", ref.uri, scored, metrics["mean_iou"])
    return Evaluation(metrics, out, ref, samples, scored)


def model_info(ref: ModelRef) -> dict[str, Any]:
    """The model facts shown at the top of a report."""
    extra = ref.spec.model_extra or {}
    training = extra.get("training") or {}
    return {
        "uri": ref.uri, "architecture": ref.spec.architecture, "encoder": ref.spec.encoder,
        "classes": ", ".join(ref.spec.classes), "weights sha256": ref.sha256[:16],
        **({"epochs": training.get("epochs_run"), "best epoch": training.get("best_epoch")} if training else {}),
    }


def write_evaluation_report(out_dir: str, ev: Evaluation, *, title: str, champion: Evaluation | None = None,
                            class_colors: list[str] | None = None, corrections_md: str | None = None
                            ) -> tuple[str, str]:
    """``out_dir/report.html`` + ``report.md`` for ``ev``; with ``champion``, the two side by side.

    ``class_colors`` default to the model's own (``class_colors`` in its ``model.json``), filled by
    :func:`segpipe.core.classes.class_colors` exactly as in its Zarr outputs.
    """
    from segpipe.evaluate.reports import write_report

    if class_colors is None:
        class_colors = colors_from_spec(ev.model.spec.model_extra)
    history = ((ev.model.spec.model_extra or {}).get("training") or {}).get("history")
    html, md = write_report(
        out_dir, champion.metrics if champion else ev.metrics, title=title, model_info=model_info(ev.model),
        history=history, samples=ev.samples, challenger=ev.metrics if champion else None,
        class_colors=class_colors, corrections_md=corrections_md,
    )
    return str(html), str(md)
