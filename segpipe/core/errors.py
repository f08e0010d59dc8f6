"""Errors that users can act on.

Every error here carries one line for the user: *what* (a path or a name) and
*what is wrong*. The command line prints ``error: <line>`` without a traceback
(``--debug`` shows it); flows log the same line. Anything that is not a
``SegpipeError`` is a bug in segpipe and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SegpipeError(Exception):
    """Base class: a problem with the user's input or environment.

    ``args`` are exactly the constructor's parameters ``(subject, problem)``: distributed
    pickles task exceptions through tblib, which rebuilds an exception as ``cls(*args)``
    (once a chained exception has made it patch the class); any other shape fails to
    unpickle and reaches the driver as a bare ``Exception(repr(e))``.
    """

    def __init__(self, subject: str | None, problem: str) -> None:
        super().__init__(subject, problem)
        self.subject = subject
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}" if self.subject else self.problem

    def detached(self) -> SegpipeError:
        """The same error without ``__cause__``/``__context__``, to raise across a process boundary.

        tblib pickles the whole chain; a GDAL error in it (rasterio's ``CPLE_*`` classes
        cannot be unpickled) would turn this error into a bare ``Exception`` on the driver.
        """
        return type(self)(self.subject, self.problem)


class InputError(SegpipeError):
    """A source image is missing, unreadable, corrupt or does not fit the model."""


class ModelError(SegpipeError):
    """A model artifact is missing files, malformed, or does not fit its architecture."""


class OutputError(SegpipeError):
    """The output location cannot be written."""


class ConfigError(SegpipeError):
    """A setting is invalid (bad value, unknown name)."""


class DatasetError(SegpipeError):
    """A training/evaluation dataset is malformed."""


#: errors worth retrying (network hiccups, bucket throttling); bad input is never retried.
class TransientIOError(SegpipeError):
    """A storage operation failed in a way that may succeed when retried."""


def validation_problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """(where, what) of one pydantic validation error (an item of ``ValidationError.errors()``), for one line.

    ``where`` is the field's dotted path, ``""`` for a check across fields (never an empty ``: ``
    prefix); ``what`` is the message without pydantic's ``"Value error, "`` prefix (the check's own
    words), and with the value given when pydantic's message does not show it.
    """
    where = ".".join(str(x) for x in error.get("loc", ()))
    what = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    value = error.get("input")
    if where and error.get("type") != "value_error" and isinstance(value, str | int | float | bool):
        what = f"{what} (got {value!r})"
    return where, what
