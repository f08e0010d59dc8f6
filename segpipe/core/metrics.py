"""Segmentation metrics from one mergeable confusion matrix (pure: no I/O).

Counts first, scores once (the segmentation-models-pytorch ``metrics/functional.py`` way):
every worker turns its chunks into a K×K confusion matrix (:func:`confusion_matrix`,
:class:`ConfusionMatrix`), matrices add up exactly across chunks and workers, and
:func:`scores` derives every number of ``metrics.json`` from the final matrix in one place.
Averaging per-chunk IoUs instead would weight a nearly empty chunk like a full one.

Conventions (the ``metrics.json`` contract, see docs/architecture.md):

* rows are the true class, columns the predicted class;
* pixels whose truth equals ``ignore_index`` (a mask's own "don't score" value, 255 in the
  dataset layout) are not counted at all;
* pixels whose truth is the *nodata label* (:func:`segpipe.core.classes.nodata_label`: 255 for up
  to 255 classes, 65,535 above) are not counted either: there is nothing to score there;
* a labelled pixel whose **prediction** is the nodata label (a segpipe output writes it where the
  source has no data, or outside a slide's tissue) is a miss for its true class, never silence:
  :class:`ConfusionMatrix` counts it in ``unpredicted`` (per true class, beside the K×K matrix,
  since "no prediction" is not a class), and it adds to that class's ``fn`` and ``support``;
* for class *c*: ``tp`` = M[c, c], ``fp`` = column sum − tp, ``fn`` = row sum − tp + unpredicted,
  ``support`` = row sum + unpredicted; ``iou = tp / (tp + fp + fn)``, ``precision = tp / (tp + fp)``,
  ``recall = tp / (tp + fn)``, ``f1 = 2·tp / (2·tp + fp + fn)``; ``pixel_accuracy`` = trace / Σ support.

Degenerate cases, decided once here:

* a class absent from both truth and prediction has no score: iou, precision, recall and f1
  are ``None`` (``null`` in JSON) and the class is left out of ``mean_iou``;
* any other zero division counts as 0: a class present in the truth but never predicted has
  precision 0 (and recall, iou, f1 0); a class predicted but absent from the truth has recall 0
  (and precision, iou, f1 0) — its predictions are all wrong;
* nothing counted (all pixels ignored, or no pixels): ``pixel_accuracy``, ``mean_iou`` and
  ``frequency_weighted_iou`` are ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from segpipe.core.classes import nodata_label
from segpipe.core.errors import DatasetError

#: keys every metrics.json holds (the public contract)
METRICS_KEYS = ("classes", "confusion_matrix", "per_class", "mean_iou", "frequency_weighted_iou", "pixel_accuracy",
                "unpredicted_pixels")
#: per-class keys
CLASS_KEYS = ("iou", "precision", "recall", "f1", "support", "unpredicted")


#: ``nodata="auto"``: the nodata label of the class count (:func:`segpipe.core.classes.nodata_label`)
Nodata = int | None | Literal["auto"]


def resolve_nodata(nodata: Nodata, num_classes: int) -> int | None:
    """The label value left out of the counts: ``"auto"`` → the class count's nodata label."""
    return nodata_label(num_classes) if nodata == "auto" else nodata


def _check_ids(values: np.ndarray, num_classes: int, what: str, ignore_index: int | None) -> None:
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    bad = hi if hi >= num_classes else lo if lo < 0 else None
    if bad is not None:
        ignore = f", ignore {ignore_index}" if ignore_index is not None else ""
        raise DatasetError(what, f"class id {bad} is out of range for {num_classes} classes "
                                 f"(valid 0..{num_classes - 1}{ignore})")


def _as_labels(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(what, f"class ids must be integers, got dtype {a.dtype}")
    return a


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int | None = 255, nodata: Nodata = "auto") -> np.ndarray:
    """K×K int64 counts: ``M[t, p]`` = pixels of true class *t* predicted as *p* (:func:`confusion_counts`
    without the unpredicted pixels)."""
    return confusion_counts(truth, pred, num_classes, ignore_index, nodata)[0]


