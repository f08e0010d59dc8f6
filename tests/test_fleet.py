"""A fleet: bounded work in flight, adaptive clusters that start at 0 workers, every GPU of a host pinned."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from segpipe.cli.main import main
from tests.helpers import write_geotiff, write_png


@pytest.fixture(autouse=True)
def _log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPIPE_LOG_DIR", str(tmp_path / "logs"))


# ----------------------------------------------------------------------------- bounded work in flight

class FakeFuture:
    """What the driver loop uses of a distributed Future."""

    def __init__(self, key: str, value: dict[str, Any]) -> None:
        self.key, self.value, self.status = key, value, "pending"
        self._callbacks: list[Any] = []
        self._lock = threading.Lock()

    def add_done_callback(self, fn: Any) -> None:
        with self._lock:
            if self.status == "pending":
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, status: str = "finished") -> None:
        with self._lock:
            if self.status != "pending":
                return
            self.status = status
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def result(self) -> dict[str, Any]:
        return self.value

    def release(self) -> None:
        pass

    def cancel(self) -> None:
        self.finish("cancelled")


class FakeFleet:
    """A client of 16 workers × 12 threads (192) that runs nothing: it records every tile task submitted and
    the most pending at once, and finishes each 5 ms after its submission, from a thread of its own."""

    def __init__(self, workers: int = 16, threads: int = 12) -> None:
        self.id = "fake-fleet"
        self.scheduler = SimpleNamespace(address="fake://fleet")
        self.workers = {f"tcp://w{i}": {"nthreads": threads, "resources": {}} for i in range(workers)}
        self.queue: deque[FakeFuture] = deque()
        self.submitted = self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def scheduler_info(self, n_workers: int = -1) -> dict[str, Any]:
        return {"workers": dict(self.workers), "services": {}}

    def run(self, fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        """Each worker's answer (what the run asks them: precision, runtime) — this process's."""
        return {w: fn(*args, **kw) for w in self.workers}

    def submit(self, fn: Any, job: Any, batch: list, fill: bool, *, key: str, **kw: Any) -> FakeFuture:
        from segpipe.engine.tiled import TileStats

        chunks = sum(len(cks) for _, cks in batch)
        counters = {"chunks": chunks, "skipped": 0, "megapixels": chunks * 64 * 64 / 1e6, "stats": TileStats()}
        fut = FakeFuture(key, counters)
        fut.t0 = time.monotonic()  # type: ignore[attr-defined]
        with self._lock:
            self.queue.append(fut)
            self.submitted += 1
            self.peak = max(self.peak, sum(f.status == "pending" for f in self.queue))
        return fut

    def _run(self) -> None:
        """Finish each task 5 ms after it was submitted (its run time), in order."""
        while not self._stop.is_set():
            with self._lock:
                fut = self.queue[0] if self.queue else None
                ready = fut is not None and time.monotonic() - fut.t0 >= 0.005  # type: ignore[attr-defined]
                if ready:
                    self.queue.popleft()
            if not ready:
                self._stop.wait(0.001)
            else:
                fut.finish()  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.slow
def test_pending_tile_tasks_are_bounded_over_every_image(tmp_path, model_dir):
    """50 images of 2048² in 64-pixel chunks (256 tile tasks each, 12,800 in all) on a fleet of 192 worker
    threads: never more than 2 tasks per worker thread pending over all images together. Before, images
    in flight started at the 192 threads and each kept max(8, 4 × 192) tasks pending: all 12,800 at once."""
    from segpipe.core.settings import segment_settings
    from segpipe.engine.segment import segment_many

    src = tmp_path / "src"
    src.mkdir()
    first = write_geotiff(src / "im00.tif", np.zeros((3, 2048, 2048), np.uint8))
    for i in range(1, 50):
        shutil.copy(first, src / f"im{i:02d}.tif")
    settings = segment_settings(chunk_size=64, halo=16, device="cpu", precision="fp32", batch_size=1)
    settings = settings.model_copy(update={"output": settings.output.model_copy(update={"pyramid": False})})
    fleet = FakeFleet()
    try:
        results = segment_many([str(src)], model_dir, str(tmp_path / "out"), settings, fleet)  # type: ignore[arg-type]
    finally:
        fleet.close()
    assert [r.status for r in results] == ["done"] * 50, [r.error for r in results if r.error][:3]
    assert fleet.submitted == 50 * 256  # every tile once
    assert fleet.peak <= 2 * 192, fleet.peak


# ----------------------------------------------------------------------------- adaptive clusters

def _segment(src: Path, model: str, out: Path, *extra: str):
    return CliRunner().invoke(main, ["segment", str(src), "--model", model, "--out", str(out), "--chunk-size", "64",
                                     "--halo", "16", "--no-progress", *extra])


def test_a_run_waits_for_an_adaptive_cluster_to_start_its_first_worker(tmp_path, photo, model_dir):
    """An adaptive cluster at 0 workers (what dask-kubernetes, dask-jobqueue and Coiled start with): the
    default --precision auto waits for a worker, saying so in one line, and the queued probe makes the
    cluster start one. Before, the run exited 2: "no Dask worker is connected to resolve it"."""
    from distributed import LocalCluster

    src = tmp_path / "src"
    src.mkdir()
    write_png(src / "a.png", photo[:, :100, :120])
    with LocalCluster(n_workers=0, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        cluster.adapt(minimum=0, maximum=1, interval="200ms")
        r = _segment(src, model_dir, tmp_path / "out", "--dask-address", cluster.scheduler_address)
    assert r.exit_code == 0, r.output
    assert (f"warning: no Dask worker at {cluster.scheduler_address} yet: waiting up to 600 s for one to join "
            "(--wait-for-workers)") in r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert (tmp_path / "out" / "a.zarr" / "0" / "c").exists()


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_no_worker_joins_one_line_after_the_wait(tmp_path, photo, model_dir, precision):
    """A cluster where no worker ever comes: one line after --wait-for-workers seconds, with auto and with
    an explicit precision (which used to wait silently, forever)."""
    from distributed import LocalCluster

    src = tmp_path / "src"
    src.mkdir()
    write_png(src / "a.png", photo[:, :64, :64])
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        r = _segment(src, model_dir, tmp_path / "out", "--dask-address", cluster.scheduler_address,
                     "--precision", precision, "--wait-for-workers", "1")
    address = cluster.scheduler_address
    assert r.exit_code == 2, r.output
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {address}: no Dask worker joined in 1 s; start workers (e.g. `segpipe worker --scheduler ADDRESS` "
        "on each host) or wait longer (--wait-for-workers)"]
    assert "Traceback" not in r.output
    assert not (tmp_path / "out" / "a.zarr").exists()


# ----------------------------------------------------------------------------- precision of a mixed fleet

@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({"a": ("cuda", "bf16"), "b": ("cuda", "bf16")}, "bf16"),  # all agree
        ({"a": ("cpu", "fp32")}, "fp32"),
        ({"a": ("cuda", "bf16"), "b": ("cuda", "fp16")}, "fp16"),  # an A100 and a V100: fp16 runs on both
        ({"a": ("cuda", "bf16"), "b": ("cpu", "bf16"), "c": ("cuda", "fp16")}, "fp32"),  # a CPU has no fp16
        ({"a": ("cpu", "bf16"), "b": ("cpu", "fp32")}, "fp32"),  # AMX and an older CPU
    ],
)
def test_a_mixed_fleet_computes_in_the_precision_every_worker_runs(answers, expected):
    from segpipe.engine.cluster import common_precision

    assert common_precision(answers) == expected


def test_resolve_run_precision_of_workers_that_disagree(monkeypatch, caplog):
    """Before, a fleet whose workers resolved auto differently was refused outright."""
    from segpipe.core.settings import InferenceSettings
    from segpipe.engine import cluster

    class Fleet:
        id = "mixed-fleet"

        def run(self, fn, *args):
            return {"tcp://a": ("cuda", "bf16"), "tcp://b": ("cuda", "bf16"), "tcp://c": ("cpu", "fp32")}

    with caplog.at_level("WARNING", logger="segpipe.engine.cluster"):
        assert cluster.resolve_run_precision(Fleet(), InferenceSettings()) == "fp32"  # type: ignore[arg-type]
    assert ("--precision auto: the workers resolve it differently (bf16 on 2, fp32 on 1); computing in fp32, which "
            "all of them run (pass --precision to choose)") in caplog.messages


# ----------------------------------------------------------------------------- GPU workers must be pinned

def test_gpu_workers_that_leave_gpus_idle_are_refused():
    from segpipe.core.errors import ConfigError
    from segpipe.engine.cluster import WorkerView, check_gpu_pinning, idle_gpus

    pinned = [WorkerView("tcp://a", "h1", ("0",)), WorkerView("tcp://b", "h1", ("1",)),
              WorkerView("tcp://c", "h2", ("0",)), WorkerView("tcp://d", "h2", ("0",))]  # 2 processes on one GPU
    dask_cuda = [WorkerView("tcp://a", "h1", ("0", "1")), WorkerView("tcp://b", "h1", ("1", "0"))]  # rotated
    cpu = [WorkerView("tcp://a", "h1", ())]
    single = [WorkerView("tcp://a", "h1", ("0",))]  # one GPU host, nothing to pin
    for ok in (pinned, dask_cuda, cpu, single):
        assert idle_gpus(ok) == {}
        check_gpu_pinning(ok, "tcp://s:8786")
    unpinned = [WorkerView("tcp://a", "h1", ("0", "1", "2", "3")), WorkerView("tcp://b", "h2", ("0",))]
    assert idle_gpus(unpinned) == {"h1": ["1", "2", "3"]}
    with pytest.raises(ConfigError) as e:
        check_gpu_pinning(unpinned, "tcp://s:8786")
    assert str(e.value) == (
        "tcp://s:8786: its GPU workers are not pinned: on host h1, GPU(s) 1, 2, 3 would stay idle (1 worker(s) see "
        "several GPUs and compute on the first only); start one worker per GPU with CUDA_VISIBLE_DEVICES, e.g. "
        "`segpipe worker --scheduler ADDRESS` on each host")
    two_unpinned = [WorkerView("tcp://a", "h1", ("0", "1")), WorkerView("tcp://b", "h1", ("0", "1"))]
    assert idle_gpus(two_unpinned) == {"h1": ["1"]}


def test_pinned_workers_of_a_host():
    from segpipe.engine.cluster import WorkerSpec, pinned_workers

    assert pinned_workers(1, devices=["0", "1"], cores=16) == [
        WorkerSpec("gpu0-0", {"CUDA_VISIBLE_DEVICES": "0"}, 8, {"GPU": 1}),
        WorkerSpec("gpu1-0", {"CUDA_VISIBLE_DEVICES": "1"}, 8, {"GPU": 1})]
    assert [w.nthreads for w in pinned_workers(2, devices=["0", "1"], cores=64)] == [12] * 4
    assert [w.nthreads for w in pinned_workers(1, 5, devices=["0"], cores=64)] == [5]
    cpu = pinned_workers(2, devices=[], cores=8)
    assert [(w.name, w.resources, w.nthreads, w.env["SEGPIPE_WORKER_CORES"]) for w in cpu] == [
        ("cpu-0", None, 4, "4"), ("cpu-1", None, 4, "4")]


# ----------------------------------------------------------------------------- segpipe status

def test_status_lists_outputs_and_the_locks_held(tmp_path, photo, model_dir):
    """Complete, running (a live run holds the lock), unfinished (a failed run: no live lock), and a lock whose
    process died (stale), each with its owner and age; the chunks of the outputs are never listed."""
    import json
    import socket
    import subprocess
    import sys
    import time

    import zarr

    from segpipe.io.locks import acquire

    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for name in ("done.png", "held.png", "failed.png", "sub/dead.png"):
        write_png(src / name, photo[:, :70, :70])
    r = _segment(src, model_dir, out, "--precision", "fp32")
    assert r.exit_code == 0, r.output
    for name in ("held.zarr", "failed.zarr", "sub/dead.zarr"):
        g = zarr.open_group(str(out / name), mode="r+")
        g.attrs["segpipe"] = {**g.attrs["segpipe"], "status": "running"}
    lock = acquire(str(out / "held.zarr"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    started = time.time() - 600
    (out / "sub" / "dead.zarr.lock").write_text(json.dumps({
        "host": socket.gethostname(), "pid": gone.pid, "run_id": "deadbeef" * 4, "started": started,
        "heartbeat": started}))
    try:
        r = CliRunner().invoke(main, ["status", str(out), "--json"])
        assert r.exit_code == 0, r.output
        states = {Path(s["uri"]).relative_to(out).as_posix(): s for s in json.loads(r.stdout)}
        assert {k: s["state"] for k, s in states.items()} == {
            "done.zarr": "complete", "held.zarr": "running", "failed.zarr": "unfinished", "sub/dead.zarr": "unfinished"}
        assert states["done.zarr"]["precision"] == "fp32" and states["done.zarr"]["lock"] is None
        held = states["held.zarr"]["lock"]
        assert (held["pid"], held["run_id"], held["stale"]) == (os.getpid(), lock.info.run_id, False)
        dead = states["sub/dead.zarr"]["lock"]
        assert dead["stale"] and dead["age_s"] >= 600 and dead["pid"] == gone.pid
        r = CliRunner().invoke(main, ["status", str(out)])
        assert r.exit_code == 0, r.output
        assert r.stdout.strip().splitlines()[-1] == "1 complete, 1 running, 2 unfinished; 2 lock(s) held"
        from segpipe.io.status import output_states

        [dead_state] = [s for s in output_states(str(out)) if s.uri.endswith("dead.zarr")]
        assert dead_state.lock_line(started + 600) == (f"host {socket.gethostname()}, pid {gone.pid}, run deadbeef, "
                                                       "held 10 min, heartbeat 10 min ago (stale)")
    finally:
        lock.release()
    r = CliRunner().invoke(main, ["status", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {tmp_path / 'nowhere'}: does not exist"
