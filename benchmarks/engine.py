"""Engine benchmark: the pipeline vs the raw model forward vs MONAI's sliding_window_inference.

Everything runs side by side in one invocation, each as a whole process the way a user
runs it, on the same scene, model, device and precision:

    python benchmarks/engine.py --megapixels 50 --device cpu --precision bf16 [--tile-size 1536]
    python benchmarks/engine.py --megapixels 50 --free-model      # the host path against the I/O floor

    python benchmarks/engine.py --megapixels 50 --sim-device 0.25x,0.5x,1x,2x,8x   # device utilisation

``--free-model`` runs the real ``segpipe segment`` with the network's forward replaced by a free
one (logits = the normalised input; ``benchmarks/_free_segment.py``): what is left is what a GPU
would wait for. It is compared with the I/O floor, which does the same work: the same windows as
segpipe's tiles (tile + halo) read with rasterio on all cores, the argmax of each tile core over the
bands, the same uint8 chunks zstd-compressed; no framework.

``--sim-device RATE,…`` sweeps a simulated device (``benchmarks/_sim_device.py``: normalisation,
forward and argmax are device work held for window pixels / RATE) on a scene, a whole slide and a
folder of chips, and reports device utilisation (busy / wall) and throughput against
min(device-limited, I/O floor); that floor skips the argmax, which is device work there.

Reports wall time, megapixels/s and peak RSS (summed over the process tree), the raw
forward on the same number and shape of tiles, the steady-state ratio, the fixed cost
(a one-chunk image), and the memory of a run on 1/16 of the pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import fail_above_limits, measure  # noqa: E402

PY = sys.executable
CLASSES = "background,building,road,water"
#: ratios of a run against its limit (raw forward of the same windows, I/O floor, min(device, floor)): above 1
#: the two did not do the same work, and the benchmark fails instead of reporting it
LIMIT_RATIOS = {"ratio_steady_vs_raw", "ratio_image_vs_raw", "ratio_steady_vs_raw_with_warmup",
                "ratio_image_vs_raw_with_warmup", "ratio_steady_vs_raw_chunk_windows",
                "ratio_image_vs_raw_chunk_windows", "ratio_image_vs_floor", "ratio_steady_vs_floor",
                "throughput_vs_bound", "image_throughput_vs_bound", "throughput_vs_floor"}


def resolved_forward(device_name: str, precision: str, runtime: str) -> tuple[object, str, str]:
    """(device, precision, runtime) resolved by segpipe's own functions, as its workers resolve them."""
    from segpipe.engine.runtime import resolve_device, resolve_precision, resolve_runtime

    device = resolve_device(device_name)
    prec = resolve_precision(precision, device)
    return device, prec, resolve_runtime(runtime, prec, device)


def make_scene(path: Path, side: int) -> None:
    """A mosaic of scikit-image's real sample photographs as a tiled GeoTIFF, written strip by strip."""
    import rasterio
    from rasterio.transform import from_origin
    from skimage import data, transform

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry(), data.retina()[..., :3] if data.retina().ndim == 3 else data.astronaut()]
    tiles = [(transform.resize(p, (512, 512), preserve_range=True, anti_aliasing=True)).astype(np.uint8)
             for p in photos]
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", height=side, width=side, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000, 4100000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, side, 512):
            h = min(512, side - y0)
            strip = np.concatenate([tiles[rng.integers(len(tiles))] for _ in range(math.ceil(side / 512))], axis=1)
            ds.write(strip[:h, :side].transpose(2, 0, 1), window=rasterio.windows.Window(0, y0, side, h))


