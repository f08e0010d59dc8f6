"""What the per-chunk uncertainty costs: ``segment`` with it and without it, side by side, same run.

    python benchmarks/uncertainty.py --megapixels 8 --precision fp32 --repeats 3

One process, the embedded Dask cluster (as ``segpipe segment``), one Unet-resnet18 with competing
classes on a tiled photo GeoTIFF. Runs alternate (with, without, with, …) so a load change on a shared
machine hits both; "without" replaces the tile tasks' engine call by one with ``uncertainty=False``
(the driver still writes the all-NaN array). Also times the predictor alone on one default tile
(1024² core + 64 halo): the forward with and without the entropy map, the best of ``--tile-repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megapixels", type=float, default=8.0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile-repeats", type=int, default=8, help="alternating timings of the predictor alone")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from segpipe.core.settings import InferenceSettings, segment_settings
    from segpipe.engine import tasks
    from segpipe.engine.cluster import dask_client
    from segpipe.engine.job import check_model
    from segpipe.engine.predictor import Predictor
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images
    from segpipe.models.artifact import load_artifact
    from tests.helpers import competing_classes_model, sample_photo, write_geotiff

    side = int((a.megapixels * 1e6) ** 0.5)
    tmp = Path(tempfile.mkdtemp(prefix="segpipe-unc-"))
    tif = write_geotiff(tmp / "scene.tif", sample_photo(side, side))
    model = str(competing_classes_model(tmp / "model", sample_photo(512, 512)))
    settings = segment_settings(device="cpu", precision=a.precision)
    ref, _ = check_model(model)
    image = list_images(str(tif))[0]
    original = tasks.infer_tiles

    def without(*args, **kwargs):  # the same engine call, no entropy map
        return original(*args, **{**kwargs, "uncertainty": False})

    seconds: dict[str, list[float]] = {"with": [], "without": []}
    with dask_client() as client:
        if a.repeats:
            segment_image(image, ref, str(tmp / "warm"), settings, client)  # model load, first-call costs
        for i in range(a.repeats):
            for kind in ("with", "without"):
                tasks.infer_tiles = original if kind == "with" else without  # type: ignore[assignment]
                r = segment_image(image, ref, str(tmp / f"{kind}{i}"), settings, client)
                assert r.status == "done", r.error
                seconds[kind].append(r.seconds)
    tasks.infer_tiles = original

    pred = Predictor(load_artifact(model), InferenceSettings(device="cpu", precision=a.precision))
    window = sample_photo(1152, 1152)[None]
    forward: dict[str, list[float]] = {"with": [], "without": []}
    cpu: dict[str, list[float]] = {"with": [], "without": []}  # CPU seconds of this process: less load-sensitive
    for _ in range(a.tile_repeats):
        for kind in ("with", "without"):
            t0, c0 = time.perf_counter(), time.process_time()
            pred._predict(window, None, (64, 1024), kind == "with")
            forward[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
    report: dict = {"megapixels": side * side / 1e6, "precision": pred.precision, "repeats": a.repeats,
                    "tile_forward_best": {k: min(v) for k, v in forward.items()},
                    "tile_forward_median": {k: statistics.median(v) for k, v in forward.items()},
                    "tile_cpu_median": {k: statistics.median(v) for k, v in cpu.items()}}
    for name, m in (("tile_overhead", report["tile_forward_best"]), ("tile_cpu_overhead", report["tile_cpu_median"])):
        report[name] = m["with"] / m["without"] - 1
    if a.repeats:
        m = {k: statistics.median(v) for k, v in seconds.items()}
        report.update(segment_seconds=seconds, segment_median=m, segment_overhead=m["with"] / m["without"] - 1)
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
