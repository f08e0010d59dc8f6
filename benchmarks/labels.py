"""Labels: 100,000 polygons over a 50,000² georeferenced image, burned window by window, vs gdal_rasterize.

    python benchmarks/labels.py --workdir /tmp/bench-labels [--json docs/bench-labels.json]

1. Writes a GeoPackage of ``--polygons`` irregular polygons (radius 4–120 px, 6–24 vertices,
   one in ten with a hole; classes 1..3, sorted by class so that gdal_rasterize's "last
   feature wins" equals segpipe's default priority) in EPSG:32633 over a ``--side``² grid of
   0.5 m pixels, and a header-only (sparse) GeoTIFF of that grid as the image.
2. **Floor:** ``gdal_rasterize -a class -init 0 -co TILED=YES`` into a new uncompressed tiled
   GeoTIFF of the same grid (GDAL's own command-line tool, one process).
3. **segpipe:** one process opens the dataset item through
   :func:`segpipe.labels.truth.open_truth`, which compiles the labels into the label cache
   (read, repair, STRtree, burn every 512² tile, write a tiled zstd GeoTIFF: the "compile" time,
   the figure compared with the floor), then reads every ``--window``² window of the compiled
   labels, as :func:`segpipe.train.index.index_masks` does, counting pixels per class.

Both are timed as whole processes (wall time, peak RSS of the process tree, sampled), and
the per-class pixel counts of both are compared (the floor's read back window by window,
outside the timing). The machine is shared: run it when nothing else runs, and read the
figures as one sample.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIXEL = 0.5
ORIGIN = (500000.0, 4100000.0)


def make_inputs(root: Path, side: int, n: int, seed: int) -> None:
    """DATA/images/scene.tif (header only), DATA/labels/scene.gpkg, DATA/classes.json."""
    import rasterio
    import shapely
    from pyogrio.raw import write
    from rasterio.transform import from_origin

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    with rasterio.open(root / "images" / "scene.tif", "w", driver="GTiff", height=side, width=side, count=3,
                       dtype="uint8", tiled=True, blockxsize=512, blockysize=512, sparse_ok=True, crs="EPSG:32633",
                       transform=from_origin(*ORIGIN, PIXEL, PIXEL)):
        pass
    rng = np.random.default_rng(seed)
    geoms = []
    for k in range(n):
        cx, cy = rng.uniform(0, side, 2)
        r = float(np.exp(rng.uniform(np.log(4), np.log(120))))
        m = int(rng.integers(6, 25))
        ang = np.sort(rng.uniform(0, 2 * np.pi, m))
        rad = r * rng.uniform(0.6, 1.0, m)
        ring = np.column_stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)])
        hole = np.column_stack([cx + 0.3 * r * np.cos(ang[::2]), cy + 0.3 * r * np.sin(ang[::2])])
        holes = [hole] if k % 10 == 0 and m >= 8 else None
        geoms.append(shapely.Polygon(ring, holes))
    classes = rng.integers(1, 4, n).astype(np.int32)
    order = np.argsort(classes, kind="stable")  # gdal_rasterize: last wins = higher class on top
    geoms_map = shapely.transform(np.asarray(geoms, dtype=object)[order],
                                  lambda xy: np.column_stack([ORIGIN[0] + PIXEL * xy[:, 0], ORIGIN[1] - PIXEL * xy[:, 1]]))
    write(str(root / "labels" / "scene.gpkg"), shapely.to_wkb(geoms_map), field_data=[classes[order]],
          fields=["class"], crs="EPSG:32633", geometry_type="Polygon", driver="GPKG", layer="labels")
    (root / "classes.json").write_text(json.dumps({
        "classes": [{"name": n} for n in ("background", "a", "b", "c")], "unlabelled": "background"}))


def run_segpipe(root: str, window: int) -> None:
    """The measured segpipe process: open the item's labels, read every window, print counts."""
    import time

    from segpipe.core.geometry import ChunkGrid, Window
    from segpipe.labels.dataset import load_dataset
    from segpipe.labels.truth import open_truth

    t0 = time.perf_counter()
    ds = load_dataset(root)
    item = ds.items[0]
    reader = open_truth(ds, item)
    t_open = time.perf_counter() - t0
    counts = np.zeros(256, np.int64)
    for ch in ChunkGrid(item.height, item.width, window):
        counts += np.bincount(reader.read(Window(ch.y0, ch.x0, ch.h, ch.w)).ravel(), minlength=256)
    print(json.dumps({"open_s": t_open, "counts": counts[:4].tolist(), "ignored": int(counts[255])}))


def floor_counts(path: Path, window: int) -> list[int]:
    import rasterio
    from rasterio.windows import Window as RWindow

    counts = np.zeros(256, np.int64)
    with rasterio.open(path) as ds:
        for y in range(0, ds.height, window):
            for x in range(0, ds.width, window):
                w = RWindow(x, y, min(window, ds.width - x), min(window, ds.height - y))
                counts += np.bincount(ds.read(1, window=w).ravel(), minlength=256)
    return counts[:4].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/segpipe-bench-labels")
    ap.add_argument("--side", type=int, default=50_000)
    ap.add_argument("--polygons", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--segpipe-only", metavar="DATA", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.segpipe_only:
        run_segpipe(args.segpipe_only, args.window)
        return

    import os

    from _measure import measure

    exe = shutil.which("gdal_rasterize")
    if exe is None:
        sys.exit("gdal_rasterize is not on PATH (apt-get install gdal-bin): it is the floor")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    make_inputs(data, args.side, args.polygons, args.seed)
    x0, y1 = ORIGIN
    x1, y0 = x0 + args.side * PIXEL, y1 - args.side * PIXEL
    floor_tif = work / "floor.tif"
    floor = measure([exe, "-q", "-a", "class", "-l", "labels", "-init", "0", "-ot", "Byte", "-te", str(x0), str(y0),
                     str(x1), str(y1), "-tr", str(PIXEL), str(PIXEL), "-co", "TILED=YES", "-co", "BLOCKXSIZE=512",
                     "-co", "BLOCKYSIZE=512", "-co", "BIGTIFF=YES", str(data / "labels" / "scene.gpkg"),
                     str(floor_tif)])
    if floor.returncode:
        sys.exit(f"gdal_rasterize failed: {floor.stderr}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SEGPIPE_CACHE": str(work / "cache")}
    ours = measure([sys.executable, __file__, "--segpipe-only", str(data), "--window", str(args.window)], env=env)
    if ours.returncode:
        sys.exit(f"segpipe run failed: {ours.stderr}")
    result = json.loads(ours.stdout.strip().splitlines()[-1])
    expected = floor_counts(floor_tif, args.window)
    figures = {
        "side": args.side, "polygons": args.polygons, "window": args.window, "cpus": os.cpu_count(),
        "floor_gdal_rasterize_s": round(floor.seconds, 2), "floor_peak_rss_mb": round(floor.peak_rss_mb),
        "segpipe_s": round(ours.seconds, 2), "segpipe_compile_s": round(result["open_s"], 2),
        "segpipe_peak_rss_mb": round(ours.peak_rss_mb),
        "ratio_to_floor": round(ours.seconds / floor.seconds, 2),
        "compile_ratio_to_floor": round(result["open_s"] / floor.seconds, 2),
        "class_counts_segpipe": result["counts"], "class_counts_floor": expected,
        "counts_equal": result["counts"] == expected,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
