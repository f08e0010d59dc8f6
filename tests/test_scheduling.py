"""The sliding window of images shared by the CLI and the flow."""

from __future__ import annotations

import math
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


def test_images_in_flight_rule():
    """1 + host/device images keep the device busy (Little's law), one more for variation; at least 2,
    at most 4 per worker thread; before any measurement one per thread, at least 4."""
    from segpipe.core.scheduling import images_in_flight

    assert images_in_flight(0.0, 0.0, 3) == 4 and images_in_flight(0.0, 0.0, 12) == 12  # nothing measured
    assert images_in_flight(0.5, 30.0, 3) == 3  # a big scene: device time dwarfs per-image work (2 + 1)
    assert images_in_flight(10.0, 10.0, 3) == 3  # ceil(1 + 1) + 1
    assert images_in_flight(10.0, 3.4, 3) == 5  # chips at half the host's floor: ceil(3.94) + 1
    assert images_in_flight(10.0, 0.4, 12) == 27  # chips on an H100: ceil(26) + 1
    assert images_in_flight(10.0, 0.4, 3) == 12  # ... capped at 4 per worker thread
    assert images_in_flight(10.0, 0.001, 1) == 4  # the cap is never below 4


def test_images_in_flight_follows_what_finished_images_measured():
    from segpipe.core.scheduling import ImagesInFlight

    w = ImagesInFlight(threads=12)
    assert w() == 4 and w.most == 48  # starts small, whatever the cluster's size
    for _ in range(10):
        w.observe(0.010, 0.0004)  # chips on a fast device
    assert [w() for _ in range(4)] == [8, 16, 27, 27]  # grows to what they need, at most doubling per step
    w.observe(0.5, 60.0)  # then a big scene: the ratio of sums moves
    assert w() == math.ceil(1 + 0.6 / 60.004) + 1 == 3
    assert ImagesInFlight(3, fixed=7)() == 7 and ImagesInFlight(3, fixed=7).most == 7


def test_window_width_may_change_as_items_finish():
    """A callable width is asked as items finish: the window widens and narrows without cancelling anything."""
    widths = iter([1, 1, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1])
    live, peaks = [0], []
    lock = threading.Lock()

    def run(i: int) -> int:
        return i

    def start(i):
        with lock:
            live[0] += 1
            peaks.append(live[0])
        return pool.submit(run, i)

    def first_done(fs):
        f = next(iter(wait(fs, return_when=FIRST_COMPLETED).done))
        with lock:
            live[0] -= 1
        return f

    with ThreadPoolExecutor(4) as pool:
        got = [i for i, _ in sliding_window(list(range(8)), start, first_done, lambda: next(widths))]
    assert sorted(got) == list(range(8))
    assert max(peaks) == 3 and peaks[:2] == [1, 1]  # one at a time until the width grew to 3


def test_tasks_per_device_rule():
    """1 + host/device tasks share a device, rounded up to a power of two within 2..32; 8 before measuring."""
    from segpipe.engine.sizing import TASKS_PER_DEVICE, tasks_per_device

    assert tasks_per_device(0.0, 0.0) == TASKS_PER_DEVICE == 8
    assert tasks_per_device(1.0, 10.0) == 2  # slow device: one forward, one task reading/writing
    assert tasks_per_device(3.0, 1.0) == 4
    assert tasks_per_device(3.1, 1.0) == 8
    assert tasks_per_device(100.0, 1.0) == 32
    assert all(1 / tasks_per_device(h, 1.0) * tasks_per_device(h, 1.0) == 1.0 for h in (0.5, 3, 9, 40))


def test_images_in_flight_start_small_on_a_large_cluster():
    """192 worker threads: 4 images before anything finished, not 192 (each holds a driver thread, a reader,
    an output lock and a share of the tile tasks)."""
    from segpipe.core.scheduling import IMAGES_IN_FLIGHT, ImagesInFlight

    w = ImagesInFlight(threads=192)
    assert w() == IMAGES_IN_FLIGHT == 4 and w.most == 768


def test_task_budget_bounds_every_holder_together_and_shares_fairly():
    from segpipe.core.scheduling import TaskBudget

    assert TaskBudget.for_threads(192) == 384 and TaskBudget.for_threads(1) == 8
    b = TaskBudget(10)
    assert b.take("a", 100, wait=True) == 10  # alone: the whole budget
    assert b.take("b", 100, wait=False) == 0  # nothing free; b holds none but does not wait
    b.give("a", 4)
    assert b.take("b", 100, wait=False) == 4  # fair share now 10 // 2 = 5
    b.give("a", 6)
    assert b.take("a", 100, wait=False) == 5 and b.take("b", 100, wait=False) == 1  # a: 5, b: 5
    assert b.used == 10 and b.held == {"a": 5, "b": 5}
    b.leave("a")
    assert b.used == 5 and b.take("b", 100, wait=False) == 5
    b.resize(4)
    assert b.take("c", 1, wait=False) == 0  # over the new limit: nothing until slots come back
    b.leave("b")
    assert b.take("c", 100, wait=False) == 4 and b.used == 4


def test_task_budget_a_waiting_holder_gets_the_next_slot():
    """A holder with no slot waits for one, first come first served: the holders that have some do not
    take the freed slot back before it (no starvation when images outnumber slots)."""
    from segpipe.core.scheduling import TaskBudget

    b = TaskBudget(2)
    assert b.take("a", 1, wait=True) == 1 and b.take("b", 1, wait=True) == 1
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(b.take("c", 1, wait=True)))
    waiter.start()
    for _ in range(200):
        if b._waiting:
            break
        threading.Event().wait(0.01)
    assert b._waiting == ["c"]
    b.give("a")
    assert b.take("a", 1, wait=False) == 0  # c waits: a may not top up first
    waiter.join(5)
    assert got == [1] and b.held == {"a": 0, "b": 1, "c": 1}
