"""segpipe.engine.cluster: how the embedded cluster is sized, and what worker_capacity reports."""

from __future__ import annotations

import pytest

from segpipe.core.settings import ClusterSettings
from segpipe.engine import cluster


@pytest.mark.parametrize(
    ("gpus", "cores", "threads"),
    [
        (0, 1, 3),  # a CPU: one thread computes, two read and write, whatever the core count
        (0, 2, 3),
        (0, 64, 3),
        (1, 1, 3),  # with a GPU: as many threads as cores, at least 3 ...
        (1, 2, 3),
        (1, 8, 8),
        (1, 12, 12),
        (1, 64, 12),  # ... and at most 12
        (2, 2, 3),
        (2, 6, 6),
        (2, 64, 12),
    ],
)
def test_default_threads(monkeypatch, gpus, cores, threads):
    monkeypatch.setattr("segpipe.engine.predictor.available_cores", lambda: cores)
    assert cluster.default_threads(gpus) == threads


def test_gpu_count_is_torchs(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert cluster._gpu_count() == 0  # a count without a usable CUDA runtime is no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cluster._gpu_count() == 3


@pytest.mark.parametrize(
    ("gpus", "settings", "workers", "threads"),
    [
        (0, ClusterSettings(), 1, 3),  # the default: one worker of three threads
        (1, ClusterSettings(), 1, 8),  # one GPU: one worker, threads by default_threads (8 cores here)
        (0, ClusterSettings(n_workers=2, threads_per_worker=2), 2, 2),
        (1, ClusterSettings(threads_per_worker=4), 1, 4),
    ],
)
def test_embedded_cluster_sizing(monkeypatch, gpus, settings, workers, threads):
    """The embedded (threaded) cluster for 0 and 1 GPU, seen through worker_capacity."""
    monkeypatch.setattr(cluster, "_gpu_count", lambda: gpus)
    monkeypatch.setattr("segpipe.engine.predictor.available_cores", lambda: 8)
    with cluster.dask_client(settings) as client:
        info = client.scheduler_info()["workers"]
        assert len(info) == workers
        assert sorted(w["nthreads"] for w in info.values()) == [threads] * workers
        # a GPU resource per visible device on the worker: GPU tasks request one each
        assert [w.get("resources", {}).get("GPU") for w in info.values()] == [gpus or None] * workers
        assert cluster.worker_capacity(client) == (gpus > 0, workers * threads)
        assert cluster.has_gpu_workers(client) is (gpus > 0)
        assert cluster.is_in_process(client)
        assert cluster.client_for(client.scheduler.address) is client


@pytest.mark.parametrize(("settings", "threads"), [(ClusterSettings(), 4), (ClusterSettings(threads_per_worker=3), 3)])
def test_every_gpu_of_the_host_gets_a_pinned_worker_process(monkeypatch, settings, threads):
    """Two GPUs, --procs-per-device 1 (the default): one worker process per GPU, each seeing only its GPU
    (CUDA_VISIBLE_DEVICES) with a GPU=1 resource — not one worker holding GPU=2 that computes on cuda:0."""
    monkeypatch.setattr(cluster, "_gpu_count", lambda: 2)
    monkeypatch.setattr("segpipe.engine.predictor.available_cores", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with cluster.dask_client(settings) as client:
        info = client.scheduler_info()["workers"]
        assert sorted(w["id"] for w in info.values()) == ["gpu0-0", "gpu1-0"]
        assert [w["resources"] for w in info.values()] == [{"GPU": 1}] * 2
        assert cluster.worker_capacity(client) == (True, 2 * threads)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))  # in each worker
        assert sorted(seen.values()) == ["0", "1"]
        assert not cluster.is_in_process(client)


def test_worker_capacity_of_the_session_cluster(client):
    """The fixture's cluster is what the CLI starts: one in-process worker, 3 threads on a CPU."""
    gpus = cluster._gpu_count()
    info = client.scheduler_info()["workers"]
    # expected from what the CLI asks for (one worker, default threads), not from the answer being tested
    assert len(info) == 1
    assert cluster.worker_capacity(client) == (gpus > 0, cluster.default_threads(gpus))
    if not gpus:
        assert cluster.worker_capacity(client) == (False, 3)
    assert cluster.is_in_process(client)


