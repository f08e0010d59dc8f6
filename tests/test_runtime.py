"""The forward's runtime (segpipe.engine.runtime): torch or ONNX Runtime, resolved once per run, equal labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from segpipe.core.errors import ConfigError
from segpipe.core.settings import InferenceSettings, segment_settings


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what segpipe believes about the CPU's bf16 (``SEGPIPE_CPU_BF16``) for one test."""
    from segpipe.engine.runtime import cpu_supports_bf16

    def set_to(native: bool) -> None:
        monkeypatch.setenv("SEGPIPE_CPU_BF16", "1" if native else "0")
        cpu_supports_bf16.cache_clear()

    yield set_to
    monkeypatch.delenv("SEGPIPE_CPU_BF16", raising=False)
    cpu_supports_bf16.cache_clear()


def test_auto_is_onnx_only_for_fp32_on_cpus_without_native_bf16(cpu_bf16, monkeypatch):
    import torch

    from segpipe.engine import runtime
    from segpipe.engine.runtime import resolve_precision, resolve_runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cpu_bf16(False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_runtime("auto", "fp32", cpu) == "onnx"
    assert resolve_runtime("auto", "bf16", cpu) == "torch"
    assert resolve_runtime("auto", "fp32", cuda) == "torch"
    assert resolve_runtime("torch", "fp32", cpu) == "torch"
    cpu_bf16(True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_runtime("auto", "fp32", cpu) == "torch"  # native bf16: torch is kept (bf16 is faster still)
    assert resolve_runtime("onnx", "fp32", cpu) == "onnx"  # asked for: fine anywhere it can run
    with pytest.raises(ConfigError, match="pass --precision fp32"):
        resolve_runtime("onnx", "bf16", cpu)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_runtime("onnx", "fp32", cuda)
    cpu_bf16(False)
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
    assert resolve_runtime("auto", "fp32", cpu) == "torch"
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        resolve_runtime("onnx", "fp32", cpu)


def test_runtime_is_part_of_the_output_identity():
    torch_s = segment_settings(precision="fp32", runtime="torch")
    onnx_s = torch_s.with_runtime("onnx")
    assert onnx_s.inference.runtime == "onnx" and onnx_s.output_settings()["runtime"] == "onnx"
    assert onnx_s.output_key() != torch_s.output_key()
    assert torch_s.with_runtime("torch") is torch_s


def test_the_exported_graph_is_cached_per_weights(tmp_path, monkeypatch, model_dir):
    from segpipe.engine import runtime
    from segpipe.engine.predictor import Predictor
    from segpipe.models.artifact import load_artifact

    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    art = load_artifact(model_dir)
    settings = InferenceSettings(device="cpu", precision="fp32", runtime="onnx")
    first = Predictor(art, settings, threads=1)
    assert first.runtime == "onnx"
    cached = list((tmp_path / "cache" / "onnx").iterdir())
    assert [p.name[:32] for p in cached] == [art.sha256[:32]]  # one whole file, no temporary left behind

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph of these weights is cached")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    second = Predictor(art, settings, threads=1)
    tiles = np.random.default_rng(0).integers(0, 255, (1, 3, 96, 96), dtype=np.uint8)
    assert np.array_equal(first.predict(tiles)[0], second.predict(tiles)[0])
    first.close()
    second.close()


@pytest.mark.slow
def test_onnx_labels_agree_with_torch_fp32_on_a_trained_model(trained_model, landcover, tmp_path, monkeypatch):
    """≥ 99.9 % equal argmax on real images, and equal wherever the top two logits are clearly apart."""
    import torch

    from segpipe.engine.predictor import Predictor
    from segpipe.labels.dataset import load_dataset
    from segpipe.models.artifact import load_artifact

    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    art = load_artifact(trained_model)
    preds = {rt: Predictor(art, InferenceSettings(device="cpu", precision="fp32", runtime=rt, tta=rt == "onnx"))
             for rt in ("torch", "onnx")}
    equal = total = 0
    for item in load_dataset(landcover, None).items:
        import rasterio

        with rasterio.open(item.image_uri) as ds:
            image = ds.read()[None]
        with torch.inference_mode():
            x = preds["torch"]._to_input(image)
            logits = {rt: p.net(x.contiguous()).float() for rt, p in preds.items()}
        top2 = logits["torch"].topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        labels = {rt: v.argmax(dim=1) for rt, v in logits.items()}
        assert torch.equal(labels["torch"][clear], labels["onnx"][clear])
        assert (logits["torch"] - logits["onnx"]).abs().max() < 1e-3
        equal += int((labels["torch"] == labels["onnx"]).sum())
        total += labels["torch"].numel()
        # the predictor's whole path (normalisation, TTA, softmax, argmax) agrees as well
        tta_torch = Predictor.from_network(preds["torch"].net, art.spec,
                                           InferenceSettings(device="cpu", precision="fp32", tta=True),
                                           torch.device("cpu"))
        agree = (tta_torch.predict(image)[0] == preds["onnx"].predict(image)[0]).mean()
        assert agree >= 0.999, agree
    assert total > 100_000 and equal / total >= 0.999, equal / total
    for p in preds.values():
        p.close()


@pytest.mark.slow
def test_segment_resolves_auto_to_onnx_without_native_bf16_and_records_it(tmp_path, scene_tif, model_dir, client):
    """``--precision auto`` on a CPU without native bf16 (``SEGPIPE_CPU_BF16=0``): fp32 by ONNX Runtime,
    recorded in the output, with the labels of a torch fp32 run (chunk for chunk, within the agreement)."""
    out = tmp_path / "out"
    env = {**os.environ, "SEGPIPE_CPU_BF16": "0", "SEGPIPE_CACHE": str(tmp_path / "cache"),
           "SEGPIPE_LOG_DIR": str(tmp_path / "logs")}
    run = subprocess.run([sys.executable, "-m", "segpipe.cli.main", "segment", scene_tif, "--model", model_dir,
                          "--out", str(out), "--chunk-size", "128", "--halo", "16", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    zarr_path = out / (Path(scene_tif).stem + ".zarr")
    seg = json.loads((zarr_path / "zarr.json").read_text())["attributes"]["segpipe"]
    assert seg["inference"]["precision"] == "fp32" and seg["inference"]["runtime"] == "onnx"
    assert seg["settings"]["runtime"] == "onnx"
    # a complete onnx output is not taken for a torch one: kept, and the change is named
    from click.testing import CliRunner

    from segpipe.cli.main import main

    r = CliRunner().invoke(main, ["segment", scene_tif, "--model", model_dir, "--out", str(out), "--chunk-size", "128",
                                  "--halo", "16", "--precision", "fp32", "--runtime", "torch", "--no-progress"])
    assert r.exit_code == 1 and "is complete with other settings (runtime onnx → torch)" in r.stderr, r.stderr

    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images

    settings = segment_settings(chunk_size=128, halo=16, device="cpu", precision="fp32", runtime="torch")
    ref, _ = check_model(model_dir)
    result = segment_image(list_images(scene_tif)[0], ref, str(tmp_path / "torch"), settings, client)
    assert result.status == "done", result.error
    a = zarr.open_array(str(zarr_path / "0"), mode="r")[...]
    b = zarr.open_array(str(Path(result.output) / "0"), mode="r")[...]
    assert a.shape == b.shape and (a == b).mean() >= 0.999, (a == b).mean()


def test_onnx_with_bf16_is_one_line(tmp_path, scene_tif, model_dir):
    run = subprocess.run([sys.executable, "-m", "segpipe.cli.main", "segment", scene_tif, "--model", model_dir,
                          "--out", str(tmp_path / "out"), "--precision", "bf16", "--runtime", "onnx", "--no-progress"],
                         env={**os.environ, "SEGPIPE_LOG_DIR": str(tmp_path / "logs")},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert errors and "--runtime onnx" in errors[-1] and "pass --precision fp32" in errors[-1], run.stderr
    assert "Traceback" not in run.stderr
