"""The fence between a failed image's Dask tasks and the next writer of its output; what lost workers did.

``Future.cancel`` stops only tasks that have not started; a started tile or pyramid task runs on, and
its writes would land after the driver released the output's lock, beside another run's (the image's
next try a second later). The tasks look at their own state before each chunk they write
(:func:`cancelled`: a :class:`Fenced` stop), and the driver waits until no task of the run executes
(:func:`wait_for_started`) before it lets the lock go. A run's tasks are known by their key prefix
(:class:`RunTasks`, :func:`task_prefixes`), which also counts the tasks a lost worker had in hand
(:class:`LostWorkers`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segpipe.core.errors import SegpipeError, TransientIOError
from segpipe.core.retry import RetryPolicy, describe

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("segpipe.engine.segment")


class Fenced(Exception):
    """A tile task stopped before writing because the driver cancelled it (its image failed)."""


def cancelled() -> bool:
    """True when the Dask task running in this thread was cancelled (a local look at the worker's state).

    ``Future.cancel`` stops only tasks that have not started; a started one runs on, and its writes would
    land after the driver released the output's lock, beside another run's (a Prefect retry 5 s later).
    The tile tasks look here before each chunk they write (the fence); the driver waits until no task
    of the run executes (:func:`wait_for_started`) before it lets the lock go.
    """
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker (library use, tests)
        return False
    key = getattr(thread_state, "key", None)
    ts = worker.state.tasks.get(key) if key is not None else None
    return ts is not None and ts.state == "cancelled"


#: worker task states from which a task never runs again (its result is there, it failed, it is gone)
_SETTLED = frozenset({"memory", "error", "released", "forgotten"})


def _executing(prefix: tuple[str, ...], dask_worker: Any = None) -> list[str]:
    """Keys starting with one of ``prefix`` that ``dask_worker`` runs now or may still start (via client.run,
    which passes the worker as the keyword ``dask_worker``, after the positional arguments).

    A cancelled task that runs stays ``cancelled`` until it returns; one that was queued on the worker
    when the cancellation left the scheduler is ``ready`` until the worker hears of it, and could start
    meanwhile: both count."""
    return [str(k) for k, ts in list(dask_worker.state.tasks.items())
            if str(k).startswith(prefix) and ts.state not in _SETTLED]


def wait_for_started(client: Client, prefix: tuple[str, ...], timeout: float = 600.0) -> None:
    """Return once no worker runs, or may still start, a task whose key starts with one of ``prefix``
    (cancelled tasks stop at their next chunk, see :func:`cancelled`); after ``timeout`` s, go on with a
    warning. Two looks in a row must find none: a task the scheduler sent just before the cancellation
    may reach its worker after the first look."""
    deadline = time.monotonic() + timeout
    delay, quiet = 0.01, 0
    while True:
        try:
            running = [k for keys in client.run(_executing, prefix).values() for k in keys]
        except Exception:  # noqa: BLE001 - a scheduler that is gone runs nothing more
            log.debug("could not ask the workers what runs", exc_info=True)
            return
        quiet = 0 if running else quiet + 1
        if quiet >= 2:
            return
        if time.monotonic() > deadline:
            log.warning("%d cancelled task(s) still run after %.0f s: %s", len(running), timeout, running[:3])
            return
        time.sleep(delay if running else 0.05)
        delay = min(0.2, delay * 2)


@dataclass
class RunTasks:
    """One image run's Dask tasks as the driver sees them: their keys (whose prefix is the fence), the
    :class:`RetryPolicy` the tasks retry storage faults with, and the retries they reported."""

    run_id: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    storage_retries: int = 0
    retried: str | None = None  #: the last fault a task retried (one line)

    def prefix(self, kind: str) -> str:
        """The key prefix of this run's tasks of ``kind`` ("tiles", "fill", "pyramid")."""
        return f"segpipe-{kind}-{self.run_id[:8]}-"

    def key(self, kind: str) -> str:
        """A unique key for a task of ``kind`` of this run."""
        return self.prefix(kind) + uuid.uuid4().hex[:12]

    def observe(self, counters: dict[str, Any]) -> None:
        """Count the retries a task reported in its counters (``storage_retries``, ``retried``)."""
        if counters.get("storage_retries"):
            self.storage_retries += int(counters["storage_retries"])
            self.retried = counters.get("retried") or self.retried

    def map(self, client: Client, kind: str, fn: Callable[[Any], Any], items: list[Any]) -> list[dict[str, Any]]:
        """``fn(item)`` for every item as Dask tasks of this run (``kind``: their key's word), each retrying
        storage faults with :attr:`retry` (:func:`retried_task`); returns their counters as they finish
        (``value``: what ``fn`` returned) and counts their retries. On the first error: the other tasks are
        cancelled, and it is raised once none of them runs or may still start (the fence)."""
        from distributed import as_completed

        futures = [client.submit(retried_task, fn, self.retry, item, key=self.key(kind), pure=False)
                   for item in items]
        done: list[dict[str, Any]] = []
        try:
            for fut in as_completed(futures):
                counters = fut.result()
                self.observe(counters)
                if "error" in counters:
                    raise counters["error"]
                done.append(counters)
        except BaseException:
            client.cancel(futures)  # one round trip; tasks already started stop at their next chunk
            wait_for_started(client, (self.prefix(kind),))
            raise
        return done


def retried_task(fn: Callable[[Any], Any], retry: RetryPolicy, item: Any) -> dict[str, Any]:
    """Dask task: ``fn(item)`` with storage faults that may pass retried (until the task is cancelled).

    Returns ``{"value": …}`` (plus ``storage_retries`` and the last fault's line when it retried), or
    ``{"error": e}`` for a :class:`SegpipeError` that outlasted the retries — returned, not raised, so the
    worker logs no "Compute Failed" block (as :func:`segpipe.engine.tasks.run_tiles`)."""
    retried: list[str] = []
    try:
        counters: dict[str, Any] = {"value": retry.call(lambda: fn(item), retried=lambda e: retried.append(
            describe(e)), stop=cancelled)}
    except SegpipeError as e:
        counters = {"error": e.detached()}
    except (ConnectionError, TimeoutError) as e:
        counters = {"error": TransientIOError(None, f"a task failed ({describe(e)})")}
    if retried:
        counters.update(storage_retries=len(retried), retried=retried[-1])
    return counters


def task_prefixes(run_id: str) -> tuple[str, ...]:
    """The key prefixes of one image run's Dask tasks (tile, fill and pyramid tasks): what the fence waits
    for and what a lost worker's recomputations are counted by."""
    run = RunTasks(run_id)
    return (run.prefix("tiles"), run.prefix("fill"), run.prefix("pyramid"))


class LostWorkers:
    """The workers a client saw lost, and the task keys each had in hand (scheduler events).

    When a worker dies unexpectedly, the scheduler publishes a ``remove-worker`` event on its ``all`` topic
    with the keys it was processing and the results it held (``processing-tasks``, ``lost-computed-tasks``)
    — exactly the tasks Dask runs again elsewhere — before it reschedules them. The event reaches the client
    on the same ordered stream as task results, so by the time an image's last task is back, every loss
    that touched it is here. Counting from inside a task cannot see this (a task does not know it ran
    before), and the scheduler forgets a task's state once its result is released. A graceful removal
    (``expected``: retirement, adaptive scale-down) hands its tasks over and is not counted.

    The client is subscribed only while an image watches (:meth:`watch`): a client that stays subscribed
    to ``all`` makes the scheduler log a CRITICAL "Closed comm" line when that client closes.
    """

    def __init__(self, client: Client, keep: int = 1000) -> None:
        self.client = client
        self._events: deque[tuple[float, frozenset[str]]] = deque(maxlen=keep)
        self._mutex = threading.Lock()
        self._watching = 0

    def handle(self, event: tuple[float, Any]) -> None:
        """The ``subscribe_topic("all")`` handler (runs on the client's event loop)."""
        _, msg = event
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker" or msg.get("expected"):
            return
        keys = frozenset(str(k) for k in (*msg.get("processing-tasks", ()), *msg.get("lost-computed-tasks", ())))
        ours = [k for k in keys if k.startswith("segpipe-")]
        if ours:
            log.warning("worker %s was lost with %d segpipe task(s) in hand; Dask runs them again elsewhere",
                        msg.get("worker", "?"), len(ours))
        with self._mutex:
            self._events.append((time.monotonic(), keys))

    def watch(self) -> LostWorkerWatch:
        """Start counting for one image (subscribes the client when it is the first image in flight)."""
        with self._mutex:
            if self._watching == 0:
                self.client.subscribe_topic("all", self.handle)
            self._watching += 1
        return LostWorkerWatch(self, time.monotonic())

    def _unwatch(self) -> None:
        with self._mutex:
            self._watching -= 1
            if self._watching:
                return
            try:
                self.client.unsubscribe_topic("all")
            except Exception:  # noqa: BLE001 - a client that is closing has no subscription left to end
                log.debug("cannot unsubscribe from the scheduler's events", exc_info=True)

    def recomputed(self, prefixes: Iterable[str], since: float) -> int:
        """Tasks whose key starts with one of ``prefixes`` that lost workers had in hand since ``since``
        (``time.monotonic()``)."""
        prefixes = tuple(prefixes)
        with self._mutex:
            events = [keys for t, keys in self._events if t >= since]
        return sum(1 for keys in events for k in keys if k.startswith(prefixes))


@dataclass
class LostWorkerWatch:
    """One image's view of :class:`LostWorkers`, from its start until :meth:`close`."""

    lost: LostWorkers | None
    since: float

    def recomputed(self, prefixes: Iterable[str]) -> int:
        """The image's tasks (keys starting with one of ``prefixes``) that a lost worker had in hand."""
        return self.lost.recomputed(prefixes, self.since) if self.lost is not None else 0

    def close(self) -> None:
        if self.lost is not None:
            self.lost._unwatch()
            self.lost = None


_watched: weakref.WeakKeyDictionary[Any, LostWorkers] = weakref.WeakKeyDictionary()
_watched_lock = threading.Lock()


def watch_lost_workers(client: Client) -> LostWorkerWatch:
    """Count, for one image, the tasks that lost workers of ``client``'s cluster had in hand; ``close()`` it
    when the image ends. A client that cannot subscribe counts nothing (the image runs all the same)."""
    with _watched_lock:
        lost = _watched.get(client)
        if lost is None:
            lost = _watched[client] = LostWorkers(client)
    try:
        return lost.watch()
    except Exception:  # noqa: BLE001 - counting is a report; a client that cannot subscribe still runs
        log.debug("cannot subscribe to the scheduler's events", exc_info=True)
        return LostWorkerWatch(None, time.monotonic())
