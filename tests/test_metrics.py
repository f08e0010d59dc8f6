"""Metrics against scikit-learn, the degenerate cases, merging, and strict metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from segpipe.core.errors import DatasetError, InputError
from segpipe.core.metrics import METRICS_KEYS, ConfusionMatrix, confusion_matrix, scores
from segpipe.io.metrics import read_metrics_json, write_metrics_json

IGNORE = 255


def _random_pair(seed: int, k: int, shape: tuple[int, int] = (97, 131), ignore_fraction: float = 0.1,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced truth with some ignore pixels; a prediction that is right ~70 % of the time."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.7))
    truth = rng.choice(k, size=shape, p=p).astype(np.uint8)
    pred = np.where(rng.random(shape) < 0.7, truth, rng.integers(0, k, size=shape)).astype(np.uint8)
    truth[rng.random(shape) < ignore_fraction] = IGNORE
    return truth, pred


def _names(k: int) -> list[str]:
    return [f"class_{i}" for i in range(k)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("k", [2, 5, 11])
def test_matches_sklearn(seed: int, k: int) -> None:
    truth, pred = _random_pair(seed, k)
    keep = truth != IGNORE
    t, p = truth[keep], pred[keep]
    labels = list(range(k))

    m = confusion_matrix(truth, pred, k)
    assert m.dtype == np.int64
    np.testing.assert_array_equal(m, skm.confusion_matrix(t, p, labels=labels))

    result = scores(m, _names(k))
    prec, rec, f1, support = skm.precision_recall_fscore_support(t, p, labels=labels, average=None, zero_division=0)
    iou = skm.jaccard_score(t, p, labels=labels, average=None, zero_division=0)
    present = np.isin(labels, np.concatenate([t, p]))
    for i, name in enumerate(_names(k)):
        c = result["per_class"][name]
        assert c["support"] == support[i]
        if not present[i]:
            assert c["iou"] is c["precision"] is c["recall"] is c["f1"] is None
            continue
        assert c["iou"] == pytest.approx(iou[i], abs=1e-9)
        assert c["precision"] == pytest.approx(prec[i], abs=1e-9)
        assert c["recall"] == pytest.approx(rec[i], abs=1e-9)
        assert c["f1"] == pytest.approx(f1[i], abs=1e-9)
    assert result["mean_iou"] == pytest.approx(iou[present].mean(), abs=1e-9)
    # sklearn's "weighted" average weights by true support: exactly the frequency-weighted IoU
    assert result["frequency_weighted_iou"] == pytest.approx(
        skm.jaccard_score(t, p, labels=labels, average="weighted", zero_division=0), abs=1e-9)
    assert result["pixel_accuracy"] == pytest.approx(skm.accuracy_score(t, p), abs=1e-9)
    assert set(result) == set(METRICS_KEYS)
    assert result["classes"] == _names(k)
    assert result["confusion_matrix"] == m.tolist()


def test_uint8_ids_with_many_classes_do_not_wrap() -> None:
    # 19·20 + 19 = 399 does not fit uint8: the index must be computed in int64
    truth = np.array([19, 19, 0, 7], dtype=np.uint8)
    pred = np.array([19, 0, 19, 7], dtype=np.uint8)
    m = confusion_matrix(truth, pred, 20)
    assert m[19, 19] == 1 and m[19, 0] == 1 and m[0, 19] == 1 and m[7, 7] == 1
    assert m.sum() == 4


def test_ignore_none_counts_every_pixel() -> None:
    truth = np.array([0, 1, 1, 2])
    pred = np.array([0, 1, 2, 2])
    m = confusion_matrix(truth, pred, 3, ignore_index=None)
    assert m.sum() == 4
    np.testing.assert_array_equal(m, skm.confusion_matrix(truth, pred, labels=[0, 1, 2]))


def test_class_absent_from_truth_and_prediction_is_null_and_left_out_of_mean() -> None:
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    r = scores(confusion_matrix(truth, pred, 3), ["a", "b", "c"])
    c = r["per_class"]["c"]
    assert c == {"iou": None, "precision": None, "recall": None, "f1": None, "support": 0, "unpredicted": 0}
    # a: tp 1, fn 1 → iou 1/2; b: tp 2, fp 1 → iou 2/3
    assert r["per_class"]["a"]["iou"] == pytest.approx(0.5)
    assert r["per_class"]["b"]["iou"] == pytest.approx(2 / 3)
    assert r["mean_iou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["pixel_accuracy"] == pytest.approx(0.75)


def test_class_in_truth_never_predicted_scores_zero() -> None:
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0])
    r = scores(confusion_matrix(truth, pred, 2), ["a", "b"])
    assert r["per_class"]["b"] == {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2, "unpredicted": 0}
    assert r["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert r["per_class"]["a"]["recall"] == pytest.approx(1.0)
    assert r["mean_iou"] == pytest.approx(0.25)


def test_class_predicted_but_absent_from_truth_scores_zero() -> None:
    truth = np.array([0, 0, 0, 0])
    pred = np.array([0, 0, 0, 1])
    r = scores(confusion_matrix(truth, pred, 2), ["a", "b"])
    assert r["per_class"]["b"] == {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "unpredicted": 0}
    assert r["mean_iou"] == pytest.approx((0.75 + 0.0) / 2)
    # frequency weighting ignores classes without truth pixels
    assert r["frequency_weighted_iou"] == pytest.approx(0.75)


def test_all_ignored_gives_nulls() -> None:
    truth = np.full((8, 8), IGNORE, dtype=np.uint8)
    pred = np.zeros((8, 8), dtype=np.uint8)
    m = confusion_matrix(truth, pred, 3)
    assert m.shape == (3, 3) and m.sum() == 0
    r = scores(m, ["a", "b", "c"])
    assert r["pixel_accuracy"] is None
    assert r["mean_iou"] is None
    assert r["frequency_weighted_iou"] is None
    assert all(v == {"iou": None, "precision": None, "recall": None, "f1": None, "support": 0, "unpredicted": 0}
               for v in r["per_class"].values())
    assert r["confusion_matrix"] == [[0, 0, 0]] * 3


def test_empty_arrays() -> None:
    m = confusion_matrix(np.zeros((0, 5), np.uint8), np.zeros((0, 5), np.uint8), 2)
    assert m.tolist() == [[0, 0], [0, 0]]


def test_single_class() -> None:
    truth = np.zeros((4, 4), dtype=np.uint8)
    r = scores(confusion_matrix(truth, truth, 1), ["only"])
    assert r["per_class"]["only"] == {"iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 16, "unpredicted": 0}
    assert r["mean_iou"] == r["pixel_accuracy"] == r["frequency_weighted_iou"] == 1.0


def test_perfect_prediction_with_ignore() -> None:
    truth, _ = _random_pair(7, 4)
    pred = np.where(truth == IGNORE, 3, truth)
    r = scores(confusion_matrix(truth, pred, 4), _names(4))
    assert r["mean_iou"] == r["pixel_accuracy"] == 1.0


def test_merge_equals_whole_on_uneven_chunks() -> None:
    truth, pred = _random_pair(11, 6, shape=(203, 157))
    whole = ConfusionMatrix(6).update(truth, pred)
    workers = [ConfusionMatrix(6) for _ in range(3)]
    ys, xs = [0, 17, 90, 91, 203], [0, 64, 100, 157]  # deliberately uneven chunks
    n = 0
    for y0, y1 in zip(ys, ys[1:]):
        for x0, x1 in zip(xs, xs[1:]):
            workers[n % 3].update(truth[y0:y1, x0:x1], pred[y0:y1, x0:x1])
            n += 1
    merged = workers[0] + workers[1] + workers[2]
    assert merged == whole
    assert sum(reversed(workers)) == whole
    assert workers[2].merge(workers[0]).merge(workers[1]) == whole
    assert merged.total == int((truth != IGNORE).sum())
    assert merged.scores(_names(6)) == whole.scores(_names(6))
    # merging does not modify its operands
    assert workers[0].total + workers[1].total + workers[2].total == whole.total


def test_merge_rejects_different_class_counts() -> None:
    with pytest.raises(DatasetError, match="merge"):
        ConfusionMatrix(3) + ConfusionMatrix(4)


def test_round_trip_through_metrics_dict() -> None:
    truth, pred = _random_pair(3, 5)
    cm = ConfusionMatrix(5).update(truth, pred)
    assert ConfusionMatrix.from_metrics(cm.scores(_names(5))) == cm


@pytest.mark.parametrize(("truth", "pred", "who", "value"), [
    ([0, 1, 7], [0, 1, 2], "truth", "7"),
    ([0, 1, 2], [0, 5, 2], "prediction", "5"),
    ([0, 1, 2], [0, 254, 2], "prediction", "254"),
    ([0, -1, 2], [0, 1, 2], "truth", "-1"),
])
def test_out_of_range_ids_raise(truth: list[int], pred: list[int], who: str, value: str) -> None:
    with pytest.raises(DatasetError, match=rf"^{who}: class id {value} is out of range for 3 classes"):
        confusion_matrix(np.array(truth), np.array(pred), 3)


def test_prediction_of_255_raises_when_nodata_is_off() -> None:
    # without a nodata label, 255 in a prediction is just an id out of range
    with pytest.raises(DatasetError, match=r"^prediction: class id 255 is out of range for 3 classes"):
        confusion_matrix(np.array([0, 1, 2]), np.array([0, 255, 2]), 3, nodata=None)


def test_nodata_truth_is_not_counted_and_an_unpredicted_labelled_pixel_is_a_miss() -> None:
    """3 classes → nodata label 255; the mask's own ignore value here is 9 (not 255)."""
    truth = np.array([[0, 0, 1, 1, 2],
                      [2, 255, 1, 9, 0]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 255, 2],
                     [1, 0, 255, 2, 255]], dtype=np.uint8)
    # in the matrix (truth, pred): (0,0) (0,1) (1,1) (2,2) (2,1); not scored: (255,0) (9 ignored, 2);
    # labelled but predicted as nodata — misses of their class: (1,255) (1,255) (0,255)
    m = confusion_matrix(truth, pred, 3, ignore_index=9)
    assert m.tolist() == [[1, 1, 0],
                          [0, 1, 0],
                          [0, 1, 1]]
    cm = ConfusionMatrix(3, ignore_index=9).update(truth, pred)
    assert cm.total == 8 and cm.nodata == 255 and cm.unpredicted.tolist() == [1, 2, 0]
    s = cm.scores(["a", "b", "c"])
    assert s["pixel_accuracy"] == pytest.approx(3 / 8) and s["unpredicted_pixels"] == 3
    # support and recall include the misses: a 1 of 3, b 1 of 3, c 1 of 2
    assert [s["per_class"][n]["support"] for n in "abc"] == [3, 3, 2]
    assert [s["per_class"][n]["recall"] for n in "abc"] == pytest.approx([1 / 3, 1 / 3, 1 / 2])
    # iou: a 1/(1+0+2), b 1/(1+2+2), c 1/(1+0+1)
    assert [s["per_class"][n]["iou"] for n in "abc"] == pytest.approx([1 / 3, 1 / 5, 1 / 2])
    # merging keeps the rule (counts add); the default mask ignore value (255) is the nodata label as well
    merged = cm + ConfusionMatrix(3).update(np.array([255, 0]), np.array([1, 255]))
    assert merged.total == 9 and merged.unpredicted.tolist() == [2, 2, 0]
    # the counts survive metrics.json
    assert ConfusionMatrix.from_metrics(s) == cm


