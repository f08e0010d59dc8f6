"""Small images share Dask tasks: the tile work of many one-task images runs in one Dask task.

A folder of 256² chips is mostly per-image work, and one Dask task per chip cost the scheduler and the
client ~4 ms of CPU each (docs/benchmarks.md, "The per-image toll"): as much as reading and writing the
chip. An image whose whole tile work is one task (a *small* image) hands that task to its process's
:class:`SharedTasks` instead of submitting it. A collector thread puts the work of the small images
waiting at that moment into one Dask task (:func:`run_shared`) as soon as a worker can start it: when
the workers idle, an image waits for nobody; when they are busy, the images that arrive meanwhile
share the next task.

Nothing else is shared. Each image keeps its own driver (one Prefect task per image in the flow), output,
lock, provenance and completion record; its chunks are written by :func:`segpipe.engine.tasks.run_tiles`
exactly as in a task of its own (retries, one-line errors, the fence), one image after the other, so
every chunk still has one writer and no label depends on which images shared a task. A shared task that
has started cannot be stopped for one of its images: an image that fails meanwhile waits for it before
it lets its lock go (:meth:`SharedItem.cancel`), as it waits for its own started tasks.
"""

from __future__ import annotations

import logging
import pickle
import threading
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from segpipe.engine.fence import Fenced
from segpipe.engine.job import ChunkJob, TileWork
from segpipe.engine.tasks import run_tiles

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("segpipe.engine.segment")

#: small images' work in one shared task, at most (the images in flight bound it first)
MAX_SHARED = 32
#: seconds a collector thread waits for work before it ends (the next small image starts another)
IDLE_EXIT_S = 30.0


def run_shared(items: list[tuple[ChunkJob, TileWork]]) -> list[dict[str, Any]]:
    """Dask task: the tile work of several small images, one after the other, each exactly as in a task of
    its own (:func:`segpipe.engine.tasks.run_tiles`); one result per image, in order. A bug in one image's
    work fails that image only (its exception and traceback come back as ``{"raised": …}``)."""
    out: list[dict[str, Any]] = []
    for job, work in items:
        try:
            out.append(run_tiles(job, work, False))
        except Fenced:
            raise  # the shared task itself was cancelled: none of its images may write on
        except Exception as e:  # noqa: BLE001 - the other images of the task go on
            out.append({"raised": _portable(e), "traceback": traceback.format_exc()})
    return out


