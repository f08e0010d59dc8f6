"""Flow ``retrain``: train a challenger, evaluate it and the champion on the same split, promote if better.

A thin wrapper over :func:`segpipe.evaluate.retrain.retrain`: its steps run as Prefect tasks.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.failures import install_one_line_failures, install_segpipe_warnings
from segpipe.core.settings import segment_settings
from segpipe.evaluate import retrain as lib
from segpipe.train.settings import TRAIN_DEFAULTS as D
from segpipe.train.settings import train_settings

train_challenger = task(name="train-challenger", cache_policy=NO_CACHE)(lib.train_challenger)
evaluate_model = task(name="evaluate", task_run_name="evaluate {label}", cache_policy=NO_CACHE)(lib.evaluate_model)


@flow(name="retrain", log_prints=True)
def retrain(
    data: str,
    registry: str,
    workdir: str | None = None,
    architecture: str = D["architecture"],
    encoder: str = D["encoder"],
    epochs: int = D["epochs"],
    batch_size: int = D["batch_size"],
    patch_size: int = D["patch_size"],
    patches_per_epoch: int | None = None,
    lr: float = D["lr"],
    class_balanced: bool = D["class_balanced"],
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    seed: int = 0,
    split: str = "val",
    margin: float = 0.005,
    chunk_size: int = 512,
    halo: int = 64,
    dask_address: str | None = None,
    skip_unchanged: bool = True,
    baseline: str | None = None,
    mpp: float | None = None,
    gsd: float | None = None,
) -> dict:
    """Train a challenger on ``data``, evaluate challenger and champion on ``split``, promote when better.

    ``skip_unchanged`` (default): a round whose data, labels, champion and settings are those of the
    last completed round ends at once with a note — an idle week costs a folder listing.
    ``baseline``: the folder of segpipe outputs corrected label files were exported from (a GeoPackage
    export records it itself); the report then shows what annotators changed.
    """
    logger = get_run_logger()
    install_one_line_failures()  # a dataset error ends the run Failed with one line, not the engine's traceback
    install_segpipe_warnings()  # segpipe's warnings in the run's logs, not only on the worker's terminal
    tsettings = train_settings(
        architecture=architecture, encoder=encoder, epochs=epochs, batch_size=batch_size, patch_size=patch_size,
        patches_per_epoch=patches_per_epoch, lr=lr, class_balanced=class_balanced, device=device,
        precision=precision, seed=seed, mpp=mpp, gsd=gsd,
    )
    ssettings = segment_settings(chunk_size=chunk_size, halo=halo, device=device, precision=precision)
    result = lib.retrain(data, registry, tsettings, ssettings, workdir=workdir, split=split, margin=margin,
                         dask_address=dask_address, skip_unchanged=skip_unchanged, baseline=baseline, train_step=train_challenger,
                         evaluate_step=evaluate_model)
    if result.skipped:
        logger.info("%s", result.reason)
        create_markdown_artifact(f"## retrain skipped\n\n{result.reason}\n\nlast report: `{result.report}`",
                                 key="retrain-comparison")
        return result.as_dict()
    logger.info("%s %s: %s", "promoted" if result.promoted else "registered (champion kept)", result.version,
                result.reason)
    create_markdown_artifact(
        f"## retrain {result.run.rsplit('/', 1)[-1]}\n\nchallenger **{result.version}**: "
        f"{'promoted' if result.promoted else 'not promoted'} ({result.reason})\n\n{result.comparison}\n\n"
        f"report: `{result.report}`",
        key="retrain-comparison",
    )
    return result.as_dict()
