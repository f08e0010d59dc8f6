"""A failed run in one line, and segpipe's warnings in the run's logs.

What Prefect's engine logs when a flow ends Failed on a segpipe error:

A flow that returns a ``Failed`` state (failed images, a bad source) ends its run Failed as it
should, but a deployment's runner then calls ``state.result()`` in its engine, which raises the
state's exception and logs it as "Engine execution exited with unexpected exception" with a
traceback — in the flow-run logs of the API and UI, where the user reads it as a crash.
For a :class:`~segpipe.core.errors.SegpipeError` (bad input, failed images) that traceback says
nothing the one-line message does not; the filter keeps the record and drops the traceback.
Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import logging

from segpipe.core.errors import SegpipeError

#: the logger of Prefect's flow-run engine messages (``prefect.logging.loggers.flow_run_logger``)
ENGINE_LOGGER = "prefect.flow_runs"


class OneLineForSegpipeErrors(logging.Filter):
    """Turn the engine's traceback record for a SegpipeError into one line: ``flow run failed: …``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SegpipeError):
            record.msg, record.args = "flow run failed: %s", (str(exc),)
            record.exc_info, record.exc_text = None, None
        return True


def install_one_line_failures() -> None:
    """Attach the filter to the engine's logger once per process (called from the flow bodies, never at import)."""
    logger = logging.getLogger(ENGINE_LOGGER)
    if not any(isinstance(f, OneLineForSegpipeErrors) for f in logger.filters):
        logger.addFilter(OneLineForSegpipeErrors())


#: segpipe's own loggers (the library logs under this name)
SEGPIPE_LOGGER = "segpipe"


class _InARun(logging.Filter):
    """Pass records made inside a flow or task run: only those have a run to be shown in."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def install_segpipe_warnings() -> None:
    """Send segpipe's warnings (label features repaired, dropped or outside the image, a mask that wins
    over labels, …) to the flow run's logs in the API and UI, where the person who runs the weekly
    retrain reads them; Prefect ships only its own loggers there. Once per process, from the flow bodies."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(SEGPIPE_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler(level=logging.WARNING)
        handler.addFilter(_InARun())
        logger.addHandler(handler)
