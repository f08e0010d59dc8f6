"""One retrain round: train a challenger, evaluate it and the champion on the same split, register, promote if better.

The ``retrain`` flow and ``segpipe retrain`` both call :func:`retrain`; the flow passes its
Prefect tasks as ``train_step``/``evaluate_step`` so each step shows in its run graph.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from segpipe.core.errors import ConfigError
from segpipe.core.settings import ClusterSettings, SegmentSettings
from segpipe.engine.cluster import dask_client
from segpipe.evaluate.corrections import corrections, corrections_markdown
from segpipe.evaluate.decision import Decision, decide, run_dir
from segpipe.evaluate.evaluation import Evaluation, evaluate, write_evaluation_report
from segpipe.evaluate.reports import markdown_table
from segpipe.io.storage import filesystem, join, tree_fingerprint
from segpipe.labels.dataset import load_dataset
from segpipe.models.registry import champion, init_registry, promote, register, resolve, weights_sha256
from segpipe.train.checkpoint import clear_checkpoints
from segpipe.train.loop import TrainResult, train
from segpipe.train.settings import TrainSettings

log = logging.getLogger("segpipe.retrain")


#: the corrections figures a round returns (corrections.json next to the report holds them all)
CORRECTIONS_SUMMARY = ("pixels", "changed_pixels", "changed_fraction", "mean_dice", "changed_pixels_train",
                       "changed_pixels_val", "compared", "not_compared", "hand_drawn", "files")


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
    #: nothing changed since the last round (data, labels, champion, settings): no training was done
    skipped: bool = False
    #: what annotators changed against the model labels they started from (:data:`CORRECTIONS_SUMMARY`: totals,
    #: and every labels file with its outcome); None only for a skipped round
    corrections: dict | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "comparison"}


def train_challenger(data: str, out: str, settings: TrainSettings) -> TrainResult:
    """Train (or resume training) the challenger into ``out``.

    The checkpoint serves a resume of this training (a retried task of the same round) only: once the
    artifact is written it goes — each round trains into a folder of its own, so no later round resumes it,
    and it is the largest file of a round (model, best model and optimizer moments: ~3× the weights).
    """
    result = train(data, out, settings, resume=True, progress=False)
    fs, path = filesystem(out)
    clear_checkpoints(fs, join(path, "checkpoint"))
    with contextlib.suppress(OSError):  # the folder, now empty
        fs.rmdir(join(path, "checkpoint"))
    log.info("challenger trained: %d epoch(s), best %s, val mean IoU %s (%s)", result.epochs_run,
             result.best_epoch, result.metrics.get("val_mean_iou"), result.stop_reason)
    return result


def evaluate_model(label: str, model: str, data: str, split: str, out: str, settings: SegmentSettings,
                   dask_address: str | None) -> Evaluation:
    """Evaluate ``model`` on ``split`` with the production engine and write its report into ``out``."""
    with dask_client(ClusterSettings(address=dask_address), settings.inference.device) as client:
        ev = evaluate(model, load_dataset(data, split), out, settings, client, split=split)
    write_evaluation_report(out, ev, title=f"{label}: {ev.model.spec.architecture}/{ev.model.spec.encoder}")
    log.info("%s mean IoU %s on %d %s image(s)", label, ev.metrics["mean_iou"], ev.images, split)
    return ev


#: what a dataset is made of, for the "did anything change?" check of a weekly retrain
DATA_PARTS = ("images", "masks", "labels", "regions", "classes.json", "split.json")
LAST_ROUND = "last-retrain.json"


def data_listing(data: str) -> dict[str, str]:
    """What the dataset's files are now (one listing per part: paths, sizes, mtimes/ETags; no file read)."""
    return {p: tree_fingerprint(join(data, p)) for p in DATA_PARTS}


