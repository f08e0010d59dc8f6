"""The outcome of one image (a row of the run summary) and the progress protocol: pure values,
shared by the engine that fills them, the exports that extend them and the applications that show them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class Progress(Protocol):
    """Receives totals once (``plan``) and increments as chunk tasks finish (``advance``)."""

    def plan(self, chunks: int, megapixels: float) -> None: ...

    def advance(self, chunks: int, megapixels: float) -> None: ...

@dataclass
class ImageResult:
    """The outcome of one image (a row of the run summary)."""

    source: str
    output: str
    status: str = "pending"  #: done | skipped | failed
    height: int = 0
    width: int = 0
    chunks: int = 0
    chunks_computed: int = 0
    chunks_resumed: int = 0
    chunks_skipped: int = 0  #: empty (nodata / background) chunks written as fill, no model run
    seconds: float = 0.0
    error: str | None = None
    #: one-line notices for the user (an output replaced and why, a single-class mask, a busy output)
    notes: list[str] = field(default_factory=list)
    #: the failure was a storage error that may pass when retried (a Prefect task retries it)
    transient: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: wall seconds of per-image work that gives the device nothing (header, output, lock, pyramid, finalize)
    host_seconds: float = 0.0
    #: device seconds of its windows at the workers' measured rate (what the image gives the device)
    device_seconds: float = 0.0
    #: storage faults that segpipe tried again (lock, tile and pyramid tasks, uncertainty, the image itself),
    #: after the storage client's own retries gave up (see segpipe.core.retry)
    storage_retries: int = 0
    #: the last storage fault that was tried again (one line), when any
    retried: str | None = None
    #: this image's Dask tasks that a lost worker had in hand and that ran again elsewhere
    recomputed: int = 0

    def add_retries(self, count: int, last: str | None = None) -> None:
        """Count ``count`` storage retries (``last``: the line of the last fault retried)."""
        if count:
            self.storage_retries += count
            self.retried = last or self.retried

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 and self.status == "done" else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["megapixels"] = round(self.megapixels, 3)
        d["mp_per_s"] = round(self.mp_per_s, 3)
        return d

def summary_rows(results: Sequence[ImageResult]) -> list[dict[str, Any]]:
    """One row per image for run summaries (CLI table, Prefect table artifact, JSON report)."""
    return [{
        "image": r.source,
        "size": f"{r.width}x{r.height}" if r.height else "",
        "chunks": r.chunks,
        "computed": r.chunks_computed,
        "resumed": r.chunks_resumed,
        "skipped": r.chunks_skipped,
        "retries": r.storage_retries,
        "recomputed": r.recomputed,
        "seconds": round(r.seconds, 2),
        "mp_per_s": round(r.mp_per_s, 3),
        "status": r.status,
        "output": r.output,
        "error": r.error or "",
    } for r in results]
