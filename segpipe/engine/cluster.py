"""Dask: an embedded cluster sized to the machine, or an existing scheduler.

The default is a ``LocalCluster`` with one worker of three *threads* in this process:
torch, GDAL and zstd release the GIL, so one thread computes while the others read
the next windows and write finished chunks, and the process pays for one torch import
and one model load. ``address="tcp://…"`` attaches to any running scheduler instead
(dask-kubernetes, dask-jobqueue, Coiled, or ``dask scheduler`` + ``dask worker``), with
no code change. With GPUs, dask-cuda's ``LocalCUDACluster`` (one worker per GPU) is used
when installed; otherwise one worker gets a ``GPU`` resource per visible device. With
``procs_per_device`` N > 1, each device gets N worker processes, each pinned to its GPU through
``CUDA_VISIBLE_DEVICES`` (on a CPU: N processes splitting the cores), so one process's host work
overlaps another's forward on the same device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
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


def check_device_pinning(device: str, settings: ClusterSettings) -> None:
    """Refuse option combinations that ``procs_per_device`` cannot honour, with one line."""
    if settings.procs_per_device == 1:
        return
    if settings.address:
        raise ConfigError("--procs-per-device", "sizes the embedded cluster; with --dask-address start the "
                          "workers yourself (e.g. `CUDA_VISIBLE_DEVICES=0 dask worker ADDRESS --resources GPU=1`, "
                          "twice per GPU)")
    if device.startswith("cuda:"):
        raise ConfigError("--procs-per-device", f"gives each worker process one GPU, which it calls cuda:0; "
                          f"use --device auto or cuda, and CUDA_VISIBLE_DEVICES to choose GPUs, not --device {device}")


def default_threads(gpus: int) -> int:
    """Worker threads: 3 on a CPU (one computes, two read and write); with a GPU, enough CPU threads
    to read, normalise and write as fast as the GPU computes (reading is then the limit)."""
    if not gpus:
        return 3
    from segpipe.engine.predictor import available_cores

    return max(3, min(available_cores(), 12))


@contextlib.contextmanager
def dask_client(settings: ClusterSettings | None = None) -> Iterator[Client]:
    """A connected Dask client for the lifetime of the block; an embedded cluster is closed after it."""
    from distributed import Client, LocalCluster

    settings = settings or ClusterSettings()
    check_device_pinning("auto", settings)
    if settings.address:
        try:
            client = Client(settings.address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(settings.address, f"no Dask scheduler answers there ({e})") from None
        log.info("using Dask scheduler %s (dashboard %s)", settings.address, client.dashboard_link)
        try:
            yield client
        finally:
            close_clients(settings.address)
            client.close()
        return

    # the embedded cluster's scheduler/worker chatter at INFO drowns the run's own logs
    logging.getLogger("distributed").setLevel(max(logging.getLogger("distributed").level, logging.WARNING))
    gpus = _gpu_count()
    threads = settings.threads_per_worker or default_threads(gpus)
    cluster = None
    if settings.procs_per_device > 1:
        cluster, threads = _pinned_cluster(settings, gpus)
    elif gpus and settings.processes:
        try:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(threads_per_worker=threads, dashboard_address=":0", resources={"GPU": 1})
        except ImportError:
            cluster = None
    if cluster is None:
        cluster = LocalCluster(
            n_workers=settings.n_workers or 1,
            threads_per_worker=threads,
            processes=settings.processes,
            dashboard_address=":0",
            resources={"GPU": gpus} if gpus else None,
            silence_logs=logging.WARNING,
        )
    client = Client(cluster)
    log.info("embedded Dask cluster: %d worker(s) × %d thread(s)%s; dashboard %s", len(cluster.workers), threads,
             f", {gpus} GPU(s)" if gpus else "", dashboard_link(client) or "off (pip install bokeh)")
    try:
        yield client
    finally:
        close_clients(cluster.scheduler_address)
        client.close()
        cluster.close()


def _pinned_cluster(settings: ClusterSettings, gpus: int) -> tuple[Any, int]:
    """``procs_per_device`` worker processes per device, each pinned to its device (:func:`device_workers`);
    returns the cluster and the threads of each worker."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    from segpipe.engine.predictor import available_cores

    devices = visible_devices() if gpus else []
    cores = available_cores()
    workers = device_workers(devices, settings.procs_per_device, cores)
    if settings.n_workers and settings.n_workers != len(workers):
        raise ConfigError("--workers", f"{settings.n_workers} conflicts with --procs-per-device "
                          f"{settings.procs_per_device} on {max(1, len(devices))} device(s) "
                          f"({len(workers)} worker processes); give one of them")
    # a process per device share: its threads read, normalise and write for that share of the device
    threads = settings.threads_per_worker or max(3, min(cores // len(workers), 12))
    spec = {name: {"cls": Nanny, "options": {
        "nthreads": threads, "env": env, "host": "127.0.0.1", "memory_limit": MEMORY_LIMIT // len(workers),
        "resources": {"GPU": 1} if devices else None, "silence_logs": logging.WARNING}}
        for name, env in workers}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=spec, scheduler=scheduler, silence_logs=logging.WARNING, name="segpipe"), threads


def dashboard_link(client: Client) -> str | None:
    """The Dask dashboard's address, or None when it is not served (bokeh not installed)."""
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
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


def _worker_precision(device: str, precision: str) -> str:
    from segpipe.engine.predictor import resolve_device, resolve_precision

    return resolve_precision(precision, resolve_device(device))


_run_precision: dict[tuple[str, str, str], str] = {}


def resolve_run_precision(client: Client, settings: InferenceSettings) -> str:
    """The precision the workers will compute in, resolved before an output is created.

    The resolved precision is part of an output's identity (its skip/resume key and provenance):
    ``auto`` gives bf16 on one machine and fp32 on another, and a resumed output must not mix
    chunks of both. An explicit precision is checked against this process's devices only where
    workers share them; ``auto`` is asked of every worker (once per client, cached), and workers
    that disagree are refused — a mixed fleet needs an explicit ``--precision``.
    """
    from segpipe.core.errors import ConfigError

    if settings.precision != "auto":
        return settings.precision
    key = (str(getattr(client, "id", id(client))), settings.device, settings.precision)
    hit = _run_precision.get(key)
    if hit is not None:
        return hit
    per_worker: dict[str, str] = client.run(_worker_precision, settings.device, settings.precision)
    found = sorted(set(per_worker.values()))
    if not found:
        raise ConfigError("--precision auto", "no Dask worker is connected to resolve it; start workers first")
    if len(found) > 1:
        where = ", ".join(f"{p} on {next(w for w, v in per_worker.items() if v == p)}" for p in found)
        raise ConfigError("--precision auto", f"the workers resolve it differently ({where}); an output must be "
                                              "computed in one precision: pass --precision explicitly")
    if len(_run_precision) > 64:
        _run_precision.clear()
    _run_precision[key] = found[0]
    return found[0]