def test_worker_capacity_counts_every_worker():
    """Totals over workers and any worker's GPU resource, from the scheduler's answer."""

    class FakeClient:
        def __init__(self, workers):
            self.workers = workers

        def scheduler_info(self, n_workers=5):
            items = list(self.workers.items())
            return {"workers": dict(items if n_workers == -1 else items[:n_workers])}

    many = {f"tcp://w{i}": {"nthreads": 2, "resources": {}} for i in range(9)}
    many["tcp://gpu"] = {"nthreads": 4, "resources": {"GPU": 1}}
    assert cluster.worker_capacity(FakeClient(many)) == (True, 22)  # all 10 workers, not the first 5
    assert cluster.worker_capacity(FakeClient({"a": {"nthreads": 3}, "b": {}})) == (False, 4)
    assert cluster.worker_capacity(FakeClient({})) == (False, 0)


def test_trim_memory_asks_glibc_to_return_freed_memory(monkeypatch):
    """trim_memory calls malloc_trim(0) on Linux, and a libc without it (musl) is not an error."""
    import sys

    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(cluster, "_libc", lambda: Libc())
    cluster.trim_memory()
    assert calls == ([0] if sys.platform == "linux" else [])
    monkeypatch.setattr(cluster, "_libc", lambda: object())  # no malloc_trim symbol
    cluster.trim_memory()
    monkeypatch.undo()
    cluster.trim_memory()  # the real glibc call


def test_recent_worker_capacity_asks_the_scheduler_at_most_every_max_age():
    """One scheduler round trip per client and period, not per image; a worker that joins is seen after it."""

    class CountingClient:
        def __init__(self, cid):
            self.id, self.calls, self.workers = cid, 0, {"a": {"nthreads": 2}}

        def scheduler_info(self, n_workers=5):
            self.calls += 1
            return {"workers": dict(self.workers)}

    c = CountingClient("client-under-test")
    assert [cluster.recent_worker_capacity(c, max_age=60) for _ in range(5)] == [(False, 2)] * 5
    assert c.calls == 1
    c.workers["b"] = {"nthreads": 4, "resources": {"GPU": 1}}
    assert cluster.recent_worker_capacity(c, max_age=60) == (False, 2)  # still the recent answer
    assert cluster.recent_worker_capacity(c, max_age=0) == (True, 6)  # older than max_age: asked again
    assert c.calls == 2
    other = CountingClient("another-client")
    assert cluster.recent_worker_capacity(other, max_age=60) == (False, 2) and other.calls == 1


def test_client_for_keeps_one_client_per_address_and_closes_it_with_the_cluster():
    """Defect 7: when the default client is another cluster's (deployments/serve.py serves two flows, each
    with its own), client_for opened a new Client per image and never closed it."""
    one = ClusterSettings(threads_per_worker=1)
    with cluster.dask_client(one) as first:
        address = first.scheduler.address
        scheduler = first.cluster.scheduler
        before = len(scheduler.clients)
        with cluster.dask_client(one) as second:  # now the default client, at another address
            assert second.scheduler.address != address
            got = [cluster.client_for(address) for _ in range(3)]
            assert got[0] is got[1] is got[2] and got[0] is not first
            assert got[0].submit(sum, [1, 2]).result() == 3
            assert len(scheduler.clients) == before + 1  # one more client, not one per image
        assert got[0].status == "running"  # the first cluster still runs: its client stays
    assert got[0].status == "closed"  # closed with its cluster
    assert address not in cluster._clients


def test_device_workers_pin_each_process_to_its_device():
    """N processes per GPU, each seeing only its GPU; without GPUs the CPU's cores are split between them."""
    assert cluster.device_workers(["0", "1"], 2, 16) == [
        ("gpu0-0", {"CUDA_VISIBLE_DEVICES": "0"}), ("gpu0-1", {"CUDA_VISIBLE_DEVICES": "0"}),
        ("gpu1-0", {"CUDA_VISIBLE_DEVICES": "1"}), ("gpu1-1", {"CUDA_VISIBLE_DEVICES": "1"})]
    assert cluster.device_workers(["GPU-ab12"], 1, 8) == [("gpu" + "GPU-ab12-0", {"CUDA_VISIBLE_DEVICES": "GPU-ab12"})]
    assert cluster.device_workers([], 3, 8) == [
        (f"cpu-{i}", {"SEGPIPE_WORKER_CORES": "2", "OMP_NUM_THREADS": "2"}) for i in range(3)]
    assert cluster.device_workers([], 4, 2)[0][1]["SEGPIPE_WORKER_CORES"] == "1"  # never 0 cores


