"""What every command shares: exit codes, one-line errors, the console, the engine's options.

- exit codes: ``EXIT_FAILED_IMAGES`` (1), ``EXIT_USAGE`` (2), ``EXIT_BUG`` (3), ``EXIT_INTERRUPTED`` (130);
- :func:`handle_errors`: a user error is one line ``error: <what>: <problem>`` and exit 2, a bug
  is one line pointing at the log file and exit 3; ``--debug`` re-raises both;
- :func:`console`: a rich console (stdout, or stderr for progress);
- :func:`segment_options` and :func:`build_settings`: the options of every command that runs the
  segmentation engine (``segment``, ``evaluate``) and their translation into settings;
- :func:`preload`: the engine's heavy libraries imported at a command's start, without the cyclic
  garbage collector scanning them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from segpipe.cli.logs import log_path
from segpipe.core.errors import ConfigError, SegpipeError, validation_problem

EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


#: what a command that runs the engine loads first: Dask, torch and the model library
ENGINE_LIBRARIES = ("distributed", "torch", "segmentation_models_pytorch")


def preload(modules: tuple[str, ...] = ENGINE_LIBRARIES) -> None:
    """Import ``modules`` with Python's cyclic garbage collector off, then freeze what they allocated (and,
    on fewer than 4 cores, with OpenMP's spinning bounded: :func:`segpipe.engine.cluster.bound_openmp_spinning`).

    Importing torch and segmentation-models-pytorch (which pulls timm, torchvision and torch._dynamo) makes
    hundreds of thousands of objects that live as long as the process; the collector's full passes over
    that growing heap were ~1 s of a run's ~4 s of imports (docs/benchmarks.md, issue 22). Frozen, they
    are never scanned again. A module that is not installed is left to the import that needs it (which
    says so there)."""
    import gc
    import importlib

    from segpipe.engine.cluster import bound_openmp_spinning

    bound_openmp_spinning()  # (read once, when torch loads libgomp)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def debug_requested() -> bool:
    """Whether the root ``segpipe`` group was given ``--debug``."""
    return click.get_current_context().find_root().params.get("debug", False)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SegpipeError and settings validation errors into one line; --debug re-raises.

    Anything else is a bug: it keeps its traceback (in the log file without ``--debug``) and
    the user gets one line pointing at it.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        debug = debug_requested()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            # the images in flight stopped at their next task and released their locks (engine.stop)
            click.echo("interrupted: nothing unfinished was marked complete", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except SegpipeError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except ValidationError as e:
            if debug:
                raise
            where, what = validation_problem(e.errors()[0])
            click.echo(f"error: {option_name(where)}: {what}" if where else f"error: {what}", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as e:  # noqa: BLE001 - a bug: keep the traceback, but in the log
            if debug:
                raise
            logging.getLogger("segpipe.cli.main").error("unexpected error", exc_info=True)
            path = log_path()
            where = f"; traceback in {path}" if path else ""
            click.echo(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       f"(a bug in segpipe{where}; --debug shows it)", err=True)
            sys.exit(EXIT_BUG)

    return wrapper


def option_name(field: str) -> str:
    """The command's option for a settings field (``patch_size`` → ``--patch-size``), else the field as is."""
    ctx = click.get_current_context(silent=True)
    for param in (ctx.command.params if ctx is not None else []):
        if param.name == field and isinstance(param, click.Option):
            return max(param.opts, key=len)
    return field


def segment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``segment`` and the commands that run the segmentation engine."""
    opts = [
        click.option("--chunk-size", type=int, default=512, show_default=True, help="Output chunk side (pixels)."),
        click.option("--halo", type=int, default=64, show_default=True, help="Context pixels on each side of a chunk."),
        click.option("--tile-size", type=int, default=None,
                     help="Side the model sees at once (plus the halo), a multiple of --chunk-size "
                          "[default: 2 × chunk size, never larger than the image]."),
        click.option("--batch-size", type=int, default=None, help="Tiles per forward pass [default: 1 CPU, 16 GPU]."),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto = bf16 where the device runs it natively."),
        click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
                     help="What runs the forward: auto = ONNX Runtime on CPUs without native bf16 (fp32, "
                          "onnxruntime installed), torch elsewhere."),
        click.option("--tta", is_flag=True, help="Flip test-time augmentation (4 passes)."),
        click.option("--probabilities", is_flag=True, help="Also write class probabilities (uint8)."),
        click.option("--bands", default=None, help="1-based bands to read, e.g. 1,2,3 [default: all]."),
        click.option("--level", type=int, default=None, help="Pyramid level to segment (slides, COG overviews)."),
        click.option("--mpp", type=float, default=None,
                     help="Microns per pixel to segment slides at [default: the model's resolution]."),
        click.option("--gsd", type=float, default=None,
                     help="Pixel size in CRS units to segment georeferenced rasters at (area-averaged reads) "
                          "[default: the model's resolution]."),
        click.option("--skip-empty/--no-skip-empty", default=True, show_default=True,
                     help="Skip chunks that are all nodata (written as the nodata label) or slide background."),
        click.option("--background-class", type=int, default=None,
                     help="Class for slide background outside the tissue [default: the nodata label]."),
        click.option("--max-pixels", type=float, default=1e11, show_default=True,
                     help="Refuse images declaring more pixels than this."),
        click.option("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def build_settings(chunk_size: int, halo: int, batch_size: int | None, device: str, precision: str, tta: bool,
                   probabilities: bool, bands: str | None, level: int | None = None, mpp: float | None = None,
                   skip_empty: bool = True, max_pixels: float = 1e11, background_class: int | None = None,
                   overwrite: bool = False, tile_size: int | None = None, task_seconds: float | None = None,
                   gsd: float | None = None, runtime: str = "auto"):
    """The CLI's options → :func:`segpipe.core.settings.segment_settings` (the flow calls the same builder)."""
    from segpipe.core.settings import segment_settings

    try:
        return segment_settings(chunk_size=chunk_size, halo=halo, tile_size=tile_size, batch_size=batch_size,
                                device=device,
                                precision=precision, runtime=runtime, tta=tta, probabilities=probabilities, bands=bands,
                                level=level,
                                mpp=mpp, gsd=gsd, skip_empty=skip_empty, max_pixels=max_pixels,
                                background_class=background_class, overwrite=overwrite, task_seconds=task_seconds)
    except ConfigError as e:  # name the option as the user typed it
        raise ConfigError(f"--{e.subject}", e.problem) from None
