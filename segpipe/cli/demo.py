"""``segpipe demo``: the whole loop on generated data (the work is :func:`segpipe.demo.run_demo`)."""

from __future__ import annotations

import click

from segpipe.cli.common import handle_errors


@click.command()
@click.option("--out", default="demo-output", show_default=True, help="Folder for everything the demo makes.")
@click.option("--quick", is_flag=True, help="Tiny sizes (for tests and smoke runs): seconds, not minutes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Training's and segmentation's precision (auto = bf16 where the CPU has it natively; "
                   "SEGPIPE_CPU_BF16=0 runs as on a CPU without it).")
@handle_errors
def demo(out: str, quick: bool, seed: int, precision: str) -> None:
    """Generate data, retrain + register a model, segment a large scene, evaluate it, print where it all is."""
    from segpipe.demo import run_demo

    run_demo(out, quick=quick, seed=seed, precision=precision, echo=click.echo)
