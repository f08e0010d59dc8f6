"""Dask: an embedded cluster sized to the machine, or an existing scheduler.

The default is a ``LocalCluster`` with one worker of three *threads* in this process:
torch, GDAL and zstd release the GIL, so one thread computes while the others read
the next windows and write finished chunks, and the process pays for one torch import
and one model load. ``address="tcp://…"`` attaches to any running scheduler instead
(dask-kubernetes, dask-jobqueue, Coiled, ``segpipe worker`` or ``dask scheduler`` + ``dask worker``),
with no code change; a cluster that has no worker yet (adaptive clusters start at 0) is waited for
(:func:`await_workers`), and one whose GPU workers would leave GPUs idle is refused
(:func:`check_gpu_pinning`).

Every GPU is used: with several GPUs (or ``procs_per_device`` N > 1, or ``processes`` with a GPU) the
embedded cluster starts N worker processes per visible GPU, each pinned to its GPU through
``CUDA_VISIBLE_DEVICES`` with a ``GPU=1`` resource (:func:`pinned_workers`; on a CPU: N processes
splitting the cores), so one process's host work overlaps another's forward on the same device.
``segpipe worker`` starts the same pinned workers on a host of an existing cluster.

Why this module is long: the embedded cluster, the pinning of its worker processes to devices, the
wait for a first worker of an adaptive cluster and the run's precision are one decision — which
processes compute, on what — taken when a client is made; apart they would pass the same worker views
and settings back and forth.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segpipe.core.errors import ConfigError
from segpipe.core.settings import ClusterSettings, InferenceSettings

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("segpipe.engine.cluster")


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_devices() -> list[str]:
    """The GPUs this process may hand to worker processes, as ``CUDA_VISIBLE_DEVICES`` names them: the
    entries of that variable when it is set (indices or UUIDs of the physical devices), else 0 … N-1."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = _gpu_count()
    return listed[:count] if listed else [str(i) for i in range(count)]


