"""GPU checks (marker ``gpu``; CI has no GPU and skips them with -m "not gpu").

They check outcomes against a CPU fp32 run of the same image and model, not the code path:

* fp32 on CUDA labels the same pixels as the CPU (≥ 99.9 %; cuDNN's TF32 switched off, so both
  compute in fp32 and only genuine near-ties can differ), and with PyTorch's default TF32 still ≥ 99 %;
* bf16 autocast agrees on ≥ 97 % of pixels overall, and where the CPU's top class wins clearly
  (top-two probability margin ≥ 16/255) on ≥ 99.9 %: bf16 only flips near-ties (the test model's
  classes compete on purpose, so near-ties are common: CPU bf16 measured 97.5 % overall, 100 % on
  clear wins, which are 72 % of the pixels);
* TTA on CUDA gives the CPU's TTA labels, with probabilities that sum to 1 and whose argmax is the label;
* GPU memory does not grow with the image: the peak for a 4× larger image stays that of one batch.
"""

import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # pragma: no cover - only on machines without CUDA
    pytest.skip("no CUDA device", allow_module_level=True)

CHUNK, HALO = 128, 32


@pytest.fixture
def no_tf32():
    """fp32 means fp32: PyTorch runs cuDNN convolutions in TF32 (10-bit mantissa) unless told not to."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)


def segment(uri: str, model_dir: str, out, client, **inference) -> zarr.Group:
    """Segment ``uri`` with chunk 128 / halo 32 and the given inference settings; the output group."""
    from segpipe.core.settings import InferenceSettings, SegmentSettings, TilingSettings
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images

    ref, _ = check_model(model_dir)
    s = SegmentSettings(tiling=TilingSettings(chunk_size=CHUNK, halo=HALO), inference=InferenceSettings(**inference))
    r = segment_image(list_images(uri)[0], ref, str(out), s, client)
    assert r.status == "done", r.error
    return zarr.open_group(r.output, mode="r")


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory, scene_tif, model_dir, client) -> tuple[np.ndarray, np.ndarray]:
    """CPU fp32 labels and probabilities (class, y, x) of the scene."""
    g = segment(scene_tif, model_dir, tmp_path_factory.mktemp("cpu"), client, device="cpu", precision="fp32",
                probabilities=True)
    labels, probs = g["0"][:], g["probabilities"][:]
    assert len(np.unique(labels)) >= 3  # the model's classes compete: agreement is not trivially 100 %
    return labels, probs


def test_auto_device_and_precision_pick_cuda_bf16():
    from segpipe.engine.runtime import resolve_device, resolve_precision

    dev = resolve_device("auto")
    assert dev.type == "cuda"
    assert resolve_precision("auto", dev) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_cuda_fp32_labels_equal_cpu(tmp_path, scene_tif, model_dir, client, cpu_reference, no_tf32):
    cpu, _ = cpu_reference
    for name, device in (("cuda", "cuda"), ("cuda0", "cuda:0")):
        gpu = segment(scene_tif, model_dir, tmp_path / name, client, device=device, precision="fp32",
                      batch_size=4)["0"][:]
        assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
        agreement = (gpu == cpu).mean()
        assert agreement >= 0.999, (device, agreement)


def test_cuda_fp32_with_default_tf32_still_agrees(tmp_path, scene_tif, model_dir, client, cpu_reference):
    cpu, _ = cpu_reference
    gpu = segment(scene_tif, model_dir, tmp_path / "tf32", client, device="cuda", precision="fp32")["0"][:]
    assert (gpu == cpu).mean() >= 0.99


def test_cuda_bf16_differs_from_cpu_only_at_near_ties(tmp_path, scene_tif, model_dir, client, cpu_reference):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cpu, probs = cpu_reference
    bf16 = segment(scene_tif, model_dir, tmp_path / "bf16", client, device="cuda", precision="bf16",
                   batch_size=4)["0"][:]
    agree = bf16 == cpu
    assert agree.mean() >= 0.97, agree.mean()
    top2 = np.sort(probs.astype(np.int32), axis=0)[-2:]
    clear = (top2[1] - top2[0]) >= 16  # the CPU's winner leads by ≥ 16/255 in probability
    assert clear.mean() > 0.5  # most pixels are clear wins, so the next line says something
    assert agree[clear].mean() >= 0.999, agree[clear].mean()
    # and where they differ, the CPU's own decision was close
    if (~agree).any():
        assert np.median((top2[1] - top2[0])[~agree]) < np.median((top2[1] - top2[0])[agree])


def test_cuda_tta_and_probabilities(tmp_path, scene_tif, model_dir, client, no_tf32):
    cpu = segment(scene_tif, model_dir, tmp_path / "cpu", client, device="cpu", precision="fp32", tta=True)["0"][:]
    g = segment(scene_tif, model_dir, tmp_path / "gpu", client, device="cuda", precision="fp32", tta=True,
                probabilities=True)
    labels, p = g["0"][:], g["probabilities"][:].astype(int)
    assert (labels == cpu).mean() >= 0.999
    assert np.abs(p.sum(0) - 255).max() <= 4  # probabilities of each pixel sum to 1 (uint8 rounding)
    # the label is the most probable class (up to uint8 rounding: near-ties round to the same value)
    p_label = np.take_along_axis(p, labels[None].astype(np.intp), axis=0)[0]
    assert (p_label >= p.max(0) - 1).all()


def test_gpu_memory_does_not_grow_with_the_image(tmp_path, model_dir, client):
    """Peak CUDA memory for a 4× larger image is that of the smaller one: one batch of windows at a time."""
    from segpipe.engine.cluster import is_in_process
    from tests.helpers import sample_photo, write_geotiff

    if not is_in_process(client):
        pytest.skip("CUDA memory statistics are per process; the workers run in other processes")
    medium = write_geotiff(tmp_path / "medium.tif", sample_photo(866, 778))  # 3 × 3 tiles of 384
    large = write_geotiff(tmp_path / "large.tif", sample_photo(1732, 1556))  # 5 × 5 tiles: 4× the pixels
    kw = dict(device="cuda", precision="bf16" if torch.cuda.is_bf16_supported() else "fp16", batch_size=4)
    segment(str(medium), model_dir, tmp_path / "warm", client, **kw)  # model load, cuDNN set-up
    peaks = {}
    for name, uri in (("medium", medium), ("large", large)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        segment(str(uri), model_dir, tmp_path / name, client, **kw)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated()
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    assert peaks["large"] <= 1.15 * peaks["medium"] + 64 * 2**20, peaks
    # and nothing is left behind after a run beyond the cached model and allocator blocks
    assert torch.cuda.memory_allocated() <= peaks["medium"]