def test_nodata_label_of_uint16_classes() -> None:
    """300 classes → uint16 ids, nodata label 65,535; 255 is a real class there."""
    k = 300
    truth = np.array([255, 299, 65535, 3], dtype=np.uint16)
    pred = np.array([255, 65535, 7, 3], dtype=np.uint16)
    m = confusion_matrix(truth, pred, k, ignore_index=None)
    assert m.sum() == 2 and m[255, 255] == 1 and m[3, 3] == 1
    # uint8 arrays compared with a 16-bit nodata label: nothing dropped, nothing wraps
    assert confusion_matrix(np.array([0, 254], np.uint8), np.array([254, 0], np.uint8), k,
                            ignore_index=None).sum() == 2


def test_prediction_at_ignored_pixels_is_not_checked() -> None:
    m = confusion_matrix(np.array([0, 255]), np.array([0, 99]), 2)
    assert m.tolist() == [[1, 0], [0, 0]]


def test_bad_shapes_and_dtypes_raise() -> None:
    with pytest.raises(DatasetError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(DatasetError, match="integers"):
        confusion_matrix(np.zeros(3, float), np.zeros(3, int), 2)
    with pytest.raises(DatasetError, match="3 class names"):
        scores(np.zeros((2, 2), np.int64), ["a", "b", "c"])


def test_metrics_json_is_strict_and_round_trips(tmp_path) -> None:
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    metrics = scores(confusion_matrix(truth, pred, 3), ["a", "b", "c"])
    metrics["extra_nan"] = float("nan")  # a stray NaN from a caller still becomes null
    path = tmp_path / "eval" / "metrics.json"
    write_metrics_json(str(path), metrics)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda t: pytest.fail(f"non-strict token {t}"))
    assert loaded["per_class"]["c"]["iou"] is None
    assert loaded["extra_nan"] is None
    back = read_metrics_json(str(path))
    del metrics["extra_nan"], back["extra_nan"]
    assert back == metrics


def test_metrics_json_on_fsspec_memory() -> None:
    truth, pred = _random_pair(5, 4)
    metrics = scores(confusion_matrix(truth, pred, 4), _names(4))
    write_metrics_json("memory://segpipe-test/run1/metrics.json", metrics)
    back = read_metrics_json("memory://segpipe-test/run1/metrics.json")
    assert back["mean_iou"] == pytest.approx(metrics["mean_iou"], abs=0)
    assert back == metrics


def test_read_metrics_json_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_metrics_json(str(tmp_path / "missing.json"))
    bad = tmp_path / "nan.json"
    bad.write_text('{"mean_iou": NaN}')
    with pytest.raises(InputError, match="strict JSON"):
        read_metrics_json(str(bad))
    partial = tmp_path / "partial.json"
    partial.write_text('{"classes": []}')
    with pytest.raises(InputError, match="missing key"):
        read_metrics_json(str(partial))
