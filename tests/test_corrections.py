"""The corrections figures from one confusion matrix (rows: corrected labels, columns: the model's)."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.core.metrics import ConfusionMatrix
from segpipe.evaluate.corrections import corrections_markdown, summarize


def test_added_removed_and_dice_counted_by_hand():
    cm = ConfusionMatrix(3)
    corrected = np.array([[0, 0, 1, 1], [1, 2, 2, 0]])
    model = np.array([[0, 1, 1, 1], [1, 2, 0, 0]])
    cm.update(corrected, model)
    s = summarize(cm, ["bg", "house", "road"], area=0.25, unit="CRS units²")
    # class 0: corrected 3 px (0,0),(0,1),(1,3); model 3 px (0,0),(1,2),(1,3); both: 2 → added 1, removed 1
    assert s["per_class"]["bg"] == {"added_pixels": 1, "removed_pixels": 1, "added_area": 0.25, "removed_area": 0.25,
                                    "dice": pytest.approx(2 * 2 / 6)}
    # class 1: corrected 3 (0,2),(0,3),(1,0); model 4 (0,1),(0,2),(0,3),(1,0): added 0, removed 1
    assert s["per_class"]["house"]["added_pixels"] == 0 and s["per_class"]["house"]["removed_pixels"] == 1
    assert s["per_class"]["house"]["dice"] == pytest.approx(2 * 3 / 7)
    # class 2: corrected 2 (1,1),(1,2); model 1 (1,1): added 1
    assert s["per_class"]["road"]["added_pixels"] == 1 and s["per_class"]["road"]["dice"] == pytest.approx(2 / 3)
    assert s["pixels"] == 8 and s["changed_pixels"] == 2 and s["changed_fraction"] == 0.25
    assert sum(c["added_pixels"] for c in s["per_class"].values()) == s["changed_pixels"]
    md = corrections_markdown({**s, "images": [{"labels": "l.gpkg", "model_output": "o.zarr",
                                                 "changed_fraction": 0.25, "mean_dice": s["mean_dice"]}]})
    assert "| house | 0.0 | 0.2 | 0.8571 |" in md and "2 of 8 labelled pixels changed (25.00 %)" in md


def test_an_unchanged_class_has_dice_one_and_an_absent_one_none():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1]), np.array([0, 0, 1]))
    s = summarize(cm, ["a", "b", "c"])
    assert s["per_class"]["a"]["dice"] == 1.0 and s["per_class"]["c"]["dice"] is None and s["changed_pixels"] == 0
