"""How many images are in progress at once: one sliding window for the CLI and the flows.

A run keeps ``width`` images in progress, and starts the next one as soon as *any* of them
finishes — not when the slowest of a batch does: one 50,000² scene in a batch of chips would
otherwise leave the workers idle while it runs alone. The window is generic over what runs an
image (a thread pool's future in the CLI, a Prefect task future in the flow), so both keep the
same policy; results come back in the order of the listing.

The width is not a constant: :class:`ImagesInFlight` sizes it from what finished images measured
(see :func:`images_in_flight` for the rule).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
F = TypeVar("F")

#: images in progress at once before anything is measured, and the least when a caller gives no width
IMAGES_IN_FLIGHT = 4
#: at most this many images in progress per worker thread (each holds a driver thread and a few tasks)
IMAGES_PER_THREAD = 4
#: ... and this many when most finished images were *small*: their tile work shares Dask tasks
#: (engine.groups), so each holds only a driver thread and an open reader, and the tasks fill only with
#: many of them in flight (a worker thread's task carries the small images that arrived while it ran)
SMALL_IMAGES_PER_THREAD = 16
#: tile tasks submitted and not finished, per worker thread, over every image of a run (TaskBudget)
TASKS_PER_THREAD = 2
#: … and never fewer than this many (a cluster of one or two threads still overlaps reads and writes)
MIN_TASKS_IN_FLIGHT = 8


def images_in_flight(host_seconds: float, device_seconds: float, threads: int) -> int:
    """Images to keep in progress so the device never waits for per-image work.

    An image keeps the device busy for ``device_seconds`` (its windows at the measured device rate) and
    spends ``host_seconds`` on work that gives the device nothing (header, output creation and lock,
    provenance, pyramid, finalize: its wall time outside its tile tasks). For the device to stay busy,
    images must finish at one per ``device_seconds``; each is in progress ``host + device`` seconds, so
    (Little's law) ``1 + host / device`` must be in flight; one more absorbs the variation between images.
    At least 2 (one image's per-image work always overlaps another's tiles), at most
    ``IMAGES_PER_THREAD × threads`` (and never below :data:`IMAGES_IN_FLIGHT` as a ceiling).

    A 50 MP scene (device seconds ≫ host seconds) gives 3; a folder of 256² chips on an H100
    (host ~10 ms, device ~0.4 ms a chip) gives 27, capped by the workers' threads.
    """
    cap = max(IMAGES_IN_FLIGHT, IMAGES_PER_THREAD * max(1, threads))  # = ImagesInFlight.most
    if device_seconds <= 0:
        return min(cap, max(IMAGES_IN_FLIGHT, threads))
    need = math.ceil(1 + host_seconds / device_seconds) + 1
    return max(2, min(cap, need))


class ImagesInFlight:
    """The sliding window's width, re-derived as images finish (thread-safe: finished images report from
    the threads that ran them).

    It starts small — :data:`IMAGES_IN_FLIGHT`, whatever the cluster's size: a fleet of 192 threads
    does not open 192 images before one finished — and grows from measurement: each answer is
    :func:`images_in_flight` of the sums of what finished images measured (a ratio of sums: a few slow
    headers do not swing it), but at most twice the previous answer, so one early measurement cannot
    open hundreds of images at once. Tile tasks are bounded separately, over all images (:class:`TaskBudget`).
    """

    def __init__(self, threads: int, fixed: int | None = None) -> None:
        self.threads, self.fixed = max(1, threads), fixed
        self.host = self.device = 0.0
        self.finished = self.small = 0  #: images observed, and how many of them were small
        self._width = min(IMAGES_IN_FLIGHT, self.most)
        self._lock = threading.Lock()

    def observe(self, host_seconds: float, device_seconds: float, small: bool = False) -> None:
        """A finished image's per-image host time and device time; ``small``: its tile work shared a task."""
        with self._lock:
            self.host += max(0.0, host_seconds)
            self.device += max(0.0, device_seconds)
            self.finished += 1
            self.small += bool(small)

    def __call__(self) -> int:
        if self.fixed is not None:
            return max(1, self.fixed)
        with self._lock:
            if self.host <= 0 and self.device <= 0:
                return self._width  # nothing measured yet
            if 2 * self.small > self.finished:  # small images: as many as fill the shared tasks
                want = max(IMAGES_IN_FLIGHT, SMALL_IMAGES_PER_THREAD * self.threads)
            else:
                want = images_in_flight(self.host, self.device, self.threads)
            self._width = min(2 * self._width, want)
            return self._width

    @property
    def most(self) -> int:
        """The widest the window can get for images that are not small."""
        return max(1, self.fixed) if self.fixed is not None else max(IMAGES_IN_FLIGHT, IMAGES_PER_THREAD * self.threads)

    @property
    def pool_size(self) -> int:
        """The widest the window can get for any images (small ones: :data:`SMALL_IMAGES_PER_THREAD`): the
        size of a pool that runs them."""
        if self.fixed is not None:
            return self.most
        return max(IMAGES_IN_FLIGHT, SMALL_IMAGES_PER_THREAD * self.threads)


