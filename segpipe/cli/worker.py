"""``segpipe worker``: the Dask workers of one host of an existing cluster, pinned to its GPUs.

What an operator puts in a Kubernetes pod or a Slurm job script: ``segpipe worker --scheduler
tcp://scheduler:8786`` starts ``--procs-per-device`` worker processes per visible GPU, each seeing only
its GPU (``CUDA_VISIBLE_DEVICES``) with a ``GPU=1`` resource — the same workers the embedded cluster
starts (:func:`segpipe.engine.cluster.pinned_workers`); on a host without GPUs, processes splitting the
cores. It runs until SIGINT or SIGTERM, or until every worker process has ended.
"""

from __future__ import annotations

import socket

import click

from segpipe.cli.common import handle_errors


@click.command()
@click.option("--scheduler", "scheduler", required=True, help="tcp://host:port of the Dask scheduler.")
@click.option("--procs-per-device", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Worker processes per GPU, each seeing only its GPU (without a GPU: processes splitting the "
                   "CPU's cores).")
@click.option("--worker-threads", type=click.IntRange(1, 256), default=None,
              help="Threads per worker process [default: cores / processes, between 3 and 12].")
@click.option("--name", "name", default=None, help="Prefix of the workers' names [default: the host name].")
@handle_errors
def worker(scheduler: str, procs_per_device: int, worker_threads: int | None, name: str | None) -> None:
    """Start this host's Dask workers for SCHEDULER, one pinned process per GPU (× --procs-per-device)."""
    import asyncio

    from segpipe.engine.cluster import pinned_workers

    specs = pinned_workers(procs_per_device, worker_threads)
    prefix = name or socket.gethostname()
    gpus = sorted({w.env["CUDA_VISIBLE_DEVICES"] for w in specs if "CUDA_VISIBLE_DEVICES" in w.env})
    click.echo(f"segpipe worker: {len(specs)} worker process(es) × {specs[0].nthreads} thread(s) for {scheduler}"
               + (f", pinned to GPU(s) {', '.join(gpus)}" if gpus else ", no GPU"), err=True)
    asyncio.run(_serve(scheduler, specs, prefix))


async def _serve(scheduler: str, specs: list, prefix: str) -> None:
    """Run one Nanny per spec until a signal arrives or every worker process ended."""
    import asyncio
    import signal

    from distributed import Nanny
    from distributed.system import MEMORY_LIMIT

    nannies = [Nanny(scheduler, nthreads=w.nthreads, env=w.env, resources=w.resources, name=f"{prefix}-{w.name}",
                     memory_limit=MEMORY_LIMIT // len(specs)) for w in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    # like `dask worker`, wait for a scheduler that is not up yet (a pod may start before it)
    started = asyncio.ensure_future(asyncio.gather(*(n.start() for n in nannies)))
    await asyncio.wait([started, stopping], return_when=asyncio.FIRST_COMPLETED)
    if started.done() and not stopping.done():
        ended = asyncio.ensure_future(asyncio.gather(*(n.finished() for n in nannies)))
        await asyncio.wait([ended, stopping], return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
    started.cancel()
    stopping.cancel()
    await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
