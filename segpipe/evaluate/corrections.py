"""What annotators changed: their corrected labels against the model labels they started from.

The loop this closes: segment nightly → export polygons (``segment --vector gpkg``, ``segpipe export``)
→ a person corrects them in QGIS or QuPath → the corrected file goes to ``DATA/labels/<name>.<ext>``
→ retrain. Each corrected file is compared with exactly the model labels it was made from, pixel by
pixel over the labelled pixels (the rule of evaluation: ignored names, pixels outside the regions and
the output's nodata are left out), through one confusion matrix (rows: corrected, columns: model):

* per class: pixels annotators **added** to the class (corrected says c, the model did not) and
  **removed** from it, as pixels and as area (CRS units² for georeferenced outputs, µm² for slides
  with a resolution, else pixels); the **Dice** of model vs corrected (1 = unchanged);
* per file: its outcome, the share changed, and its split — corrections on images outside the train
  split change the challenger's score, never the challenger (it is not trained on them).

Which model labels a file started from (:func:`find_origin`), in this order:

1. a GeoPackage export carries them (:mod:`segpipe.export.origin`): compared with that copy, whatever
   happened to the output since;
2. an export that records its output but carries no copy (made before segpipe carried one): the
   output itself, only while it is still the one recorded (complete, same weights, source and
   settings) — else the file is named with why not (recomputed since by model X, still being written,
   gone);
3. a file with segpipe's output columns but no record (GeoJSON/Shapefile exports; a GeoPackage that
   lost its metadata through QGIS "Save Features As…", which is named with the hint to edit in place):
   ``BASELINE/<name>.zarr`` when ``--baseline`` names the folder of outputs, if that output was
   finished before the file was last saved (a later one cannot be where the annotator started);
4. anything else was drawn from scratch: never a correction, with or without ``--baseline``.

A file that is not compared is always named, with the reason, in the report and as a warning;
there is no silent "nothing to compare".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.errors import DatasetError, SegpipeError
from segpipe.core.metrics import ConfusionMatrix
from segpipe.evaluate.evaluation import output_grid, score_output
from segpipe.export.origin import (
    MODEL_KEY,
    OUTPUT_FIELDS,
    SETTINGS_KEY,
    SOURCE_FINGERPRINT_KEY,
    SOURCE_KEY,
    WEIGHTS_KEY,
    RecordedOrigin,
    describe_model,
    extract_baseline,
    read_origin,
)
from segpipe.io.meta import open_output_group, output_meta
from segpipe.io.output import read_attrs
from segpipe.io.storage import filesystem, has_scheme, join, strip_file_scheme
from segpipe.labels.dataset import Dataset, Item, split_dataset
from segpipe.labels.truth import open_truth

log = logging.getLogger("segpipe.evaluate.corrections")

#: outcomes of one labels file
COMPARED = "compared"
HAND_DRAWN = "hand-drawn"
_SAVE_AS_HINT = ("QGIS 'Save Features As…' writes a new file without it: copy the exported GeoPackage and edit "
                 "the copy in place (Layer › Toggle Editing, then Save Layer Edits), or pass --baseline")


@dataclass(frozen=True)
class Origin:
    """Which model labels a labels file is compared with, or why it is not."""

    outcome: str  #: ``compared``, ``hand-drawn`` or why not: ``recomputed``, ``running``, ``not found``, …
    reason: str  #: one line for the report (for a compared file: a note, possibly empty)
    output: str | None = None  #: the model output's URI (as recorded, or assumed from --baseline)
    model: str | None = None  #: the model that made the labels compared with
    #: ``file`` (the copy the file carries), ``output`` (the live output) or None (not compared)
    compare_with: str | None = None


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch of an mtime (number), a datetime, or an ISO string."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dt.datetime):
        return value.timestamp()
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _saved_at(uri: str) -> float | None:
    fs, path = filesystem(strip_file_scheme(uri))
    info = fs.info(path)
    return _epoch(info.get("mtime") or info.get("LastModified") or info.get("last_modified"))


def _live(output: str, labels_uri: str, recorded: dict[str, str] | None) -> Origin:
    """The output at ``output`` if it is still the one the file started from (``recorded``: the export's record;
    None: nothing recorded, then only an output finished before the file was last saved qualifies)."""
    try:
        attrs = read_attrs(output)
    except SegpipeError as e:
        return Origin("error", f"its output cannot be read ({e.problem}): not compared", output)
    if attrs is None:
        relative = not has_scheme(output) and not posixpath.isabs(strip_file_scheme(output))
        hint = (" (an older export recorded it relative to the folder segpipe ran in: export it again)"
                if relative else "")
        return Origin("not found", f"the output it started from ({output}) is gone{hint}: not compared", output)
    seg = attrs.get("segpipe") or {}
    model = describe_model(seg)
    if seg.get("status") != "complete":
        return Origin("running", f"its output {output} is being written (status {seg.get('status')!r}): not "
                                 "compared with a half-written output", output, model)
    if recorded:
        started = f"{recorded.get(MODEL_KEY) or '?'} (weights {recorded.get(WEIGHTS_KEY, '?')[:12]})"
        if (seg.get("model") or {}).get("weights_sha256") != recorded.get(WEIGHTS_KEY):
            return Origin("recomputed", f"its output {output} was recomputed since by model {model}; the file "
                                        f"started from {started}: not compared", output, model)
        if seg.get("source_fingerprint") != recorded.get(SOURCE_FINGERPRINT_KEY):
            return Origin("recomputed", f"its output {output} was recomputed since from a changed source image: "
                                        "not compared", output, model)
        if recorded.get(SETTINGS_KEY) and seg.get("settings_key") != recorded[SETTINGS_KEY]:
            return Origin("recomputed", f"its output {output} was recomputed since with other settings: not "
                                        "compared", output, model)
        return Origin(COMPARED, "", output, model, "output")
    finished, saved = _epoch(seg.get("finished")), _saved_at(labels_uri)
    if finished is None or (saved is not None and finished > saved):
        return Origin("recomputed", f"its output {output} was made by model {model} at {seg.get('finished')}, after "
                                    "the file was last saved: not what the annotator started from; not compared",
                      output, model)
    return Origin(COMPARED, f"the file records no model: compared with {output} (model {model}), finished before "
                            "the file was last saved", output, model, "output")


def find_origin(item: Item, baseline: str | None) -> Origin:
    """Which model labels ``item``'s labels file started from (see the module docstring), or why none."""
    assert item.labels_uri is not None
    rec: RecordedOrigin = read_origin(item.labels_uri)
    if rec.output is not None:
        level = rec.metadata.get("segpipe_level", "0")
        if level != "0":
            return Origin("other level", f"was exported from pyramid level {level}, not the full-resolution "
                                         "labels: not compared", rec.output)
        source = rec.metadata.get(SOURCE_KEY) or ""
        stem = posixpath.splitext(posixpath.basename(source))[0] if source else None
        if stem and stem != posixpath.basename(item.name):
            return Origin("other image", f"was exported from the output of {source}, not of image {item.name}: "
                                         "not compared", rec.output)
        if rec.carries_baseline:
            # the copy decides; the output's state now is only a note (it may have been recomputed since)
            now = _live(rec.output, item.labels_uri, rec.metadata)
            note = {COMPARED: "", "recomputed": f"the output was recomputed since by {now.model}",
                    "running": "the output is being rewritten", "not found": "the output is gone"}.get(
                now.outcome, f"the output: {now.outcome}")
            model = f"{rec.metadata.get(MODEL_KEY) or '?'} (weights {rec.metadata.get(WEIGHTS_KEY, '?')[:12]})"
            return Origin(COMPARED, note, rec.output, model, "file")
        # an export without the copy (older segpipe): the output itself while it is still the one recorded
        return _live(rec.output, item.labels_uri, rec.metadata if rec.metadata.get(WEIGHTS_KEY) else None)
    if not rec.has_output_schema:
        return Origin(HAND_DRAWN, f"drawn from scratch (not segpipe's output columns {', '.join(OUTPUT_FIELDS)}): "
                                  "not a correction")
    lost = item.labels_uri.lower().endswith(".gpkg")
    if lost:
        log.warning("%s: has segpipe's output columns but lost the layer metadata that records its origin (%s)",
                    item.labels_uri, _SAVE_AS_HINT)
    if baseline:
        return _live(join(strip_file_scheme(baseline), f"{item.name}.zarr"), item.labels_uri, None)
    if lost:
        return Origin("metadata lost", f"has segpipe's output columns but lost the layer metadata that records "
                                       f"its origin ({_SAVE_AS_HINT}): not compared")
    return Origin("not recorded", "has segpipe's output columns, but its format records no origin: pass --baseline "
                                  "FOLDER (the segment --out it was exported from); not compared")


