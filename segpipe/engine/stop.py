"""A run told to stop (Ctrl-C on the CLI, or a library caller's KeyboardInterrupt).

The driver's images run in threads, and a KeyboardInterrupt reaches only the main thread: without a
word to the others, leaving the images' thread pool waited for every image in flight to finish all its
chunks (minutes for a large image; measured: still running 60 s after SIGINT). :func:`request` tells the
images in flight to stop at their next tile task's completion: each cancels its pending tasks, waits for
the started ones (no task of the run writes after its lock is released), flushes its uncertainty values,
releases its lock and leaves its output resumable, never complete.
"""

from __future__ import annotations

import threading

_stop = threading.Event()


def request() -> None:
    """Ask every image this process drives to stop."""
    _stop.set()


def clear() -> None:
    """The run that asked has ended: later runs of this process go on."""
    _stop.clear()


def requested() -> bool:
    return _stop.is_set()


def check() -> None:
    """Raise KeyboardInterrupt in an image's thread when a stop was asked (not an error of the image:
    its ``finally`` releases what it holds and the interrupt reaches the caller)."""
    if _stop.is_set():
        raise KeyboardInterrupt("segpipe: stop requested")
