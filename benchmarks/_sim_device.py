"""``segpipe segment`` with the network replaced by a simulated device: what a GPU worker's host sees.

The device stage (``Predictor._predict``: uint8 windows in, uint8 labels of the tile cores out) is
replaced by a device that holds itself for ``window pixels / RATE`` seconds — a sleep, which releases
the GIL — and returns labels computed from the input in one cheap pass (the stand-in for the
device-to-host copy of real labels). Normalisation, the forward and the argmax are device work, as
on a GPU, so they cost the host nothing here. Everything else is the real command: header reads,
window reads and reflection, batching and request merging, Dask, merging, zstd, Zarr writes, the
pyramid. The engine runs its GPU path (one visible "GPU": its task sizes, forward batch of 16 units,
request merging, worker threads), on this machine's CPU.

One device per worker process, serialised by a lock like a real one; processes that name the same
``SEGPIPE_SIM_LOCK`` file share one device (``fcntl.flock``: two processes per device). ``{device}`` in
that name is the GPU the process sees (``CUDA_VISIBLE_DEVICES``, set per worker by ``--procs-per-device``),
and ``SEGPIPE_SIM_GPUS`` is how many GPUs the driver process sees (default 1). Every hold is
recorded as a busy interval, one file per process, and a sampler notes every 10 ms what each host
thread is doing (read, write, merge, pyramid, per-image work, waiting for the device, idle), so a run
reports device utilisation (busy / wall) and what the host did in the device's longest idle gaps
(:func:`analyse`).

    SEGPIPE_SIM_RATE=40 SEGPIPE_SIM_TRACE=DIR python benchmarks/_sim_device.py segment SCENE --model M --out O
    SEGPIPE_SIM_RATE=real ...   # the real device, instrumented the same way (busy = time in the device stage)

``SEGPIPE_SIM_RATE`` is in megapixels of input windows per second (halo included), the unit a raw
forward benchmark measures: an H100's bf16 Unet-resnet18 is ~250.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Interval = tuple[float, float]


class SimDevice:
    """A device that is busy for ``pixels / rate`` seconds per forward, one forward at a time.

    ``clock`` and ``sleep`` are injectable so the accounting can be checked on a known schedule.
    ``lock_path``: processes opening the same file share the device (an exclusive ``flock`` is held
    for each forward). ``trace``: a file that receives one line ``start end pixels`` per forward.
    """

    def __init__(self, rate_mp_s: float, *, lock_path: str | None = None, trace: str | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate_mp_s <= 0:
            raise ValueError(f"device rate must be > 0 MP/s, got {rate_mp_s}")
        self.rate = rate_mp_s * 1e6
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._lock_path = lock_path
        self._trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115 - lives as long as the process
        self.intervals: list[tuple[float, float, int]] = []

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        with self._lock:
            if self._lock_path is None:
                yield
                return
            with open(self._lock_path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def run(self, pixels: int) -> float:
        """Hold the device for one forward of ``pixels`` input pixels; returns the busy seconds recorded."""
        with self._held():
            t0 = self.clock()
            self.sleep(pixels / self.rate)
            t1 = self.clock()
            self.record(t0, t1, pixels)
        return t1 - t0

    def record(self, t0: float, t1: float, pixels: int) -> None:
        self.intervals.append((t0, t1, pixels))
        if self._trace is not None:
            self._trace.write(f"{t0:.6f} {t1:.6f} {pixels}\n")


def sim_labels(tiles: np.ndarray, num_classes: int, crop: tuple[int, int] | None,
               dtype: Any = np.uint8) -> np.ndarray:
    """Labels of the tile cores from band 0 in one pass (value × K / 256 for uint8): cheap, deterministic,
    position-dependent, so outputs of different task sizes or process counts can be compared chunk for chunk."""
    o, n = crop or (0, max(tiles.shape[-2:]))
    band = tiles[:, 0, o:o + n, o:o + n]
    if band.dtype == np.uint8:
        return ((band.astype(np.uint16) * num_classes) >> 8).astype(dtype)
    return (band.astype(np.int64) % num_classes).astype(dtype)


# ---------------------------------------------------------------- accounting (pure)

def union(intervals: list[Interval]) -> list[Interval]:
    """Sorted, merged intervals (several processes on one device never overlap; several devices may)."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def busy_within(intervals: list[Interval], start: float, end: float) -> float:
    """Seconds of [start, end] covered by at least one interval."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in union(intervals))


def idle_gaps(intervals: list[Interval], start: float, end: float) -> list[Interval]:
    """The uncovered parts of [start, end], longest first."""
    gaps, t = [], start
    for a, b in union(intervals):
        if a > t:
            gaps.append((t, min(a, end)))
        t = max(t, b)
        if t >= end:
            break
    if t < end:
        gaps.append((t, end))
    return sorted((g for g in gaps if g[1] > g[0]), key=lambda g: g[0] - g[1])


def overlapping(intervals: list[Interval]) -> list[tuple[Interval, Interval]]:
    """Pairs of intervals that overlap (two forwards on one device at once: must be empty)."""
    s = sorted(intervals)
    return [(s[i], s[i + 1]) for i in range(len(s) - 1) if s[i + 1][0] < s[i][1]]


@dataclass
class Utilisation:
    """Device utilisation of one run: busy / wall over the whole process and over the steady span."""

    forwards: int
    pixels: int
    busy_s: float
    whole_s: float
    steady_s: float  #: first forward's start → last forward's end
    devices: int = 1
    gaps: list[dict] = field(default_factory=list)

    @property
    def whole(self) -> float:
        return self.busy_s / self.devices / self.whole_s if self.whole_s > 0 else 0.0

    @property
    def steady(self) -> float:
        return self.busy_s / self.devices / self.steady_s if self.steady_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "device_megapixels": round(self.pixels / 1e6, 2),
                "busy_s": round(self.busy_s, 3), "whole_s": round(self.whole_s, 3),
                "steady_s": round(self.steady_s, 3), "devices": self.devices,
                "utilisation_whole": round(self.whole, 3), "utilisation_steady": round(self.steady, 3),
                "longest_idle_gaps": self.gaps}


def utilisation(busy: dict[str, list[tuple[float, float, int]]], start: float, end: float,
                samples: list[tuple[float, list[str]]] | None = None, top: int = 5) -> Utilisation:
    """Utilisation from the busy intervals of each device (key = device), over [start, end] (the whole
    process) and over the steady span; the ``top`` longest idle gaps of the steady span (any device idle),
    each with a count of what the host threads were doing in it (``samples``: (time, [stage per thread]))."""
    all_iv = [(a, b) for ivs in busy.values() for a, b, _ in ivs]
    if not all_iv:
        return Utilisation(0, 0, 0.0, end - start, 0.0, max(1, len(busy)))
    s0, s1 = min(a for a, _ in all_iv), max(b for _, b in all_iv)
    busy_s = sum(busy_within([(a, b) for a, b, _ in ivs], start, end) for ivs in busy.values())
    gaps = []
    for dev, ivs in busy.items():
        for g in idle_gaps([(a, b) for a, b, _ in ivs], s0, s1)[:top]:
            gaps.append((g, dev))
    gaps.sort(key=lambda x: x[0][0] - x[0][1])
    out = []
    for (a, b), dev in gaps[:top]:
        doing: Counter[str] = Counter()
        for t, stages in samples or ():
            if a <= t <= b:
                doing.update(stages)
        n = sum(doing.values())
        out.append({"device": dev, "start_s": round(a - start, 3), "seconds": round(b - a, 3),
                    "host": {k: round(v / n, 2) for k, v in doing.most_common(5)} if n else {}})
    return Utilisation(len(all_iv), sum(p for ivs in busy.values() for *_, p in ivs), busy_s, end - start,
                       s1 - s0, max(1, len(busy)), out)


def read_busy(trace_dir: Path) -> dict[str, list[tuple[float, float, int]]]:
    """Busy intervals per device from a trace folder: ``busy-<device>.tsv`` files (one per process, or
    ``busy-<lock>-<pid>`` when processes share a device: those are grouped under one device)."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    for f in sorted(trace_dir.glob("busy-*.tsv")):
        dev = f.stem.split("@")[0]
        rows = [line.split() for line in f.read_text().splitlines() if line.strip()]
        out.setdefault(dev, []).extend((float(a), float(b), int(p)) for a, b, p in rows)
    return out


