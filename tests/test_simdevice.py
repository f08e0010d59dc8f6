"""The simulated device of benchmarks/_sim_device.py, and outputs that do not depend on how tiles are grouped."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import sample_photo, write_geotiff

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _sim_device as sim


class FakeClock:
    """A clock that only moves when the device sleeps or the test says so: the schedule is exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_known_schedule_busy_idle_accounting_is_exact():
    clock = FakeClock()
    dev = sim.SimDevice(1.0, clock=clock.now, sleep=clock.sleep)  # 1 MP/s
    assert dev.run(500_000) == 0.5  # busy 0 → 0.5
    clock.t += 0.25  # idle 0.5 → 0.75
    dev.run(1_000_000)  # busy 0.75 → 1.75
    clock.t += 1.0  # idle 1.75 → 2.75
    dev.run(250_000)  # busy 2.75 → 3.0
    assert [iv[:2] for iv in dev.intervals] == [(0.0, 0.5), (0.75, 1.75), (2.75, 3.0)]
    samples = [(0.6, ["write"]), (2.0, ["read", "write"]), (2.5, ["read"]), (1.0, ["wait-device"])]
    u = sim.utilisation({"gpu0": dev.intervals}, -1.0, 4.0, samples)
    assert (u.forwards, u.pixels, u.busy_s, u.whole_s, u.steady_s) == (3, 1_750_000, 1.75, 5.0, 3.0)
    assert u.whole == 1.75 / 5.0 and u.steady == 1.75 / 3.0
    assert [(g["start_s"], g["seconds"]) for g in u.gaps] == [(2.75, 1.0), (1.5, 0.25)]
    assert u.gaps[0]["host"] == {"read": 0.67, "write": 0.33} and u.gaps[1]["host"] == {"write": 1.0}
    assert sim.idle_gaps([(0.0, 0.5), (0.75, 1.75)], -1.0, 2.0) == [(-1.0, 0.0), (0.5, 0.75), (1.75, 2.0)]  # ties in time order
    assert sim.busy_within([(0.0, 2.0), (1.0, 3.0)], 0.5, 2.5) == 2.0
    assert sim.overlapping([(0.0, 1.0), (1.0, 2.0)]) == []
    assert sim.overlapping([(0.0, 1.0), (0.5, 2.0)]) == [((0.0, 1.0), (0.5, 2.0))]


def test_trace_files_hold_the_same_intervals(tmp_path):
    clock = FakeClock()
    dev = sim.SimDevice(2.0, trace=str(tmp_path / "busy-dev0@1.tsv"), clock=clock.now, sleep=clock.sleep)
    for px in (1_000_000, 3_000_000):
        dev.run(px)
        clock.t += 0.5
    busy = sim.read_busy(tmp_path)
    assert list(busy) == ["busy-dev0"] and busy["busy-dev0"] == [(0.0, 0.5, 1_000_000), (1.0, 2.5, 3_000_000)]


def _forwards(lock: str | None, trace: str, barrier, n: int) -> None:
    dev = sim.SimDevice(10.0, lock_path=lock, trace=trace)
    barrier.wait()
    for _ in range(n):
        dev.run(200_000)  # 20 ms each