def _portable(e: Exception) -> Exception:
    """``e``, or a RuntimeError saying what it was when it cannot travel back through Dask (pickle)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - anything pickle may raise
        return RuntimeError(f"{type(e).__name__}: {e}")


class SharedItem:
    """One small image's tile work handed to :class:`SharedTasks`: a future-like value with what
    :func:`segpipe.engine.tasks.run_tile_tasks` uses of a Dask future (``key``, ``status``, ``result``,
    ``exception``, ``traceback``, ``add_done_callback``, ``cancel``, ``release``)."""

    def __init__(self, owner: SharedTasks, client: Client, job: ChunkJob, work: TileWork,
                 resources: dict[str, float] | None) -> None:
        (ty, tx), _ = work[0]
        self.key = f"segpipe-shared-{job.target.run_id[:8]}-{ty}-{tx}-{uuid.uuid4().hex[:6]}"
        self.owner, self.client, self.job, self.work, self.resources = owner, client, job, work, resources
        self.group = (job.model.sha256, job.inference.device, tuple(sorted((resources or {}).items())))
        self.status = "pending"  #: pending → finished | error | cancelled
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._traceback: Any = None
        self._callbacks: list[Callable[[SharedItem], Any]] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    def add_done_callback(self, fn: Callable[[SharedItem], Any]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, status: str, result: dict[str, Any] | None = None, error: BaseException | None = None,
               tb: Any = None) -> None:
        """Settle the item (once) and call its callbacks."""
        with self._lock:
            if self._done.is_set():
                return
            self.status, self._result, self._error, self._traceback = status, result, error, tb
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def result(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self) -> BaseException | None:
        return self._error

    def traceback(self) -> Any:
        return self._traceback

    def release(self) -> None:
        self._result = None

    def cancel(self) -> None:
        """Withdraw the work if no task carries it yet; else wait until its shared task ended (it cannot
        be stopped for one image, and no task may write an image's chunks after its lock is released)."""
        if self.owner.withdraw(self):
            self.finish("cancelled")
            return
        if not self._done.wait(600.0):
            log.warning("%s: its shared tile task still runs after 600 s", self.job.target.uri)


class SharedTasks:
    """The small images' tile work of one process on one cluster, gathered into shared Dask tasks.

    At most ``slots`` shared tasks are submitted and unfinished (the work a worker can start now, plus one
    queued per worker so none waits for the collector); the work that arrives meanwhile waits for the next
    one, up to :data:`MAX_SHARED` images a task. Obtain it with :func:`shared_tasks`.
    """

    def __init__(self) -> None:
        self.slots = 1
        self._pending: dict[tuple[Any, ...], list[SharedItem]] = {}
        self._inflight = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, client: Client, job: ChunkJob, work: TileWork, resources: dict[str, float] | None,
               slots: int) -> SharedItem:
        """Hand over one small image's tile work (one task's worth); ``slots``: shared tasks worth having
        in flight on this cluster now."""
        item = SharedItem(self, client, job, work, resources)
        with self._cond:
            self.slots = max(1, slots)
            self._pending.setdefault(item.group, []).append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._collect, name="segpipe-shared-tasks", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return item

    def withdraw(self, item: SharedItem) -> bool:
        """Remove ``item`` if it still waits for a task; False when a task already carries it."""
        with self._cond:
            waiting = self._pending.get(item.group, [])
            if item in waiting:
                waiting.remove(item)
                return True
        return False

    def _ready(self) -> tuple[Any, ...] | None:
        """The group of work to submit now, or None: some work waits and a slot is free (or a task's worth waits)."""
        waiting = {g: items for g, items in self._pending.items() if items}
        if not waiting:
            return None
        group = max(waiting, key=lambda g: len(waiting[g]))
        if self._inflight < self.slots or len(waiting[group]) >= MAX_SHARED:
            return group
        return None

    def _collect(self) -> None:
        while True:
            with self._cond:
                group = self._ready()
                while group is None:
                    if not self._cond.wait(IDLE_EXIT_S) and self._ready() is None and not any(self._pending.values()):
                        self._thread = None  # idle: the next submit starts a new collector
                        return
                    group = self._ready()
                items = self._pending[group][:MAX_SHARED]
                del self._pending[group][:len(items)]
                self._inflight += 1
            try:
                self._launch(items)
            except Exception as e:  # noqa: BLE001 - the client is gone, or refused the task
                self._settle(items, None, e)

    def _launch(self, items: list[SharedItem]) -> None:
        first = items[0]
        fut = first.client.submit(run_shared, [(it.job, it.work) for it in items], pure=False,
                                  resources=first.resources, key=f"segpipe-shared-{uuid.uuid4().hex}")
        fut.add_done_callback(lambda f: self._settle(items, f, None))

    def _settle(self, items: list[SharedItem], fut: Any, error: BaseException | None) -> None:
        """A shared task ended (or could not be submitted): settle each of its images."""
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()
        if error is None and fut.status != "finished":
            error = fut.exception() if fut.status == "error" else Fenced(items[0].work[0][0])
            tb = fut.traceback() if fut.status == "error" else None
        else:
            tb = None
        if error is not None:
            for it in items:
                it.finish("error", error=error, tb=tb)
            return
        try:
            results = fut.result()
        except Exception as e:  # noqa: BLE001 - the result could not be fetched
            for it in items:
                it.finish("error", error=e)
            return
        finally:
            fut.release()
        for it, counters in zip(items, results):
            if "raised" in counters:
                error = counters["raised"]
                if error.__traceback__ is None:  # it came from another process: its traceback as text
                    error.add_note(counters["traceback"])
                it.finish("error", error=error, tb=error.__traceback__)
            else:
                it.finish("finished", result=counters)


_shared: dict[str, SharedTasks] = {}
_shared_lock = threading.Lock()


def shared_tasks(client: Client) -> SharedTasks:
    """This process's :class:`SharedTasks` for the cluster of ``client`` (every image it drives there shares it)."""
    key = str(getattr(getattr(client, "scheduler", None), "address", None) or id(client))
    with _shared_lock:
        shared = _shared.get(key)
        if shared is None:
            if len(_shared) > 16:  # clusters of finished runs (their collectors end when idle)
                _shared.clear()
            shared = _shared[key] = SharedTasks()
        return shared


def is_small(tiles: int, tiles_per_task: int, background: bool) -> bool:
    """Whether an image's tile work shares a Dask task: all of its ``tiles`` fit in one task, and none of them
    is slide background (written by fill tasks of their own)."""
    return not background and tiles <= tiles_per_task


def share_tasks(client: Client, job: ChunkJob, threads: int) -> Callable[[TileWork, dict[str, float] | None], SharedItem]:
    """``submit(work, resources)`` for :func:`segpipe.engine.tasks.run_tile_tasks`: one small image's tile work
    into this process's :class:`SharedTasks` for the cluster of ``client`` (``threads`` worker threads)."""
    pool = shared_tasks(client)

    def submit(work: TileWork, resources: dict[str, float] | None) -> SharedItem:
        return pool.submit(client, job, work, resources, shared_slots(threads, (resources or {}).get("GPU")))

    return submit


def shared_slots(threads: int, share: float | None) -> int:
    """Shared tasks worth having in flight: one per worker thread that may run one (a GPU task's ``share`` of
    a device allows ``1 / share`` at once per device). None queued behind them: the work that arrives
    while they run waits for the next task, which is how the tasks fill."""
    running = max(1, threads)
    if share:
        running = min(running, max(1, round(1 / share)))
    return running