def confusion_counts(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int | None = 255, nodata: Nodata = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(K×K counts ``M[t, p]``, K counts of labelled pixels per true class whose prediction is ``nodata``).

    Pixels whose truth is ``ignore_index`` or ``nodata`` (``"auto"``: the nodata label of
    ``num_classes``; ``None``: no such value) are skipped (their prediction is not checked); a
    labelled pixel predicted as ``nodata`` is *unpredicted* (a miss, see the module docstring).
    Every other truth and prediction id must lie in ``0..num_classes-1``; otherwise a
    :class:`~segpipe.core.errors.DatasetError` names the first offending value — a silently
    dropped id would make the scores look better than they are.
    One ``np.bincount`` over ``truth·K + pred`` does the counting.
    """
    if num_classes < 1:
        raise DatasetError("num_classes", f"must be at least 1, got {num_classes}")
    t = _as_labels(truth, "truth")
    p = _as_labels(pred, "prediction")
    if t.shape != p.shape:
        raise DatasetError("prediction", f"shape {p.shape} differs from the truth's {t.shape}")
    t, p = t.ravel(), p.ravel()
    keep = None
    if ignore_index is not None:
        keep = t != ignore_index
    nd = resolve_nodata(nodata, num_classes)
    k = num_classes
    unpredicted = np.zeros(k, dtype=np.int64)
    if nd is not None:
        keep = t != nd if keep is None else keep & (t != nd)
        missing = p == nd
        if missing.any():
            missed = t[missing if keep is None else missing & keep]
            _check_ids(missed, num_classes, "truth", ignore_index)
            unpredicted = np.bincount(missed.astype(np.int64), minlength=k)[:k].astype(np.int64, copy=False)
            keep = ~missing if keep is None else keep & ~missing
    if keep is not None and not keep.all():
        t, p = t[keep], p[keep]
    _check_ids(t, num_classes, "truth", ignore_index)
    _check_ids(p, num_classes, "prediction", ignore_index)
    # int64 before multiplying: uint8 ids times K would wrap around
    flat = t.astype(np.int64) * k + p.astype(np.int64)
    return np.bincount(flat, minlength=k * k).reshape(k, k).astype(np.int64, copy=False), unpredicted


class ConfusionMatrix:
    """Accumulated counts for ``num_classes`` classes; merge results of chunks and workers with ``+``.

    Usage: ``cm = ConfusionMatrix(5)``; ``cm.update(truth_chunk, pred_chunk)`` per chunk;
    ``total = sum(per_worker_matrices)``; ``total.scores(class_names)``.
    """

    def __init__(self, num_classes: int, matrix: np.ndarray | None = None, ignore_index: int | None = 255,
                 nodata: Nodata = "auto", unpredicted: np.ndarray | None = None) -> None:
        if num_classes < 1:
            raise DatasetError("num_classes", f"must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        #: label value never counted in truth or prediction (see :func:`confusion_matrix`)
        self.nodata = resolve_nodata(nodata, num_classes)
        if matrix is None:
            self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        else:
            m = np.asarray(matrix)
            if m.shape != (num_classes, num_classes):
                raise DatasetError("confusion matrix", f"shape {m.shape} does not fit {num_classes} classes")
            if not np.issubdtype(m.dtype, np.integer) or (m.size and m.min() < 0):
                raise DatasetError("confusion matrix", "must hold non-negative integer counts")
            self.matrix = m.astype(np.int64, copy=True)
        #: labelled pixels per true class that the prediction left as nodata (misses; see the module docstring)
        self.unpredicted = np.zeros(num_classes, dtype=np.int64) if unpredicted is None else \
            np.asarray(unpredicted, dtype=np.int64).copy()
        if self.unpredicted.shape != (num_classes,):
            raise DatasetError("confusion matrix", f"unpredicted counts {self.unpredicted.shape} do not fit "
                                                   f"{num_classes} classes")

    def update(self, truth: np.ndarray, pred: np.ndarray) -> ConfusionMatrix:
        """Add the counts of one chunk (in place); returns ``self`` for chaining."""
        m, u = confusion_counts(truth, pred, self.num_classes, self.ignore_index, self.nodata)
        self.matrix += m
        self.unpredicted += u
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the counts of both (order does not matter)."""
        if other.num_classes != self.num_classes:
            raise DatasetError("confusion matrix", f"cannot merge {other.num_classes} classes "
                                                   f"into {self.num_classes}")
        return ConfusionMatrix(self.num_classes, self.matrix + other.matrix, self.ignore_index, self.nodata,
                               self.unpredicted + other.unpredicted)

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other: object) -> ConfusionMatrix:
        # lets sum([cm_a, cm_b, ...]) work (sum starts from 0)
        if other == 0:
            return ConfusionMatrix(self.num_classes, self.matrix, self.ignore_index, self.nodata, self.unpredicted)
        return NotImplemented

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return self.num_classes == other.num_classes and bool(np.array_equal(self.matrix, other.matrix)) \
            and bool(np.array_equal(self.unpredicted, other.unpredicted))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total})"

    @property
    def total(self) -> int:
        """Labelled pixels scored so far (predicted or not)."""
        return int(self.matrix.sum() + self.unpredicted.sum())

    def scores(self, class_names: Sequence[str]) -> dict[str, Any]:
        """:func:`scores` of the accumulated counts."""
        return scores(self.matrix, class_names, self.unpredicted)

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> ConfusionMatrix:
        """The counts back from a ``metrics.json`` dict (to merge evaluations or re-derive scores)."""
        m = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
        names = metrics["classes"]
        per = metrics.get("per_class") or {}
        unpredicted = [int((per.get(n) or {}).get("unpredicted") or 0) for n in names]
        return cls(len(names), m, unpredicted=np.asarray(unpredicted, dtype=np.int64))


