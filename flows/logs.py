"""segpipe's own log lines in the flow run's logs (API and UI), not only on the serving process's terminal.

The library logs on ``segpipe.*`` loggers (which cluster a run used, waiting for workers, training
progress, evaluation progress); Prefect sends only its run loggers' records to the API. The handler
added here sends segpipe's INFO-and-above records too, when they are emitted inside a flow or task run
(a Dask worker thread of the embedded cluster has no run: its records stay local).
"""

from __future__ import annotations

import logging


class _InARun(logging.Filter):
    """Only records emitted inside a Prefect flow or task run (the API handler needs the run's id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def forward_library_logs() -> None:
    """Send ``segpipe`` INFO+ records to the run's logs, once per process (called from the flow bodies)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("segpipe")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        return
    handler = APILogHandler()
    handler.setLevel(logging.INFO)
    handler.addFilter(_InARun())
    logger.addHandler(handler)
