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

import click

from segpipe.cli.demo import demo
from segpipe.cli.export import export
from segpipe.cli.logs import configure_logging
from segpipe.cli.model import model
from segpipe.cli.registry import models
from segpipe.cli.segment import segment
from segpipe.cli.status import status
from segpipe.cli.suggest import suggest
from segpipe.cli.train import evaluate, retrain, train
from segpipe.cli.worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs on the terminal.")
@click.version_option(package_name="segpipe")
def main(debug: bool) -> None:
    """segpipe: batch semantic segmentation of large images into Zarr masks."""
    configure_logging(debug)


for _command in (segment, model, train, evaluate, retrain, models, export, suggest, demo, worker, status):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
