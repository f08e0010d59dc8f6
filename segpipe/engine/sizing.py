"""How much work one Dask tile task carries, and how many share a device.

* :func:`tiles_per_task` — today's unit: ``--batch-size``, else one tile on a CPU and a forward batch
  of ~6.5 MP on a GPU; :class:`TaskSizer` grows it to ``--task-seconds`` of device time from the rate
  the workers measure (fewer, larger tasks per scheduler for a fleet);
* :func:`tasks_per_device` — how many tile tasks share one GPU (one in the forward while the others
  read and write), from the tasks' measured host and device time;
* :class:`TimedPredictor` — a predictor seen through one task, timing what the task gave the device.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from segpipe.core.settings import InferenceSettings

#: tile tasks that share one GPU at once (a power of two: the shares add up exactly); the worker's
#: threads bound it further
TASKS_PER_DEVICE = 8

def tiles_per_task(settings: InferenceSettings, gpu_workers: bool, window_side: int) -> int:
    """Tiles per Dask task (= per forward batch): ``--batch-size``, else 1 on CPU and, on a GPU, as
    many as keep a batch near 16 windows of 640² (6.5 MP) whatever the tile size."""
    if settings.batch_size:
        return settings.batch_size
    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and gpu_workers)
    return max(1, (16 * 640 * 640) // (window_side * window_side)) if gpu else 1

def batched(keys: Iterator[Any], size: int | Callable[[], int]) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` items, produced lazily (an image's plan is never materialised).
    ``size`` may be a callable, asked at the start of each list (task sizes that adapt as tasks finish)."""
    size_of = size if callable(size) else (lambda: size)
    batch: list[Any] = []
    n = max(1, size_of())
    for k in keys:
        batch.append(k)
        if len(batch) >= n:
            yield batch
            batch = []
            n = max(1, size_of())
    if batch:
        yield batch


#: the last device rate seen per (model weights, device): the next image's tasks start at the right size
_rates: dict[tuple[str, str], float] = {}


class TaskSizer:
    """Tiles per tile task from a target device time (``--task-seconds``), measured as tasks finish.

    Starts at ``base`` tiles (today's size: one forward batch), or at the rate the last image measured;
    then each finished task reports its worker's device seconds per megapixel of windows, and later
    tasks carry ``task_seconds / (that × window megapixels)`` tiles — never fewer than ``base``, and
    never so many that the image has fewer than two tasks per worker thread (``cap``). How tiles are
    grouped never changes the output: each chunk is in exactly one tile, each tile in exactly one task.
    """

    def __init__(self, task_seconds: float | None, base: int, window_side: int, tiles: int, threads: int,
                 key: tuple[str, str] = ("", "")) -> None:
        self.task_seconds, self.base, self.key = task_seconds, base, key
        self.window_mp = window_side * window_side / 1e6
        self.cap = max(base, -(-tiles // (2 * max(1, threads))))
        self.rate = _rates.get(key) if task_seconds else None

    def size(self) -> int:
        if not self.task_seconds or not self.rate:
            return self.base
        return max(self.base, min(self.cap, int(self.task_seconds / (self.rate * self.window_mp))))

    def observe(self, counters: dict[str, Any]) -> None:
        rate = counters.get("seconds_per_megapixel")
        if self.task_seconds and rate:
            self.rate = _rates[self.key] = float(rate)
        with _shares_lock:
            host, device = _task_times.get(self.key, (0.0, 0.0))
            if host + device > 600:  # a long-lived driver (serve.py) follows the recent past, not its whole life
                host, device = host / 2, device / 2
            _task_times[self.key] = (host + float(counters.get("host_seconds", 0.0)),
                                     device + float(counters.get("device_seconds", 0.0)))

    def device_share(self) -> float:
        """The share of a GPU one tile task requests: 1 / :func:`tasks_per_device` of the host and device
        time the run's tasks measured so far (1 / :data:`TASKS_PER_DEVICE` before any task finished)."""
        with _shares_lock:
            host, device = _task_times.get(self.key, (0.0, 0.0))
        return 1 / tasks_per_device(host, device)


#: host and device seconds of finished tile tasks per (model weights, device), summed over the run
_task_times: dict[tuple[str, str], tuple[float, float]] = {}
_shares_lock = threading.Lock()


def tasks_per_device(host_seconds: float, device_seconds: float) -> int:
    """Tile tasks that share one device at once: its read-ahead depth.

    One task is in the forward while the others read their windows and write their chunks; for the device
    never to wait, the others must finish a task's host work (``host / device`` times a forward's time)
    while one forward runs, so ``1 + host / device`` tasks share it. Rounded up to a power of two (shares
    of ``1 / 2**n`` add up exactly in Dask's resource accounting), between 2 and 32;
    :data:`TASKS_PER_DEVICE` until a task has measured both (the worker's threads bound it further).
    """
    if host_seconds <= 0 or device_seconds <= 0:
        return TASKS_PER_DEVICE
    need = 1 + host_seconds / device_seconds
    return min(32, max(2, 1 << math.ceil(math.log2(need))))

class TimedPredictor:
    """A predictor seen through one task: the time this task spent in ``predict`` (its forwards and the
    queue before them) and the window pixels it sent."""

    def __init__(self, predictor: Any) -> None:
        self.predictor, self.seconds, self.pixels = predictor, 0.0, 0

    def _timed(self, fn: Any, tiles: np.ndarray, norm: Any, crop: tuple[int, int] | None) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(tiles, norm, crop)
        finally:
            self.seconds += time.perf_counter() - t0
            self.pixels += int(tiles.shape[0]) * int(tiles.shape[-2]) * int(tiles.shape[-1])

    def predict(self, tiles: np.ndarray, norm: Any = None,
                crop: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        return self._timed(self.predictor.predict, tiles, norm, crop)

    def predict_uncertain(self, tiles: np.ndarray, norm: Any = None, crop: tuple[int, int] | None = None,
                          ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return self._timed(self.predictor.predict_uncertain, tiles, norm, crop)


