"""Many small images vs one big one: the per-image toll of ``segpipe segment``.

A folder of N PNG chips (256² by default, crops of scikit-image's sample photographs) against one
GeoTIFF holding exactly the same pixels as a mosaic, same chunk size (= the chip size), whole
processes. Reports the throughput ratio (mosaic time / chips time: 1.0 = no per-image cost) and
the per-image overhead in ms ((chips − mosaic) / N), each as wall time and as CPU time of the process
tree (on a shared machine the steadier of the two), medians of ``--repeats`` interleaved runs.

    python benchmarks/many.py [--images 600] [--side 256] [--free-model] [--repeats 3] [--json docs/bench-many.json]
    python benchmarks/many.py --free-model --trees before=/path/to/old/checkout,after=.   # side by side

``--trees`` runs each pair with ``PYTHONPATH`` set to each tree (the segpipe imported), interleaved.

With ``--free-model`` the forward is free (``benchmarks/_free_segment.py``), which is what a GPU
sees: the per-image toll is then most of the time.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402

PY = sys.executable


def make_inputs(work: Path, n: int, side: int) -> tuple[Path, Path]:
    import rasterio
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    mosaic = np.zeros((rows * side, cols * side, 3), np.uint8)
    chips = work / "chips"
    chips.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - side), rng.integers(0, p.shape[1] - side)
        chip = np.ascontiguousarray(p[y:y + side, x:x + side, :3])
        Image.fromarray(chip).save(chips / f"chip-{i:05d}.png")
        r, c = divmod(i, cols)
        mosaic[r * side:(r + 1) * side, c * side:(c + 1) * side] = chip
    big = work / "mosaic" / "mosaic.tif"
    big.parent.mkdir(exist_ok=True)
    with rasterio.open(big, "w", driver="GTiff", width=mosaic.shape[1], height=mosaic.shape[0], count=3,
                       dtype="uint8", tiled=True, blockxsize=256, blockysize=256, compress="deflate") as ds:
        ds.write(mosaic.transpose(2, 0, 1))
    return chips, big


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--free-model", action="store_true")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--trees", default=None, help="name=path,…: run each with PYTHONPATH=path, interleaved.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-many-"))
    chips, big = work / "chips", work / "mosaic" / "mosaic.tif"
    if not big.exists():
        chips, big = make_inputs(work, args.images, args.side)
    model = work / "model"
    if not model.exists():
        from segpipe.models.artifact import create_artifact

        create_artifact(str(model), "Unet", "resnet18", ["a", "b", "c"], seed=0)
    runner = [PY, str(Path(__file__).with_name("_free_segment.py"))] if args.free_model else [PY, "-m", "segpipe.cli.main"]
    common = ["--model", str(model), "--chunk-size", str(args.side), "--tile-size", str(args.side), "--halo",
              str(args.halo), "--precision", args.precision, "--no-progress"]
    results: dict = {"images": args.images, "side": args.side, "free_model": args.free_model,
                     "megapixels": args.images * args.side**2 / 1e6, "repeats": args.repeats,
                     "load_average": os.getloadavg()}
    trees = dict(t.split("=", 1) for t in args.trees.split(",")) if args.trees else {"": None}
    runs: dict = {tree: {"mosaic": [], "chips": []} for tree in trees}
    for _ in range(args.repeats):
        for tree, path in trees.items():
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = str(Path(path).resolve())
            for name, src in (("mosaic", big), ("chips", chips)):
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                m = measure([*runner, "segment", str(src), "--out", str(out), *common], env=env)
                if m.returncode != 0:
                    raise SystemExit(m.stderr[-3000:])
                runs[tree][name].append(m)
    for tree, pair in runs.items():
        res = results.setdefault(tree, {}) if tree else results
        for name, ms in pair.items():
            res[name] = {"seconds": round(statistics.median(m.seconds for m in ms), 2),
                         "cpu_seconds": round(statistics.median(m.cpu_seconds for m in ms), 2),
                         "peak_rss_mb": round(statistics.median(m.peak_rss_mb for m in ms)),
                         "runs_seconds": [round(m.seconds, 2) for m in ms],
                         "runs_cpu_seconds": [round(m.cpu_seconds, 2) for m in ms]}
        # ratios per repeat (the pair ran back to back), then their median
        walls = [a.seconds / b.seconds for a, b in zip(pair["mosaic"], pair["chips"])]
        cpus = [a.cpu_seconds / b.cpu_seconds for a, b in zip(pair["mosaic"], pair["chips"])]
        res["throughput_ratio"] = round(statistics.median(walls), 3)
        res["throughput_ratio_cpu"] = round(statistics.median(cpus), 3)
        res["per_image_overhead_ms"] = round(statistics.median(
            1000 * (b.seconds - a.seconds) / args.images for a, b in zip(pair["mosaic"], pair["chips"])), 1)
        res["per_image_cpu_ms"] = round(statistics.median(
            1000 * (b.cpu_seconds - a.cpu_seconds) / args.images for a, b in zip(pair["mosaic"], pair["chips"])), 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
