"""One read of an image at a coarser pixel size: peak memory and time against GDAL's own decimated read.

    python benchmarks/resample.py --workdir /tmp/bench-resample [--json docs/bench-resample.json]

Writes an 8,200² single-band GeoTIFF of 0.5 m pixels twice — without overviews (every source pixel is
read) and as a COG-like file with 2×/4×/8× overviews — and reads one 1,152² window of it at 3.35 m
(factor 6.7) and 4 m (factor 8) through :func:`segpipe.io.readers.open_image` (``gsd=``):

* **memory:** the read's own peak Python/numpy allocations (tracemalloc) as a multiple of the window
  it returns (target ≤ 3×);
* **time:** the median of 3 reads against GDAL's decimated read of the same source rectangle
  (``Resampling.average``, ``out_shape``): the floor, which uses the overviews when present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDE, PIXEL, WINDOW = 8200, 0.5, 1152


def write(path: Path, overviews: bool) -> None:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    yy = np.arange(SIDE, dtype=np.uint32)[:, None]
    xx = np.arange(SIDE, dtype=np.uint32)[None, :]
    band = ((yy * 7 + xx * 3) % 251).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", height=SIDE, width=SIDE, count=1, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32633",
                       transform=from_origin(500000.0, 4100000.0, PIXEL, PIXEL)) as ds:
        ds.write(band, 1)
        if overviews:
            ds.build_overviews([2, 4, 8], Resampling.average)


def one(path: Path, gsd: float) -> dict:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window as RWindow

    from segpipe.core.geometry import Window
    from segpipe.io.readers import open_image

    factor = gsd / PIXEL
    times, floor_times, peak = [], [], 0
    with open_image(str(path), gsd=gsd) as r:
        level = r.info.extra.get("level", 0)
        for _ in range(3):
            tracemalloc.start()
            t0 = time.perf_counter()
            out = r.read(Window(0, 0, WINDOW, WINDOW))
            times.append(time.perf_counter() - t0)
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    with rasterio.open(path) as ds:
        src = RWindow(0, 0, WINDOW * factor, WINDOW * factor)
        for _ in range(3):
            t0 = time.perf_counter()
            ds.read(1, window=src, out_shape=(WINDOW, WINDOW), resampling=Resampling.average)
            floor_times.append(time.perf_counter() - t0)
    t, f = statistics.median(times), statistics.median(floor_times)
    return {"factor": factor, "level_read": level, "peak_over_window": round(peak / out.nbytes, 2),
            "seconds": round(t, 3), "gdal_decimated_seconds": round(f, 3), "ratio_to_gdal": round(t / f, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/segpipe-bench-resample")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    figures: dict = {"side": SIDE, "window": WINDOW}
    for name, overviews in (("no_overviews", False), ("overviews", True)):
        path = work / f"{name}.tif"
        write(path, overviews)
        figures[name] = [one(path, gsd) for gsd in (3.35, 4.0)]
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    bad = [r for rows in (figures["no_overviews"], figures["overviews"]) for r in rows if r["peak_over_window"] > 3]
    shutil.rmtree(work, ignore_errors=True)
    if bad:
        sys.exit(f"a resampled read peaked at {bad[0]['peak_over_window']}× its window (limit 3×)")


if __name__ == "__main__":
    main()
