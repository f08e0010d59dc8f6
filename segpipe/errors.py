"""Errors that users can act on.

Every error here carries one line for the user: *what* (a path or a name) and
*what is wrong*. The command line prints ``error: <line>`` without a traceback
(``--debug`` shows it); flows log the same line. Anything that is not a
``SegpipeError`` is a bug in segpipe and keeps its traceback.
"""

from __future__ import annotations


class SegpipeError(Exception):
    """Base class: a problem with the user's input or environment."""

    def __init__(self, subject: str | None, problem: str) -> None:
        self.subject = subject
        self.problem = problem
        super().__init__(f"{subject}: {problem}" if subject else problem)

    def __reduce__(self):  # errors cross process boundaries (Dask workers): keep both fields
        return (type(self), (self.subject, self.problem))


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