class TaskBudget:
    """Tile tasks submitted and not yet finished, over every image in progress: at most ``limit``.

    Each image's driver takes slots before it submits tasks and gives one back per finished task. An
    image that holds no slot waits for one (it cannot make progress otherwise); an image that holds
    some tops up without waiting, and only to its fair share (``limit`` / images holding slots), so a
    large image cannot starve the others. Every held slot is a submitted task that finishes, so a waiting
    image always gets a slot. ``limit`` may change while the run goes on (workers join or leave an
    adaptive cluster): :meth:`resize`.

    Without it each image kept ``max(8, 4 × threads)`` tasks pending, and a run ``threads`` images:
    ~147,000 futures for 16 workers × 12 threads before one image finished.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self.held: dict[object, int] = {}
        self._waiting: list[object] = []  # holders with no slot, in the order they asked
        self._cond = threading.Condition()

    @staticmethod
    def for_threads(threads: int) -> int:
        """The bound for a cluster of ``threads`` worker threads: :data:`TASKS_PER_THREAD` per thread
        (one running, one queued behind it so a thread never waits for the driver), at least
        :data:`MIN_TASKS_IN_FLIGHT`."""
        return max(MIN_TASKS_IN_FLIGHT, TASKS_PER_THREAD * max(1, threads))

    def resize(self, limit: int) -> None:
        with self._cond:
            self.limit = max(1, limit)
            self._cond.notify_all()

    def take(self, holder: object, want: int, wait: bool) -> int:
        """Take up to ``want`` slots for ``holder``; returns how many.

        A holder that holds none and may ``wait`` queues for a slot (first come, first served: while
        any holder waits, the others do not top up). Otherwise it takes what is free now, up to its
        fair share, and may get 0."""
        with self._cond:
            self.held.setdefault(holder, 0)
            queued = False
            try:
                while True:
                    mine = self.held[holder]
                    fair = max(1, self.limit // max(1, len(self.held)))
                    n = min(want, self.limit - self.used, fair - mine)
                    if n > 0 and (not self._waiting or self._waiting[0] is holder):
                        self.held[holder] = mine + n
                        self.used += n
                        return n
                    if not wait or mine > 0:
                        return 0
                    if not queued:
                        self._waiting.append(holder)
                        queued = True
                    self._cond.wait(1.0)
            finally:
                if queued:
                    self._waiting.remove(holder)
                    self._cond.notify_all()

    def give(self, holder: object, n: int = 1) -> None:
        """Give back ``n`` slots of ``holder`` (its tasks finished or were cancelled)."""
        with self._cond:
            n = min(n, self.held.get(holder, 0))
            if n <= 0:
                return
            self.held[holder] -= n
            self.used -= n
            self._cond.notify_all()

    def leave(self, holder: object) -> None:
        """``holder`` is done: its remaining slots go back, and it no longer counts for the fair share."""
        with self._cond:
            self.used -= self.held.pop(holder, 0)
            self._cond.notify_all()


def sliding_window(items: Sequence[T], start: Callable[[T], F], first_done: Callable[[list[F]], F],
                   width: int | Callable[[], int] = IMAGES_IN_FLIGHT) -> Iterable[tuple[int, F]]:
    """Start ``items`` keeping at most ``width`` running; yield ``(index, future)`` as each one finishes.

    ``start(item)`` returns a future; ``first_done(running)`` blocks until one of the running
    futures is done and returns it. Every item is started exactly once and yielded exactly once.
    ``width`` may be a callable, asked each time an item finishes (a window sized from measurements:
    :class:`ImagesInFlight`); a smaller answer lets running items finish, it never cancels one.
    """
    width_of = width if callable(width) else (lambda: int(width))
    running: dict[int, tuple[int, F]] = {}  # id(future) → (index, future): futures need not be hashable
    upcoming = iter(range(len(items)))
    left = [len(items)]

    def fill() -> None:
        w = max(1, int(width_of()))
        while left[0] and len(running) < w:
            i = next(upcoming)
            left[0] -= 1
            f = start(items[i])
            running[id(f)] = (i, f)

    fill()
    while running:
        done = first_done([f for _, f in running.values()])
        i, _ = running.pop(id(done))
        fill()
        yield i, done
