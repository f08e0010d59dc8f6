"""One retrain round: train a challenger, evaluate it and the champion on the same split, register, promote if better.

The ``retrain`` flow and ``segpipe retrain`` both call :func:`retrain`; the flow passes its
Prefect tasks as ``train_step``/``evaluate_step`` so each step shows in its run graph.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from segpipe.core.settings import ClusterSettings, SegmentSettings
from segpipe.engine.cluster import dask_client
from segpipe.evaluate.decision import decide, run_dir
from segpipe.evaluate.evaluation import Evaluation, evaluate, write_evaluation_report
from segpipe.evaluate.reports import markdown_table
from segpipe.io.storage import join
from segpipe.labels.dataset import load_dataset
from segpipe.models.registry import champion, init_registry, promote, register, resolve
from segpipe.train.loop import TrainResult, train
from segpipe.train.settings import TrainSettings

log = logging.getLogger("segpipe.retrain")


@dataclass(frozen=True)
class RetrainResult:
    """What one retrain round did (``as_dict`` is the flow's return value)."""

    version: str
    promoted: bool
    reason: str
    champion: str | None
    challenger_mean_iou: float | None
    champion_mean_iou: float | None
    report: str
    registry: str
    run: str
    comparison: str  #: markdown table, champion vs challenger

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "comparison"}


def train_challenger(data: str, out: str, settings: TrainSettings) -> TrainResult:
    """Train (or resume training) the challenger into ``out``."""
    result = train(data, out, settings, resume=True, progress=False)
    log.info("challenger trained: %d epoch(s), best %s, val mean IoU %s (%s)", result.epochs_run,
             result.best_epoch, result.metrics.get("val_mean_iou"), result.stop_reason)
    return result


def evaluate_model(label: str, model: str, data: str, split: str, out: str, settings: SegmentSettings,
                   dask_address: str | None) -> Evaluation:
    """Evaluate ``model`` on ``split`` with the production engine and write its report into ``out``."""
    with dask_client(ClusterSettings(address=dask_address)) as client:
        ev = evaluate(model, load_dataset(data, split), out, settings, client, split=split)
    write_evaluation_report(out, ev, title=f"{label}: {ev.model.spec.architecture}/{ev.model.spec.encoder}")
    log.info("%s mean IoU %s on %d %s image(s)", label, ev.metrics["mean_iou"], ev.images, split)
    return ev


def retrain(data: str, registry: str, tsettings: TrainSettings, ssettings: SegmentSettings, *,
            workdir: str | None = None, split: str = "val", margin: float = 0.005,
            dask_address: str | None = None,
            train_step: Callable[[str, str, TrainSettings], TrainResult] = train_challenger,
            evaluate_step: Callable[..., Evaluation] = evaluate_model) -> RetrainResult:
    """Train a challenger, evaluate challenger and champion on ``split``, register it, promote when better."""
    init_registry(registry)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = run_dir(workdir or join(registry, "runs"), stamp)
    trained = train_step(data, paths["challenger"], tsettings)
    challenger_ev = evaluate_step("challenger", trained.uri, data, split, paths["eval_challenger"], ssettings,
                                  dask_address)
    current = champion(registry)
    champion_ev = None
    if current:
        champion_ev = evaluate_step(f"champion {current}", resolve(registry), data, split, paths["eval_champion"],
                                    ssettings, dask_address)
    decision = decide(champion_ev.metrics if champion_ev else None, challenger_ev.metrics, margin)
    title = (f"retrain: challenger vs champion {current}" if champion_ev else
             "retrain: challenger (no champion yet)")
    write_evaluation_report(paths["report"], challenger_ev, title=title, champion=champion_ev)
    version = register(registry, trained.uri, metrics=challenger_ev.metrics, report_dir=paths["report"])
    if decision.promote:
        promote(registry, version, decision.reason)
        log.info("promoted %s: %s", version, decision.reason)
    else:
        log.info("kept champion %s: %s", current, decision.reason)
    table = (markdown_table(champion_ev.metrics, challenger_ev.metrics) if champion_ev
             else markdown_table(challenger_ev.metrics))
    return RetrainResult(
        version=version, promoted=decision.promote, reason=decision.reason,
        champion=version if decision.promote else current,
        challenger_mean_iou=decision.challenger_mean_iou, champion_mean_iou=decision.champion_mean_iou,
        report=join(paths["report"], "report.html"), registry=registry, run=paths["base"], comparison=table,
    )
