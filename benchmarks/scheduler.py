"""One Dask scheduler at fleet scale: tasks/s dispatched and the scheduler's CPU for N single-thread workers.

Starts a real ``dask scheduler`` and N ``dask worker`` processes (1 thread, small memory, no nanny) on
127.0.0.1, and drives them the way segpipe's driver does (``engine.tasks.run_tile_tasks``: a bounded
number of tile tasks in flight, one submitted per completion, each task carrying a pickled image
job and a few (tile, chunks) keys, returning small counters). Each task holds a simulated device
for ``task megapixels / device rate`` seconds and does no I/O. Workers are added step by step
(N = 2, 4, …); at each N the script reports tasks/s completed, the demand (N / task seconds), and
the CPU share of the scheduler process (psutil on its PID; 1.0 = one core), of the driver and of
all workers together, plus the scheduler's CPU seconds per task — the figure that gives the fleet
size one scheduler can feed (docs/benchmarks.md).

    python benchmarks/scheduler.py --workers 2,4,8,16,32 --task-megapixels 6.5 --device-rate 250 --seconds 6
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

DASK = str(Path(sys.executable).with_name("dask"))


def tile_task(job: bytes, work: list, seconds: float) -> dict:
    """A tile task of today's shape on a simulated device: hold it ``seconds``, return the counters."""
    time.sleep(seconds)
    chunks = sum(len(c) for _, c in work)
    return {"chunks": chunks, "skipped": 0, "megapixels": chunks * 0.262144, "stats": None}


def job_bytes() -> bytes:
    """A real image job (ChunkJob of a 50,000² GeoTIFF on a bucket), pickled: what every task carries."""
    from segpipe.core.settings import SegmentSettings
    from segpipe.engine.job import ChunkJob, ModelRef
    from segpipe.io.output import OutputTarget
    from segpipe.models.artifact import ModelSpec

    s = SegmentSettings()
    spec = ModelSpec(architecture="Unet", encoder="resnet18", in_channels=3, classes=["a", "b", "c", "d"],
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], input_scale=255.0)
    target = OutputTarget("s3://bucket/out/tiles/scene-000123.zarr", 50_000, 50_000, 512, 4, False, uuid.uuid4().hex)
    job = ChunkJob("s3://bucket/in/tiles/scene-000123.tif", s.read, ModelRef("s3://bucket/models/v7", "0" * 64, spec),
                   s.inference, s.tiling, target, None, "f" * 64, None)
    return pickle.dumps(job)


def tile_work(i: int, tiles: int) -> list:
    """``tiles`` (tile key, 4 chunk keys) entries, like a GPU task of 1,024 tiles."""
    return [((i, t), [(2 * i, 2 * t), (2 * i, 2 * t + 1), (2 * i + 1, 2 * t), (2 * i + 1, 2 * t + 1)])
            for t in range(tiles)]


def drive(client, job: bytes, tiles: int, seconds_per_task: float, threads: int, duration: float) -> dict:
    """segpipe's driver loop for ``duration`` seconds: ≤ 4 × threads in flight, one submitted per completion."""
    from distributed import as_completed

    in_flight = max(8, 4 * threads)
    n, done = 0, 0

    def submit() -> object:
        nonlocal n
        n += 1
        return client.submit(tile_task, job, tile_work(n, tiles), seconds_per_task, pure=False,
                             key=f"segpipe-tiles-bench-{n}-{uuid.uuid4().hex[:6]}")

    queue = as_completed([submit() for _ in range(in_flight)])
    t0 = time.perf_counter()
    stop = t0 + duration
    for fut in queue:
        fut.result()
        fut.release()
        done += 1
        if time.perf_counter() < stop:
            queue.add(submit())
    return {"tasks": done, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="2,4,8,16,32")
    ap.add_argument("--task-megapixels", type=float, default=6.5, help="Device pixels per task (today's GPU task).")
    ap.add_argument("--device-rate", type=float, default=250.0, help="Device MP/s (H100 bf16 Unet-resnet18 ≈ 250).")
    ap.add_argument("--tiles-per-task", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0, help="Measured span at each N.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from distributed import Client

    sizes = [int(x) for x in args.workers.split(",")]
    seconds_per_task = args.task_megapixels / args.device_rate
    work = Path(tempfile.mkdtemp(prefix="segpipe-sched-"))
    sched_file = work / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs: list[subprocess.Popen] = []
    results: dict = {"task_megapixels": args.task_megapixels, "device_rate_mp_s": args.device_rate,
                     "task_seconds": round(seconds_per_task, 4), "cores": os.cpu_count(), "runs": []}
    log = open(work / "dask.log", "w")  # noqa: SIM115 - closed in finally
    try:
        sched = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(sched_file)], stdout=log, stderr=log, env=env)
        procs.append(sched)
        while not sched_file.exists():
            time.sleep(0.1)
        time.sleep(0.3)
        address = json.loads(sched_file.read_text())["address"]
        client = Client(address, timeout="30s")
        job = job_bytes()
        results["job_bytes"] = len(job)
        sp, me = psutil.Process(sched.pid), psutil.Process()
        workers: list[psutil.Process] = []
        for n in sizes:
            while len(workers) < n:
                p = subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--memory-limit", "256MiB",
                                      "--no-nanny", "--no-dashboard", "--name", f"w{len(workers)}"],
                                     stdout=log, stderr=log, env=env)
                procs.append(p)
                workers.append(psutil.Process(p.pid))
            client.wait_for_workers(n, timeout=300)
            drive(client, job, args.tiles_per_task, seconds_per_task, n, 1.0)  # warm-up (imports, first tasks)

            def cpu(ps: list[psutil.Process]) -> float:
                return sum(sum(p.cpu_times()[:2]) for p in ps)

            c0 = (cpu([sp]), cpu([me]), cpu(workers))
            r = drive(client, job, args.tiles_per_task, seconds_per_task, n, args.seconds)
            c1 = (cpu([sp]), cpu([me]), cpu(workers))
            wall = r["seconds"]
            row = {"workers": n, "tasks": r["tasks"], "seconds": round(wall, 2),
                   "tasks_per_s": round(r["tasks"] / wall, 1),
                   "demand_tasks_per_s": round(n / seconds_per_task, 1),
                   "scheduler_cpu_share": round((c1[0] - c0[0]) / wall, 3),
                   "driver_cpu_share": round((c1[1] - c0[1]) / wall, 3),
                   "workers_cpu_share": round((c1[2] - c0[2]) / wall, 3),
                   "scheduler_cpu_ms_per_task": round(1000 * (c1[0] - c0[0]) / max(1, r["tasks"]), 3),
                   "driver_cpu_ms_per_task": round(1000 * (c1[1] - c0[1]) / max(1, r["tasks"]), 3)}
            row["fraction_of_demand"] = round(row["tasks_per_s"] / row["demand_tasks_per_s"], 3)
            results["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
        client.close()
    finally:
        for p in reversed(procs):  # workers first, the scheduler last; each by its own PID
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