@contextlib.contextmanager
def _model_labels(origin: Origin, labels_uri: str) -> Iterator[str]:
    """The Zarr output to compare with: the live output, or the copy the file carries (extracted, then removed)."""
    if origin.compare_with == "output":
        assert origin.output is not None
        yield origin.output
        return
    with tempfile.TemporaryDirectory(prefix="segpipe-baseline-") as tmp:
        yield extract_baseline(labels_uri, tmp)


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


def _train_names(dataset: Dataset, seed: int) -> set[str]:
    try:
        return {i.name for i in split_dataset(dataset, "train", seed).items}
    except DatasetError:  # no train image: nothing teaches the challenger (training refuses such a dataset)
        return set()


def corrections(dataset: Dataset, baseline: str | None = None, *, seed: int = 0) -> dict[str, Any]:
    """What annotators changed in every labels file of ``dataset`` (all splits), per file and in total.

    ``seed`` is the training seed: with it, the split the challenger trains on (``split.json``, else the
    seeded default). Streams like evaluation: one output chunk at a time, the labels burned window by window.
    """
    k = dataset.num_classes
    train = _train_names(dataset, seed)
    total = ConfusionMatrix(k)
    files: list[dict[str, Any]] = []
    areas: dict[str, list[dict[str, Any]]] = {}
    changed_by_split = {"train": 0, "val": 0}
    for item in dataset.items:
        if item.labels_uri is None:
            continue
        split = "train" if item.name in train else "val"
        entry: dict[str, Any] = {"image": item.name, "labels": item.labels_uri, "split": split}
        if item.mask_uri is not None:
            origin = Origin("not trained", f"{item.mask_uri} wins over this file (it is not trained on): not compared")
        else:
            origin = find_origin(item, baseline)
        entry.update(outcome=origin.outcome, reason=origin.reason, model_output=origin.output, model=origin.model)
        if origin.compare_with is not None:
            try:
                with _model_labels(origin, item.labels_uri) as uri:
                    meta = output_meta(uri, open_output_group(uri))
                    # rows: the corrected labels (as truth), columns: the model's labels, over the labelled pixels
                    cm = score_output(uri, open_truth(dataset, item, output_grid(uri)), k)
            except SegpipeError as e:
                entry.update(outcome="error", reason=f"not compared: {e}")
            else:
                one = summarize(cm, dataset.classes, *_pixel_area(meta))
                entry.update(compared_with="the model labels the file carries" if origin.compare_with == "file"
                             else origin.output, pixels=one["pixels"], changed_pixels=one["changed_pixels"],
                             changed_fraction=one["changed_fraction"], mean_dice=one["mean_dice"])
                areas.setdefault(one["area_unit"], []).append(one)
                changed_by_split[split] += one["changed_pixels"]
                total = total + cm
        if entry["outcome"] not in (COMPARED, HAND_DRAWN):
            log.warning("%s: corrections not counted: %s", item.labels_uri, entry["reason"])
        files.append(entry)
    out = _totals(total, dataset.classes, areas)
    out.update(changed_pixels_train=changed_by_split["train"], changed_pixels_val=changed_by_split["val"],
               compared=sum(f["outcome"] == COMPARED for f in files),
               hand_drawn=sum(f["outcome"] == HAND_DRAWN for f in files),
               not_compared=sum(f["outcome"] not in (COMPARED, HAND_DRAWN) for f in files), files=files)
    return out