def device_workers(devices: Sequence[str], procs_per_device: int, cores: int) -> list[tuple[str, dict[str, str]]]:
    """(worker name, environment) of each worker process when every device gets ``procs_per_device``.

    On GPUs each process sees only its device (``CUDA_VISIBLE_DEVICES``; torch calls it ``cuda:0``), the way
    dask-cuda pins one worker per GPU, here several per GPU. Without GPUs (``devices`` empty) the CPU is the
    one device: its ``cores`` are split evenly (``SEGPIPE_WORKER_CORES``, which sizes each process's torch
    threads, and ``OMP_NUM_THREADS`` for libraries that read it)."""
    from segpipe.engine.predictor import WORKER_CORES_ENV

    if not devices:
        share = str(max(1, cores // procs_per_device))
        return [(f"cpu-{p}", {WORKER_CORES_ENV: share, "OMP_NUM_THREADS": share}) for p in range(procs_per_device)]
    return [(f"gpu{d}-{p}", {"CUDA_VISIBLE_DEVICES": d}) for d in devices for p in range(procs_per_device)]


@dataclass(frozen=True)
class WorkerSpec:
    """One pinned worker process: its name, environment, threads and Dask resources."""

    name: str
    env: dict[str, str]
    nthreads: int
    resources: dict[str, float] | None


def pinned_workers(procs_per_device: int, threads_per_worker: int | None = None,
                   devices: Sequence[str] | None = None, cores: int | None = None) -> list[WorkerSpec]:
    """The worker processes of one host: ``procs_per_device`` per visible GPU, each pinned to its GPU
    (``CUDA_VISIBLE_DEVICES``) with a ``GPU=1`` resource; without GPUs, ``procs_per_device`` processes
    splitting the cores (:func:`device_workers`). Each has ``threads_per_worker`` threads, by default
    enough to read, normalise and write for its share of the device: cores / processes, between 3 and 12.
    The embedded cluster and ``segpipe worker`` both start these."""
    from segpipe.engine.predictor import available_cores

    devices = visible_devices() if devices is None else list(devices)
    cores = available_cores() if cores is None else cores
    workers = device_workers(devices, procs_per_device, cores)
    threads = threads_per_worker or max(3, min(cores // len(workers), 12))
    return [WorkerSpec(name, env, threads, {"GPU": 1} if devices else None) for name, env in workers]


def check_device_pinning(device: str, settings: ClusterSettings) -> None:
    """Refuse option combinations that ``procs_per_device`` cannot honour, with one line."""
    if settings.procs_per_device == 1:
        return
    if settings.address:
        raise ConfigError("--procs-per-device", "sizes the embedded cluster; with --dask-address start the "
                          f"workers with it on each host: `segpipe worker --scheduler {settings.address} "
                          f"--procs-per-device {settings.procs_per_device}`")
    if device.startswith("cuda:"):
        raise ConfigError("--procs-per-device", f"gives each worker process one GPU, which it calls cuda:0; "
                          f"use --device auto or cuda, and CUDA_VISIBLE_DEVICES to choose GPUs, not --device {device}")


#: below this many cores the forward's OpenMP threads share every core with the reading and writing threads
#: (the cut of engine.predictor.cpu_threads)
SHARED_CORES_BELOW = 4


def bound_openmp_spinning() -> None:
    """Below :data:`SHARED_CORES_BELOW` cores, bound how long libgomp's idle threads spin (``GOMP_SPINCOUNT``
    300) unless the user chose a value or a wait policy. Call it before torch is imported: libgomp reads it once.

    There the forward's OpenMP threads share every core with the threads that read and write. libgomp's
    default spins ~300,000 times after each parallel region before it sleeps: between the compute thread's
    small regions that kept a core busy doing nothing (62 % of a free-model run's CPU samples), while the
    forward itself is as fast with 300 (docs/benchmarks.md, issue 22). Until then something else made
    libgomp throttle its spinning: a parallel NaN check of the weights on the main thread (more OpenMP
    threads than cores)."""
    if len(os.sched_getaffinity(0)) < SHARED_CORES_BELOW and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "300")


def default_threads(gpus: int) -> int:
    """Worker threads: 3 on a CPU (one computes, two read and write); with a GPU, enough CPU threads
    to read, normalise and write as fast as the GPU computes (reading is then the limit)."""
    if not gpus:
        return 3
    from segpipe.engine.predictor import available_cores

    return max(3, min(available_cores(), 12))


#: seconds a run waits for the first worker of a cluster that has none (``--wait-for-workers``)
WAIT_FOR_WORKERS_S = 600.0


def _probe() -> str:
    """A task that only needs a worker to run it: queued, it makes an adaptive cluster start one."""
    return socket.gethostname()


def await_workers(client: Client, timeout: float = WAIT_FOR_WORKERS_S, where: str = "the Dask cluster") -> None:
    """Return once the cluster has a worker; say so in one line when it has none yet.

    Adaptive clusters (dask-kubernetes, dask-jobqueue, Coiled) start at 0 workers and add workers
    only for queued work, so the wait submits one tiny probe task: the scheduler's adaptive target is
    then at least one worker. After ``timeout`` seconds without a worker: :class:`ConfigError`, one line.
    """
    from distributed import wait

    if _worker_count(client):
        return
    log.warning("no Dask worker at %s yet: waiting up to %.0f s for one to join (--wait-for-workers)",
                where, timeout)
    t0 = time.monotonic()
    probe = client.submit(_probe, pure=False, key=f"segpipe-probe-{os.getpid()}-{time.monotonic_ns()}")
    try:
        wait(probe, timeout=timeout)
    except TimeoutError:
        pass
    finally:
        probe.cancel()
    if not _worker_count(client):
        raise ConfigError(where, f"no Dask worker joined in {timeout:g} s; start workers (e.g. `segpipe worker "
                                 f"--scheduler ADDRESS` on each host) or wait longer (--wait-for-workers)")
    log.warning("a Dask worker joined %s after %.0f s", where, time.monotonic() - t0)


def _worker_count(client: Client) -> int:
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return len(info.get("workers", {}))


@dataclass(frozen=True)
class WorkerView:
    """What one worker process sees: its host and the GPUs visible to it (first = the one torch uses)."""

    worker: str
    host: str
    gpus: tuple[str, ...]


def _worker_view() -> dict[str, Any]:
    """Runs on a worker (``client.run``): its host name and visible GPUs."""
    # the module's own _gpu_count, looked up at call time (simulated GPUs in tests patch it)
    return {"host": socket.gethostname(), "gpus": list(sys.modules[__name__].visible_devices())}


def worker_views(client: Client) -> list[WorkerView]:
    """Every connected worker's :class:`WorkerView` (one ``client.run``)."""
    answers: Mapping[str, dict[str, Any]] = client.run(_worker_view)
    return [WorkerView(w, str(a["host"]), tuple(a["gpus"])) for w, a in sorted(answers.items())]


def idle_gpus(views: Sequence[WorkerView]) -> dict[str, list[str]]:
    """Per host, the GPUs some worker sees but no worker computes on (torch uses a process's first visible
    GPU, ``cuda:0``): a worker that sees several GPUs without being pinned to one leaves the others idle.

    Pinned workers (``CUDA_VISIBLE_DEVICES`` one GPU each, or dask-cuda's rotation of the list, whose first
    entry differs per worker) leave none; several workers on one GPU (``--procs-per-device``) are fine."""
    seen: dict[str, set[str]] = {}
    used: dict[str, set[str]] = {}
    for v in views:
        if v.gpus:
            seen.setdefault(v.host, set()).update(v.gpus)
            used.setdefault(v.host, set()).add(v.gpus[0])
    return {h: sorted(seen[h] - used[h]) for h in sorted(seen) if seen[h] - used[h]}


def check_gpu_pinning(views: Sequence[WorkerView], where: str) -> None:
    """Refuse, in one line, a cluster whose GPU workers are not pinned (some GPU would stay idle)."""
    idle = idle_gpus(views)
    if not idle:
        return
    host, gpus = next(iter(idle.items()))
    unpinned = [v.worker for v in views if v.host == host and len(v.gpus) > 1]
    raise ConfigError(where, f"its GPU workers are not pinned: on host {host}, GPU(s) {', '.join(gpus)} would stay "
                             f"idle ({len(unpinned)} worker(s) see several GPUs and compute on the first only); "
                             f"start one worker per GPU with CUDA_VISIBLE_DEVICES, e.g. `segpipe worker "
                             f"--scheduler ADDRESS` on each host")


def describe_cluster(client: Client, where: str, devices: int) -> str:
    """One line: which cluster, its workers, threads and devices, and the dashboard link (or why there is none)."""
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    workers = info.get("workers", {}).values()
    threads = sum(int(w.get("nthreads", 1)) for w in workers)
    link = dashboard_link(client, embedded=where == "embedded")
    return (f"Dask cluster {where}: {len(workers)} worker(s), {threads} thread(s), "
            f"{f'{devices} GPU(s)' if devices else 'no GPU'}; "
            + (f"dashboard {link}" if link else "dashboard unavailable (pip install 'segpipe[dashboard]' for bokeh)"))


@contextlib.contextmanager
def dask_client(settings: ClusterSettings | None = None, device: str = "auto") -> Iterator[Client]:
    """A connected Dask client for the lifetime of the block; an embedded cluster is closed after it.

    An existing cluster (``settings.address``) is waited for until it has a worker
    (``settings.wait_for_workers`` seconds at most), and refused when its GPU workers are not pinned
    (unless ``device`` is ``cpu``); the cluster used is logged in one line."""
    from distributed import Client, LocalCluster

    settings = settings or ClusterSettings()
    check_device_pinning(device, settings)
    if settings.address:
        try:
            client = Client(settings.address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(settings.address, f"no Dask scheduler answers there ({e})") from None
        try:
            if settings.wait_for_workers > 0:
                await_workers(client, settings.wait_for_workers, settings.address)
            views = worker_views(client)
            if device != "cpu":
                check_gpu_pinning(views, settings.address)
            devices = len({(v.host, v.gpus[0]) for v in views if v.gpus})
            log.info("%s", describe_cluster(client, settings.address, devices))
            yield client
        finally:
            close_clients(settings.address)
            client.close()
        return

    # the embedded cluster's scheduler/worker chatter at INFO drowns the run's own logs
    logging.getLogger("distributed").setLevel(max(logging.getLogger("distributed").level, logging.WARNING))
    gpus = _gpu_count()
    if gpus > 1 or settings.procs_per_device > 1 or (gpus and settings.processes):
        # a process per GPU (times procs_per_device): one worker holding several GPUs computes on cuda:0 only
        cluster = _pinned_cluster(settings, gpus)
    else:
        cluster = LocalCluster(
            n_workers=settings.n_workers or 1,
            threads_per_worker=settings.threads_per_worker or default_threads(gpus),
            processes=settings.processes,
            dashboard_address=":0",
            resources={"GPU": gpus} if gpus else None,
            silence_logs=logging.WARNING,
        )
    client = Client(cluster)
    log.info("%s", describe_cluster(client, "embedded", gpus))
    try:
        yield client
    finally:
        close_clients(cluster.scheduler_address)
        client.close()
        cluster.close()


def _pinned_cluster(settings: ClusterSettings, gpus: int) -> Any:
    """The embedded cluster of :func:`pinned_workers`: ``procs_per_device`` pinned worker processes per device."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    specs = pinned_workers(settings.procs_per_device, settings.threads_per_worker,
                           visible_devices() if gpus else [])
    if settings.n_workers and settings.n_workers != len(specs):
        raise ConfigError("--workers", f"{settings.n_workers} conflicts with --procs-per-device "
                          f"{settings.procs_per_device} on {max(1, gpus)} device(s) "
                          f"({len(specs)} worker processes); give one of them")
    spec = {w.name: {"cls": Nanny, "options": {
        "nthreads": w.nthreads, "env": w.env, "host": "127.0.0.1", "memory_limit": MEMORY_LIMIT // len(specs),
        "resources": w.resources, "silence_logs": logging.WARNING}} for w in specs}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=spec, scheduler=scheduler, silence_logs=logging.WARNING, name="segpipe")


def dashboard_link(client: Client, embedded: bool = True) -> str | None:
    """The Dask dashboard's address, or None when it is not served: an embedded cluster serves it only
    with bokeh installed here (an optional dependency: ``segpipe[dashboard]``); an existing scheduler
    serves it when it runs the ``dashboard`` service (with bokeh installed there)."""
    import importlib.util

    if embedded and importlib.util.find_spec("bokeh") is None:
        return None
    if "dashboard" not in (client.scheduler_info(n_workers=0) if _accepts_n_workers(client)
                           else client.scheduler_info()).get("services", {}):
        return None
    return client.dashboard_link


def has_gpu_workers(client: Client) -> bool:
    """True when some worker advertises a ``GPU`` resource (then inference tasks request one)."""
    return worker_capacity(client)[0]


def worker_capacity(client: Client) -> tuple[bool, int]:
    """(some worker advertises a ``GPU`` resource, total worker threads), in one scheduler round trip."""
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    workers = info.get("workers", {}).values()
    gpu = any(w.get("resources", {}).get("GPU") for w in workers)
    return gpu, sum(int(w.get("nthreads", 1)) for w in workers)


_capacity: dict[str, tuple[float, tuple[bool, int]]] = {}


def recent_worker_capacity(client: Client, max_age: float = 10.0) -> tuple[bool, int]:
    """:func:`worker_capacity`, asked of the scheduler at most every ``max_age`` seconds per client:
    a folder of chips otherwise pays one scheduler round trip per image, and workers that join an
    adaptive cluster are still seen within ``max_age``."""
    import time

    key = str(getattr(client, "id", id(client)))
    now = time.monotonic()
    hit = _capacity.get(key)
    if hit is not None and now - hit[0] < max_age:
        return hit[1]
    capacity = worker_capacity(client)
    if len(_capacity) > 64:
        _capacity.clear()
    _capacity[key] = (now, capacity)
    return capacity


def _accepts_n_workers(client: Client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def is_in_process(client: Client) -> bool:
    """True for the embedded threaded cluster (workers share this process's memory)."""
    cluster = getattr(client, "cluster", None)
    return cluster is not None and not getattr(cluster, "processes", True) and hasattr(cluster, "scheduler")


_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def client_for(address: str) -> Client:
    """A client for ``address``: the default client when it is connected there, else this process's one
    client for that address (opened on first use, reused after; closed by :func:`close_clients`).

    Prefect tasks run in threads of the flow's process; they reuse the flow's client (which also works
    for the embedded cluster's in-process address) instead of opening one each. The default client is
    the last one made in the process, so under ``deployments/serve.py`` (two flows, each with its own
    cluster) it is often another flow's: opening a client per image then leaked one per image.
    """
    from distributed import Client, default_client

    try:
        client = default_client()
        if client.scheduler.address == address:
            return client
    except ValueError:
        pass
    with _clients_lock:
        client = _clients.get(address)
        if client is not None and client.status == "running":
            return client
        client = _clients[address] = Client(address, set_as_default=False)
        return client


def close_clients(address: str | None = None) -> None:
    """Close the clients :func:`client_for` opened (for ``address``, or all): when a cluster goes away."""
    with _clients_lock:
        gone = [a for a in _clients if address is None or a == address]
        closing = [_clients.pop(a) for a in gone]
    for client in closing:
        with contextlib.suppress(Exception):  # noqa: BLE001 - closing a client to a scheduler that is gone
            client.close()


def trim_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Tiles and label arrays are allocated by one thread and freed by another; glibc keeps the
    freed pages in per-thread arenas, so without trimming the peak creeps up with the number
    of chunks. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` for its worker processes for the
    same reason; the embedded in-process cluster calls this instead.
    """
    if sys.platform != "linux":
        return
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _worker_precision(device: str, precision: str) -> tuple[str, str]:
    """Runs on a worker: (its device type, what ``precision`` resolves to there)."""
    from segpipe.engine.predictor import resolve_device, resolve_precision

    dev = resolve_device(device)
    return dev.type, resolve_precision(precision, dev)


def common_precision(answers: Mapping[str, tuple[str, str]]) -> str:
    """One precision for a fleet whose workers resolve ``auto`` differently: the one they all run.

    ``answers``: worker → (device type, precision ``auto`` resolves to there). Equal answers give that
    precision; GPUs only (some bf16, some fp16 without bf16): fp16, which every CUDA device runs; anything
    else (CPUs and GPUs, or a CPU without bf16): fp32, which every device runs. An output is computed in
    one precision whichever worker computes a chunk, so a resumed or shared output never mixes two.
    """
    found = {p for _, p in answers.values()}
    if len(found) == 1:
        return found.pop()
    if all(d == "cuda" for d, _ in answers.values()) and found <= {"bf16", "fp16"}:
        return "fp16"
    return "fp32"


_run_precision: dict[tuple[str, str, str], str] = {}


def resolve_run_precision(client: Client, settings: InferenceSettings) -> str:
    """The precision the workers will compute in, resolved before an output is created.

    The resolved precision is part of an output's identity (its skip/resume key and provenance):
    ``auto`` gives bf16 on one machine and fp32 on another, and a resumed output must not mix
    chunks of both. An explicit precision is returned as it is. ``auto`` is asked of every worker
    (once per client, cached), after waiting for a first worker when the cluster has none
    (:func:`await_workers`); workers that disagree compute in the precision they all run
    (:func:`common_precision`, with one line saying so).
    """
    if settings.precision != "auto":
        return settings.precision
    key = (str(getattr(client, "id", id(client))), settings.device, settings.precision)
    hit = _run_precision.get(key)
    if hit is not None:
        return hit
    per_worker: dict[str, tuple[str, str]] = client.run(_worker_precision, settings.device, settings.precision)
    if not per_worker:  # a client made elsewhere, on a cluster with no worker yet (dask_client waits itself)
        await_workers(client)
        per_worker = client.run(_worker_precision, settings.device, settings.precision)
    resolved = common_precision({w: tuple(a) for w, a in per_worker.items()})  # type: ignore[misc]
    if len({p for _, p in per_worker.values()}) > 1:
        counts: dict[str, int] = {}
        for _, p in per_worker.values():
            counts[p] = counts.get(p, 0) + 1
        log.warning("--precision auto: the workers resolve it differently (%s); computing in %s, which all of "
                    "them run (pass --precision to choose)", ", ".join(f"{p} on {n}" for p, n in sorted(counts.items())),
                    resolved)
    if len(_run_precision) > 64:
        _run_precision.clear()
    _run_precision[key] = resolved
    return resolved
