"""Where a small image's time goes: the per-image path of ``segment_many`` profiled stage by stage.

Runs a folder of PNG chips through the real ``segment_many`` in one process (embedded threaded
cluster, the simulated device of ``_sim_device.py`` on its GPU path, so the forward costs the host
nothing), with every per-image step wrapped in a timer that records its wall time and the calling
thread's CPU time: header, output inspection, lock, output creation and provenance, the tile task
round trip, pyramid, finalize, lock release, and inside the tile task its reads, writes and forward.
Variants run back to back in the same process (warm imports, same cluster), so compare them side by side:

    python benchmarks/per_image.py --chips 300 --rate 30 --variants derived,fixed4 [--json OUT]

``fixed4`` is the previous policy (4 images in flight); ``derived`` the default (``ImagesInFlight``).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    "segpipe.engine.segment": ["resolve_run_precision", "recent_worker_capacity", "_read_header", "inspect_output",
                               "plan_output", "acquire_lock", "output_arrays_exist", "provenance", "prepare_output",
                               "_run_tasks", "_build_pyramid", "finalize"],
    "segpipe.engine.tasks": ["_run_tiles", "write_chunk", "shared_reader", "infer_tiles"],
    "segpipe.engine.predictor": ["cached_predictor"],
    "segpipe.engine.tiled": ["_predict_batch"],
}


def install_timers() -> None:
    import importlib

    from segpipe.io import locks

    for module, names in STAGES.items():
        mod = importlib.import_module(module)
        for name in names:
            setattr(mod, name, timed(f"{module.rsplit('.', 1)[1]}.{name}", getattr(mod, name)))
    locks.OutputLock.release = timed("segment.lock.release", locks.OutputLock.release)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", type=int, default=300)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--rate", type=float, default=30.0, help="Simulated device, MP/s of windows.")
    ap.add_argument("--variants", default="derived,fixed4")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import _sim_device as sim
    from many import make_inputs

    from segpipe.core.settings import segment_settings
    from segpipe.engine.cluster import dask_client
    from segpipe.engine.segment import segment_many
    from segpipe.models.artifact import create_artifact

    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-per-image-"))
    work.mkdir(parents=True, exist_ok=True)
    chips = work / "chips"
    if not chips.exists():
        make_inputs(work, args.chips, args.side)
    model = work / "model"
    if not model.exists():
        create_artifact(str(model), "Unet", "resnet18", ["a", "b", "c", "d"], seed=0)
    for obj, name, value in sim.sim_patches(sim.SimDevice(args.rate)):
        setattr(obj, name, value)
    install_timers()
    c = args.side
    settings = segment_settings(chunk_size=c, tile_size=c, halo=32, precision="fp32")
    n = len(list(chips.glob("*.png")))
    report: dict[str, Any] = {"chips": n, "side": c, "rate_mp_s": args.rate, "variants": {}}
    with dask_client() as client:
        segment_many([str(sorted(chips.glob("*.png"))[0])], str(model), str(work / "warm"), settings, client)
        for variant in args.variants.split(","):
            out = work / f"out-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            _totals.clear()
            width = int(variant[len("fixed"):]) if variant.startswith("fixed") else None
            t0 = time.perf_counter()
            results = segment_many([str(chips)], str(model), str(out), settings, client, max_concurrent_images=width)
            wall = time.perf_counter() - t0
            assert all(r.status == "done" for r in results), [r.error for r in results if r.error][:3]
            stages = {k: {"wall_ms_per_image": round(v[0] / n * 1e3, 2), "cpu_ms_per_image": round(v[1] / n * 1e3, 2),
                          "calls_per_image": round(v[2] / n, 2)} for k, v in sorted(_totals.items())}
            report["variants"][variant] = {
                "seconds": round(wall, 2), "chips_per_s": round(n / wall, 1),
                "host_ms_per_image": round(sum(r.host_seconds for r in results) / n * 1e3, 2),
                "device_ms_per_image": round(sum(r.device_seconds for r in results) / n * 1e3, 2),
                "stages": stages}
            print(json.dumps({variant: {k: v for k, v in report["variants"][variant].items() if k != "stages"}}),
                  file=sys.stderr)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