def _totals(cm: ConfusionMatrix, classes: list[str], areas: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The summed figures; areas summed per file (pixel sizes differ between images), in pixels when units mix."""
    out = summarize(cm, classes)
    if len(areas) == 1:
        [(unit, ones)] = areas.items()
        out["area_unit"] = unit
        for name, v in out["per_class"].items():
            v["added_area"] = float(sum(o["per_class"][name]["added_area"] for o in ones))
            v["removed_area"] = float(sum(o["per_class"][name]["removed_area"] for o in ones))
    return out


def corrections_markdown(c: dict[str, Any]) -> str | None:
    """The report section (None when the dataset has no vector labels files at all)."""
    files = c["files"]
    if not files:
        return None
    compared = [f for f in files if f["outcome"] == COMPARED]
    skipped = [f for f in files if f["outcome"] not in (COMPARED, HAND_DRAWN)]
    lines = ["## Corrections: what annotators changed", ""]
    if compared:
        dice = f"{c['mean_dice']:.4f}" if c["mean_dice"] is not None else "n/a"
        lines += [f"{len(compared)} corrected label file(s) compared with the model labels each started from: "
                  f"{c['changed_pixels']:,} of {c['pixels']:,} labelled pixels changed "
                  f"({100 * c['changed_fraction']:.2f} %), mean Dice model vs corrected {dice}.", "",
                  f"Changed pixels on train images: {c['changed_pixels_train']:,} (the challenger learns from "
                  f"them); on val images: {c['changed_pixels_val']:,} (they change its score only: val images are "
                  "not trained on)."
                  + (" No correction lies on a train image: the challenger was trained on the labels the champion "
                     "saw." if c["changed_pixels"] and not c["changed_pixels_train"] else ""), "",
                  f"| class | added ({c['area_unit']}) | removed ({c['area_unit']}) | Dice model vs corrected |",
                  "|---|---:|---:|---:|"]
        for name, v in c["per_class"].items():
            d = f"{v['dice']:.4f}" if v["dice"] is not None else "n/a"
            lines.append(f"| {name} | {v['added_area']:,.1f} | {v['removed_area']:,.1f} | {d} |")
        lines += ["", "| labels | split | compared with | changed | Dice | note |", "|---|---|---|---:|---:|---|"]
        for f in compared:
            d = f"{f['mean_dice']:.4f}" if f["mean_dice"] is not None else "n/a"
            lines.append(f"| {f['labels']} | {f['split']} | {f['compared_with']} ({f['model'] or '?'}) | "
                         f"{100 * f['changed_fraction']:.2f} % | {d} | {f['reason']} |")
    else:
        lines.append("No corrected label file could be compared with the model labels it started from.")
    if skipped:
        lines += ["", f"Not compared ({len(skipped)}):", "", "| labels | split | why |", "|---|---|---|"]
        lines += [f"| {f['labels']} | {f['split']} | {f['outcome']}: {f['reason']} |" for f in skipped]
    if c["hand_drawn"]:
        lines += ["", f"{c['hand_drawn']} label file(s) drawn from scratch (without segpipe's output columns): "
                      "not corrections."]
    return "\n".join(lines) + "\n"
