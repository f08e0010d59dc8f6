"""Progress lines for long steps: a training epoch, an evaluation, so a log is never silent for minutes.

A flow's weekly training step logged nothing for 2 min 45 s (hours in a real week): nobody could tell a
slow step from a hung one. :class:`ProgressLog` writes a line at most every :data:`PROGRESS_EVERY_S`
seconds, built only when it is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: seconds between two progress lines of one step
PROGRESS_EVERY_S = 30.0


class ProgressLog:
    """Log ``line()`` on ``logger`` when :data:`PROGRESS_EVERY_S` (or ``every``) seconds passed since the last."""

    def __init__(self, logger: logging.Logger, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.clock = logger, clock
        self.every = PROGRESS_EVERY_S if every is None else every
        self.t0 = self.last = clock()

    def __call__(self, line: Callable[[], str], force: bool = False) -> bool:
        """Log ``line()`` (with the seconds since the start) if it is time, or ``force``; True when logged."""
        now = self.clock()
        if not force and now - self.last < self.every:
            return False
        self.last = now
        self.logger.info("%s (%.0f s)", line(), now - self.t0)
        return True
