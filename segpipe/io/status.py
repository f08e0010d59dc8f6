"""What is in an output folder: each segpipe output's state and the locks held there (read only).

``segpipe status OUT…`` shows it. An output is

* ``complete`` — its provenance says ``status: complete`` (the last write of a run);
* ``running`` — a live run holds its lock (``OUT/x.zarr.lock``: host, PID, run id, heartbeat);
* ``unfinished`` — neither: the run that wrote it failed or was stopped; the next run resumes it (or
  replaces it when its settings differ), taking over a stale lock.

The walk lists folders and stops at each ``*.zarr`` (their chunks are never listed), so it costs one
listing per folder of sources plus one small read per output.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass

from segpipe.core.errors import OutputError
from segpipe.io.locks import LockInfo, read_lock
from segpipe.io.output import FORMAT, read_attrs
from segpipe.io.storage import filesystem, has_scheme, strip_file_scheme

LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class OutputState:
    """One output (or a lock whose output does not exist yet) and where it stands."""

    uri: str
    state: str  #: complete | running | unfinished
    source: str | None = None
    precision: str | None = None
    started: str | None = None
    finished: str | None = None
    lock: LockInfo | None = None

    def lock_line(self, now: float | None = None) -> str:
        """The lock in words: owner, age, heartbeat age, live or stale; "" without a lock."""
        if self.lock is None:
            return ""
        now = time.time() if now is None else now
        lk = self.lock
        return (f"host {lk.host}, pid {lk.pid}, run {lk.run_id[:8]}, held {_age(now - lk.started)}, heartbeat "
                f"{_age(now - lk.heartbeat)} ago ({'stale' if lk.is_stale(now) else 'live'})")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def output_states(root: str) -> list[OutputState]:
    """Every segpipe output under ``root`` (a folder or bucket prefix, or one ``*.zarr``), sorted by path."""
    root = strip_file_scheme(root).rstrip("/")
    fs, path = filesystem(root)
    prefix = root.split("://", 1)[0] + "://" if has_scheme(root) else ""
    try:
        if not fs.exists(path):
            raise OutputError(root, "does not exist")
    except OSError as e:
        raise OutputError(root, f"cannot be listed ({e})") from None
    outputs: set[str] = set()
    locks: set[str] = set()
    if path.endswith(".zarr"):
        outputs.add(path)
        if fs.exists(path + LOCK_SUFFIX):
            locks.add(path + LOCK_SUFFIX)
    else:
        folders = [path]
        while folders:
            folder = folders.pop()
            try:
                entries = fs.ls(folder, detail=True)
            except OSError as e:
                raise OutputError(prefix + folder, f"cannot be listed ({e})") from None
            for entry in entries:
                name = entry["name"].rstrip("/")
                base = posixpath.basename(name)
                if base.startswith("."):
                    continue
                if entry.get("type") == "directory":
                    (outputs.add if base.endswith(".zarr") else folders.append)(name)
                elif base.endswith(".zarr" + LOCK_SUFFIX):
                    locks.add(name)
    states = []
    for out in sorted(outputs | {lk[: -len(LOCK_SUFFIX)] for lk in locks}):
        uri = prefix + out
        lock = read_lock(uri) if out + LOCK_SUFFIX in locks else None
        states.append(_state(uri, lock))
    return [s for s in states if s is not None]


def _state(uri: str, lock: LockInfo | None) -> OutputState | None:
    live = lock is not None and not lock.is_stale()
    attrs = read_attrs(uri)
    seg = (attrs or {}).get("segpipe") or {}
    if seg.get("format") != FORMAT:
        if lock is None:
            return None  # a Zarr store that is not segpipe's
        # a lock without an output yet: a run is creating it, or one died before it wrote anything
        return OutputState(uri, "running" if live else "unfinished", lock=lock)
    state = "complete" if seg.get("status") == "complete" else "running" if live else "unfinished"
    return OutputState(uri, state, source=seg.get("source"), precision=(seg.get("inference") or {}).get("precision"),
                       started=seg.get("started"), finished=seg.get("finished"), lock=lock)
