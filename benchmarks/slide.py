"""Whole-slide benchmark: segpipe vs TIAToolbox 2.1.3's SemanticSegmentor, whole processes side by side.

Both tools segment the same generated Aperio-style SVS (level 0, 0.5 µm/px, ~50 % tissue)
with the same random-init Unet-resnet18 (the same ``weights.safetensors``), 640-pixel windows
cropped to 512-pixel chunks (segpipe: ``--chunk-size 512 --halo 64``; TIAToolbox:
``patch_input_shape 640, patch_output_shape 512, stride 512``), bf16 autocast on the CPU, and
write their class maps to disk the way each does by default (segpipe: OME-Zarr with a pyramid;
TIAToolbox: ``<slide>.zarr`` with ``predictions`` and ``coordinates``). Both skip background:
segpipe by its tissue mask, TIAToolbox by ``auto_get_mask`` (its default).

TIAToolbox lives in its own virtualenv so segpipe's stays untouched::

    python3 -m venv .bench/tia-venv
    .bench/tia-venv/bin/pip download --no-deps -d .bench/dl tiatoolbox==2.1.3
    unzip -p .bench/dl/tiatoolbox-2.1.3-py3-none-any.whl tiatoolbox-2.1.3.dist-info/METADATA \
        | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | grep -viE '^(torch|torchvision)[<>=]' > .bench/tia-reqs.txt
    .bench/tia-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 segmentation-models-pytorch -r .bench/tia-reqs.txt
    .bench/tia-venv/bin/pip install --no-deps .bench/dl/tiatoolbox-2.1.3-py3-none-any.whl

(why ``--no-deps``: see "Installing TIAToolbox" at the end.)

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/slide.py --workdir .bench/slide --json .bench/slide.json

Each measurement is a whole process (wall clock from spawn to exit; peak RSS summed over the
process tree, sampled every 20 ms by ``benchmarks/_measure.py``):

(a) ``python -m segpipe.cli.main segment SLIDE --model M --out OUT --chunk-size 512 --halo 64
    --precision bf16 --no-progress --report-json R``;
(b) ``.bench/tia-venv/bin/python benchmarks/slide.py tia --slide SLIDE --model M --out OUT``
    (the ``tia`` subcommand below: SemanticSegmentor with the model wrapped in a ``ModelABC``);
(c) segpipe again on a slide with 4× the pixels (12,288 × 16,384): its peak should stay flat.

Printed JSON: seconds, MP/s (slide megapixels / whole-process seconds), peak RSS, chunks
computed/skipped, and ``speedup`` = tia_seconds / segpipe_seconds, ``rss_ratio`` =
segpipe_peak / tia_peak, ``flat`` = peak_4x / peak_1x (targets: ≥ 2, ≤ 0.4, ≈ 1).

Installing TIAToolbox: tiatoolbox 2.1.3 declares ``torch<2.13`` and ``torchvision<0.28``, while
this machine's torch is 2.14.1 (the same torch as segpipe's, so both run the same kernels).
pip therefore cannot resolve ``tiatoolbox==2.1.3`` together with ``torch==2.14.1``; the venv is
built with tiatoolbox's other requirements resolved normally and tiatoolbox installed with
``--no-deps`` (``pip check`` then reports exactly that torch/torchvision pin, nothing else).
The engine code paths used here (WSIPatchDataset, DataLoader, numpy merging, dask/zarr
writing) do not depend on the torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
DEFAULT_TIA_PYTHON = ROOT / ".bench" / "tia-venv" / "bin" / "python"
CLASSES = "background,tumour,stroma,necrosis"
MPP = 0.5
TILE = 256  # TIFF tile side
STRIP = TILE  # level-0 rows generated at a time: one row of tiles


# --------------------------------------------------------------------------- the slide


def _bilinear(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample ``grid`` (h, w) at fractional grid coordinates ``ys`` (rows) × ``xs`` (columns), bilinearly."""
    h, w = grid.shape
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, h - 2)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, w - 2)
    fy = np.clip(ys - y0, 0.0, 1.0).astype(np.float32)[:, None]
    fx = np.clip(xs - x0, 0.0, 1.0).astype(np.float32)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _smooth_noise(rng: np.random.Generator, h: int, w: int, passes: int = 3) -> np.ndarray:
    """Low-frequency noise on an (h, w) grid: white noise box-blurred a few times, scaled to unit std."""
    field = rng.standard_normal((h, w)).astype(np.float32)
    for _ in range(passes):
        padded = np.pad(field, 1, mode="edge")
        field = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _block_mean(image: np.ndarray, f: int) -> np.ndarray:
    """f×f area average of an (h, w, 3) uint8 image (h, w multiples of f), rounded."""
    h, w = image.shape[0] // f, image.shape[1] // f
    return np.rint(image[:h * f, :w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)


def make_slide(path: Path, width: int, height: int, tissue: float = 0.5, seed: int = 0,
               compression: str = "zlib") -> dict:
    """An Aperio-style pyramidal SVS (levels 1, 1/4, 1/16; RGB; 256² tiles), written strip by strip.

    Tissue: H&E-like pink stroma with purple nuclei in a few large irregular regions covering
    about ``tissue`` of the slide; background near-white with sensor noise; a background margin
    all round. Only one 256-row strip of level 0 is in memory at a time (plus levels 1 and 2,
    1/16 and 1/256 of the pixels). Returns the slide's facts (size, tissue fraction).
    """
    import tifffile

    if width % 16 or height % 16:
        raise SystemExit("slide sides must be multiples of 16")
    rng = np.random.default_rng(seed)
    # tissue field on a 64-px grid: a few large regions (smooth noise on a grid of ~10 cells across
    # the short side, so the layout scales with the slide like a real section does) with ragged
    # edges (finer noise), a background margin all round, thresholded at the tissue quantile
    cell = 64
    gh, gw = height // cell + 2, width // cell + 2
    big = max(1, min(height, width) // 10 // cell)  # 64-px cells per coarse cell
    coarse = _smooth_noise(rng, gh // big + 3, gw // big + 3, passes=2)
    field = _bilinear(coarse, (np.arange(gh, dtype=np.float32) + 0.5) / big,
                      (np.arange(gw, dtype=np.float32) + 0.5) / big)
    field = (field - field.mean()) / max(float(field.std()), 1e-6) + 0.12 * _smooth_noise(rng, gh, gw, passes=1)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    edge = np.minimum.reduce([yy, xx, gh - 1 - yy, gw - 1 - xx]) / max(min(gh, gw) * 0.10, 1.0)
    field = field - 4.0 * np.clip(1.0 - edge, 0.0, 1.0)  # no tissue at the very edges
    threshold = float(np.quantile(field, 1.0 - tissue))
    # texture fields: stain mix (one cell = 24 px) and nuclei (one cell = 5 px)
    stain = _smooth_noise(rng, height // 24 + 2, width // 24 + 2, passes=2)
    nuclei_cell = 5
    nuclei = rng.random((height // nuclei_cell + 2, width // nuclei_cell + 2), dtype=np.float32)

    pink = np.array([232, 160, 200], np.float32)  # eosin stroma
    pink2 = np.array([205, 115, 170], np.float32)  # denser cytoplasm
    purple = np.array([95, 60, 150], np.float32)  # haematoxylin nuclei
    white = np.array([242, 241, 245], np.float32)
    xs_field = (np.arange(width, dtype=np.float32) + 0.5) / cell
    xs_stain = (np.arange(width, dtype=np.float32) + 0.5) / 24
    xs_nuc = (np.arange(width, dtype=np.float32) + 0.5) / nuclei_cell
    level1 = np.empty((height // 4, width // 4, 3), np.uint8)
    tissue_pixels = 0

    def strips():
        nonlocal tissue_pixels
        for y0 in range(0, height, STRIP):
            h = min(STRIP, height - y0)
            ys = np.arange(y0, y0 + h, dtype=np.float32) + 0.5
            t = _bilinear(field, ys / cell, xs_field) - threshold  # > 0: tissue
            alpha = np.clip(t * 40.0 + 0.5, 0.0, 1.0)[..., None]  # a few pixels of soft edge
            tissue_pixels += int((t > 0).sum())
            s = np.clip(_bilinear(stain, ys / 24, xs_stain) * 0.35 + 0.5, 0.0, 1.0)[..., None]
            n = _bilinear(nuclei, ys / nuclei_cell, xs_nuc)
            nuc = np.clip((n - 0.80) * 8.0, 0.0, 1.0)[..., None]  # ~10 % of tissue pixels are nuclei
            tissue_rgb = (pink * (1 - s) + pink2 * s) * (1 - nuc) + purple * nuc
            rgb = white * (1 - alpha) + tissue_rgb * alpha
            rgb += rng.normal(0.0, 4.0, rgb.shape).astype(np.float32)
            strip = np.clip(rgb, 0, 255).astype(np.uint8)
            level1[y0 // 4:(y0 + h) // 4] = _block_mean(strip, 4)
            for x0 in range(0, width, TILE):  # one row of tiles (STRIP == TILE), left to right
                yield strip[:, x0:x0 + TILE]

    def desc(lw: int, lh: int) -> str:
        return (f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) -> "
                f"{lw}x{lh} {compression.upper()}|AppMag = 20|MPP = {MPP}|Filename = {path.stem}")

    tmp = path.with_name(path.name + ".part")
    opts = dict(tile=(TILE, TILE), photometric="rgb", compression=compression, metadata=None)
    with tifffile.TiffWriter(str(tmp), bigtiff=width * height * 3 > 3.5 * 2**30) as tw:
        tw.write(strips(), shape=(height, width, 3), dtype=np.uint8, description=desc(width, height),
                 **opts)
        tw.write(level1, description=desc(width // 4, height // 4), **opts)
        tw.write(_block_mean(level1, 4), description=desc(width // 16, height // 16), **opts)
    tmp.replace(path)
    facts = {"width": width, "height": height, "mpp": MPP, "tissue_fraction": round(tissue_pixels / (width * height), 3),
             "compression": compression, "file_mb": round(path.stat().st_size / 2**20, 1)}
    path.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def ensure_slide(work: Path, width: int, height: int, compression: str) -> tuple[Path, dict]:
    path = work / f"slide-{width}x{height}.svs"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    t0 = time.perf_counter()
    facts = make_slide(path, width, height, compression=compression)
    print(f"generated {path} in {time.perf_counter() - t0:.0f} s: {facts}", file=sys.stderr)
    return path, facts


# --------------------------------------------------------------------------- TIAToolbox side (tia venv)


def tia_run(args: argparse.Namespace) -> None:
    """SemanticSegmentor on the slide with the artifact's smp Unet; prints a JSON line (engine seconds, patches)."""
    t_start = time.perf_counter()
    import segmentation_models_pytorch as smp
    import tiatoolbox
    import torch
    from safetensors.torch import load_file
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    model_dir = Path(args.model)
    spec = json.loads((model_dir / "model.json").read_text())
    classes = spec["classes"]
    names = [c if isinstance(c, str) else c.get("name", str(i)) for i, c in enumerate(classes)]
    net = smp.create_model(spec["architecture"], encoder_name=spec["encoder"], encoder_weights=None,
                           in_channels=spec["in_channels"], classes=len(names))
    net.load_state_dict(load_file(str(model_dir / "weights.safetensors")), strict=True)
    scale = float(spec.get("input_scale", 255.0))
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    crop = (args.window - args.chunk) // 2

    class SmpSegmentation(ModelABC):
        """The artifact's network as a TIAToolbox model: NHWC patches in, (N, 512, 512, K) softmax out."""

        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.net = network
            self.crop = crop
            self.channels_last = args.channels_last
            self.class_dict = dict(enumerate(names))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        @staticmethod
        def preproc(image: np.ndarray) -> np.ndarray:
            return ((image.astype(np.float32) / scale - mean) / std).astype(np.float32)

        @staticmethod
        def postproc(image):  # noqa: ANN001, ANN205 - dask array of (h, w, K) probabilities
            return image.argmax(axis=-1)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, *, device: str) -> np.ndarray:
            model.eval()
            x = batch_data.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
            if model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                logits = model(x)
            probs = torch.softmax(logits.float(), dim=1)
            c = model.crop
            if c:
                probs = probs[:, :, c:-c, c:-c]
            return probs.permute(0, 2, 3, 1).cpu().numpy()

    model = SmpSegmentation(net).eval()
    if args.channels_last:
        model.net = model.net.to(memory_format=torch.channels_last)
    ioconfig = IOSegmentorConfig(
        input_resolutions=[{"units": "mpp", "resolution": args.mpp}],
        output_resolutions=[{"units": "mpp", "resolution": args.mpp}],
        patch_input_shape=(args.window, args.window),
        patch_output_shape=(args.chunk, args.chunk),
        stride_shape=(args.chunk, args.chunk),
        save_resolution={"units": "mpp", "resolution": args.mpp},
    )
    segmentor = SemanticSegmentor(model=model, batch_size=args.batch_size, num_workers=args.num_workers,
                                  device="cpu", verbose=False)
    out_dir = Path(args.out)
    t0 = time.perf_counter()
    output = segmentor.run([Path(args.slide)], patch_mode=False, ioconfig=ioconfig, save_dir=out_dir,
                           overwrite=True, output_type="zarr")
    engine_seconds = time.perf_counter() - t0
    patches = len(segmentor.dataloader.dataset) if segmentor.dataloader is not None else None
    saved = [str(p) for p in output.values()] if isinstance(output, dict) else [str(output)]
    print(json.dumps({"engine_seconds": round(engine_seconds, 2), "setup_seconds": round(t0 - t_start, 2),
                      "patches": patches, "output": saved, "tiatoolbox": tiatoolbox.__version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------- orchestration (segpipe venv)


def _tia_available(python: Path) -> str | None:
    """None when ``python`` can import TIAToolbox's SemanticSegmentor and smp, else the reason."""
    if not python.exists():
        return f"{python} does not exist (create the TIAToolbox venv first, see the docstring)"
    probe = subprocess.run(
        [str(python), "-c", "import segmentation_models_pytorch, safetensors, tiatoolbox; "
         "from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor; print(tiatoolbox.__version__)"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{python} cannot import TIAToolbox: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "loadavg_at_start": load}


def agreement(segpipe_zarr: Path, tia_zarr: Path, chunk: int) -> dict | None:
    """Pixel agreement of the two class maps: everywhere, and away from the slide's outer border chunks
    (where segpipe reflects and TIAToolbox pads with white). With a random-init model the maps may
    hold a single class, which makes agreement trivial: the classes seen are reported with it."""
    import zarr

    try:
        a = zarr.open_group(str(segpipe_zarr), mode="r")["0"]
        b = zarr.open_group(str(tia_zarr), mode="r")["predictions"]
    except Exception as e:  # noqa: BLE001 - a report, not a test
        return {"error": f"cannot open outputs: {e}"}
    if tuple(a.shape) != tuple(b.shape[:2]):
        return {"error": f"shapes differ: segpipe {tuple(a.shape)}, tiatoolbox {tuple(b.shape)}"}
    h, w = a.shape
    same = total = inner_same = inner_total = 0
    seen_a: set[int] = set()
    seen_b: set[int] = set()
    for y in range(0, h, 2048):
        ya, yb = np.asarray(a[y:y + 2048]), np.asarray(b[y:y + 2048])
        eq = ya == yb.astype(ya.dtype)
        seen_a.update(np.unique(ya).tolist())
        seen_b.update(np.unique(yb).tolist())
        same += int(eq.sum())
        total += eq.size
        rows = np.arange(y, y + eq.shape[0])
        inner_rows = (rows >= chunk) & (rows < h - chunk)
        inner = eq[inner_rows][:, chunk:w - chunk]
        inner_same += int(inner.sum())
        inner_total += inner.size
    return {"all": round(same / total, 4), "inner": round(inner_same / max(inner_total, 1), 4),
            "classes_segpipe": sorted(seen_a), "classes_tiatoolbox": sorted(seen_b)}


def run_all(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from _measure import measure

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    results: dict = {"machine": _machine(),
                     "settings": {"chunk_size": args.chunk_size, "halo": args.halo, "window": args.chunk_size + 2 * args.halo,
                                  "precision": "bf16", "device": "cpu", "model": "Unet-resnet18",
                                  "classes": len(CLASSES.split(",")), "tia_batch_size": args.tia_batch_size,
                                  "tia_num_workers": args.tia_workers}}
    slide, facts = ensure_slide(work, width, height, args.compression)
    results["slide"] = {"path": str(slide), **facts, "megapixels": round(width * height / 1e6, 2)}
    model = work / "model"
    if not (model / "weights.safetensors").exists():
        r = subprocess.run([PY, "-m", "segpipe.cli.main", "model", "create", "--arch", "Unet", "--encoder", "resnet18",
                            "--classes", CLASSES, "--out", str(model), "--seed", "0"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"segpipe model create failed:\n{r.stderr[-3000:]}")
    env = {**os.environ}

    def segpipe_run(src: Path, name: str) -> dict:
        out, report = work / f"out-segpipe-{name}", work / f"report-segpipe-{name}.json"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [PY, "-m", "segpipe.cli.main", "segment", str(src), "--model", str(model), "--out", str(out),
               "--chunk-size", str(args.chunk_size), "--halo", str(args.halo), "--precision", "bf16",
               "--no-progress", "--report-json", str(report)]
        m = measure(cmd, env=env)
        if m.returncode != 0:
            raise SystemExit(f"segpipe failed on {src}:\n{m.stderr[-3000:]}")
        row = json.loads(report.read_text())[0]
        mp = row_mp = None
        try:
            w_, h_ = (int(v) for v in row["size"].split("x"))
            mp = w_ * h_ / 1e6
            row_mp = row["mp_per_s"]
        except (KeyError, ValueError):
            pass
        return {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb),
                "mp_per_s": round(mp / m.seconds, 3) if mp else None,
                "engine_seconds": row["seconds"], "engine_mp_per_s": row_mp,
                "chunks": row["chunks"], "chunks_computed": row["computed"], "chunks_skipped": row["skipped"],
                "output": str(out / (src.stem + ".zarr"))}

    results["segpipe"] = segpipe_run(slide, "1x")
    print(f"segpipe 1x: {results['segpipe']}", file=sys.stderr)

    tia_reason = "--skip-tia" if args.skip_tia else _tia_available(Path(args.tia_python))
    if tia_reason is None:
        out = work / "out-tia"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [args.tia_python, str(Path(__file__).resolve()), "tia", "--slide", str(slide), "--model", str(model),
               "--out", str(out), "--window", str(args.chunk_size + 2 * args.halo), "--chunk", str(args.chunk_size),
               "--mpp", str(MPP), "--batch-size", str(args.tia_batch_size), "--num-workers", str(args.tia_workers)]
        if args.tia_channels_last:
            cmd.append("--channels-last")
        m = measure(cmd, env=env)
        (work / "tia.log").write_text(m.stdout + "\n--- stderr ---\n" + m.stderr)
        if m.returncode != 0:
            tia_reason = f"TIAToolbox run failed (exit {m.returncode}); see {work / 'tia.log'}: {m.stderr[-1500:]}"
        else:
            info = json.loads(m.stdout.strip().splitlines()[-1])
            mp = width * height / 1e6
            results["tiatoolbox"] = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb),
                                     "mp_per_s": round(mp / m.seconds, 3), **info}
            print(f"tiatoolbox 1x: {results['tiatoolbox']}", file=sys.stderr)
            if info.get("output"):
                results["agreement"] = agreement(Path(results["segpipe"]["output"]), Path(info["output"][0]),
                                                 args.chunk_size)
    if tia_reason is not None:
        results["tiatoolbox"] = {"skipped": tia_reason}
        print(f"TIAToolbox not measured: {tia_reason}", file=sys.stderr)

    if not args.skip_large:
        big, big_facts = ensure_slide(work, width * 2, height * 2, args.compression)
        results["slide_4x"] = {"path": str(big), **big_facts, "megapixels": round(4 * width * height / 1e6, 2)}
        results["segpipe_4x"] = segpipe_run(big, "4x")
        print(f"segpipe 4x: {results['segpipe_4x']}", file=sys.stderr)

    s, t = results["segpipe"], results.get("tiatoolbox", {})
    if "seconds" in t:
        results["speedup"] = round(t["seconds"] / s["seconds"], 2)
        results["rss_ratio"] = round(s["peak_rss_mb"] / t["peak_rss_mb"], 3)
    if "segpipe_4x" in results:
        results["flat"] = round(results["segpipe_4x"]["peak_rss_mb"] / s["peak_rss_mb"], 3)
    results["targets"] = {"speedup>=2": results.get("speedup", 0) >= 2 if "speedup" in results else None,
                          "rss_ratio<=0.4": results["rss_ratio"] <= 0.4 if "rss_ratio" in results else None,
                          "flat<=1.1": results["flat"] <= 1.1 if "flat" in results else None}
    results["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "slide"),
                    help="Slides, model and outputs go here; slides and model are reused when present.")
    ap.add_argument("--size", default="6144x8192", help="Level-0 WIDTHxHEIGHT of the slide (the 4x slide doubles both).")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--compression", default="zlib", choices=["zlib", "jpeg"],
                    help="Tile compression of the generated slide (jpeg needs imagecodecs).")
    ap.add_argument("--tia-python", default=str(DEFAULT_TIA_PYTHON), help="Python of the TIAToolbox venv.")
    ap.add_argument("--tia-batch-size", type=int, default=2)
    ap.add_argument("--tia-workers", type=int, default=0, help="SemanticSegmentor num_workers (its default is 0).")
    ap.add_argument("--tia-channels-last", action="store_true",
                    help="Run TIAToolbox's forward in channels_last like segpipe does (a plain user would not).")
    ap.add_argument("--skip-tia", action="store_true")
    ap.add_argument("--skip-large", action="store_true", help="Skip the 4x-pixels slide.")
    ap.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    sub = ap.add_subparsers(dest="cmd")
    t = sub.add_parser("tia", help="(internal) run TIAToolbox's SemanticSegmentor; needs the TIAToolbox venv.")
    t.add_argument("--slide", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--window", type=int, default=640)
    t.add_argument("--chunk", type=int, default=512)
    t.add_argument("--mpp", type=float, default=MPP)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--num-workers", type=int, default=0)
    t.add_argument("--channels-last", action="store_true")
    g = sub.add_parser("make-slide", help="Only generate a slide.")
    g.add_argument("path")
    g.add_argument("--size", default="6144x8192")
    g.add_argument("--compression", default="zlib", choices=["zlib", "jpeg"])
    args = ap.parse_args()
    if args.cmd == "tia":
        return tia_run(args)
    if args.cmd == "make-slide":
        w, h = (int(v) for v in args.size.lower().split("x"))
        print(json.dumps(make_slide(Path(args.path), w, h, compression=args.compression)))
        return None
    run_all(args)
    return None


if __name__ == "__main__":
    main()
