"""A dataset of mixed pixel sizes trains, evaluates and retrains end to end, on one pixel grid per image.

GeoTIFFs at 0.5 and 0.6 m, slides from two scanners at 0.2527 and 0.2270 µm: the model records the median,
every image is read at it for training, ``segment`` reads it there, and evaluation scores the truth on the
prediction's own grid — checked here against the test's own count (nearest class id under each grid pixel).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from click.testing import CliRunner

from segpipe.cli.main import main
from segpipe.core.classes import nodata_label
from segpipe.core.grid import resampled_size
from segpipe.train.synthetic import write_dataset

COMMON = ["--chunk-size", "64", "--halo", "16", "--precision", "fp32"]
TRAIN = ["--epochs", "1", "--batch-size", "4", "--patch-size", "64", "--patches-per-epoch", "8", "--device", "cpu",
         "--precision", "fp32"]


def _set_pixel_size(path: Path, size: float) -> None:
    with rasterio.open(path, "r+") as ds:
        t = ds.transform
        ds.transform = rasterio.Affine(size, 0, t.c, 0, -size, t.f)


def _expected(out: Path, val: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(confusion matrix, unpredicted per class, grid pixels) of the val outputs against the full-size truth,
    counted here: the truth's class id under each output pixel's centre."""
    want, missed, pixels = np.zeros((k, k), np.int64), np.zeros(k, np.int64), 0
    nd = nodata_label(k)
    for name, truth in val.items():
        g = zarr.open_group(str(out / "predictions" / f"{name}.zarr"), mode="r")
        pred = g["0"][:].astype(np.int64)
        scale = g.attrs["segpipe"]["grid"]["scale"]
        h, w = pred.shape
        assert (h, w) == (resampled_size(truth.shape[0], scale), resampled_size(truth.shape[1], scale))
        rows = np.minimum(np.floor((np.arange(h) + 0.5) * scale).astype(int), truth.shape[0] - 1)
        cols = np.minimum(np.floor((np.arange(w) + 0.5) * scale).astype(int), truth.shape[1] - 1)
        t = truth[rows[:, None], cols[None, :]].astype(np.int64)
        labelled = t != 255
        hit = labelled & (pred != nd)
        np.add.at(want, (t[hit], pred[hit]), 1)
        missed += np.bincount(t[labelled & (pred == nd)], minlength=k)[:k]
        pixels += h * w
    return want, missed, pixels


def _check_round(tmp_path: Path, data: Path, val: dict[str, np.ndarray], k: int, what: str) -> dict:
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "m"), *TRAIN])
    assert r.exit_code == 0, r.output
    assert "are read resampled to the dataset's pixel size" in r.output + (r.stderr or "")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    out = tmp_path / "eval"
    r = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(out),
                             *COMMON])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    want, missed, pixels = _expected(out, val, k)
    np.testing.assert_array_equal(np.asarray(metrics["confusion_matrix"]), want)
    assert [metrics["per_class"][c]["unpredicted"] for c in metrics["classes"]] == missed.tolist()
    assert metrics["data"]["pixels"] == pixels
    assert metrics["data"]["unscored_pixels"] == pixels - int(want.sum()) - int(missed.sum())
    assert (out / "report.html").exists() and "thumbnail" not in r.output  # the thumbnails drew, no refusal
    registry = tmp_path / "registry"
    r = runner.invoke(main, ["retrain", "--data", str(data), "--registry", str(registry), *TRAIN])
    assert r.exit_code == 0, r.output
    return {"resolution": spec["resolution"], "metrics": metrics}


@pytest.mark.slow
def test_geotiffs_at_half_and_six_tenths_of_a_metre(tmp_path):
    data = write_dataset(tmp_path / "d", 4, 192, seed=5)
    names = sorted(p.stem for p in (data / "images").glob("*.tif"))
    for name in names[2:]:  # two images at 0.6 m (and their masks)
        _set_pixel_size(data / "images" / f"{name}.tif", 0.6)
        _set_pixel_size(data / "masks" / f"{name}.tif", 0.6)
    split = {"train": [names[0], names[2]], "val": [names[1], names[3]]}
    (data / "split.json").write_text(json.dumps(split))
    val = {n: rasterio.open(data / "masks" / f"{n}.tif").read(1) for n in split["val"]}
    k = len(json.loads((data / "classes.json").read_text())["classes"])
    got = _check_round(tmp_path, data, val, k, "gsd")
    assert got["resolution"] == {"mpp": None, "gsd": pytest.approx(0.55)} or got["resolution"]["gsd"] == \
        pytest.approx(0.55)


def _slide(path: Path, mpp: float, seed: int) -> np.ndarray:
    """An Aperio slide (levels 1 and 4) with a tissue blob on glass; returns its level-0 class ids
    (0 glass, 1 tissue, 2 a stripe of 'ink' drawn across glass and tissue alike)."""
    h, w = 384, 512
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = rng.integers(232, 248, (h, w, 3)).astype(np.uint8)
    tissue = ((yy - 200) / 120.0) ** 2 + ((xx - 250) / 160.0) ** 2 < 1
    image[tissue] = rng.integers(120, 190, (int(tissue.sum()), 3)).astype(np.uint8)
    labels = tissue.astype(np.uint8)
    labels[(xx > 40) & (xx < 60)] = 2  # labelled everywhere, also on glass the tissue detector skips
    small = np.rint(image.reshape(h // 4, 4, w // 4, 4, 3).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)
    with tifffile.TiffWriter(str(path)) as tw:
        for level in (image, small):
            lh, lw = level.shape[:2]
            desc = (f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (256x256) -> {lw}x{lh} RAW"
                    f"|AppMag = 40|MPP = {mpp}")
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", description=desc, metadata=None)
    return labels


@pytest.mark.slow
def test_slides_from_two_scanners_and_labelled_glass(tmp_path):
    data = tmp_path / "slides"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    truth = {}
    for name, mpp, seed in (("a", 0.2527, 1), ("b", 0.2270, 2), ("c", 0.2527, 3)):
        truth[name] = _slide(data / "images" / f"{name}.svs", mpp, seed)
        tifffile.imwrite(data / "masks" / f"{name}.tif", truth[name])
    (data / "classes.json").write_text(json.dumps({"classes": [{"name": "glass"}, {"name": "tissue"},
                                                               {"name": "ink"}]}))
    (data / "split.json").write_text(json.dumps({"train": ["a", "b"], "val": ["c"]}))
    got = _check_round(tmp_path, data, {"c": truth["c"]}, 3, "mpp")
    assert got["resolution"]["mpp"] == pytest.approx((0.2527 + 0.2270) / 2) or \
        got["resolution"]["mpp"] == pytest.approx(0.2527)
    m = got["metrics"]
    # glass outside the tissue is nodata in the prediction: its labelled pixels are misses, not silence
    assert m["per_class"]["glass"]["unpredicted"] > 0 and m["per_class"]["ink"]["unpredicted"] > 0
    assert m["data"]["unpredicted_pixels"] == sum(c["unpredicted"] for c in m["per_class"].values())