def raw_forward(args: argparse.Namespace) -> None:
    """The limit: N forwards of (batch, 3, T, T) through the same network, no I/O, in the precision and
    runtime the compared run recorded (resolved by segpipe's functions when given as ``auto``)."""
    import torch

    from segpipe.engine.predictor import available_cores
    from segpipe.models.artifact import load_artifact

    device, precision, runtime = resolved_forward(args.device, args.precision, args.runtime)
    art = load_artifact(args.model)
    net = art.network().to(device).to(memory_format=torch.channels_last).eval()
    if device.type == "cpu":
        torch.set_num_threads(available_cores())
    x = torch.randn(args.batch, 3, args.side, args.side, device=device)
    if runtime == "onnx":
        from segpipe.engine.runtime import onnx_network

        net = onnx_network(net, art.sha256, art.spec.in_channels, available_cores())
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    n_batches = math.ceil(args.tiles / args.batch)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        t0 = time.perf_counter()
        net(x)  # warm-up (kernel selection, first allocation of the activations), reported apart
        if device.type == "cuda":
            torch.cuda.synchronize()
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n_batches):
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "batches": n_batches, "warmup_seconds": warmup, "precision": precision,
                      "runtime": runtime}))


def monai_run(args: argparse.Namespace) -> None:
    """What a MONAI user writes: load the image with rasterio, sliding_window_inference, argmax, save."""
    import rasterio
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from segpipe.models.artifact import load_artifact

    device, precision, _ = resolved_forward(args.device, args.precision, "torch")  # MONAI runs torch
    art = load_artifact(args.model)
    net = art.network().to(device).eval()
    with rasterio.open(args.scene) as ds:
        img = ds.read()
    x = torch.from_numpy(img).float()[None] / art.spec.input_scale
    mean = torch.tensor(art.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(art.spec.std).view(1, -1, 1, 1)
    x = ((x - mean) / std).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = sliding_window_inference(x, roi_size=(args.side, args.side), sw_batch_size=args.batch,
                                       predictor=net, overlap=args.overlap, mode="constant",
                                       padding_mode="reflect")
    labels = out.argmax(1)[0].to(torch.uint8).cpu().numpy()
    zarr.create_array(args.out, data=labels, chunks=(512, 512), overwrite=True)
    print(json.dumps({"windows_hint": args.overlap}))


def io_floor(args: argparse.Namespace) -> None:
    """The host's floor, doing the same work as segpipe: the same windows (segpipe's tile + halo,
    clipped to the image) read with rasterio on all cores, the labels of each tile core taken (the
    argmax over the bands, as the free model does; with ``--no-argmax`` band 0, as the simulated device
    returns them), and the same uint8 chunks zstd-compressed (level 3, as segpipe writes them). No
    framework, no model. ``--scene`` may be repeated (a folder of chips: each chip is its own image)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from numcodecs import Zstd
    from rasterio.windows import Window

    from segpipe.core.settings import TilingSettings
    from segpipe.engine.tiled import TilePlan

    tiling = TilingSettings(chunk_size=args.chunk_size, halo=args.halo, tile_size=args.tile_size)
    jobs = []
    for scene in args.scene:
        with rasterio.open(scene) as ds:
            plan = TilePlan.of(tiling, ds.height, ds.width)
        jobs.extend((scene, plan, tile) for tile in plan.tiles)
    local = threading.local()
    zstd = Zstd(level=3)

    def work(job: tuple) -> int:
        scene, plan, tile = job
        handles = getattr(local, "handles", None)
        if handles is None:
            handles = local.handles = {}
        ds = handles.get(scene)
        if ds is None:
            if len(handles) > 8:  # chips: a few open at a time
                for h in handles.values():
                    h.close()
                handles.clear()
            ds = handles[scene] = rasterio.open(scene)
        win = plan.window(tile)
        y0, x0 = max(0, win.y0), max(0, win.x0)
        y1, x1 = min(plan.height, win.y0 + win.h), min(plan.width, win.x0 + win.w)
        a = ds.read(window=Window(x0, y0, x1 - x0, y1 - y0))
        core = a[:, tile.y0 - y0:tile.y0 - y0 + tile.h, tile.x0 - x0:tile.x0 - x0 + tile.w]
        labels = core.argmax(axis=0).astype(np.uint8) if args.argmax else np.ascontiguousarray(core[0])
        n = 0
        for c in plan.chunks(tile):
            n += len(zstd.encode(np.ascontiguousarray(
                labels[c.y0 - tile.y0:c.y0 - tile.y0 + c.h, c.x0 - tile.x0:c.x0 - tile.x0 + c.w])))
        return n

    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=256 * 2**20), ThreadPoolExecutor(cores) as ex:
        sum(ex.map(work, jobs))
    print(json.dumps({"seconds": time.perf_counter() - t0, "windows": len(jobs), "threads": cores}))


def run_floor(scenes: list[Path], chunk: int, halo: int, tile: int | None, argmax: bool, env: dict) -> dict:
    """:func:`io_floor` as a whole process (its own imports and GDAL cache, like segpipe's)."""
    fl = measure([PY, __file__, "floor", *[a for s in scenes for a in ("--scene", str(s))], "--chunk-size",
                  str(chunk), "--halo", str(halo), *(["--tile-size", str(tile)] if tile else []),
                  *([] if argmax else ["--no-argmax"])], env=env)
    if fl.returncode != 0:
        raise SystemExit(fl.stderr[-3000:])
    return json.loads(fl.stdout.strip().splitlines()[-1])


def window_ratio(height: int, width: int, chunk: int, halo: int, tile: int | None) -> float:
    """Window pixels the device computes per image pixel (halo and padding included) for segpipe's tiles."""
    from segpipe.core.settings import TilingSettings
    from segpipe.engine.tiled import TilePlan

    plan = TilePlan.of(TilingSettings(chunk_size=chunk, halo=halo, tile_size=tile), height, width)
    return len(plan.tiles) * plan.window_side**2 / (height * width)


def sim_sweep(args: argparse.Namespace) -> dict:
    """Device utilisation and throughput of the real ``segpipe segment`` with a simulated device at each RATE.

    RATE is the device's speed in megapixels of input windows per second; ``0.5x`` means half the
    input's I/O floor (the device-limited image throughput is then half the floor's). For each input
    and rate: whole process wall and peak RSS, device busy / wall over the whole process and over the
    steady span (first forward to last), the longest idle gaps with what the host threads did in them,
    and the steady throughput against min(device-limited, I/O floor).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    model = work / "model"
    if not model.exists():
        from segpipe.models.artifact import create_artifact

        create_artifact(str(model), "Unet", "resnet18", CLASSES.split(","), seed=0)
    inputs: dict[str, dict] = {}
    want = args.sim_inputs.split(",")
    if "scene" in want:
        side = round(math.sqrt(args.megapixels * 1e6))
        scene = work / f"scene-{side}.tif"
        if not scene.exists():
            make_scene(scene, side)
        small = work / f"scene-{side // 4}.tif"
        if args.sim_memory and not small.exists():
            make_scene(small, side // 4)
        inputs["scene"] = {"src": scene, "floor_src": [scene], "mp": side * side / 1e6, "small": small,
                           "opts": ["--chunk-size", str(args.chunk_size), "--halo", str(args.halo),
                                    *(["--tile-size", str(args.tile_size)] if args.tile_size else [])],
                           "floor": (args.chunk_size, args.halo, args.tile_size),
                           "ratio": window_ratio(side, side, args.chunk_size, args.halo, args.tile_size)}
    if "slide" in want:
        from slide import ensure_slide

        w = round(math.sqrt(args.slide_megapixels * 1e6 * 0.75)) // 256 * 256
        h = round(args.slide_megapixels * 1e6 / w) // 256 * 256
        slide, facts = ensure_slide(work, w, h, "zlib")
        inputs["slide"] = {"src": slide, "floor_src": None, "mp": w * h / 1e6, "facts": facts,
                           "opts": ["--chunk-size", "512", "--halo", "64"],
                           "ratio": window_ratio(h, w, 512, 64, None)}
    if "chips" in want:
        from many import make_inputs

        chips = work / "chips"
        if not chips.exists():
            make_inputs(work, args.chips, args.chip_side)
        files = sorted(chips.glob("*.png"))
        c = args.chip_side
        inputs["chips"] = {"src": chips, "floor_src": files, "mp": len(files) * c * c / 1e6,
                           "opts": ["--chunk-size", str(c), "--tile-size", str(c), "--halo", "32"],
                           "floor": (c, 32, c), "ratio": window_ratio(c, c, c, 32, c)}
    results: dict = {"cores": os.cpu_count(), "inputs": {}}
    scene_floor = None
    for name, inp in inputs.items():
        res: dict = {"megapixels": round(inp["mp"], 2), "window_pixels_per_pixel": round(inp["ratio"], 3),
                     "runs": []}
        floor_mp_s = None
        if inp["floor_src"]:
            fl = run_floor(inp["floor_src"], *inp["floor"], False, env)
            floor_mp_s = inp["mp"] / fl["seconds"]
            res["io_floor"] = {"seconds": round(fl["seconds"], 2), "mp_per_s": round(floor_mp_s, 1),
                               "windows": fl["windows"], "threads": fl["threads"]}
            scene_floor = scene_floor or floor_mp_s
        base = floor_mp_s or scene_floor
        for token in args.sim_device.split(","):
            token = token.strip()
            if token == "real":
                rate: str = "real"
            elif token.endswith("x"):
                if base is None:
                    raise SystemExit(f"{token}: a rate relative to the floor needs the scene or chips input first")
                rate = f"{float(token[:-1]) * base * inp['ratio']:.2f}"
            else:
                rate = token
            runs = [("", inp["src"])] + ([("small", inp["small"])] if args.sim_memory and "small" in inp else [])
            for tag, src in runs:
                device = ["--device", args.device, "--precision", args.precision, "--runtime", args.runtime] \
                    if rate == "real" else []
                run = _sim_run(work, model, src, [*inp["opts"], *device], rate, env, f"{name}-{token}{tag}",
                               args.segment_args)
                run["rate"], run["rate_token"] = rate, token
                mp = inp["mp"] / (16 if tag else 1)
                if run["steady_s"] > 0:
                    run["steady_mp_per_s"] = round(mp / run["steady_s"], 2)
                    device_mp_s = mp / run["busy_s"] if run["busy_s"] > 0 else float("inf")
                    bound = min(device_mp_s, floor_mp_s or float("inf"))
                    run["device_limit_mp_per_s"] = round(device_mp_s, 2)
                    run["bound_mp_per_s"] = round(bound, 2)
                    run["throughput_vs_bound"] = round(mp / run["steady_s"] / bound, 3)
                    if floor_mp_s:
                        run["throughput_vs_floor"] = round(mp / run["steady_s"] / floor_mp_s, 3)
                    if "image_seconds" in run:  # the image's whole time: first read to the pyramid's end
                        run["image_throughput_vs_bound"] = round(mp / run["image_seconds"] / bound, 3)
                if tag:
                    res["runs"][-1]["rss_ratio_16x_pixels"] = round(res["runs"][-1]["peak_rss_mb"] / run["peak_rss_mb"], 3)
                    res["runs"][-1]["small"] = {k: run[k] for k in ("seconds", "peak_rss_mb")}
                else:
                    res["runs"].append(run)
                print(json.dumps({"input": name, **{k: v for k, v in run.items() if k != "longest_idle_gaps"}}),
                      file=sys.stderr)
        results["inputs"][name] = res
    return results


def _sim_run(work: Path, model: Path, src: Path, opts: list[str], rate: str, env: dict, name: str,
             extra: str) -> dict:
    """One whole ``segpipe segment`` process on the simulated (or instrumented real) device, analysed."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _sim_device import analyse

    out, trace = work / f"out-sim-{name}", work / f"trace-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(trace, ignore_errors=True)
    cmd = [PY, str(Path(__file__).with_name("_sim_device.py")), "segment", str(src), "--model", str(model),
           "--out", str(out), "--no-progress", *opts, *extra.split()]
    t0 = time.monotonic()
    m = measure(cmd, env={**env, "SEGPIPE_SIM_RATE": rate, "SEGPIPE_SIM_TRACE": str(trace)})
    if m.returncode != 0:
        raise SystemExit(f"segpipe on the simulated device failed on {src}:\n{m.stderr[-3000:]}")
    outputs = list(out.glob("*.zarr/zarr.json"))
    image = {}
    if len(outputs) == 1:  # one image: its own time as segpipe recorded it (header to finalize)
        image["image_seconds"] = json.loads(outputs[0].read_text())["attributes"]["segpipe"]["seconds"]
    return {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb), **image,
            **analyse(trace, t0, t0 + m.seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megapixels", type=float, default=50.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--runtime", default="auto", help="segpipe's --runtime (auto | torch | onnx).")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--tile-size", type=int, default=None, help="segpipe's --tile-size [default: 2 × chunk].")
    ap.add_argument("--free-model", action="store_true", help="Forward replaced by a free one; compare with the I/O floor.")
    ap.add_argument("--compare-tile", action="store_true",
                    help="Also run with --tile-size = --chunk-size (today's windows) and report the ratio.")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="Keep scenes and outputs here (default: a temp folder).")
    ap.add_argument("--skip-monai", action="store_true")
    ap.add_argument("--segment-args", default="", help="Extra `segpipe segment` options, e.g. '--workers 4 --processes'.")
    ap.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    ap.add_argument("--sim-device", default=None, metavar="RATE[,RATE…]",
                    help="Sweep a simulated device (benchmarks/_sim_device.py) at these rates: MP/s of input "
                    "windows, or Nx = N × the input's I/O floor, or 'real' (the real device, instrumented).")
    ap.add_argument("--sim-inputs", default="scene,slide,chips", help="Inputs of the sweep (scene, slide, chips).")
    ap.add_argument("--slide-megapixels", type=float, default=50.0)
    ap.add_argument("--chips", type=int, default=600)
    ap.add_argument("--chip-side", type=int, default=256)
    ap.add_argument("--sim-memory", action="store_true", help="Also run the scene with 1/16 of the pixels at each rate.")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("raw")
    m = sub.add_parser("monai")
    fl = sub.add_parser("floor")
    fl.add_argument("--scene", action="append", required=True)
    fl.add_argument("--chunk-size", type=int, default=512)
    fl.add_argument("--halo", type=int, default=64)
    fl.add_argument("--tile-size", type=int, default=None)
    fl.add_argument("--no-argmax", dest="argmax", action="store_false")
    for p in (r, m):
        p.add_argument("--model", required=True)
        p.add_argument("--device", default="cpu")
        p.add_argument("--precision", default="bf16")
        p.add_argument("--side", type=int, default=640)
        p.add_argument("--batch", type=int, default=2)
    r.add_argument("--runtime", default="auto")
    r.add_argument("--tiles", type=int, required=True)
    m.add_argument("--scene", required=True)
    m.add_argument("--overlap", type=float, required=True)
    m.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "raw":
        return raw_forward(args)
    if args.cmd == "monai":
        return monai_run(args)
    if args.cmd == "floor":
        return io_floor(args)
    if args.sim_device:
        results = sim_sweep(args)
        fail_above_limits(results, LIMIT_RATIOS, "benchmarks/engine.py --sim-device")
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    from segpipe.core.settings import TilingSettings
    from segpipe.engine.predictor import default_batch_size
    from segpipe.engine.tiled import TilePlan

    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    side = int(round(math.sqrt(args.megapixels * 1e6)))
    small_side = side // 4  # 1/16 of the pixels
    scene, small, one = work / f"scene-{side}.tif", work / f"scene-{small_side}.tif", work / "one-chunk.tif"
    for path, s in ((scene, side), (small, small_side), (one, args.chunk_size)):
        if not path.exists():
            make_scene(path, s)
    model = work / "model"
    if not model.exists():
        from segpipe.models.artifact import create_artifact

        create_artifact(str(model), "Unet", "resnet18", CLASSES.split(","), seed=0)
    if args.free_model:
        model = work / "model-free"
        if not model.exists():
            from segpipe.models.artifact import create_artifact

            create_artifact(str(model), "Unet", "resnet18", ["a", "b", "c"], seed=0)
    # the windows segpipe computes for this scene, by its own plan (tile size, halo, padding)
    plan = TilePlan.of(TilingSettings(chunk_size=args.chunk_size, halo=args.halo, tile_size=args.tile_size), side, side)
    tile, T, tiles = plan.tile_size, plan.window_side, len(plan.tiles)
    device, precision, runtime = resolved_forward(args.device, args.precision, args.runtime)
    batch = args.batch_size or default_batch_size(device.type)
    runner = [PY, str(Path(__file__).with_name("_free_segment.py"))] if args.free_model else [PY, "-m", "segpipe.cli.main"]
    segpipe = [*runner, "segment", "--model", str(model), "--chunk-size", str(args.chunk_size),
               "--halo", str(args.halo), "--device", args.device, "--precision", args.precision,
               "--runtime", args.runtime, "--no-progress", *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
               *args.segment_args.split()]
    env = {**os.environ}
    results: dict = {"scene": f"{side}x{side}", "megapixels": side * side / 1e6, "chunk_size": args.chunk_size,
                     "tile_size": tile, "tiles": tiles, "window_side": T, "batch_size": batch, "device": args.device,
                     "precision": args.precision, "runtime": args.runtime, "precision_resolved": precision,
                     "runtime_resolved": runtime, "free_model": args.free_model, "cores": os.cpu_count()}

    def seg(src: Path, name: str, tile_size: int | None = None) -> dict:
        out = work / f"out-{name}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        m = measure([*segpipe, "--tile-size", str(tile_size or args.tile_size or 2 * args.chunk_size), str(src),
                     "--out", str(out)], env=env)
        if m.returncode != 0:
            raise SystemExit(f"segpipe failed on {src}:\n{m.stderr[-3000:]}")
        # the image's own time as segpipe recorded it (header to finalize: no imports, cluster or model load)
        attrs = json.loads(next(out.glob("*.zarr/zarr.json")).read_text())["attributes"]["segpipe"]
        inference = attrs.get("inference") or {}
        return {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb),
                "image_seconds": round(attrs["seconds"], 2), "tile_size": attrs.get("tile_size"),
                "precision": inference.get("precision"), "runtime": inference.get("runtime", "torch")}

    if args.free_model:
        results["fixed_cost"] = seg(one, "one")
        results["pipeline"] = seg(scene, "scene")
        floor = run_floor([scene], args.chunk_size, args.halo, args.tile_size, True, env)
        steady = results["pipeline"]["seconds"] - results["fixed_cost"]["seconds"]
        image = results["pipeline"]["image_seconds"]
        mp = results["megapixels"]
        results.update({
            "io_floor": {"seconds": round(floor["seconds"], 2), "threads": floor["threads"]},
            # two views of the steady state: whole process − fixed cost (two noisy wall times), and the
            # image's own time recorded in its output (header to finalize, one measurement)
            "image_seconds": image,
            "ratio_image_vs_floor": round(floor["seconds"] / image, 3),
            "steady_state_seconds": round(steady, 2),
            "steady_state_mp_per_s": round(mp / steady, 2),
            "steady_state_mp_per_s_per_core": round(mp / steady / (os.cpu_count() or 1), 2),
            "io_floor_mp_per_s": round(mp / floor["seconds"], 2),
            "ratio_steady_vs_floor": round(floor["seconds"] / steady, 3),
        })
        fail_above_limits(results, LIMIT_RATIOS, "benchmarks/engine.py --free-model")
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return
    results["fixed_cost"] = seg(one, "one")
    results["pipeline"] = seg(scene, "scene")
    results["pipeline_small"] = seg(small, "small")
    if args.compare_tile:
        results["pipeline_tile_eq_chunk"] = seg(scene, "scene-chunk-tiles", args.chunk_size)
    # the raw forward in what the run recorded it computed in (not what was asked: auto resolves per machine)
    p = results["pipeline"]
    if (p["tile_size"], p["precision"], p["runtime"]) != (tile, precision, runtime):
        raise SystemExit(f"benchmarks/engine.py: FAILED, segpipe resolved tile {p['tile_size']}, {p['precision']}, "
                         f"{p['runtime']}; the references would use tile {tile}, {precision}, {runtime}")
    raw = measure([PY, __file__, "raw", "--model", str(model), "--device", args.device, "--precision", precision,
                   "--runtime", runtime, "--side", str(T), "--batch", str(batch), "--tiles", str(tiles)], env=env)
    if raw.returncode != 0:
        raise SystemExit(raw.stderr[-3000:])
    raw_out = json.loads(raw.stdout.strip().splitlines()[-1])
    results["raw_forward"] = {"seconds": round(raw_out["seconds"], 2), "warmup_seconds": round(raw_out["warmup_seconds"], 2)}
    if not args.skip_monai:
        overlap = 1 - tile / T  # same window count: stride = tile size
        mo = measure([PY, __file__, "monai", "--model", str(model), "--device", args.device, "--precision",
                      precision, "--side", str(T), "--batch", str(batch), "--scene", str(scene), "--overlap",
                      str(overlap), "--out", str(work / "out-monai.zarr")], env=env)
        if mo.returncode != 0:
            raise SystemExit(mo.stderr[-3000:])
        results["monai"] = {"seconds": round(mo.seconds, 2), "peak_rss_mb": round(mo.peak_rss_mb)}
    p, f, rf = results["pipeline"], results["fixed_cost"], results["raw_forward"]
    steady = p["seconds"] - f["seconds"]
    results["steady_state_seconds"] = round(steady, 2)
    results["pipeline_mp_per_s"] = round(results["megapixels"] / p["seconds"], 3)
    results["steady_state_mp_per_s"] = round(results["megapixels"] / steady, 3)
    results["raw_forward_mp_per_s"] = round(results["megapixels"] / rf["seconds"], 3)
    results["ratio_steady_vs_raw"] = round(rf["seconds"] / steady, 3)
    results["ratio_image_vs_raw"] = round(rf["seconds"] / p["image_seconds"], 3)  # the image's own time, one measurement
    # the pipeline's first forward of the scene's window shape pays the same warm-up once (the one-chunk
    # image of the fixed cost has a smaller window): compare with the raw forward including its warm-up
    results["ratio_steady_vs_raw_with_warmup"] = round((rf["seconds"] + rf["warmup_seconds"]) / steady, 3)
    results["ratio_image_vs_raw_with_warmup"] = round((rf["seconds"] + rf["warmup_seconds"]) / p["image_seconds"], 3)
    results["rss_ratio_16x_pixels"] = round(p["peak_rss_mb"] / results["pipeline_small"]["peak_rss_mb"], 3)
    if "monai" in results:
        results["speedup_vs_monai"] = round(results["monai"]["seconds"] / p["seconds"], 2)
        results["rss_vs_monai"] = round(p["peak_rss_mb"] / results["monai"]["peak_rss_mb"], 3)
    if args.compare_tile:
        results["speedup_tile_vs_chunk_windows"] = round(results["pipeline_tile_eq_chunk"]["seconds"] / p["seconds"], 3)
        # the raw forward of the chunk-sized windows too: each pipeline against the forward of its own windows
        plan_c = TilePlan.of(TilingSettings(chunk_size=args.chunk_size, halo=args.halo, tile_size=args.chunk_size),
                             side, side)
        side_c, tiles_c = plan_c.window_side, len(plan_c.tiles)
        rc = measure([PY, __file__, "raw", "--model", str(model), "--device", args.device, "--precision",
                      precision, "--runtime", runtime, "--side", str(side_c), "--batch", str(batch),
                      "--tiles", str(tiles_c)], env=env)
        if rc.returncode != 0:
            raise SystemExit(rc.stderr[-3000:])
        rc_out = json.loads(rc.stdout.strip().splitlines()[-1])
        results["raw_forward_chunk_windows"] = {"seconds": round(rc_out["seconds"], 2), "windows": tiles_c,
                                                "side": side_c}
        steady_c = results["pipeline_tile_eq_chunk"]["seconds"] - f["seconds"]
        results["ratio_steady_vs_raw_chunk_windows"] = round(rc_out["seconds"] / steady_c, 3)
        results["ratio_image_vs_raw_chunk_windows"] = round(
            rc_out["seconds"] / results["pipeline_tile_eq_chunk"]["image_seconds"], 3)
    fail_above_limits(results, LIMIT_RATIOS, "benchmarks/engine.py")
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
