"""What annotators changed: their corrected labels against the model output they started from.

The loop this closes: segment nightly → export polygons (``segment --vector``, ``segpipe export``) →
a person corrects them in QGIS or QuPath → the corrected file goes to ``DATA/labels/<name>.<ext>``
→ retrain. Each corrected file is compared with the segpipe output it was made from, pixel by pixel
over the labelled pixels (the same rule as evaluation: ignored names, pixels outside the regions and
the output's nodata are left out), through one confusion matrix (rows: corrected, columns: model):

* per class: pixels the annotators **added** to the class (corrected says c, the model did not) and
  **removed** from it (the model said c, corrected does not), as pixels and as area (CRS units² for
  georeferenced outputs, µm² for slides with a resolution, else pixels);
* per class and overall: the **Dice** between the model's and the corrected labels (1 = unchanged).

Which output a labels file started from: the ``segpipe_output`` its GeoPackage layer records (segpipe
writes it with every GeoPackage export), else ``BASELINE/<name>.zarr`` when a baseline folder of
outputs is given (the nightly run's ``--out``; GeoJSON, QuPath and Shapefile keep no such record).
The model's labels and the human ones are never confused: only files found this way are compared,
and the report names each file and the output it is compared with.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from segpipe.core.errors import SegpipeError
from segpipe.core.metrics import ConfusionMatrix
from segpipe.evaluate.evaluation import output_grid, score_output
from segpipe.export.vectors import ORIGIN_KEY
from segpipe.io.meta import open_output_group, output_meta
from segpipe.io.storage import filesystem, join, strip_file_scheme
from segpipe.labels.dataset import Dataset, Item
from segpipe.labels.truth import open_truth

log = logging.getLogger("segpipe.evaluate.corrections")



def recorded_origin(labels_uri: str) -> str | None:
    """The segpipe output a labels file was exported from, as its GeoPackage layer metadata records it."""
    if not labels_uri.lower().endswith(".gpkg"):
        return None
    try:
        import pyogrio

        info = pyogrio.read_info(strip_file_scheme(labels_uri))
    except Exception:  # noqa: BLE001 - unreadable metadata: the file is read (and refused) as labels elsewhere
        return None
    meta = info.get("layer_metadata") or {}
    return meta.get(ORIGIN_KEY) or None


def find_origin(item: Item, baseline: str | None) -> str | None:
    """The output ``item``'s labels started from: recorded in the file, else ``baseline/<name>.zarr``."""
    if item.labels_uri is None or item.mask_uri is not None:
        return None  # a raster mask wins over labels: its labels are not what is trained on
    origin = recorded_origin(item.labels_uri)
    if origin is None and baseline:
        origin = join(strip_file_scheme(baseline), f"{item.name}.zarr")
    if origin is None:
        return None
    fs, path = filesystem(strip_file_scheme(origin))
    if not fs.exists(path):
        log.info("%s: the output it started from (%s) is gone; its corrections are not counted", item.labels_uri,
                 origin)
        return None
    return origin


def _pixel_area(meta: Any) -> tuple[float, str]:
    if meta.transform is not None and meta.crs_wkt:
        a, b, _, d, e, _ = meta.transform[:6]
        return abs(a * e - b * d), "CRS units²"
    if meta.mpp:
        return float(meta.mpp) ** 2, "µm²"
    return 1.0, "pixels"


def summarize(cm: ConfusionMatrix, classes: list[str], area: float = 1.0, unit: str = "pixels") -> dict[str, Any]:
    """Per-class added/removed pixels and area, Dice of model vs corrected, and the changed share (pure)."""
    m = np.asarray(cm.matrix, dtype=np.int64)
    diag, corrected, model = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    total = int(m.sum())
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        denom = int(corrected[i] + model[i])
        per_class[name] = {
            "added_pixels": int(corrected[i] - diag[i]), "removed_pixels": int(model[i] - diag[i]),
            "added_area": float((corrected[i] - diag[i]) * area), "removed_area": float((model[i] - diag[i]) * area),
            "dice": (2 * int(diag[i]) / denom) if denom else None,
        }
    dices = [c["dice"] for c in per_class.values() if c["dice"] is not None]
    changed = total - int(diag.sum())
    return {"classes": classes, "pixels": total, "changed_pixels": changed,
            "changed_fraction": changed / total if total else 0.0, "area_unit": unit,
            "mean_dice": float(np.mean(dices)) if dices else None, "per_class": per_class,
            "matrix": m.tolist()}


def corrections(dataset: Dataset, baseline: str | None = None) -> dict[str, Any] | None:
    """The corrections of every labels file of ``dataset`` that started from a segpipe output (None: none did).

    Streams like evaluation: one output chunk at a time, the labels burned window by window.
    """
    k = dataset.num_classes
    total = ConfusionMatrix(k)
    images: list[dict[str, Any]] = []
    area, unit = 1.0, "pixels"
    for item in dataset.items:
        origin = find_origin(item, baseline)
        if origin is None:
            continue
        try:
            meta = output_meta(origin, open_output_group(origin))
            # rows: the corrected labels (as truth), columns: the model's output, over the labelled pixels
            cm = score_output(origin, open_truth(dataset, item, output_grid(origin)), k)
        except SegpipeError as e:
            log.warning("%s: corrections not counted (%s)", item.labels_uri, e)
            continue
        area, unit = _pixel_area(meta)
        one = summarize(cm, dataset.classes, area, unit)
        images.append({"image": item.name, "labels": item.labels_uri, "model_output": origin,
                       "changed_fraction": one["changed_fraction"], "mean_dice": one["mean_dice"]})
        total = total + cm
    if not images:
        return None
    out = summarize(total, dataset.classes, area, unit)
    out["images"] = images
    return out


def corrections_markdown(c: dict[str, Any]) -> str:
    """The report section: per class what annotators added and removed, and the Dice of model vs corrected."""
    lines = ["## Corrections: what annotators changed", "",
             f"{len(c['images'])} corrected label file(s) compared with the segpipe output each started from: "
             f"{c['changed_pixels']:,} of {c['pixels']:,} labelled pixels changed "
             f"({100 * c['changed_fraction']:.2f} %), mean Dice model vs corrected "
             + (f"{c['mean_dice']:.4f}." if c["mean_dice"] is not None else "n/a."), "",
             f"| class | added ({c['area_unit']}) | removed ({c['area_unit']}) | Dice model vs corrected |",
             "|---|---:|---:|---:|"]
    for name, v in c["per_class"].items():
        dice = f"{v['dice']:.4f}" if v["dice"] is not None else "n/a"
        lines.append(f"| {name} | {v['added_area']:,.1f} | {v['removed_area']:,.1f} | {dice} |")
    lines += ["", "| labels | model output | changed | Dice |", "|---|---|---:|---:|"]
    for im in c["images"]:
        dice = f"{im['mean_dice']:.4f}" if im["mean_dice"] is not None else "n/a"
        lines.append(f"| {im['labels']} | {im['model_output']} | {100 * im['changed_fraction']:.2f} % | {dice} |")
    return "\n".join(lines) + "\n"
