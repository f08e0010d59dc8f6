"""Output locks: an output being written by one run is owned by that run.

A lock is a small JSON file next to the output (``OUT/x.zarr.lock``) holding the host,
PID, run id, start time and a heartbeat that the owning process refreshes every
:data:`HEARTBEAT_S` seconds. Another run that finds it leaves the output alone and says so
in one line. A lock is *stale* — and is taken over — when its process is gone (same host,
PID not alive) or its heartbeat is older than :data:`STALE_AFTER_S` (another host, whose
process we cannot see). This is the scheme of TRIDENT's lock files, plus a heartbeat so a
SIGKILLed run on another machine does not block the output forever.

Local folders: creation is ``O_CREAT | O_EXCL`` (exactly one winner) and a stale lock is
first renamed away (also atomic), so two runs that both see it stale cannot both take it.
Object stores: there is no exclusive create in every S3 implementation, so the lock is
written and read back; two runs starting within the same second on one bucket key can
both believe they won. Chunk writes are whole objects, so the output is still correct then.

A storage fault is never a decision: a lock that cannot be read (a 5xx, a 403, a time-out) is a
:class:`~segpipe.core.errors.TransientIOError`, retried with the run's
:class:`~segpipe.core.retry.RetryPolicy`, and never read as "another run holds it" (which would skip the
image) nor as "no lock" (which would let two runs write). Only a lock file whose *content* is not a lock
(half-written, foreign) counts as held, and it turns stale by age.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from segpipe.core.errors import SegpipeError
from segpipe.core.retry import RetryPolicy
from segpipe.io.storage import filesystem, is_local, storage_error, strip_file_scheme, write_atomic

log = logging.getLogger("segpipe.locks")

HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0


@dataclass(frozen=True)
class LockInfo:
    """Who holds an output."""

    host: str
    pid: int
    run_id: str
    started: float
    heartbeat: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}, since {started}"

    def is_stale(self, now: float | None = None) -> bool:
        """Its process is gone (same host), or its heartbeat is older than :data:`STALE_AFTER_S` (any host:
        a live process beats every :data:`HEARTBEAT_S`, so an old heartbeat is a lock that it released
        but could not remove)."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return now - self.heartbeat > STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_path(output_uri: str) -> str:
    return strip_file_scheme(output_uri).rstrip("/") + ".lock"


