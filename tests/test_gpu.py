"""GPU checks (marker ``gpu``; CI has no GPU and skips them with -m "not gpu")."""

import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # pragma: no cover - only on machines without CUDA
    pytest.skip("no CUDA device", allow_module_level=True)


def test_auto_device_and_precision_pick_cuda_bf16():
    from segpipe.engine.predictor import resolve_device, resolve_precision

    dev = resolve_device("auto")
    assert dev.type == "cuda"
    assert resolve_precision("auto", dev) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_cuda_bf16_agrees_with_cpu_fp32(tmp_path, scene_tif, model_dir, client):
    from segpipe.core.settings import InferenceSettings, SegmentSettings, TilingSettings
    from segpipe.io.storage import list_images
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image

    ref, _ = check_model(model_dir)
    image = list_images(scene_tif)[0]
    out = {}
    for name, dev, prec in (("cpu", "cpu", "fp32"), ("cuda", "cuda", "bf16"), ("cuda32", "cuda:0", "fp32")):
        s = SegmentSettings(tiling=TilingSettings(chunk_size=128, halo=32),
                            inference=InferenceSettings(device=dev, precision=prec, batch_size=4))
        r = segment_image(image, ref, str(tmp_path / name), s, client)
        assert r.status == "done", r.error
        out[name] = zarr.open_array(r.output + "/0", mode="r")[:]
    # fp32 on CUDA runs convolutions in TF32 (PyTorch's default), so labels near ties may differ
    assert (out["cuda32"] == out["cpu"]).mean() > 0.99
    assert (out["cuda"] == out["cpu"]).mean() > 0.97


def test_cuda_tta_and_probabilities(tmp_path, scene_tif, model_dir, client):
    from segpipe.core.settings import InferenceSettings, SegmentSettings, TilingSettings
    from segpipe.io.storage import list_images
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image

    ref, _ = check_model(model_dir)
    s = SegmentSettings(tiling=TilingSettings(chunk_size=128, halo=32),
                        inference=InferenceSettings(device="cuda", tta=True, probabilities=True))
    r = segment_image(list_images(scene_tif)[0], ref, str(tmp_path / "o"), s, client)
    assert r.status == "done", r.error
    g = zarr.open_group(r.output, mode="r")
    p = g["probabilities"][:, :128, :128].astype(int)
    assert np.abs(p.sum(0) - 255).max() <= 4
    assert (p.argmax(0) == g["0"][:128, :128]).mean() > 0.99
