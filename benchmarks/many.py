"""Many small images vs one big one: the per-image toll of ``segpipe segment``.

A folder of N PNG chips (256² by default, crops of scikit-image's sample photographs) against one
GeoTIFF holding exactly the same pixels as a mosaic, same chunk size (= the chip size), whole
processes. Reports the throughput ratio (mosaic time / chips time: 1.0 = no per-image cost) and
the per-image overhead in ms ((chips − mosaic) / N).

    python benchmarks/many.py [--images 600] [--side 256] [--free-model] [--json docs/bench-many.json]

With ``--free-model`` the forward is free (``benchmarks/_free_segment.py``), which is what a GPU
sees: the per-image toll is then most of the time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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
                     "megapixels": args.images * args.side**2 / 1e6}
    for name, src in (("mosaic", big), ("chips", chips)):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        m = measure([*runner, "segment", str(src), "--out", str(out), *common], env=dict(os.environ))
        if m.returncode != 0:
            raise SystemExit(m.stderr[-3000:])
        results[name] = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb)}
    results["throughput_ratio"] = round(results["mosaic"]["seconds"] / results["chips"]["seconds"], 3)
    results["per_image_overhead_ms"] = round(
        1000 * (results["chips"]["seconds"] - results["mosaic"]["seconds"]) / args.images, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
