"""Training: the loss goes down, artifacts load, seeds reproduce, a resume equals a straight run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from segpipe.core.errors import ConfigError
from segpipe.labels.dataset import load_dataset
from segpipe.models.artifact import load_artifact
from segpipe.train.loop import train
from segpipe.train.loss import class_weights
from segpipe.train.settings import TrainSettings
from segpipe.train.synthetic import write_dataset
from segpipe.train.validate import validate

#: tiny but real: Unet-resnet18 on 64² patches, 8 steps per epoch. On the CPU so that runs are
#: bit-identical (CUDA kernels such as weighted nll_loss2d are not deterministic)
TINY = TrainSettings(encoder="resnet18", epochs=2, batch_size=4, patch_size=64, patches_per_epoch=32, lr=3e-3,
                     class_balanced=True, seed=7, device="cpu")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 3 scenes of 96²: 2 train, 1 val (synthetic.write_dataset writes split.json)
    return write_dataset(tmp_path_factory.mktemp("train") / "data", 3, 96, seed=0)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    return train(str(data), str(out), TINY, progress=False)


def _last_weights(out: str) -> dict[str, torch.Tensor]:
    ck = sorted(Path(out, "checkpoint").glob("epoch-*.safetensors"))[-1]
    return {k: v for k, v in load_file(str(ck)).items() if k.startswith("model/")}


@pytest.mark.slow
def test_loss_goes_down_and_artifact_loads(straight, data):
    h = straight.history
    assert [e["epoch"] for e in h] == [1, 2] and straight.epochs_run == 2
    assert h[1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert all(e["patches_per_s"] > 0 for e in h)

    art = load_artifact(straight.uri)
    assert art.sha256 == straight.weights_sha256
    spec = art.spec
    assert (spec.architecture, spec.encoder, spec.in_channels) == ("Unet", "resnet18", 3)
    assert spec.classes == load_dataset(str(data)).classes
    assert spec.input_scale == 255.0 and all(0 < s < 1 for s in spec.std)
    assert spec.input_dtype == "uint8" and spec.resolution is not None and spec.resolution.gsd == 0.5
    extra = spec.model_extra
    tr = extra["training"]
    assert tr["epochs_run"] == 2 and tr["best_epoch"] == straight.best_epoch
    assert tr["settings"] == TINY.model_dump(mode="json") and tr["data"] == str(data)
    assert len(tr["class_pixel_counts"]) == 5 and sum(tr["class_pixel_counts"]) == 2 * 96 * 96
    assert len(tr["history"]) == 2 and tr["seconds"] > 0
    assert extra["metrics"]["val_mean_iou"] == straight.metrics["val_mean_iou"]
    assert 0 < straight.metrics["val_mean_iou"] <= 1 and 0 < straight.metrics["val_pixel_accuracy"] <= 1
    metrics = json.loads(Path(straight.uri, "metrics.json").read_text())
    assert metrics["mean_iou"] == straight.metrics["val_mean_iou"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 96 * 96

    net = art.network()
    with torch.inference_mode():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


@pytest.mark.slow
def test_seeded_and_resume_equals_straight(straight, data, tmp_path):
    """1 epoch, a crash, then resume: bit-identical to 2 straight epochs (and to a second straight run)."""
    again = train(str(data), str(tmp_path / "again"), TINY, progress=False)
    assert again.weights_sha256 == straight.weights_sha256
    assert [e["train_loss"] for e in again.history] == [e["train_loss"] for e in straight.history]

    out = str(tmp_path / "resumed")

    def crash_after_first(entry):
        if entry["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        train(str(data), out, TINY, progress=False, on_epoch=crash_after_first)
    assert not Path(out, "model.json").exists()
    assert [p.name for p in sorted(Path(out, "checkpoint").iterdir())] == ["epoch-0001.json",
                                                                            "epoch-0001.safetensors"]
    seen = []
    resumed = train(str(data), out, TINY, resume=True, progress=False, on_epoch=seen.append)
    assert [e["epoch"] for e in seen] == [2]  # only the missing epoch ran
    assert [e["train_loss"] for e in resumed.history] == [e["train_loss"] for e in straight.history]
    assert resumed.weights_sha256 == straight.weights_sha256
    last_a, last_b = _last_weights(straight.uri), _last_weights(out)
    assert last_a.keys() == last_b.keys()
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)

    # resuming a finished run trains nothing and rewrites the same artifact
    seen.clear()
    assert train(str(data), out, TINY, resume=True, progress=False, on_epoch=seen.append).weights_sha256 \
        == straight.weights_sha256
    assert seen == []
    # other settings than the checkpoint's: refused, with the differing setting named
    with pytest.raises(ConfigError, match=r"cannot resume: setting 'lr' was 0\.003 in the checkpoint, now 0\.001"):
        train(str(data), out, TINY.model_copy(update={"lr": 1e-3}), resume=True, progress=False)


def test_time_budget_fits_the_epochs_and_the_schedule_to_it(data, tmp_path):
    """A budget that fits one epoch: training stops after it with the schedule ended (lr at its floor),
    says why, and a resume keeps the fitted plan instead of training the remaining epochs."""
    s = TINY.model_copy(update={"epochs": 4, "max_seconds": 1e-3})
    out = str(tmp_path / "budget")
    result = train(str(data), out, s, progress=False)
    assert result.epochs_run == 1 and "time budget" in result.stop_reason
    meta = json.loads(Path(out, "checkpoint", "epoch-0001.json").read_text())
    steps = s.patches_per_epoch // s.batch_size
    assert meta["scheduler"]["total_steps"] == steps == meta["scheduler"]["last_epoch"]  # planned over 1 epoch
    # the one-cycle ended (annealed far below its peak), where the plan over 4 epochs would be warming up near it
    assert meta["optimizer"]["param_groups"][0]["lr"] < s.lr / 10
    seen: list = []
    assert train(str(data), out, s, resume=True, progress=False, on_epoch=seen.append).epochs_run == 1
    assert seen == []
    from segpipe.train.schedule import epochs_in_budget

    assert epochs_in_budget(TINY.model_copy(update={"epochs": 10, "max_seconds": 100}), 1, 30, 20) == 4
    assert epochs_in_budget(TINY.model_copy(update={"epochs": 3, "max_seconds": 100}), 1, 30, 20) == 3
    assert epochs_in_budget(TINY.model_copy(update={"epochs": 3}), 1, 1e6, 1e6) == 3  # no budget


@pytest.mark.slow
def test_loader_workers_give_the_same_run(straight, data, tmp_path):
    """Patches are a pure function of (seed, epoch, index): 2 worker processes train the same weights."""
    r = train(str(data), str(tmp_path / "workers"), TINY.model_copy(update={"num_workers": 2}), progress=False)
    assert r.weights_sha256 == straight.weights_sha256


def test_damaged_checkpoint_is_skipped(data, tmp_path, caplog):
    s = TINY.model_copy(update={"epochs": 1, "patches_per_epoch": 4})
    out = tmp_path / "run"
    first = train(str(data), str(out), s, progress=False)
    ck = out / "checkpoint" / "epoch-0001.safetensors"
    ck.write_bytes(ck.read_bytes()[:-10])  # truncated: its hash no longer matches the JSON
    with caplog.at_level(logging.WARNING, logger="segpipe.train.checkpoint"):
        again = train(str(data), str(out), s, resume=True, progress=False)
    assert "skipping damaged checkpoint epoch-0001" in caplog.text
    assert again.weights_sha256 == first.weights_sha256  # started over, same seed


def test_early_stopping_keeps_the_best_epoch(data, tmp_path, monkeypatch):
    import segpipe.train.loop as training
    from segpipe.core.metrics import ConfusionMatrix

    # validation scores by epoch: 0.5, 0.7, 0.6, 0.6 → best epoch 2, stop after 2 worse validations
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.9])

    def fake_evaluate(net, dataset, spec, **kw):
        # 1000 pixels of class 0, tp of them right, the rest predicted as class 1:
        # IoU 0 = tp/1000, IoU 1 = 0 → mean IoU = tp/2000
        tp = round(next(scores) * 1000)
        m = np.zeros((5, 5), dtype=np.int64)
        m[0, 0], m[0, 1] = tp, 1000 - tp
        return ConfusionMatrix(5, m)

    monkeypatch.setattr(training, "validate", fake_evaluate)
    s = TINY.model_copy(update={"epochs": 5, "patches_per_epoch": 4, "early_stopping_patience": 2})
    r = train(str(data), str(tmp_path / "es"), s, progress=False)
    assert r.epochs_run == 4 and r.best_epoch == 2
    assert r.stop_reason == "early stopping: no better val mean IoU in 2 validations"
    ious = [round(h["val_mean_iou"], 3) for h in r.history]
    assert ious == [0.25, 0.35, 0.3, 0.3]
    assert r.metrics["val_mean_iou"] == r.history[1]["val_mean_iou"]
    # the artifact holds epoch 2's weights, which the checkpoint kept as "best"
    from safetensors.torch import load_file

    best = {k[5:]: v for k, v in load_file(str(tmp_path / "es/checkpoint/epoch-0004.safetensors")).items()
            if k.startswith("best/")}
    art = load_artifact(str(tmp_path / "es"))
    assert all(torch.equal(art.weights[k], best[k]) for k in art.weights)
    last = _last_weights(str(tmp_path / "es"))  # epoch 4's weights differ from the kept ones
    assert not all(torch.equal(art.weights[k[len("model/"):]], v) for k, v in last.items())


def test_logs_each_epoch(data, tmp_path, caplog):
    s = TINY.model_copy(update={"epochs": 1, "patches_per_epoch": 4, "class_balanced": False})
    with caplog.at_level(logging.INFO, logger="segpipe.train.loop"):
        r = train(str(data), str(tmp_path / "o"), s, progress=False)
    assert "epoch 1/1: loss" in caplog.text and "val mIoU" in caplog.text
    assert r.stop_reason == "completed"


def test_logs_progress_within_an_epoch(data, tmp_path, caplog, monkeypatch):
    """A long epoch (or validation) logs a progress line every PROGRESS_EVERY_S seconds, not only at its end:
    the weekly retrain's training step logged nothing for minutes (here every line is due at once)."""
    from segpipe.core import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    s = TINY.model_copy(update={"epochs": 1, "patches_per_epoch": 8, "batch_size": 2, "class_balanced": False})
    with caplog.at_level(logging.INFO, logger="segpipe.train.loop"):
        train(str(data), str(tmp_path / "o"), s, progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("epoch 1/1: step 4/4, loss ") for m in lines), lines
    assert any(m.startswith("validation 1/1: ") and " MP (" in m for m in lines), lines


