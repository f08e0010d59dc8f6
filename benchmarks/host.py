"""The host side against a simulated device, several checkouts side by side: device utilisation and
throughput against the I/O floor, medians of interleaved runs.

The simulated device of ``_sim_device.py`` (the real ``segpipe segment``, the device stage held for
window pixels / RATE) on a scene and on a folder of chips, at rates given as multiples of the input's
I/O floor (``engine.py``'s floor: the same windows read with rasterio on every core, the chunks
zstd-compressed). The floor is measured ``--floors`` times first and its median fixes the rates, so every
tree and repeat runs against the same device speed; each (input, rate) then runs once per tree per repeat,
trees interleaved. Reported per tree: whole-process seconds and CPU seconds, device utilisation over the
whole process and over the steady span (first forward to last), steady throughput / floor, and the
image's own time (header to finalize) / bound.

    python benchmarks/host.py --inputs scene,chips --rates 0.5x,2x --trees before=/old/checkout,after=. \\
        --repeats 3 --workdir .bench/host --json docs/bench-host.json

On a shared machine, read the ratios within one invocation only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve().parent


def floor_seconds(sources: list[Path], chunk: int, halo: int, tile: int | None, env: dict) -> float:
    """One run of ``engine.py floor`` (no argmax: the simulated device's labels are device work)."""
    cmd = [PY, str(HERE / "engine.py"), "floor", *[a for s in sources for a in ("--scene", str(s))],
           "--chunk-size", str(chunk), "--halo", str(halo), *(["--tile-size", str(tile)] if tile else []),
           "--no-argmax"]
    m = measure(cmd, env=env)
    if m.returncode != 0:
        raise SystemExit(m.stderr[-3000:])
    return float(json.loads(m.stdout.strip().splitlines()[-1])["seconds"])


def sim_run(work: Path, model: Path, src: Path, opts: list[str], rate: float, env: dict, name: str) -> dict:
    """One whole ``segpipe segment`` process on the simulated device, analysed (``_sim_device.analyse``)."""
    from _sim_device import analyse

    out, trace = work / f"out-{name}", work / f"trace-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(trace, ignore_errors=True)
    cmd = [PY, str(HERE / "_sim_device.py"), "segment", str(src), "--model", str(model), "--out", str(out),
           "--no-progress", *opts]
    t0 = time.monotonic()
    m = measure(cmd, env={**env, "SEGPIPE_SIM_RATE": f"{rate:.3f}", "SEGPIPE_SIM_TRACE": str(trace)})
    if m.returncode != 0:
        raise SystemExit(f"{name} failed:\n{m.stderr[-3000:]}")
    outputs = list(out.glob("*.zarr/zarr.json"))
    run = {"seconds": round(m.seconds, 2), "cpu_seconds": round(m.cpu_seconds, 2), "peak_rss_mb": round(m.peak_rss_mb)}
    if len(outputs) == 1:
        run["image_seconds"] = json.loads(outputs[0].read_text())["attributes"]["segpipe"]["seconds"]
    run.update(analyse(trace, t0, t0 + m.seconds))
    run.pop("longest_idle_gaps", None)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default="scene,chips")
    ap.add_argument("--rates", default="0.5x,2x", help="Multiples of the input's I/O floor, e.g. 0.5x,2x.")
    ap.add_argument("--megapixels", type=float, default=67.0)
    ap.add_argument("--chips", type=int, default=600)
    ap.add_argument("--trees", default=None, help="name=path,…: PYTHONPATH of each run (default: this checkout).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--floors", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from engine import CLASSES, make_scene, window_ratio
    from many import make_inputs

    from segpipe.models.artifact import create_artifact

    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-host-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not model.exists():
        create_artifact(str(model), "Unet", "resnet18", CLASSES.split(","), seed=0)
    env = dict(os.environ)
    inputs: dict[str, dict] = {}
    if "scene" in args.inputs:
        side = round(math.sqrt(args.megapixels * 1e6))
        scene = work / f"scene-{side}.tif"
        if not scene.exists():
            make_scene(scene, side)
        inputs["scene"] = {"src": scene, "floor": [scene], "geometry": (512, 64, None), "mp": side * side / 1e6,
                           "opts": ["--chunk-size", "512", "--halo", "64"],
                           "ratio": window_ratio(side, side, 512, 64, None)}
    if "chips" in args.inputs:
        chips = work / "chips"
        if not chips.exists():
            make_inputs(work, args.chips, 256)
        files = sorted(chips.glob("*.png"))
        inputs["chips"] = {"src": chips, "floor": files, "geometry": (256, 32, 256), "mp": len(files) * 256**2 / 1e6,
                           "opts": ["--chunk-size", "256", "--tile-size", "256", "--halo", "32"],
                           "ratio": window_ratio(256, 256, 256, 32, 256)}
    trees = dict(t.split("=", 1) for t in args.trees.split(",")) if args.trees else {"": ""}
    results: dict = {"cores": os.cpu_count(), "repeats": args.repeats, "load_average_start": os.getloadavg(),
                     "inputs": {}}
    for name, inp in inputs.items():
        floors = [floor_seconds(inp["floor"], *inp["geometry"], env) for _ in range(args.floors)]
        floor_mp_s = inp["mp"] / statistics.median(floors)
        res: dict = {"megapixels": round(inp["mp"], 2), "floor_mp_per_s": round(floor_mp_s, 1),
                     "floor_runs_seconds": [round(f, 2) for f in floors], "rates": {}}
        for token in args.rates.split(","):
            rate = float(token.rstrip("x")) * floor_mp_s * inp["ratio"]  # MP of windows per second
            runs: dict[str, list[dict]] = {tree: [] for tree in trees}
            for _ in range(args.repeats):
                for tree, path in trees.items():
                    tree_env = {**env, **({"PYTHONPATH": str(Path(path).resolve())} if path else {})}
                    runs[tree].append(sim_run(work, model, inp["src"], inp["opts"], rate, tree_env,
                                              f"{name}-{token}-{tree or 'this'}"))
            per_tree = {}
            for tree, rs in runs.items():
                device_mp_s = inp["mp"] / statistics.median(r["busy_s"] for r in rs)
                bound = min(device_mp_s, floor_mp_s)

                def med(key: str, rs: list[dict] = rs) -> float:
                    return round(statistics.median(r[key] for r in rs), 3)

                row = {"seconds": med("seconds"), "cpu_seconds": med("cpu_seconds"),
                       "utilisation_whole": med("utilisation_whole"), "utilisation_steady": med("utilisation_steady"),
                       "steady_vs_floor": round(statistics.median(inp["mp"] / r["steady_s"] / floor_mp_s for r in rs), 3),
                       "steady_vs_bound": round(statistics.median(inp["mp"] / r["steady_s"] / bound for r in rs), 3),
                       "host_threads_by_stage": rs[len(rs) // 2]["host_threads_by_stage"], "runs": rs}
                if all("image_seconds" in r for r in rs):
                    row["image_vs_bound"] = round(statistics.median(inp["mp"] / r["image_seconds"] / bound for r in rs), 3)
                per_tree[tree or "this"] = row
                print(json.dumps({"input": name, "rate": token, "tree": tree or "this",
                                  **{k: v for k, v in row.items() if k != "runs"}}), file=sys.stderr)
            res["rates"][token] = {"rate_mp_per_s": round(rate, 2), "trees": per_tree}
        results["inputs"][name] = res
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
