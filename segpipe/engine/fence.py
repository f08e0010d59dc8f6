"""The fence between a failed image's tile tasks and the next writer of its output.

``Future.cancel`` stops only tasks that have not started; a started tile task runs on, and its
writes would land after the driver released the output's lock, beside another run's (a Prefect
retry 5 s later). Tile tasks look at their own state before each chunk they write
(:func:`cancelled`: a :class:`Fenced` stop), and the driver waits until no task of the run executes
(:func:`wait_for_started`) before it lets the lock go.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

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


def _executing(dask_worker: Any, prefix: tuple[str, ...]) -> list[str]:
    """Keys starting with one of ``prefix`` that ``dask_worker`` runs now, cancelled ones included (via client.run)."""
    running = set(dask_worker.state.executing) | set(dask_worker.state.long_running)
    return [str(ts.key) for ts in running if str(ts.key).startswith(prefix)]


def wait_for_started(client: Client, prefix: tuple[str, ...], timeout: float = 600.0) -> None:
    """Return once no worker runs a task whose key starts with one of ``prefix`` (cancelled tasks stop at their
    next chunk, see :func:`cancelled`); after ``timeout`` s, go on with a warning."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            running = [k for keys in client.run(_executing, prefix).values() for k in keys]
        except Exception:  # noqa: BLE001 - a scheduler that is gone runs nothing more
            log.debug("could not ask the workers what runs", exc_info=True)
            return
        if not running:
            return
        if time.monotonic() > deadline:
            log.warning("%d cancelled tile task(s) still run after %.0f s: %s", len(running), timeout, running[:3])
            return
        time.sleep(delay)
        delay = min(0.2, delay * 2)

#: a task's work: (tile key, [chunk keys of that tile to write])
