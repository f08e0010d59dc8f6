"""How many images are in progress at once: one sliding window for the CLI and the flows.

A run keeps ``width`` images in progress, and starts the next one as soon as *any* of them
finishes — not when the slowest of a batch does: one 50,000² scene in a batch of chips would
otherwise leave the workers idle while it runs alone. The window is generic over what runs an
image (a thread pool's future in the CLI, a Prefect task future in the flow), so both keep the
same policy; results come back in the order of the listing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
F = TypeVar("F")

#: images in progress at once, unless the caller says otherwise (CLI ``segment_many`` and the flow alike)
IMAGES_IN_FLIGHT = 4


def sliding_window(items: Sequence[T], start: Callable[[T], F], first_done: Callable[[list[F]], F],
                   width: int = IMAGES_IN_FLIGHT) -> Iterable[tuple[int, F]]:
    """Start ``items`` keeping at most ``width`` running; yield ``(index, future)`` as each one finishes.

    ``start(item)`` returns a future; ``first_done(running)`` blocks until one of the running
    futures is done and returns it. Every item is started exactly once and yielded exactly once.
    """
    width = max(1, int(width))
    running: dict[int, tuple[int, F]] = {}  # id(future) → (index, future): futures need not be hashable
    upcoming = iter(range(len(items)))

    def launch() -> None:
        i = next(upcoming, None)
        if i is not None:
            f = start(items[i])
            running[id(f)] = (i, f)

    for _ in range(min(width, len(items))):
        launch()
    while running:
        done = first_done([f for _, f in running.values()])
        i, _ = running.pop(id(done))
        launch()
        yield i, done