def round_fingerprint(data: str | dict[str, str], champion_version: str | None, tsettings: TrainSettings,
                      ssettings: SegmentSettings, split: str, margin: float) -> str:
    """Identity of a retrain round's inputs: every dataset file (listing only), the champion and the settings.

    ``data``: the dataset's root, or its :func:`data_listing` taken earlier — a round records the listing
    taken when it *started*, so labels saved while it trained make next week's round a new one.
    """
    import hashlib

    parts = data_listing(data) if isinstance(data, str) else data
    blob = json.dumps({"data": parts, "champion": champion_version, "train": tsettings.model_dump(mode="json"),
                       "segment": ssettings.output_key(), "split": split, "margin": margin}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _claim_run_dir(root: str, stamp: str) -> dict[str, str]:
    """A run folder of its own under ``root``: ``<stamp>``, or ``<stamp>-2``, ``-3``, … when a round that started
    in the same second has it (two rounds at once, or short ones back to back: the second wrote into the first's
    challenger). The suffixes sort after the stamp and before the next second's."""
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        fs, path = filesystem(join(root, name))
        if fs.exists(path):
            continue
        try:
            fs.makedirs(path, exist_ok=False)
        except FileExistsError:  # taken between the two calls
            continue
        return run_dir(root, name)
    raise ConfigError(root, f"999 retrain rounds started in the second {stamp}")


def _last_round(registry: str) -> dict:
    fs, path = filesystem(join(registry, LAST_ROUND))
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return {}


def _record_round(registry: str, entry: dict) -> None:
    fs, path = filesystem(join(registry, LAST_ROUND))
    tmp = path + ".tmp"
    fs.pipe_file(tmp, json.dumps(entry, indent=2).encode())
    fs.mv(tmp, path)


def check_margin(margin: float, allow_negative: bool = False) -> None:
    """A negative margin promotes a challenger that scores *worse* than the champion: refused unless meant."""
    if margin < 0 and not allow_negative:
        raise ConfigError("margin", f"{margin:g} is below 0: it would promote a challenger up to {-margin:g} mean IoU "
                                    "worse than the champion; pass --allow-negative-margin (flow parameter "
                                    "allow_negative_margin=True) if that is meant")


def _drop_registered_copy(trained: TrainResult, registry: str, version: str) -> None:
    """The run folder's challenger weights once ``version`` holds the same bytes (the version it was registered
    as, or the champion it is identical to): a round costs at most one copy."""
    if weights_sha256(registry, version) != trained.weights_sha256:
        return
    fs, path = filesystem(trained.uri)
    try:
        fs.rm(join(path, "weights.safetensors"))
        fs.pipe_file(join(path, "registered.json"), json.dumps(
            {"registry": registry, "version": version, "weights_sha256": trained.weights_sha256}).encode())
    except OSError as e:  # a leftover copy costs space, not correctness
        log.warning("%s: could not remove the registered challenger's weights (%s)", trained.uri, e)


def retrain(data: str, registry: str, tsettings: TrainSettings, ssettings: SegmentSettings, *,
            workdir: str | None = None, split: str = "val", margin: float = 0.005,
            allow_negative_margin: bool = False,
            dask_address: str | None = None, skip_unchanged: bool = False, baseline: str | None = None,
            train_step: Callable[[str, str, TrainSettings], TrainResult] = train_challenger,
            evaluate_step: Callable[..., Evaluation] = evaluate_model) -> RetrainResult:
    """Train a challenger, evaluate challenger and champion on ``split``, register it, promote when better.

    ``skip_unchanged``: when the dataset's files (images, masks, labels, regions, classes.json,
    split.json — compared by listing: size and mtime/ETag), the champion and the settings are those of
    the last completed round, nothing is trained and the result says so (``skipped``): an idle week
    costs a listing, not a training run.

    Labels files made from segpipe's own output (a GeoPackage export carries the model labels it started
    from; ``baseline``: the folder of outputs files without a record were exported from) are compared with
    them: the report shows what annotators changed and names every file that could not be compared, with
    why (:mod:`segpipe.evaluate.corrections`); also written as ``corrections.json`` next to it.

    ``margin`` below 0 is refused unless ``allow_negative_margin``. A challenger bit-identical to the
    champion is not registered (it would be a copy); the registered challenger's weights are not kept twice
    (the run folder keeps a ``registered.json`` pointing at its version) and its checkpoint is removed once
    trained, so a rejected challenger costs the registry its weights plus its reports.
    """
    check_margin(margin, allow_negative_margin)
    init_registry(registry)
    current = champion(registry)
    # the listing is taken now: labels saved while this round trains belong to the next round
    listing = data_listing(data)
    fingerprint = round_fingerprint(listing, current, tsettings, ssettings, split, margin)
    last = _last_round(registry)
    if skip_unchanged and last.get("fingerprint") == fingerprint:
        reason = (f"skipped: data, labels, champion {current} and settings are unchanged since the round of "
                  f"{last.get('finished', '?')} ({last.get('version', '?')})")
        log.info("%s", reason)
        return RetrainResult(version=str(last.get("version", "")), promoted=False, reason=reason, champion=current,
                             challenger_mean_iou=None, champion_mean_iou=None, report=str(last.get("report", "")),
                             registry=registry, run=str(last.get("run", "")), comparison="", skipped=True)
    paths = _claim_run_dir(workdir or join(registry, "runs"), dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"))
    # corrections first: against the labels files as this round found them, warnings before the long training
    corr = corrections(load_dataset(data), baseline, seed=tsettings.seed)
    corr_md = corrections_markdown(corr)
    trained = train_step(data, paths["challenger"], tsettings)
    challenger_ev = evaluate_step("challenger", trained.uri, data, split, paths["eval_challenger"], ssettings,
                                  dask_address)
    champion_ev = None
    if current:
        champion_ev = evaluate_step(f"champion {current}", resolve(registry), data, split, paths["eval_champion"],
                                    ssettings, dask_address)
    decision = decide(champion_ev.metrics if champion_ev else None, challenger_ev.metrics, margin)
    title = (f"retrain: challenger vs champion {current}" if champion_ev else
             "retrain: challenger (no champion yet)")
    same = current is not None and trained.weights_sha256 == weights_sha256(registry, current)
    if same:
        decision = Decision(False, f"the challenger is bit-identical to champion {current} (trained on the same "
                                   "train images, labels and settings): not registered",
                            decision.champion_mean_iou, decision.challenger_mean_iou)
    fs, path = filesystem(join(paths["report"], "corrections.json"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(corr, indent=2).encode())
    if corr["compared"]:
        log.info("corrections: %.2f %% of %d labelled pixels changed by annotators (%d on train images, %d on val "
                 "images), mean Dice %s", 100 * corr["changed_fraction"], corr["pixels"], corr["changed_pixels_train"],
                 corr["changed_pixels_val"], corr["mean_dice"])
    write_evaluation_report(paths["report"], challenger_ev, title=title, champion=champion_ev,
                            corrections_md=corr_md)
    if same:
        assert current is not None
        version = current
    else:
        version = register(registry, trained.uri, metrics=challenger_ev.metrics, report_dir=paths["report"])
    _drop_registered_copy(trained, registry, version)
    if decision.promote:
        promote(registry, version, decision.reason)
        log.info("promoted %s: %s", version, decision.reason)
    else:
        log.info("kept champion %s: %s", current, decision.reason)
    table = (markdown_table(champion_ev.metrics, challenger_ev.metrics) if champion_ev
             else markdown_table(challenger_ev.metrics)) + ("\n" + corr_md if corr_md else "")
    # the round's inputs, with the champion it leaves: next week, nothing changed = the same fingerprint
    after = champion(registry)
    _record_round(registry, {"fingerprint": round_fingerprint(listing, after, tsettings, ssettings, split, margin),
                             "version": version, "champion": after, "report": join(paths["report"], "report.html"),
                             "run": paths["base"], "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return RetrainResult(
        version=version, promoted=decision.promote, reason=decision.reason,
        champion=version if decision.promote else current,
        challenger_mean_iou=decision.challenger_mean_iou, champion_mean_iou=decision.champion_mean_iou,
        report=join(paths["report"], "report.html"), registry=registry, run=paths["base"], comparison=table,
        corrections={k: corr[k] for k in CORRECTIONS_SUMMARY},
    )
