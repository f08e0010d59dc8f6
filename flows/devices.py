"""This machine's devices, shared by the deployments through a Prefect global concurrency limit.

The nightly segmentation and the weekly retrain each size their work to the whole machine (an embedded
Dask cluster over every core and GPU; training over every core). Triggered together they fought over
it (the nightly ran 4.5× slower). Each takes one slot of the global concurrency limit ``device_limit``
(``deployments/serve.py`` creates ``segpipe-devices`` with 1 slot; ``prefect gcl create segpipe-devices
--limit 1`` for work-pool deployments) while it computes here, so one waits for the other. A limit that
does not exist is not an error: Prefect logs that it skips it and the run goes on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

#: the limit both deployments take a slot of (deployments/serve.py creates it)
DEVICE_LIMIT = "segpipe-devices"

#: a run that has not got its slot after this many seconds says that it waits, and for what
WAITING_LINE_AFTER_S = 2.0


@contextlib.contextmanager
def device_slot(limit: str | None, logger: Any, what: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``limit`` for the block (None: no limit).

    Waits as long as another run holds the slots, saying so in one line after
    :data:`WAITING_LINE_AFTER_S`; the slot is leased and renewed by Prefect while the block runs, and
    returns to the limit when the block ends (or the lease expires, when the process died)."""
    if not limit:
        yield
        return
    from prefect.concurrency.sync import concurrency

    def waiting() -> None:
        logger.info("%s waits for a slot of the global concurrency limit %s: another run computes on this "
                    "machine's devices", what, limit)

    timer = threading.Timer(WAITING_LINE_AFTER_S, waiting)
    timer.daemon = True
    timer.start()
    try:
        with concurrency(limit, occupy=1, strict=False, raise_on_lease_renewal_failure=False):
            timer.cancel()
            logger.info("%s holds a slot of %s", what, limit)
            yield
    finally:
        timer.cancel()