def test_settings_validation():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainSettings(epoch=3)
    with pytest.raises(ValidationError, match="multiple of 32"):
        TrainSettings(patch_size=100)
    with pytest.raises(ValidationError, match=r"patches_per_epoch \(2\) must be at least batch_size \(8\)"):
        TrainSettings(patches_per_epoch=2)
    with pytest.raises(ValidationError, match="device must be"):
        TrainSettings(device="gpu")
    with pytest.raises(ValidationError):
        TrainSettings(schedule="linear")
    for name, f in TrainSettings.model_fields.items():
        assert f.description, f"{name} has no description"


def test_fp16_on_cpu_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="fp16 autocast is for CUDA"):
        train(str(data), str(tmp_path / "x"), TINY.model_copy(update={"device": "cpu", "precision": "fp16"}),
              progress=False)


def test_pretrained_weights_offline_is_a_config_error(data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # offline mode makes the hub fail at once instead of retrying for ~20 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    s = TINY.model_copy(update={"encoder_weights": "imagenet"})
    with pytest.raises(ConfigError, match=r"resnet18 weights=imagenet: cannot download pretrained weights") as ei:
        train(str(data), str(tmp_path / "x"), s, progress=False)
    assert "\n" not in str(ei.value)


def test_class_weights():
    w = class_weights(np.array([900, 90, 9, 0]), power=1.0, max_weight=1000)
    present = w[:3]
    assert w[3] == 1.0
    np.testing.assert_allclose(present.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(present / present[0], [1, 10, 100], rtol=1e-5)
    clipped = class_weights(np.array([900, 90, 9]), power=1.0, max_weight=5)
    assert clipped.max() / clipped.min() <= 25 + 1e-4
    np.testing.assert_allclose(clipped.mean(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(class_weights(np.array([5, 1]), power=0.0), [1, 1])


def test_validation_in_tiles_counts_every_pixel(data):
    """A validation image larger than the tile is predicted chunk by chunk and every pixel is scored once."""
    ds = load_dataset(str(data), "val")
    torch.manual_seed(0)
    from segpipe.models.artifact import ModelSpec, build_network

    net = build_network("Unet", "resnet18", 3, 5)
    spec = ModelSpec(architecture="Unet", encoder="resnet18", in_channels=3, classes=ds.classes, mean=[0.5] * 3,
                     std=[0.25] * 3, input_scale=255.0)
    seen: list[int] = []  # the progress callback: once per image, its pixels
    tiled = validate(net, ds, spec, tile=64, halo=16, device=torch.device("cpu"), on_image=seen.append)
    assert seen == [it.height * it.width for it in ds.items]
    whole = validate(net, ds, spec, tile=1024, device=torch.device("cpu"))
    assert tiled.total == whole.total == 96 * 96
    np.testing.assert_array_equal(tiled.matrix.sum(axis=1), whole.matrix.sum(axis=1))  # same truth


def test_validation_scores_the_predictions_pixel_by_pixel(data):
    """With a network whose prediction depends on each pixel alone, validation's confusion matrix must
    equal one counted by hand from the truth and a numpy prediction: tiled or whole, every pixel once."""
    import rasterio

    from segpipe.models.artifact import ModelSpec

    ds = load_dataset(str(data), "val")
    k = ds.num_classes
    net = torch.nn.Conv2d(3, k, 1)  # logits of class c: w_c · normalised pixel + b_c
    with torch.no_grad():
        net.weight.copy_(torch.linspace(-2, 2, 3 * k).reshape(k, 3, 1, 1))
        net.bias.copy_(torch.linspace(0.5, -0.5, k))
    spec = ModelSpec(architecture="Unet", encoder="resnet18", in_channels=3, classes=ds.classes, mean=[0.5] * 3,
                     std=[0.25] * 3, input_scale=255.0)
    want = np.zeros((k, k), np.int64)
    for item in ds.items:
        with rasterio.open(item.image_uri) as s, rasterio.open(item.mask_uri) as m:
            x = (s.read().astype(np.float64) / 255.0 - 0.5) / 0.25
            truth = m.read(1).astype(np.int64)
        w, b = net.weight.detach().numpy()[:, :, 0, 0].astype(np.float64), net.bias.detach().numpy()
        pred = np.argmax(np.einsum("kc,chw->khw", w, x) + b[:, None, None], axis=0)
        keep = truth != 255
        want += np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    assert (want.sum(axis=0) > 0).sum() > 1  # the network predicts more than one class
    for tile in (64, 1024):
        got = validate(net, ds, spec, tile=tile, halo=16, device=torch.device("cpu"))
        np.testing.assert_array_equal(got.matrix, want)


@pytest.mark.slow
def test_artifact_carries_the_class_colours_of_classes_json(data, tmp_path):
    """classes.json colours → model.json ``class_colors`` → the same colours in outputs and reports."""
    import shutil

    from segpipe.core.classes import class_colors, colors_from_spec, palette_rgba
    from segpipe.engine.job import ModelRef
    from segpipe.evaluate.evaluation import Evaluation, write_evaluation_report
    from segpipe.evaluate.figures import class_palette
    from segpipe.io.output import ome_attrs

    root = tmp_path / "data"
    shutil.copytree(data, root)
    table = json.loads((root / "classes.json").read_text())
    given = ["#102030", None, "#abc", "#ff00ff", "#00ff0080"]
    for entry, color in zip(table["classes"], given, strict=True):
        entry.pop("color", None)
        if color:
            entry["color"] = color
    (root / "classes.json").write_text(json.dumps(table))
    quick = TINY.model_copy(update={"epochs": 1, "patches_per_epoch": 4})
    result = train(str(root), str(tmp_path / "model"), quick, progress=False)

    expected = class_colors(5, given)
    assert expected[0] == "#102030" and expected[2] == "#aabbcc" and expected[4] == "#00ff0080"
    model_json = json.loads((tmp_path / "model" / "model.json").read_text())
    assert model_json["class_colors"] == expected  # the contract key the pipeline reads
    assert "colors" not in model_json
    assert colors_from_spec(load_artifact(result.uri).spec.model_extra) == expected

    # the outputs' palette (NGFF image-label colours, as the pipeline writes them for this model)
    names = model_json["classes"]
    ome = ome_attrs("x", names, model_json["class_colors"], None)
    output_rgb = {c["label-value"]: tuple(c["rgba"][:3]) for c in ome["image-label"]["colors"]}
    report_rgb = class_palette(5, colors_from_spec(model_json))
    assert report_rgb == [output_rgb[i] for i in range(5)]
    assert report_rgb == [tuple(int(v) for v in c[:3]) for c in palette_rgba(5, expected)]

    # an evaluation report of this model uses those colours without being told
    ref = ModelRef(result.uri, result.weights_sha256, result.spec)
    metrics = {"classes": names, "confusion_matrix": np.eye(5, dtype=int).tolist(),
               "per_class": {n: {"iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
                             for n in names}, "mean_iou": 1.0, "frequency_weighted_iou": 1.0,
               "pixel_accuracy": 1.0}
    html, _ = write_evaluation_report(str(tmp_path / "report"), Evaluation(metrics, "", ref, [], 1), title="t")
    page = Path(html).read_text()
    for color in ("#102030", "#aabbcc", "#ff00ff", "#00ff00"):
        assert f"background:{color}" in page


@pytest.mark.slow
def test_training_validation_and_segpipe_evaluate_agree(data, tmp_path, client):
    """One engine: validation during training and ``segpipe evaluate`` (Zarr outputs scored chunk by chunk)
    give the same confusion matrix for the same model, images and tiling."""
    from segpipe.core.settings import segment_settings
    from segpipe.evaluate.evaluation import evaluate
    from segpipe.models.artifact import load_artifact

    quick = TINY.model_copy(update={"epochs": 1, "patches_per_epoch": 8})
    model = train(str(data), str(tmp_path / "model"), quick, progress=False).uri
    art = load_artifact(model)
    ds = load_dataset(str(data), "val")
    cm = validate(art.network(), ds, art.spec, tile=64, halo=16, device=torch.device("cpu"), precision="fp32")
    settings = segment_settings(chunk_size=64, tile_size=64, halo=16, precision="fp32", device="cpu")
    ev = evaluate(model, ds, str(tmp_path / "eval"), settings, client, split="val")
    assert cm.total > 0 and len(np.flatnonzero(cm.matrix.sum(axis=0))) >= 2  # predictions of several classes
    np.testing.assert_array_equal(np.array(ev.metrics["confusion_matrix"]), cm.matrix)


@pytest.mark.slow
def test_train_command_prints_a_rounded_mean_iou(data, tmp_path):
    import re

    from click.testing import CliRunner

    from segpipe.cli.main import main

    r = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--epochs", "1",
                                  "--batch-size", "4", "--patch-size", "64", "--patches-per-epoch", "8",
                                  "--device", "cpu", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    line = [x for x in r.stdout.splitlines() if x.startswith("wrote ")][-1]
    assert re.search(r"val mean IoU (\d\.\d{4}|n/a) \(completed\)$", line), line


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "int32", "uint32", "int8"])
def test_training_on_other_pixel_types_validates_and_segments_its_own_images(data, tmp_path, dtype):
    """A model trained on float64/int32/uint32/int8 images reads those images back: validation and
    segmentation used to refuse them, since input_scale 1.0 read as "made for float32"."""
    import rasterio

    from segpipe.models.normalization import check_input

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").symlink_to(data / "masks", target_is_directory=True)
    for name in ("classes.json", "split.json"):
        (root / name).write_bytes((data / name).read_bytes())
    for src in sorted((data / "images").glob("*.tif")):
        with rasterio.open(src) as s:
            a = s.read()
            profile = {**s.profile, "dtype": dtype, "predictor": 1}
        values = a.astype(np.float64) / 255.0 if dtype == "float64" else a.astype(np.int64) - (128 if dtype == "int8" else 0)
        with rasterio.open(root / "images" / src.name, "w", **profile) as d:
            d.write(values.astype(dtype))
    s = TINY.model_copy(update={"epochs": 1, "patches_per_epoch": 8})
    result = train(str(root), str(tmp_path / "model"), s, progress=False)
    assert result.history[-1]["val_mean_iou"] is not None
    art = load_artifact(str(tmp_path / "model"))
    assert art.spec.input_dtype == dtype
    with rasterio.open(next((root / "images").glob("*.tif"))) as ds:
        info = type("Info", (), {"count": ds.count, "dtype": ds.dtypes[0]})()
    assert check_input(art.spec, info, "x.tif") is not None  # the model reads its own training images