def read_samples(trace_dir: Path) -> list[tuple[float, list[str]]]:
    rows = []
    for f in trace_dir.glob("host-*.tsv"):
        for line in f.read_text().splitlines():
            t, *stages = line.split()
            rows.append((float(t), stages))
    return rows


def analyse(trace_dir: Path, start: float, end: float) -> dict:
    """Utilisation and the longest gaps of a run's trace folder, plus the host threads' stages over the
    steady span (share of thread samples)."""
    samples = read_samples(trace_dir)
    busy = read_busy(trace_dir)
    u = utilisation(busy, start, end, samples)
    ends = [t for ivs in busy.values() for a, b, _ in ivs for t in (a, b)]
    s0, s1 = (min(ends), max(ends)) if ends else (start, end)
    total: Counter[str] = Counter()
    for t, stages in samples:  # the steady span only: start-up (imports, model load) is not the question
        if s0 <= t <= s1:
            total.update(stages)
    n = sum(total.values())
    return {**u.as_dict(), "host_threads_by_stage": {k: round(v / n, 3) for k, v in total.most_common(8)} if n else {}}


# ---------------------------------------------------------------- what the host threads are doing

#: (function name, path fragment) → stage; a thread's stage is that of its innermost matching frame
_STAGES: list[tuple[str, str, str]] = [
    ("_run", "segpipe/io/locks", "idle"),  # the lock heartbeat sleeps in C: no frame shows the sleep
    ("run", "_sim_device", "device"),
    ("_predict", "_sim_device", "labels-copy"),  # the host side of the device stage: labels come back
    ("_predict", "segpipe/engine/predictor", "device"),
    ("predict", "segpipe/engine/predictor", "wait-device"),
    ("write_chunk", "segpipe/io/output", "write"),
    ("write_level1_chunk", "segpipe/io/output", "write"),
    ("_write_level1", "segpipe/engine/tasks", "write"),
    ("_write_fill", "segpipe/engine/tasks", "write"),
    ("read", "segpipe/io/readers", "read"),
    ("read_valid", "segpipe/io/readers", "read"),
    ("merge", "segpipe/engine/tiled", "merge"),
    ("_predict_batch", "segpipe/engine/tiled", "batch"),
    ("build_pyramid", "segpipe/engine/pyramid", "pyramid"),
    ("build_probability_pyramid", "segpipe/engine/pyramid", "pyramid"),
    ("_run_tiles", "segpipe/engine/tasks", "task-setup"),
    ("segment_image", "segpipe/engine/segment", "per-image"),
    ("run_tile_tasks", "segpipe/engine/tasks", "driver"),
    ("check_model", "segpipe/engine/job", "model-load"),
    ("segment_many", "segpipe/engine/segment", "driver"),
]
_WAITS = {"wait", "_wait_for_tstate_lock", "acquire", "get", "select", "poll", "epoll", "sleep", "result", "join",
          "_worker", "run_forever", "recv_into", "accept", "_sampler"}
