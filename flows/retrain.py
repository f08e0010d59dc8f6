"""Flow ``retrain``: train a challenger, evaluate it and the champion on the same split, promote if better."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segpipe.cluster import dask_client
from segpipe.config import ClusterSettings, InferenceSettings, SegmentSettings, TilingSettings
from segpipe.data import load_dataset
from segpipe.evaluation import Evaluation, evaluate, write_evaluation_report
from segpipe.io.storage import join
from segpipe.registry import champion, init_registry, promote, register, resolve
from segpipe.reports import markdown_table
from segpipe.retraining import decide, run_dir
from segpipe.training import TrainResult, TrainSettings, train


@task(name="train-challenger", cache_policy=NO_CACHE)
def train_challenger(data: str, out: str, settings: TrainSettings) -> TrainResult:
    result = train(data, out, settings, resume=True, progress=False)
    get_run_logger().info("challenger trained: %d epoch(s), best %s, val mean IoU %s (%s)", result.epochs_run,
                          result.best_epoch, result.metrics.get("val_mean_iou"), result.stop_reason)
    return result


@task(name="evaluate", task_run_name="evaluate {label}", cache_policy=NO_CACHE)
def evaluate_model(label: str, model: str, data: str, split: str, out: str, settings: SegmentSettings,
                   dask_address: str | None) -> Evaluation:
    with dask_client(ClusterSettings(address=dask_address)) as client:
        ev = evaluate(model, load_dataset(data, split), out, settings, client, split=split)
    write_evaluation_report(out, ev, title=f"{label}: {ev.model.spec.architecture}/{ev.model.spec.encoder}")
    get_run_logger().info("%s mean IoU %s on %d %s image(s)", label, ev.metrics["mean_iou"], ev.images, split)
    return ev


@flow(name="retrain", log_prints=True)
def retrain(
    data: str,
    registry: str,
    workdir: str | None = None,
    architecture: str = "Unet",
    encoder: str = "resnet18",
    epochs: int = 20,
    batch_size: int = 8,
    patch_size: int = 256,
    patches_per_epoch: int | None = None,
    lr: float = 1e-3,
    class_balanced: bool = True,
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    seed: int = 0,
    split: str = "val",
    margin: float = 0.005,
    chunk_size: int = 512,
    halo: int = 64,
    dask_address: str | None = None,
) -> dict:
    """Train a challenger on ``data``, evaluate challenger and champion on ``split``, promote when better."""
    logger = get_run_logger()
    init_registry(registry)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    paths = run_dir(workdir or join(registry, "runs"), stamp)
    tsettings = TrainSettings(
        architecture=architecture, encoder=encoder, epochs=epochs, batch_size=batch_size, patch_size=patch_size,
        lr=lr, class_balanced=class_balanced, device=device, precision=precision, seed=seed,
        **({"patches_per_epoch": patches_per_epoch} if patches_per_epoch else {}),
    )
    ssettings = SegmentSettings(tiling=TilingSettings(chunk_size=chunk_size, halo=halo),
                                inference=InferenceSettings(device=device, precision=precision))
    trained = train_challenger(data, paths["challenger"], tsettings)
    challenger_ev = evaluate_model("challenger", trained.uri, data, split, paths["eval_challenger"], ssettings,
                                   dask_address)
    current = champion(registry)
    champion_ev = None
    if current:
        champion_ev = evaluate_model(f"champion {current}", resolve(registry), data, split, paths["eval_champion"],
                                     ssettings, dask_address)
    decision = decide(champion_ev.metrics if champion_ev else None, challenger_ev.metrics, margin)
    title = (f"retrain: challenger vs champion {current}" if champion_ev else
             "retrain: challenger (no champion yet)")
    write_evaluation_report(paths["report"], challenger_ev, title=title, champion=champion_ev)
    version = register(registry, trained.uri, metrics=challenger_ev.metrics, report_dir=paths["report"])
    if decision.promote:
        promote(registry, version, decision.reason)
        logger.info("promoted %s: %s", version, decision.reason)
    else:
        logger.info("kept champion %s: %s", current, decision.reason)
    table = markdown_table(champion_ev.metrics, challenger_ev.metrics) if champion_ev else markdown_table(
        challenger_ev.metrics)
    create_markdown_artifact(
        f"## retrain {stamp}\n\nchallenger **{version}**: {'promoted' if decision.promote else 'not promoted'} "
        f"({decision.reason})\n\n{table}\n\nreport: `{paths['report']}/report.html`",
        key="retrain-comparison",
    )
    return {
        "version": version, "promoted": decision.promote, "reason": decision.reason,
        "champion": version if decision.promote else current,
        "challenger_mean_iou": decision.challenger_mean_iou, "champion_mean_iou": decision.champion_mean_iou,
        "report": join(paths["report"], "report.html"), "registry": registry, "run": paths["base"],
    }
