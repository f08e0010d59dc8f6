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
    the threads that ran them). Before any image finished: one per worker thread, at least
    :data:`IMAGES_IN_FLIGHT`. Then :func:`images_in_flight` of the sums of what finished images measured
    (a ratio of sums: a few slow headers do not swing it)."""

    def __init__(self, threads: int, fixed: int | None = None) -> None:
        self.threads, self.fixed = max(1, threads), fixed
        self.host = self.device = 0.0
        self._lock = threading.Lock()

    def observe(self, host_seconds: float, device_seconds: float) -> None:
        with self._lock:
            self.host += max(0.0, host_seconds)
            self.device += max(0.0, device_seconds)

    def __call__(self) -> int:
        if self.fixed is not None:
            return max(1, self.fixed)
        with self._lock:
            return images_in_flight(self.host, self.device, self.threads)

    @property
    def most(self) -> int:
        """The widest the window can get (the size of a pool that runs the images)."""
        return max(1, self.fixed) if self.fixed is not None else max(IMAGES_IN_FLIGHT, IMAGES_PER_THREAD * self.threads)


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