#: stages whose threads are idle when their innermost frame is a wait (a driver waiting for results)
_WAITING_STAGES = {"driver", "per-image", "task-setup"}


def classify(frame: Any) -> str:
    """The pipeline stage of a thread whose innermost frame is ``frame``."""
    innermost = frame.f_code.co_name
    f = frame
    while f is not None:
        code = f.f_code
        for name, path, stage in _STAGES:
            if code.co_name == name and path in code.co_filename:
                if stage == "idle":
                    return stage
                if stage in _WAITING_STAGES and innermost in _WAITS:
                    return "idle"
                return f"{stage}:{innermost}" if os.environ.get("SEGPIPE_SIM_DEBUG") else stage
        f = f.f_back
    if innermost in _WAITS:
        return "idle"
    f = frame
    while f is not None:  # Dask's own work: comms, the scheduler, task bookkeeping
        if any(p in f.f_code.co_filename for p in ("/distributed/", "/tornado/", "/asyncio/")):
            return "dask"
        f = f.f_back
    return f"other:{innermost}" if os.environ.get("SEGPIPE_SIM_DEBUG") else "other"


def _sampler(path: str, interval: float = 0.01) -> None:
    me = threading.get_ident()
    with open(path, "a", buffering=1 << 16) as out:
        while True:
            t = time.monotonic()
            stages = [classify(fr) for tid, fr in sys._current_frames().items() if tid != me]
            out.write(f"{t:.4f} {' '.join(s for s in stages if s != 'idle') or 'idle'}\n")
            out.flush()
            time.sleep(interval)


# ---------------------------------------------------------------- installing it in a segpipe process

def sim_gpu_count() -> int:
    """Simulated GPUs this process sees: the entries of ``CUDA_VISIBLE_DEVICES`` when it is set (a worker
    pinned to its device by ``--procs-per-device``), else ``SEGPIPE_SIM_GPUS`` (default 1)."""
    pinned = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return len(pinned) if pinned else int(os.environ.get("SEGPIPE_SIM_GPUS", "1"))


