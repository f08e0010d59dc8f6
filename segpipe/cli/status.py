"""``segpipe status OUT…``: the outputs complete, running or unfinished, and the locks held, with their age and owner."""

from __future__ import annotations

import click

from segpipe.cli.common import console, handle_errors


@click.command()
@click.argument("outs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON instead of a table.")
@handle_errors
def status(outs: tuple[str, ...], as_json: bool) -> None:
    """Show every segpipe output under OUTS (folders, bucket prefixes or *.zarr): complete, running (a live run
    holds its lock) or unfinished (failed or stopped: the next run resumes it), and the locks held."""
    import time

    from segpipe.io.status import output_states

    now = time.time()
    states = [s for out in outs for s in output_states(out)]
    if as_json:
        import json
        from dataclasses import asdict

        click.echo(json.dumps([{**asdict(s), "lock": {**asdict(s.lock), "stale": s.lock.is_stale(now),
                                                      "age_s": round(now - s.lock.started, 1),
                                                      "heartbeat_age_s": round(now - s.lock.heartbeat, 1)}
                                if s.lock else None} for s in states], indent=2))
        return
    from rich.table import Table

    table = Table(title="segpipe status", show_lines=False)
    for col in ("output", "state", "precision", "finished", "lock"):
        table.add_column(col, overflow="fold")
    style = {"complete": "[green]", "running": "[cyan]", "unfinished": "[yellow]"}
    for s in states:
        table.add_row(s.uri, f"{style.get(s.state, '')}{s.state}", s.precision or "-", s.finished or "-",
                      s.lock_line(now) or "-")
    console().print(table)
    counts = {k: sum(s.state == k for s in states) for k in ("complete", "running", "unfinished")}
    held = sum(s.lock is not None for s in states)
    click.echo(f"{counts['complete']} complete, {counts['running']} running, {counts['unfinished']} unfinished; "
               f"{held} lock(s) held")