@pytest.mark.parametrize("shared", [True, False])
def test_two_processes_on_one_device_never_overlap(tmp_path, shared):
    """With the shared lock the forwards of two processes interleave; without it (the control) they overlap."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    lock = str(tmp_path / "gpu0.lock") if shared else None
    procs = [ctx.Process(target=_forwards, args=(lock, str(tmp_path / f"busy-gpu0@{i}.tsv"), barrier, 8))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    intervals = [(a, b) for a, b, _ in sim.read_busy(tmp_path)["busy-gpu0"]]
    assert len(intervals) == 16
    assert (sim.overlapping(intervals) == []) is shared


def _chunks(zarr_path: Path) -> dict[str, bytes]:
    """Every level-0 chunk's decoded bytes, by chunk file name."""
    import zarr

    arr = zarr.open_array(str(zarr_path), path="0", mode="r")
    cy, cx = arr.chunks
    return {f"{y}.{x}": arr[y * cy:(y + 1) * cy, x * cx:(x + 1) * cx].tobytes()
            for y in range(-(-arr.shape[0] // cy)) for x in range(-(-arr.shape[1] // cx))}


@pytest.fixture(scope="module")
def sim_inputs(tmp_path_factory):
    from segpipe.models.artifact import create_artifact

    d = tmp_path_factory.mktemp("sim")
    scene = write_geotiff(d / "scene.tif", sample_photo(720, 1100))
    model = d / "model"
    create_artifact(str(model), "Unet", "resnet18", ["a", "b", "c", "d", "e"], seed=3)
    return scene, model


def test_outputs_identical_for_every_task_size(sim_inputs, tmp_path, monkeypatch, client):
    """Tiles grouped 1, 2, 3 or up to the cap per task (--batch-size, --task-seconds): the same chunks,
    each written exactly once."""
    from segpipe.core.settings import segment_settings
    from segpipe.engine import segment, tasks

    scene, model = sim_inputs
    dev = sim.SimDevice(50.0)
    for obj, name, value in sim.sim_patches(dev, gpu=False):
        monkeypatch.setattr(obj, name, value)
    writes: list[tuple[int, int]] = []
    real_write = tasks.write_chunk

    def counting(target, chunk, labels, probs):
        writes.append(chunk.key)
        return real_write(target, chunk, labels, probs)

    monkeypatch.setattr(tasks, "write_chunk", counting)
    outputs, sizes = {}, {}
    real_batched = segment.batched

    def recording(keys, size):
        for b in real_batched(keys, size):
            sizes.setdefault(name, []).append(len(b))
            yield b

    monkeypatch.setattr(segment, "batched", recording)
    for name, kw in {"one": {}, "batch3": {"batch_size": 3}, "grow": {"task_seconds": 1000.0},
                     "batch2-grow": {"batch_size": 2, "task_seconds": 1000.0}}.items():
        writes.clear()
        settings = segment_settings(chunk_size=128, halo=32, tile_size=256, device="cpu", precision="fp32", **kw)
        [r] = segment.segment_many([str(scene)], str(model), str(tmp_path / name), settings, client)
        assert r.status == "done", r.error
        assert sorted(writes) == sorted(set(writes)) and len(writes) == r.chunks  # each chunk once
        # what sizes the images in flight: device time of its 15 windows of 320² at 50 MP/s (≥ the sleeps),
        # and the per-image work outside the tile tasks
        assert 15 * 320 * 320 / 50e6 <= r.device_seconds < 10 and 0 < r.host_seconds < r.seconds
        outputs[name] = _chunks(tmp_path / name / "scene.zarr")
    # 3 × 5 tiles; the cap of a growing task is two tasks per worker thread (3 threads: 15 / 6 → 3)
    assert sizes["one"] == [1] * 15 and sizes["batch3"] == [3] * 5
    assert max(sizes["grow"]) == 3 and max(sizes["batch2-grow"]) == 3 and sum(sizes["grow"]) == 15
    ref = outputs["one"]
    assert len(set(ref.values())) > 1  # the labels follow the image: a misplaced chunk would show
    for name, out in outputs.items():
        assert out == ref, name


def test_procs_per_device_pins_worker_processes_to_their_device(sim_inputs, tmp_path):
    """--procs-per-device 2 on two simulated GPUs (the real CLI): four worker processes, two per GPU, each
    seeing only its GPU (the lock file it takes is named after CUDA_VISIBLE_DEVICES); every process runs
    forwards, never two at once on one device, and the output equals one process's chunk for chunk.
    Two GPUs with the default --procs-per-device 1: one pinned process per GPU, and both GPUs compute
    (before, one worker held GPU=2 and computed on cuda:0 only)."""
    scene, model = sim_inputs
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent), "SEGPIPE_SIM_RATE": "20"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    outs = {}
    for name, extra, gpus in (("one", [], "1"), ("pinned", ["--procs-per-device", "2"], "2"), ("every", [], "2")):
        trace = tmp_path / f"trace-{name}"
        cmd = [sys.executable, str(BENCH / "_sim_device.py"), "segment", str(scene), "--model", str(model),
               "--out", str(tmp_path / name), "--chunk-size", "128", "--halo", "32", "--tile-size", "256",
               "--batch-size", "1", "--no-progress", *extra]  # 15 tasks of one tile: every process gets some
        run_env = {**env, "SEGPIPE_SIM_TRACE": str(trace), "SEGPIPE_SIM_GPUS": gpus,
                   "SEGPIPE_SIM_LOCK": str(tmp_path / f"{name}-gpu{{device}}.lock")}
        p = subprocess.run(cmd, check=False, env=run_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        outs[name] = _chunks(tmp_path / name / "scene.zarr")
        if name == "pinned":
            busy = sim.read_busy(trace)
            assert sorted(busy) == ["busy-pinned-gpu0", "busy-pinned-gpu1"]
            for dev in ("gpu0", "gpu1"):
                used = [f for f in trace.glob(f"busy-pinned-{dev}@*.tsv") if f.read_text().strip()]
                assert len(used) == 2, (dev, used)  # both of the device's processes ran forwards on it
                assert sim.overlapping([(a, b) for a, b, _ in busy[f"busy-pinned-{dev}"]]) == []
            pids = {f.stem.split("@")[1] for f in trace.glob("busy-pinned-*@*.tsv") if f.read_text().strip()}
            assert len(pids) == 4  # four distinct worker processes
        if name == "every":  # two GPUs, one process each (--procs-per-device 1): both GPUs compute
            busy = sim.read_busy(trace)
            assert sorted(busy) == ["busy-every-gpu0", "busy-every-gpu1"], sorted(busy)
            assert all(busy[d] for d in busy)
    assert len(set(outs["one"].values())) > 1
    assert outs["pinned"] == outs["one"]


@pytest.mark.e2e
@pytest.mark.slow
def test_segpipe_worker_pins_every_gpu_and_unpinned_workers_are_refused(sim_inputs, tmp_path):
    """On a real `dask scheduler`: a plain `dask worker --resources GPU=2` on a host of two (simulated) GPUs
    would compute on the first only, and the run refuses it in one line; `segpipe worker --scheduler ADDRESS`
    starts one pinned process per GPU (GPU=1 each), the run uses both GPUs, and SIGTERM stops the workers."""
    import signal

    from distributed import Client

    from tests.services import BIN, free_port, port_open, start, stop, wait_for

    scene, model = sim_inputs
    trace = tmp_path / "trace"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent), "SEGPIPE_SIM_RATE": "20", "SEGPIPE_SIM_GPUS": "2",
           "SEGPIPE_SIM_TRACE": str(trace), "SEGPIPE_SIM_LOCK": str(tmp_path / "gpu{device}.lock"),
           "SEGPIPE_LOG_DIR": str(tmp_path / "logs")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                   env, tmp_path / "scheduler.log")]
    segment = [sys.executable, "-m", "segpipe.cli.main", "segment", str(scene), "--model", str(model), "--out",
               str(tmp_path / "out"), "--chunk-size", "128", "--halo", "32", "--tile-size", "256", "--batch-size", "1",
               "--no-progress", "--dask-address", address]
    try:
        wait_for(lambda: port_open(port), 60, "dask scheduler", procs[0])
        with Client(address, timeout="30s") as c:
            plain = start([str(BIN / "dask"), "worker", address, "--nthreads", "2", "--resources", "GPU=2",
                           "--preload", str(BENCH / "_sim_device.py"), "--no-dashboard", "--host", "127.0.0.1"],
                          env, tmp_path / "plain.log")
            procs.append(plain)
            c.wait_for_workers(1, timeout=120)
            refused = subprocess.run(segment, env=env, capture_output=True, text=True, timeout=300)
            assert refused.returncode == 2, refused.stderr[-2000:]
            errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "its GPU workers are not pinned" in errors[0], refused.stderr[-2000:]
            assert "GPU(s) 1 would stay idle" in errors[0] and "segpipe worker --scheduler" in errors[0]
            stop(plain, signal.SIGTERM)
            wait_for(lambda: not c.scheduler_info()["workers"], 60, "the plain worker gone")

            worker = start([sys.executable, str(BENCH / "_sim_device.py"), "worker", "--scheduler", address], env,
                           tmp_path / "worker.log")
            procs.append(worker)
            c.wait_for_workers(2, timeout=120)
            info = c.scheduler_info()["workers"].values()
            assert sorted(w["id"].rsplit("-", 2)[-2] for w in info) == ["gpu0", "gpu1"]
            assert [w["resources"] for w in info] == [{"GPU": 1}] * 2
            done = subprocess.run(segment, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            busy = sim.read_busy(trace)
            assert sorted(busy) == ["busy-gpu0", "busy-gpu1"] and all(busy.values()), sorted(busy)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
            wait_for(lambda: not c.scheduler_info()["workers"], 60, "segpipe worker's processes gone")
    finally:
        for p in reversed(procs):
            stop(p, signal.SIGTERM)
