"""The sliding window of images shared by the CLI and the flow."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from segpipe.core.scheduling import sliding_window


def test_a_slow_image_does_not_hold_back_the_others():
    """Width 2: while image 0 runs, images 2, 3 and 4 start and finish one after another (a batch
    policy would wait for image 0 before starting image 2)."""
    release = threading.Event()
    started: list[int] = []

    def run(i: int) -> int:
        started.append(i)
        if i == 0:
            assert release.wait(10), "image 0 was never released"
        return i * 10

    order: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        for i, fut in sliding_window(list(range(5)), lambda i: pool.submit(run, i),
                                     lambda fs: next(iter(wait(fs, return_when=FIRST_COMPLETED).done)), width=2):
            order.append(i)
            assert fut.result() == i * 10
            if i == 4:
                assert started == [0, 1, 2, 3, 4] and 0 not in order  # all started while 0 still runs
                release.set()
    assert sorted(order) == [0, 1, 2, 3, 4] and order[-1] == 0


def test_every_item_starts_once_and_at_most_width_run():
    running, peak, starts = [0], [0], []
    lock = threading.Lock()

    def run(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        with lock:
            running[0] -= 1
        return i

    with ThreadPoolExecutor(8) as pool:
        def start(i):
            starts.append(i)
            return pool.submit(run, i)

        got = [i for i, _ in sliding_window(list(range(20)), start,
                                            lambda fs: next(iter(wait(fs, return_when=FIRST_COMPLETED).done)), 3)]
    assert sorted(got) == list(range(20)) and starts == list(range(20)) and peak[0] <= 3
    assert list(sliding_window([], start, lambda fs: fs[0], 3)) == []