def device_lock(template: str | None) -> str | None:
    """The lock file of this process's simulated device: ``template`` with ``{device}`` replaced by the
    device the process sees (``CUDA_VISIBLE_DEVICES``; "0" when unset), so pinned worker processes of one
    GPU share a lock and those of different GPUs do not."""
    if not template:
        return None
    return template.replace("{device}", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0")


def sim_patches(device: SimDevice, gpu: bool = True) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) triples that put ``device`` in place of the network's device stage
    (apply them with ``setattr``, or ``monkeypatch.setattr`` in tests). With ``gpu`` the engine also
    takes its GPU path: one visible "GPU", a forward batch of 16 units, request merging."""
    from segpipe.engine import cluster, predictor

    def _predict(self: Any, tiles: np.ndarray, norm: Any = None, crop: Any = None, entropy: bool = False) -> Any:
        device.run(int(tiles.shape[0] * tiles.shape[-2] * tiles.shape[-1]))
        labels = sim_labels(tiles, self.spec.num_classes, crop, self.label_dtype)
        probs = None
        if self.settings.probabilities:
            k = np.arange(self.spec.num_classes, dtype=labels.dtype)[None, :, None, None]
            probs = (k == labels[:, None]).astype(np.uint8) * np.uint8(255)
        # one-hot "probabilities": no uncertainty anywhere (the engine still stores it per chunk)
        return labels, probs, np.zeros(labels.shape, np.float32) if entropy else None

    patches: list[tuple[Any, str, Any]] = [(predictor.Predictor, "_predict", _predict)]
    if gpu:
        init = predictor.Predictor.__init__

        def __init__(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **k)
            self.coalesce = True

        patches += [(cluster, "_gpu_count", sim_gpu_count), (predictor, "default_batch_size", lambda device_type: 16),
                    (predictor.Predictor, "__init__", __init__)]
    return patches


def install(rate: str | None = None, trace_dir: str | None = None, lock_path: str | None = None) -> None:
    """Replace this process's device stage with the simulated device (or instrument the real one with
    ``rate="real"``), and make the engine take its GPU path. Idempotent; arguments default to the
    ``SEGPIPE_SIM_RATE`` / ``SEGPIPE_SIM_TRACE`` / ``SEGPIPE_SIM_LOCK`` environment variables."""
    from segpipe.engine import predictor

    # the flag lives on the patched module: this file may be imported twice in one process (as __main__
    # and as the Dask preload ``_sim_device``), and must install once
    if getattr(predictor, "_sim_installed", False):
        return
    predictor._sim_installed = True  # type: ignore[attr-defined]

    rate = rate or os.environ.get("SEGPIPE_SIM_RATE", "real")
    trace_dir = trace_dir or os.environ.get("SEGPIPE_SIM_TRACE")
    lock_path = device_lock(lock_path or os.environ.get("SEGPIPE_SIM_LOCK"))
    pid = os.getpid()
    trace = None
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        # processes sharing a device write busy-<device>@<pid>: read_busy groups them under one device
        dev = Path(lock_path).stem if lock_path else str(pid)
        trace = str(Path(trace_dir) / f"busy-{dev}@{pid}.tsv")
        threading.Thread(target=_sampler, args=(str(Path(trace_dir) / f"host-{pid}.tsv"),), daemon=True,
                         name="sim-sampler").start()
    if rate == "real":
        device = SimDevice(1.0, trace=trace)
        original = predictor.Predictor._predict

        def _predict(self: Any, tiles: np.ndarray, norm: Any = None, crop: Any = None, entropy: bool = False) -> Any:
            t0 = time.monotonic()
            out = original(self, tiles, norm, crop, entropy)  # ends with the labels' copy to the host: synchronised
            device.record(t0, time.monotonic(), int(tiles.shape[0] * tiles.shape[-2] * tiles.shape[-1]))
            return out

        patches = [(predictor.Predictor, "_predict", _predict)]
    else:
        device = SimDevice(float(rate), lock_path=lock_path, trace=trace)
        patches = sim_patches(device)
    for obj, name, value in patches:
        setattr(obj, name, value)


def dask_setup(worker: Any = None) -> None:
    """Dask preload hook: worker processes (``--processes``) install the simulated device too."""
    install()


if __name__ == "__main__":
    # worker processes started by the embedded cluster (spawned: they do not inherit this process's
    # patches) preload this file; the embedded threads cluster runs the preload too (install is idempotent)
    os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"] = repr([str(Path(__file__).resolve())])
    install()
    from segpipe.cli.main import main

    main()