def _ratio(num: np.ndarray, den: np.ndarray, undefined: np.ndarray) -> np.ndarray:
    """num/den with 0/0 = 0, then NaN where the score is undefined."""
    out = np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)
    out[undefined] = np.nan
    return out


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def scores(matrix: np.ndarray, class_names: Sequence[str], unpredicted: np.ndarray | None = None) -> dict[str, Any]:
    """Every score of ``metrics.json`` from one confusion matrix (rows truth, columns prediction) and the
    labelled pixels per class that were left unpredicted (misses; None = none).

    Returns a JSON-ready dict (plain ints/floats, ``None`` for undefined values)::

        {"classes": [...], "confusion_matrix": [[...]],
         "per_class": {name: {"iou", "precision", "recall", "f1", "support", "unpredicted"}},
         "mean_iou", "frequency_weighted_iou", "pixel_accuracy", "unpredicted_pixels"}

    ``mean_iou`` is the mean over classes that have a score (present in truth or prediction);
    ``frequency_weighted_iou`` = Σ_c support_c · iou_c / Σ support; ``pixel_accuracy`` = trace / total.
    See the module docstring for the degenerate cases.
    """
    m = np.asarray(matrix)
    k = len(class_names)
    if m.shape != (k, k):
        raise DatasetError("confusion matrix", f"shape {m.shape} does not fit {k} class names")
    if len(set(class_names)) != k:
        raise DatasetError("class names", "must be unique")
    m = m.astype(np.int64)
    missed = np.zeros(k, dtype=np.int64) if unpredicted is None else np.asarray(unpredicted, dtype=np.int64)
    tp = np.diag(m).astype(np.float64)
    support = (m.sum(axis=1) + missed).astype(np.float64)  # labelled pixels per class, predicted or not
    predicted = m.sum(axis=0).astype(np.float64)
    fp = predicted - tp
    fn = support - tp
    absent = (support == 0) & (predicted == 0)

    iou = _ratio(tp, tp + fp + fn, absent)
    precision = _ratio(tp, tp + fp, absent)
    recall = _ratio(tp, tp + fn, absent)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, absent)

    total = float(support.sum())
    if total > 0:
        pixel_accuracy: float | None = float(tp.sum() / total)
        # classes with support > 0 always have a defined IoU
        fw_iou: float | None = float(np.sum(support[support > 0] * iou[support > 0]) / total)
    else:
        pixel_accuracy = fw_iou = None
    mean_iou = float(np.mean(iou[~absent])) if (~absent).any() else None

    per_class = {
        name: {
            "iou": _none_if_nan(iou[i]),
            "precision": _none_if_nan(precision[i]),
            "recall": _none_if_nan(recall[i]),
            "f1": _none_if_nan(f1[i]),
            "support": int(support[i]),
            "unpredicted": int(missed[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "classes": list(class_names),
        "confusion_matrix": m.tolist(),
        "per_class": per_class,
        "mean_iou": mean_iou,
        "frequency_weighted_iou": fw_iou,
        "pixel_accuracy": pixel_accuracy,
        "unpredicted_pixels": int(missed.sum()),
    }
