"""The ``segpipe`` command line: the root group (``--debug``, ``--version``, logging) and its commands.

Each command lives in its own module and is attached here, so command modules never import
this one:

=========================  ==========================================================
``segpipe.cli.segment``    ``segment`` (progress bar, summary table, exports)
``segpipe.cli.model``      ``model create``, ``model info``
``segpipe.cli.registry``   ``models list``, ``models show``, ``models promote``
``segpipe.cli.train``      ``train``, ``evaluate``, ``retrain``
``segpipe.cli.export``     ``export``
``segpipe.cli.suggest``    ``suggest`` (where to label next)
``segpipe.cli.demo``       ``demo``
``segpipe.cli.worker``     ``worker`` (pinned Dask workers of one host of a cluster)
``segpipe.cli.status``     ``status`` (outputs complete / running / unfinished, locks held)
``segpipe.cli.common``     exit codes, one-line errors, console, engine options
``segpipe.cli.logs``       log file, terminal warnings, library loggers
=========================  ==========================================================

Every user error prints one line ``error: <what>: <problem>`` and exits 2 (``--debug``
shows the traceback). ``segment`` exits 0 only when every image succeeded.
"""

from __future__ import annotations

import importlib

import click

from segpipe.cli.logs import configure_logging

#: command → module defining it; a command's module is imported when the command runs (or for --help), so
#: ``segpipe segment`` does not load training's settings and every other command's imports at start
COMMANDS = {
    "segment": "segpipe.cli.segment", "model": "segpipe.cli.model", "train": "segpipe.cli.train",
    "evaluate": "segpipe.cli.train", "retrain": "segpipe.cli.train", "models": "segpipe.cli.registry",
    "export": "segpipe.cli.export", "suggest": "segpipe.cli.suggest", "demo": "segpipe.cli.demo",
    "worker": "segpipe.cli.worker", "status": "segpipe.cli.status",
}


class LazyGroup(click.Group):
    """The root group: its commands are looked up in :data:`COMMANDS` and imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        command = getattr(importlib.import_module(COMMANDS[cmd_name]), cmd_name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs on the terminal.")
@click.version_option(package_name="segpipe")
def main(debug: bool) -> None:
    """segpipe: batch semantic segmentation of large images into Zarr masks."""
    configure_logging(debug)


if __name__ == "__main__":  # pragma: no cover
    main()
