"""How often a storage fault is tried again: one small policy value, decided once per run and passed.

What is retried is decided by the error's kind, never by the call site: a
:class:`~segpipe.core.errors.TransientIOError` (a bucket's 5xx that the storage client gave up on, a
403 that may clear, a dropped connection, a time-out; :func:`segpipe.io.storage.storage_error` sorts
them from permanent faults), or a bare ``ConnectionError`` / ``TimeoutError``. Bad input and permanent
storage errors (no space, a read-only disk) are never retried.

Where it is used (each with the run's one :class:`RetryPolicy`, ``SegmentSettings.retry``): lock reads
and writes (:mod:`segpipe.io.locks`), the uncertainty array (:mod:`segpipe.io.uncertainty`), each tile
task and each pyramid task on its worker, and the image as a whole (a transient failure anywhere else —
the output's metadata, finalize — runs the image again, which resumes from the chunks in the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from segpipe.core.errors import TransientIOError

log = logging.getLogger("segpipe.retry")

T = TypeVar("T")

#: errors a retry may cure (the io layer turns a storage client's OSError into TransientIOError)
RETRYABLE: tuple[type[BaseException], ...] = (TransientIOError, ConnectionError, TimeoutError)


class RetryPolicy(BaseModel):
    """Bounded retries with exponential backoff for storage faults that may pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(4, ge=1, le=20, description="Tries in all, the first included (1: never retry).")
    backoff: float = Field(1.0, ge=0.0, le=60.0, description="Seconds before the first retry; doubled each time.")
    max_backoff: float = Field(30.0, ge=0.0, le=600.0, description="The longest wait between two tries, in seconds.")

    def delays(self) -> list[float]:
        """The waits before retry 1, 2, …: ``backoff · 2^i``, at most ``max_backoff`` (``attempts − 1`` of them)."""
        return [min(self.backoff * 2**i, self.max_backoff) for i in range(self.attempts - 1)]

    def call(self, fn: Callable[[], T], retried: Callable[[BaseException], None] | None = None,
             stop: Callable[[], bool] | None = None) -> T:
        """``fn()``, tried again after each :data:`RETRYABLE` error while tries are left.

        ``retried(error)`` is called before each retry (the caller counts them); ``stop()`` true ends the
        retries early (a cancelled task). The last error is raised as it is: it names the storage fault.
        """
        for delay in [*self.delays(), None]:
            try:
                return fn()
            except RETRYABLE as e:
                if delay is None or (stop is not None and stop()):
                    raise
                # the log file's line; the image's row counts retries and its note names the last one
                log.info("%s; retrying in %.1f s", describe(e), delay)
                if retried is not None:
                    retried(e)
                time.sleep(delay)
        raise AssertionError("unreachable: the last try returns or raises")


def describe(e: BaseException) -> str:
    """One line for a retried error (its message's first line, or its class)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
