"""Where a small image's time goes: the per-image path of ``segment_many`` profiled stage by stage, against
one image of the same pixels.

Runs a folder of PNG chips and the GeoTIFF mosaic of the same pixels (``many.py``'s inputs) through the
real ``segment_many`` in one process (embedded threaded cluster, warm: the model is checked once, as in
one CLI run), runs interleaved, with every per-image step wrapped in a timer that records the calling
thread's CPU time (header, output inspection, lock, output creation, uncertainty, the driver loop,
finalize; inside the tile tasks their reads, writes and batches; the forward on the compute thread), and
the CPU of every thread of the process by name from /proc (Dask's event loop, its worker threads, the
compute thread, native threads: GDAL's decoders, OpenMP). Medians per image (chips) and per tile (mosaic):

    python benchmarks/per_image.py --forward free --inputs chips,mosaic --variants derived [--reps 3] [--json OUT]
    python benchmarks/per_image.py --chips 300 --rate 30 --variants derived,fixed4   # simulated device (default)

``--forward free``: logits = the normalised input (``_free_segment.py``); ``sim``: the simulated device of
``_sim_device.py`` on its GPU path. ``--variants``: ``derived`` (the default width of images in flight) or
``fixedN`` (N images in flight). The engine's libraries are loaded as the CLI loads them
(``segpipe.cli.common.preload``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
_lock = threading.Lock()


def timed(name: str, fn: Any) -> Any:
    """``fn`` with its wall and thread CPU time added to ``_totals[name]`` on every call."""

    def wrapper(*a: Any, **k: Any) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            w, c = time.perf_counter() - w0, time.thread_time() - c0
            with _lock:
                t = _totals[name]
                t[0] += w
                t[1] += c
                t[2] += 1

    return wrapper


STAGES = {
    "segpipe.engine.segment": ["segment_image", "shared_reader", "_read_header", "inspect_output", "acquire_lock",
                               "provenance", "prepare_output", "ChunkUncertainty", "run_tile_tasks", "build_output_pyramids",
                               "finalize"],
    "segpipe.engine.tasks": ["_run_tiles", "write_chunk"],
    "segpipe.engine.tiled": ["_predict_batch"],
}


def install_timers() -> None:
    from segpipe.engine import predictor
    from segpipe.io import locks, uncertainty
    from segpipe.io.readers import raster

    for module, names in STAGES.items():
        mod = importlib.import_module(module)
        for name in names:
            if hasattr(mod, name):  # (older checkouts lack some)
                setattr(mod, name, timed(f"{module.rsplit('.', 1)[1]}.{name}", getattr(mod, name)))
    locks.OutputLock.release = timed("segment.lock.release", locks.OutputLock.release)
    uncertainty.ChunkUncertainty.flush = timed("segment.uncertainty.flush", uncertainty.ChunkUncertainty.flush)
    raster.RasterioReader.read = timed("tasks.reader.read", raster.RasterioReader.read)
    predictor.Predictor._predict = timed("compute._predict", predictor.Predictor._predict)


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by name (numbers stripped; native threads as "native")."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = re.sub(r"(-\d+)+$|_\d+$", "", names.get(int(tid), "native"))
        out["thread:" + name] += (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", type=int, default=600)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--forward", choices=("free", "sim"), default="sim")
    ap.add_argument("--rate", type=float, default=30.0, help="Simulated device, MP/s of windows (--forward sim).")
    ap.add_argument("--inputs", default="chips")
    ap.add_argument("--variants", default="derived,fixed4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:  # the engine's libraries loaded as the CLI loads them (absent from older checkouts)
        from segpipe.cli.common import preload
    except ImportError:
        pass
    else:
        preload()

    from many import make_inputs

    from segpipe.core.settings import segment_settings
    from segpipe.engine import segment
    from segpipe.engine.cluster import dask_client
    from segpipe.models.artifact import create_artifact

    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-per-image-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "chips").exists():
        make_inputs(work, args.chips, args.side)
    model = work / "model"
    if not model.exists():
        create_artifact(str(model), "Unet", "resnet18", ["a", "b", "c"], seed=0)
    if args.forward == "free":
        import _free_segment

        from segpipe.models import artifact

        artifact.Artifact.network = _free_segment._free  # type: ignore[method-assign]
    else:
        import _sim_device as sim

        for obj, name, value in sim.sim_patches(sim.SimDevice(args.rate)):
            setattr(obj, name, value)
    install_timers()
    checked: dict[str, Any] = {}
    check = segment.check_model
    segment.check_model = lambda m: checked.setdefault(m, check(m))  # once per process, as in one CLI run
    c = args.side
    settings = segment_settings(chunk_size=c, tile_size=c, halo=32, precision="fp32" if args.forward == "sim" else "auto")
    sources = {"chips": work / "chips", "mosaic": work / "mosaic" / "mosaic.tif"}
    n = len(list((work / "chips").glob("*.png")))
    runs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with dask_client() as client:
        segment.segment_many([str(sorted((work / "chips").glob("*.png"))[0])], str(model), str(work / "warm"),
                             settings, client)
        for _ in range(args.reps):
            for variant in args.variants.split(","):
                width = int(variant[len("fixed"):]) if variant.startswith("fixed") else None
                for name in args.inputs.split(","):
                    out = work / f"out-{name}-{variant}"
                    shutil.rmtree(out, ignore_errors=True)
                    _totals.clear()
                    threads0 = thread_cpu()
                    t0, c0 = time.perf_counter(), time.process_time()
                    results = segment.segment_many([str(sources[name])], str(model), str(out), settings, client,
                                                   max_concurrent_images=width)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    assert all(r.status == "done" for r in results), [r.error for r in results if r.error][:3]
                    threads1 = thread_cpu()
                    row = runs[f"{name}/{variant}"]
                    row["wall"].append(wall)
                    row["cpu"].append(cpu)
                    for k, v in _totals.items():
                        row[k].append(v[1])
                    for k in set(threads0) | set(threads1):
                        row[k].append(threads1.get(k, 0.0) - threads0.get(k, 0.0))
                    print(json.dumps({"input": name, "variant": variant, "wall_s": round(wall, 2),
                                      "cpu_s": round(cpu, 2)}), file=sys.stderr)
    report: dict[str, Any] = {"chips": n, "side": c, "forward": args.forward, "reps": args.reps,
                              "rate_mp_s": args.rate if args.forward == "sim" else None,
                              "load_average": os.getloadavg(), "ms_per_image": {}}
    for key, row in runs.items():  # per chip, or per mosaic tile (the same pixels: one tile per chip)
        report["ms_per_image"][key] = {k: round(1e3 * statistics.median(v) / n, 3)
                                       for k, v in sorted(row.items(), key=lambda kv: -statistics.median(kv[1]))}
    for variant in args.variants.split(","):
        chips, mosaic = runs.get(f"chips/{variant}"), runs.get(f"mosaic/{variant}")
        if chips and mosaic:  # per pair of runs, then the median
            report.setdefault("toll", {})[variant] = {
                "per_image_cpu_ms": round(statistics.median(1e3 * (a - b) / n for a, b in zip(chips["cpu"], mosaic["cpu"])), 2),
                "ratio_cpu": round(statistics.median(b / a for a, b in zip(chips["cpu"], mosaic["cpu"])), 3),
                "ratio_wall": round(statistics.median(b / a for a, b in zip(chips["wall"], mosaic["wall"])), 3)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
