"""Training patches from vector labels against the same dataset as raster masks, after the first epoch.

    python benchmarks/label_training.py --workdir /tmp/bench-lt [--json docs/bench-label-training.json]

Writes 50 GeoTIFFs (512², 0.5 m) with 400 random polygons each as GeoPackages under ``labels/``, and the
same dataset with those polygons burned by ``gdal_rasterize`` as ``masks/`` (the raster reference).
For each, in its own process: index the truth and build the class-balanced
:class:`~segpipe.train.sampler.PatchSampler` of training (256² patches), draw one epoch (the vector
dataset compiles its labels here), then time ``--patches`` more — the figure is patches/s of that
second epoch, vector / raster (target ≥ 0.9), the median over ``--repeat`` alternating runs — by wall
time and by the process's CPU time (which the other work of a shared machine does not inflate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIXEL, ORIGIN = 0.5, (500000.0, 4100000.0)


def make(root: Path, images: int, side: int, polygons: int) -> None:
    import rasterio
    import shapely
    from pyogrio.raw import write
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    vec, ras = root / "vector", root / "raster"
    for d in (vec / "images", vec / "labels", ras / "images", ras / "masks"):
        d.mkdir(parents=True, exist_ok=True)
    classes = {"classes": [{"name": n} for n in ("background", "a", "b", "c")], "unlabelled": "background"}
    for d in (vec, ras):
        (d / "classes.json").write_text(json.dumps(classes))
    gdal = shutil.which("gdal_rasterize")
    if gdal is None:
        sys.exit("gdal_rasterize is not on PATH (apt-get install gdal-bin)")
    for i in range(images):
        name = f"im{i:02d}"
        with rasterio.open(vec / "images" / f"{name}.tif", "w", driver="GTiff", height=side, width=side, count=3,
                           dtype="uint8", tiled=True, blockxsize=256, blockysize=256, crs="EPSG:32633",
                           transform=from_origin(*ORIGIN, PIXEL, PIXEL)) as ds:
            ds.write(rng.integers(0, 255, (3, side, side), dtype=np.uint8))
        shutil.copy(vec / "images" / f"{name}.tif", ras / "images" / f"{name}.tif")
        cx, cy = rng.uniform(0, side, polygons), rng.uniform(0, side, polygons)
        r = rng.uniform(3, 25, polygons)
        geoms = [shapely.Point(ORIGIN[0] + x * PIXEL, ORIGIN[1] - y * PIXEL).buffer(rr * PIXEL, 4)
                 for x, y, rr in zip(cx, cy, r)]
        cls = np.sort(rng.integers(1, 4, polygons)).astype(np.int32)  # later = higher class wins, as segpipe's default
        gpkg = vec / "labels" / f"{name}.gpkg"
        write(str(gpkg), shapely.to_wkb(np.asarray(geoms, dtype=object)), field_data=[cls], fields=["class"],
              crs="EPSG:32633", geometry_type="Polygon", driver="GPKG", layer="labels", layer_options={"VERSION": "1.2"})
        x1, y0 = ORIGIN[0] + side * PIXEL, ORIGIN[1] - side * PIXEL
        subprocess.run([gdal, "-q", "-a", "class", "-l", "labels", "-init", "0", "-ot", "Byte", "-te", str(ORIGIN[0]),
                        str(y0), str(x1), str(ORIGIN[1]), "-tr", str(PIXEL), str(PIXEL), "-co", "TILED=YES",
                        str(gpkg), str(ras / "masks" / f"{name}.tif")], check=True)


def run(data: str, patches: int) -> None:
    from segpipe.labels.dataset import load_dataset
    from segpipe.train.index import index_masks
    from segpipe.train.sampler import PatchSampler

    t0 = time.perf_counter()
    ds = load_dataset(data)
    index = index_masks(ds)
    sampler = PatchSampler(ds, patch_size=256, patches_per_epoch=patches, mean=[0.5] * 3, std=[0.2] * 3,
                           input_scale=255.0, index=index, class_balanced=True, seed=0)
    for i in range(patches):
        sampler[(0, i)]
    first = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(patches):
        sampler[(1, i)]
    second, cpu = time.perf_counter() - t1, time.process_time() - c1
    # CPU time as well as wall time: on a shared machine the wall clock measures the neighbours too
    print(json.dumps({"first_epoch_s": first, "patches_per_s": patches / second, "patches_per_cpu_s": patches / cpu}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/segpipe-bench-label-training")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--polygons", type=int, default=400)
    ap.add_argument("--patches", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; the median is reported")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", metavar="DATA", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        run(args.only, args.patches)
        return
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    make(work, args.images, args.side, args.polygons)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SEGPIPE_CACHE": str(work / "cache")}
    runs: dict[str, list[dict]] = {"raster": [], "vector": []}
    for r in range(args.repeat):
        if r:  # every vector run compiles its labels again: a fresh cache
            shutil.rmtree(work / "cache", ignore_errors=True)
        for kind in ("raster", "vector"):
            p = subprocess.run([sys.executable, __file__, "--only", str(work / kind), "--patches", str(args.patches)],
                               capture_output=True, text=True, env=env)
            if p.returncode:
                sys.exit(f"{kind} run failed: {p.stderr[-2000:]}")
            runs[kind].append(json.loads(p.stdout.strip().splitlines()[-1]))
    import statistics

    out = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    ratios = [v["patches_per_s"] / r["patches_per_s"] for v, r in zip(runs["vector"], runs["raster"])]
    cpu_ratios = [v["patches_per_cpu_s"] / r["patches_per_cpu_s"] for v, r in zip(runs["vector"], runs["raster"])]
    figures = {"images": args.images, "side": args.side, "polygons_per_image": args.polygons,
               "patches": args.patches, "repeat": args.repeat,
               **{f"{k}_{m}": round(v[m], 2) for k, v in out.items() for m in v},
               "vector_over_raster": round(statistics.median(ratios), 3),
               "vector_over_raster_runs": [round(x, 3) for x in ratios],
               "vector_over_raster_cpu": round(statistics.median(cpu_ratios), 3),
               "vector_over_raster_cpu_runs": [round(x, 3) for x in cpu_ratios]}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