def read_lock(output_uri: str) -> LockInfo | None:
    """The current holder of ``output_uri``'s lock, or None when there is no lock file.

    A storage fault raises (:func:`segpipe.io.storage.storage_error`: a :class:`TransientIOError` for a
    5xx, a 403 or a time-out); a file whose content is not a lock counts as held since now.
    """
    fs, path = filesystem(lock_path(output_uri))
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise storage_error(lock_path(output_uri), e, "read") from None
    try:
        data = json.loads(raw)
        return LockInfo(**{k: data[k] for k in LockInfo.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        # half-written or foreign: treat as held since now, it becomes stale by age
        return LockInfo("?", -1, "?", time.time(), time.time())


class OutputLock:
    """A held lock; its heartbeat is refreshed by the process's heartbeat thread until :meth:`release`."""

    def __init__(self, output_uri: str, info: LockInfo, retry: RetryPolicy | None = None,
                 retried: Callable[[BaseException], None] | None = None) -> None:
        self.output_uri = output_uri
        self.info = info
        self.retry = retry or RetryPolicy(attempts=1)
        self.retried = retried  #: told of each storage fault retried while releasing (the image's row counts them)
        self._mutex = threading.Lock()  # a beat and the release never interleave
        self._released = False
        _heartbeats.add(self)

    def beat(self) -> None:
        """Refresh the heartbeat in the lock file (unless released meanwhile)."""
        with self._mutex:
            if self._released:
                return
            try:
                self.info = LockInfo(**{**asdict(self.info), "heartbeat": time.time()})
                fs, path = filesystem(lock_path(self.output_uri))
                write_atomic(fs, path, json.dumps(asdict(self.info)).encode())
            except OSError:  # a missed heartbeat only makes the lock look stale sooner
                log.debug("lock heartbeat failed for %s", self.output_uri, exc_info=True)

    def release(self) -> str | None:
        """Stop the heartbeat and remove the lock if it is still ours.

        Storage faults are retried (the lock's :class:`RetryPolicy`). Never raises for storage: it runs in
        ``finally`` blocks, where an exception would replace the image's own result (and abort every other
        image of a ``pool.map``). Returns None, or one line saying the lock file could not be removed; such
        a lock stops beating and is taken over once its heartbeat is :data:`STALE_AFTER_S` old
        (:meth:`LockInfo.is_stale`).
        """
        _heartbeats.remove(self)
        with self._mutex:
            if self._released:
                return None
            self._released = True
            try:
                self.retry.call(self._remove, retried=self.retried)
            except (OSError, SegpipeError) as e:
                log.debug("releasing the lock of %s failed", self.output_uri, exc_info=True)
                reason = (getattr(e, "problem", None) or getattr(e, "strerror", None) or str(e)
                          or type(e).__name__).splitlines()[0]
                return (f"{lock_path(self.output_uri)}: the lock could not be removed ({reason}); another run "
                        f"takes it over once it is {STALE_AFTER_S:.0f} s old")
            return None

    def _remove(self) -> None:
        """Remove the lock file if it still holds this lock (a storage fault raises, to be retried)."""
        fs, path = filesystem(lock_path(self.output_uri))
        holder = read_lock(self.output_uri)
        if holder is not None and holder.run_id == self.info.run_id:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise storage_error(lock_path(self.output_uri), e, "removed") from None


    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        if (problem := self.release()) is not None:
            log.warning("%s", problem)


class _Heartbeats:
    """One daemon thread per process refreshes every held lock whose heartbeat is
    :data:`HEARTBEAT_S` old (a thread per lock cost a start and a join per image, a tenth of a chip's
    time: docs/benchmarks.md, "Design measurements")."""

    def __init__(self) -> None:
        self._locks: set[OutputLock] = set()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lock: OutputLock) -> None:
        with self._mutex:
            self._locks.add(lock)
            if self._thread is None or not self._thread.is_alive():  # first lock, or after a fork
                self._thread = threading.Thread(target=self._run, name="segpipe-lock-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, lock: OutputLock) -> None:
        with self._mutex:
            self._locks.discard(lock)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S / 3)
            with self._mutex:
                held = list(self._locks)
            now = time.time()
            for lock in held:
                if now - lock.info.heartbeat >= HEARTBEAT_S:
                    lock.beat()


_heartbeats = _Heartbeats()


def acquire(output_uri: str, run_id: str | None = None, retry: RetryPolicy | None = None,
            retried: Callable[[BaseException], None] | None = None) -> OutputLock | LockInfo:
    """Take the lock of ``output_uri``: an :class:`OutputLock`, or the :class:`LockInfo` of its live holder.

    Each storage call is retried with ``retry`` (default: no retry), and ``retried(error)`` is told of each
    retry, also those of the lock's release; a fault that outlasts the retries raises its
    :class:`TransientIOError` (or :class:`OutputError`), naming the lock file — never a holder.
    """
    retry = retry or RetryPolicy(attempts=1)
    now = time.time()
    info = LockInfo(socket.gethostname(), os.getpid(), run_id or uuid.uuid4().hex, now, now)
    blob = json.dumps(asdict(info)).encode()
    fs, path = filesystem(lock_path(output_uri))

    def read() -> LockInfo | None:
        return retry.call(lambda: read_lock(output_uri), retried=retried)

    def storage(fn: Any, doing: str) -> Any:
        def once() -> Any:
            try:
                return fn()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise storage_error(lock_path(output_uri), e, doing) from None
        return retry.call(once, retried=retried)

    for _ in range(5):
        holder = read()
        if holder is not None:
            if not holder.is_stale():
                return holder
            log.warning("taking over the stale lock of %s (%s)", output_uri, holder.describe())
            storage(lambda stale=holder: _remove_stale(fs, path, stale), "removed")
            continue
        if is_local(fs):
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # someone else was faster: look at who
            except OSError as e:  # a read-only folder, a full disk: one line naming the lock file
                raise storage_error(lock_path(output_uri), e, "written") from None
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
        else:
            storage(lambda: fs.pipe_file(path, blob), "written")  # a whole object: a retry rewrites the same
            if (mine := read()) is None or mine.run_id != info.run_id:
                continue
        return OutputLock(output_uri, info, retry, retried)
    holder = read()
    return holder if holder is not None else LockInfo("?", -1, "?", now, now)


def _remove_stale(fs: Any, path: str, stale: LockInfo) -> None:
    """Remove the lock at ``path`` if it is still the ``stale`` one we looked at."""
    if is_local(fs):
        aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)  # atomic: of two runs seeing it stale, one renames it
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read()).get("run_id")
        except (OSError, ValueError):
            moved = None
        if moved is not None and moved != stale.run_id:
            # another run took the stale lock between our read and our rename: give it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        os.remove(aside)
    else:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
