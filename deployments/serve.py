"""Serve every segpipe deployment from one process (no work pool needed).

    python deployments/serve.py

Deployments:
  segment-images/nightly  cron SEGPIPE_NIGHTLY_CRON (default "0 2 * * *") in SEGPIPE_TIMEZONE (default UTC)
  retrain/weekly          cron SEGPIPE_WEEKLY_CRON  (default "0 3 * * 0") in SEGPIPE_TIMEZONE

Default parameters come from SEGPIPE_SOURCE, SEGPIPE_MODEL, SEGPIPE_OUT, SEGPIPE_COLLECTIONS, SEGPIPE_BBOX (nightly) and
SEGPIPE_DATA, SEGPIPE_REGISTRY (weekly); every parameter can be overridden per run:

    prefect deployment run 'segment-images/nightly' -p source=s3://bucket/new/ -p model=s3://bucket/models -p out=s3://bucket/masks
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def deployments() -> list:
    """Build the RunnerDeployments (nothing runs on import)."""
    from prefect.schedules import Cron

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flows.segment import segment_images

    tz = os.environ.get("SEGPIPE_TIMEZONE", "UTC")
    # a STAC API source: SEGPIPE_SOURCE=https://stac.example/api SEGPIPE_COLLECTIONS=c1,c2 SEGPIPE_BBOX=w,s,e,n
    nightly_params = {k: os.environ[f"SEGPIPE_{k.upper()}"] for k in ("source", "model", "out", "collections", "bbox")
                      if os.environ.get(f"SEGPIPE_{k.upper()}")}
    if os.environ.get("SEGPIPE_DASK_ADDRESS"):
        nightly_params["dask_address"] = os.environ["SEGPIPE_DASK_ADDRESS"]
    result = [segment_images.to_deployment(
        name="nightly",
        schedules=[Cron(os.environ.get("SEGPIPE_NIGHTLY_CRON", "0 2 * * *"), timezone=tz)],
        parameters=nightly_params,
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
        parameters=weekly_params,
        description="Train a challenger, evaluate it against the champion, promote it when it is better.",
        tags=["segpipe"],
    ))
    return result


def main() -> None:
    from prefect import serve

    serve(*deployments())


if __name__ == "__main__":
    main()
