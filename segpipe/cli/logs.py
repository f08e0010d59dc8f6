"""Where the command line's logs go: the log file, the terminal's one-line warnings, library loggers.

Owns ``configure_logging`` (called once by the ``main`` group), the log file's path
(``$SEGPIPE_LOG_DIR`` or ``$XDG_STATE_HOME/segpipe/logs``) and :func:`log_path`, which the
error handling and ``segment`` use to point users at a traceback.
"""

from __future__ import annotations

import logging
import sys
import time

import click

_log_path: str | None = None


def log_path() -> str | None:
    """This run's log file, or None (``--debug``, or no writable state folder)."""
    return _log_path


class _TerminalWarnings(logging.Handler):
    """segpipe's own warnings on the terminal, one line each and without tracebacks."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING and record.name.startswith("segpipe"):
            click.echo(f"warning: {record.getMessage().splitlines()[0]}", err=True)


def log_file_path() -> str:
    """``$SEGPIPE_LOG_DIR`` (default ``$XDG_STATE_HOME/segpipe/logs``) / ``segpipe-<time>-<pid>.log``."""
    import os

    base = os.environ.get("SEGPIPE_LOG_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "segpipe", "logs")
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, f"segpipe-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def configure_logging(debug: bool) -> None:
    """``--debug``: everything on stderr. Otherwise library noise (GDAL, tifffile, Dask's
    "Compute Failed" blocks, Python warnings) goes to a log file and the terminal shows only
    segpipe's one-line errors and warnings."""
    global _log_path
    logging.captureWarnings(True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if debug:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        root.setLevel(logging.DEBUG)
    else:
        try:
            _log_path = log_file_path()
            handler = logging.FileHandler(_log_path, delay=True)
        except OSError:  # no writable state folder: drop the noise rather than print it
            handler = logging.NullHandler()
        root.setLevel(logging.INFO)
        root.addHandler(_TerminalWarnings())
    handler.setFormatter(fmt)
    root.addHandler(handler)
    quiet_library_loggers(debug)


def quiet_library_loggers(debug: bool) -> None:
    """distributed installs its own stderr handlers when imported: route them through ours."""
    import distributed  # noqa: F401 - importing it installs the handlers we replace

    for name in ("distributed", "bokeh", "tornado", "rasterio", "tifffile", "fsspec", "s3fs", "prefect"):
        lg = logging.getLogger(name)
        if not debug:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    # distributed sets INFO on its own loggers; segpipe's INFO lines (which cluster, workers and devices a run
    # used, progress of long steps) go to the log file, the terminal shows only its warnings
    logging.getLogger("distributed").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("segpipe").setLevel(logging.INFO)