def test_visible_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(cluster, "_gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cluster.visible_devices() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # physical ids: a pinned worker is given "3" or "5"
    assert cluster.visible_devices() == ["3", "5"]
    monkeypatch.setattr(cluster, "_gpu_count", lambda: 0)
    assert cluster.visible_devices() == []


def test_worker_cores_share_sizes_available_cores(monkeypatch):
    from segpipe.engine import predictor

    monkeypatch.delenv("SEGPIPE_WORKER_CORES", raising=False)
    every = predictor.available_cores()
    monkeypatch.setenv("SEGPIPE_WORKER_CORES", "1")
    assert predictor.available_cores() == 1
    monkeypatch.setenv("SEGPIPE_WORKER_CORES", str(every + 10))
    assert predictor.available_cores() == every  # a share never exceeds the process's affinity


@pytest.mark.parametrize(
    ("device", "settings", "problem"),
    [
        ("auto", ClusterSettings(address="tcp://127.0.0.1:1", procs_per_device=2), "--dask-address"),
        ("cuda:1", ClusterSettings(procs_per_device=2), "cuda:0"),
    ],
)
def test_procs_per_device_refuses_what_it_cannot_honour(device, settings, problem):
    from segpipe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--procs-per-device") as e:
        cluster.check_device_pinning(device, settings)
    assert problem in str(e.value)
    cluster.check_device_pinning("cuda", ClusterSettings(procs_per_device=2))  # fine
    cluster.check_device_pinning("cuda:1", ClusterSettings())  # one process per device: any device


def test_procs_per_device_conflicting_worker_count(monkeypatch):
    from segpipe.core.errors import ConfigError

    monkeypatch.setattr(cluster, "_gpu_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError, match="conflicts with --procs-per-device 2"):
        with cluster.dask_client(ClusterSettings(procs_per_device=2, n_workers=3)):
            pass


@pytest.mark.parametrize(
    ("cores", "host_threads", "torch", "host"),
    [
        (1, 3, 1, None),  # below 4 cores nothing is split or pinned: the forward takes every core
        (2, 3, 2, None),
        (3, 3, 3, None),
        (4, 3, 3, (3,)),  # ceil(4 × 0.15) = 1 core for reads and writes
        (8, 3, 6, (6, 7)),  # ceil(1.2) = 2
        (16, 3, 13, (13, 14, 15)),  # ceil(2.4) = 3
        (16, 2, 14, (14, 15)),  # no more host cores than host threads
        (64, 12, 54, tuple(range(54, 64))),  # ceil(9.6) = 10
        (6, 1, 5, (5,)),
    ],
)
def test_cpu_threads_split_the_cores(cores, host_threads, torch, host):
    """torch's threads sized against the host threads; from 4 cores on, pinned apart (disjoint, all cores used)."""
    from segpipe.engine.predictor import cpu_threads

    plan = cpu_threads(tuple(range(cores)), host_threads)
    assert plan.torch == torch and plan.host_cores == host
    if host is None:
        assert plan.compute_cores is None
    else:
        assert plan.compute_cores == tuple(range(torch))
        assert set(plan.compute_cores).isdisjoint(plan.host_cores)
        assert len(plan.compute_cores) + len(plan.host_cores) == cores


def test_cpu_threads_follow_the_affinity_and_never_give_the_host_half():
    from segpipe.engine.predictor import cpu_threads

    plan = cpu_threads((9, 3, 5, 7), 8, host_share=0.9)  # an affinity mask, not 0..n-1; a huge host share
    assert plan.compute_cores == (3, 5) and plan.host_cores == (7, 9)  # at most half the cores for the host


def test_pin_thread_pins_only_the_calling_thread():
    import os
    import threading

    from segpipe.engine.predictor import pin_thread

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no thread affinity on this platform")
    before = os.sched_getaffinity(0)
    target = (min(before),)
    seen = {}

    def run():
        pin_thread(target)
        seen["inside"] = os.sched_getaffinity(0)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["inside"] == set(target) and os.sched_getaffinity(0) == before
    pin_thread(None)
    assert os.sched_getaffinity(0) == before
