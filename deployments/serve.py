"""Serve every segpipe deployment from one process (no work pool needed).

    python deployments/serve.py

Deployments:
  segment-images/nightly  cron SEGPIPE_NIGHTLY_CRON (default "0 2 * * *") in SEGPIPE_TIMEZONE (default UTC)
  retrain/weekly          cron SEGPIPE_WEEKLY_CRON  (default "0 3 * * 0") in SEGPIPE_TIMEZONE

Default parameters come from SEGPIPE_SOURCE, SEGPIPE_MODEL, SEGPIPE_OUT, SEGPIPE_COLLECTIONS, SEGPIPE_BBOX
(nightly) and SEGPIPE_DATA, SEGPIPE_REGISTRY (weekly), SEGPIPE_DASK_ADDRESS (both); every parameter can be
overridden per run:

    prefect deployment run 'segment-images/nightly' -p source=s3://bucket/new/ -p model=s3://bucket/models -p out=s3://bucket/masks

The two deployments share this machine's devices through the Prefect global concurrency limit
SEGPIPE_DEVICE_LIMIT (default "segpipe-devices", created here with SEGPIPE_DEVICE_SLOTS slots, default 1):
a run holds a slot while it computes on this machine (the nightly's embedded cluster, the weekly's
training and evaluation), so a weekly retrain triggered during the nightly waits for it instead of
both sizing torch to every core and every GPU.

SIGINT or SIGTERM stops serving: the schedules are paused (Prefect's default), and when the Prefect
server does not answer within SEGPIPE_STOP_TIMEOUT seconds (default 10) the process exits anyway,
with one line, after stopping the flow runs it started; a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("segpipe.serve")

DEVICE_LIMIT = "segpipe-devices"


def device_limit() -> str:
    """The name of the global concurrency limit both deployments take a slot of (empty: none)."""
    return os.environ.get("SEGPIPE_DEVICE_LIMIT", DEVICE_LIMIT)


def deployments() -> list:
    """Build the RunnerDeployments (nothing runs on import)."""
    from prefect.schedules import Cron

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flows.segment import segment_images

    tz = os.environ.get("SEGPIPE_TIMEZONE", "UTC")
    shared: dict[str, Any] = {"device_limit": device_limit() or None}
    if os.environ.get("SEGPIPE_DASK_ADDRESS"):  # one cluster for both deployments
        shared["dask_address"] = os.environ["SEGPIPE_DASK_ADDRESS"]
    # a STAC API source: SEGPIPE_SOURCE=https://stac.example/api SEGPIPE_COLLECTIONS=c1,c2 SEGPIPE_BBOX=w,s,e,n
    nightly_params = {k: os.environ[f"SEGPIPE_{k.upper()}"] for k in ("source", "model", "out", "collections", "bbox")
                      if os.environ.get(f"SEGPIPE_{k.upper()}")}
    result = [segment_images.to_deployment(
        name="nightly",
        schedules=[Cron(os.environ.get("SEGPIPE_NIGHTLY_CRON", "0 2 * * *"), timezone=tz)],
        parameters={**shared, **nightly_params},
        description="Segment new and changed images every night; complete outputs are skipped.",
        tags=["segpipe"],
    )]
    try:
        from flows.retrain import retrain
    except ImportError:  # retrain flow not available in this build
        return result
    weekly_params = {k: os.environ[f"SEGPIPE_{k.upper()}"] for k in ("data", "registry")
                     if os.environ.get(f"SEGPIPE_{k.upper()}")}
    result.append(retrain.to_deployment(
        name="weekly",
        schedules=[Cron(os.environ.get("SEGPIPE_WEEKLY_CRON", "0 3 * * 0"), timezone=tz)],
        parameters={**shared, **weekly_params},
        description="Train a challenger, evaluate it against the champion, promote it when it is better.",
        tags=["segpipe"],
    ))
    return result


def ensure_device_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots unless it exists (an operator's
    own setting, ``prefect gcl update``, is kept)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            log.info("created the global concurrency limit %s with %d slot(s)", name, slots)


class Stopper:
    """SIGINT/SIGTERM: stop the runner gracefully, but never wait more than ``grace`` seconds for it.

    Prefect's runner pauses the schedules on the way out; with the server gone its client retries for
    minutes and the process ignored further signals. The first signal starts the graceful stop and a
    watchdog; when the watchdog fires, or at a second signal, the flow runs this process started are
    stopped and the process exits with one line.
    """

    def __init__(self, runner: Any, grace: float) -> None:
        self.runner, self.grace = runner, grace
        self.graceful = runner.handle_sigterm  # Prefect's own: schedules the runner's stop on its loop
        self.signals = 0

    def handle(self, signum: int, frame: Any = None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals > 1:
            self.exit(f"{name} again: exiting now")
        log.warning("%s: stopping (pausing the schedules; at most %.0f s)", name, self.grace)
        threading.Thread(target=self._watchdog, name="segpipe-stop-watchdog", daemon=True).start()
        if not self.runner.started:
            raise SystemExit(0)
        self.graceful(signum, frame)

    def _watchdog(self) -> None:
        threading.Event().wait(self.grace)
        self.exit(f"the Prefect server did not answer within {self.grace:.0f} s; exiting without pausing "
                  "the schedules")

    def exit(self, line: str) -> None:
        """Stop the flow runs this process started (SIGTERM, then SIGKILL) and exit at once."""
        import psutil

        print(f"serve.py: {line}", file=sys.stderr, flush=True)
        children = psutil.Process().children()
        for child in children:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        os._exit(0)


def main() -> None:
    import asyncio

    from prefect.runner import Runner

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if device_limit():
        ensure_device_limit(device_limit(), int(os.environ.get("SEGPIPE_DEVICE_SLOTS", "1")))
    runner = Runner(pause_on_shutdown=True)
    served = deployments()
    for deployment in served:
        runner.add_deployment(deployment)
    stopper = Stopper(runner, float(os.environ.get("SEGPIPE_STOP_TIMEOUT", "10")))
    # the runner installs ``handle_sigterm`` for SIGTERM when it starts; asyncio.run keeps a SIGINT
    # handler that is not Python's default one
    runner.handle_sigterm = stopper.handle  # type: ignore[method-assign]
    signal.signal(signal.SIGINT, stopper.handle)
    log.info("serving %s (SIGINT or SIGTERM stops)", ", ".join(f"{d.flow_name}/{d.name}" for d in served))
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, SystemExit):
        pass
    log.info("stopped")


if __name__ == "__main__":
    main()
