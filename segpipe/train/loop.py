"""Training: patches from a dataset → a model artifact, resumable epoch by epoch.

``train(data_root, out_uri, settings)`` reads the dataset layout of :mod:`segpipe.labels.dataset`,
trains an smp network built by :func:`segpipe.models.artifact.build_network` on lazily read
patches (:mod:`segpipe.train.sampler`), validates on whole validation images each ``val_every``
epochs (:mod:`segpipe.train.validate`), keeps the weights of the best validation mean IoU and
writes an artifact (``model.json`` + ``weights.safetensors`` + ``metrics.json``) to ``out_uri``.

This module owns the loop itself: setting up the optimizer and schedule, one epoch of steps
(:func:`_train_epoch`), validation with early stopping (:func:`_validate`) and the artifact
(:func:`_write_artifact`). The settings are in :mod:`segpipe.train.settings`, the loss in
:mod:`segpipe.train.loss`, the optimizer, its schedule and the time budget in
:mod:`segpipe.train.schedule`, checkpoints and resume in :mod:`segpipe.train.checkpoint`.
Patches are a pure function of ``(seed, epoch, index)``, so with ``num_workers`` any value a
resumed run reproduces the straight run; on CPU the weights come out bit-identical.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.errors import ConfigError, DatasetError, ModelError
from segpipe.core.progress import ProgressLog
from segpipe.io.metrics import write_metrics_json
from segpipe.io.storage import filesystem, join, strip_file_scheme
from segpipe.labels.dataset import Dataset, at_resolution, load_dataset, split_dataset
from segpipe.models.artifact import ModelSpec, Resolution, build_network, save_artifact
from segpipe.train.checkpoint import (
    Progress,
    check_resumable,
    clear_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from segpipe.train.index import index_masks
from segpipe.train.loss import class_weights, make_loss
from segpipe.train.normalization import band_statistics, default_input_scale
from segpipe.train.resolution import dataset_resolution
from segpipe.train.sampler import PatchSampler
from segpipe.train.schedule import epochs_in_budget, optimizer, planned_epochs, replan
from segpipe.train.settings import TrainSettings, resolve_training_precision, settings_dump
from segpipe.train.validate import validate

if TYPE_CHECKING:
    import torch

log = logging.getLogger("segpipe.train.loop")

#: steps between reading the loss back (each read waits for the device)
_SYNC_EVERY = 10


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    uri: str  #: the artifact folder
    spec: ModelSpec
    metrics: dict[str, float | None]  #: val_mean_iou, val_pixel_accuracy of the kept weights
    history: list[dict[str, Any]]
    best_epoch: int | None  #: 1-based epoch of the kept weights (None: no validation images → last epoch)
    epochs_run: int
    stop_reason: str
    weights_sha256: str
    seconds: float


@dataclass(frozen=True)
class _Data:
    """The splits and what one pass over them found: class counts, normalisation, the sampler."""

    full: Dataset
    train: Dataset
    val: Dataset
    counts: np.ndarray  #: training pixels per class
    weights: np.ndarray  #: cross-entropy class weights
    input_scale: float
    mean: list[float]
    std: list[float]
    sampler: PatchSampler
    resolution: Resolution | None = None  #: the training images' pixel size, recorded in model.json


class _EpochOrder:
    """DataLoader sampler yielding the keys ``(epoch, 0..n-1)`` of the current epoch (set ``.epoch``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.n)])

    def __len__(self) -> int:
        return self.n


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), disable=not enabled,
                    transient=False)


def _prepare_data(data_root: str, full: Dataset, train_ds: Dataset, val_ds: Dataset, s: TrainSettings,
                  resolution: Resolution | None) -> _Data:
    """Index the masks (every class id checked), class weights, band statistics and the patch sampler."""
    index = index_masks(train_ds)  # also checks every class id
    if val_ds.items:
        index_masks(val_ds)  # a bad validation mask fails now, not after the first epoch
    counts = index.class_counts()
    if counts.sum() == 0:
        raise DatasetError(data_root, "the training masks hold no labelled pixels (all 255 = ignore)")
    input_scale = default_input_scale(full.dtype)
    mean, std = band_statistics(train_ds, input_scale, seed=s.seed)
    weights = class_weights(counts, s.class_weight_power, s.class_weight_max)
    sampler = PatchSampler(train_ds, patch_size=s.patch_size, patches_per_epoch=s.patches_per_epoch,
                           mean=mean, std=std, input_scale=input_scale, augment=s.augment, index=index,
                           class_balanced=s.class_balanced, balance_power=s.class_balance_power, seed=s.seed)
    return _Data(full, train_ds, val_ds, counts, weights, input_scale, mean, std, sampler, resolution)


def _train_epoch(net, loader, opt, sched, scaler, loss_fn, *, device: torch.device, amp_dtype, epoch: int,
                 s: TrainSettings, on_steps: Callable[[int, float], None]) -> tuple[float, int]:
    """One epoch of optimizer steps; returns (summed loss, steps). ``on_steps(steps, mean loss)``
    every few steps (the loss is read back from the device only then)."""
    import torch

    steps_per_epoch = s.patches_per_epoch // s.batch_size
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    n_steps = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        loss = loss_fn(logits, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        loss_sum += loss.detach()
        n_steps += 1
        if n_steps % _SYNC_EVERY == 0 or n_steps == steps_per_epoch:
            mean_loss = float(loss_sum) / n_steps
            if not math.isfinite(mean_loss):
                raise ConfigError("training", f"loss became {mean_loss} in epoch {epoch + 1}; lower lr "
                                              f"(now {s.lr}) or use precision fp32")
            on_steps(n_steps, mean_loss)
    return float(loss_sum), n_steps


def _spec_fields(data: _Data, s: TrainSettings) -> dict[str, Any]:
    """The model contract of what is being trained (validation predicts with it; the artifact records it)."""
    full = data.full
    # ``class_colors`` is the contract key the pipeline, exports and viewers read
    # (segpipe.core.classes.colors_from_spec still reads the legacy ``colors`` of older artifacts)
    # ``input_dtype``: the pixel type trained on, always recorded. Without it the type is guessed from
    # input_scale (1.0 → float32), and a model trained on float64/int32/uint32/int8 images refused them.
    return dict(architecture=s.architecture, encoder=s.encoder, in_channels=full.in_channels, classes=full.classes,
                mean=data.mean, std=data.std, input_scale=data.input_scale, input_dtype=full.dtype,
                resolution=data.resolution, class_colors=list(full.colors))


def _spec(data: _Data, s: TrainSettings) -> ModelSpec:
    return ModelSpec(**_spec_fields(data, s))


def _validate(net, data: _Data, prog: Progress, entry: dict[str, Any], *, epoch: int, s: TrainSettings,
              device: torch.device, precision: str, on_image: Callable[[int], None] | None = None) -> None:
    """Score ``net`` on the validation images; record the scores in ``entry``, keep the best weights
    in ``prog`` and set its stop reason once ``early_stopping_patience`` validations brought no gain."""
    cm = validate(net, data.val, _spec(data, s), device=device, precision=precision, tile=s.val_tile,
                  halo=s.val_halo, batch_size=1, on_image=on_image)
    scores = cm.scores(data.full.classes)
    miou = scores["mean_iou"]
    entry["val_mean_iou"] = miou
    entry["val_pixel_accuracy"] = scores["pixel_accuracy"]
    if miou is not None and (prog.best_metric is None or miou > prog.best_metric):
        prog.best_metric, prog.best_epoch, prog.best_scores = miou, epoch + 1, scores
        prog.best_weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        prog.bad_validations = 0
    else:
        prog.bad_validations += 1
        if s.early_stopping_patience is not None and prog.bad_validations >= s.early_stopping_patience:
            prog.stop_reason = f"early stopping: no better val mean IoU in {prog.bad_validations} validations"


def train(data_root: str, out_uri: str, settings: TrainSettings | None = None, *, resume: bool = False,
          progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a model on the dataset at ``data_root`` and write its artifact to ``out_uri``.

    ``resume=True`` continues from the newest checkpoint in ``out_uri/checkpoint/`` (with the
    same settings; starts over when there is none). ``on_epoch`` gets each epoch's history
    entry. Per-epoch metrics are logged on logger ``segpipe.train.loop``.
    """
    import torch
    from torch.utils.data import DataLoader

    from segpipe.engine.runtime import resolve_device

    t_start = time.perf_counter()
    s = settings or TrainSettings()
    data_root = strip_file_scheme(data_root).rstrip("/") or "/"
    out_uri = strip_file_scheme(out_uri).rstrip("/")
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    precision = resolve_training_precision(s.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    full = load_dataset(data_root)
    # one pixel size for every image, recorded in model.json: the chosen one, else the images' median;
    # every image and its truth are read on their grid at it, as segment will read them
    chosen = s.mpp is not None or s.gsd is not None
    resolution = Resolution(mpp=s.mpp, gsd=s.gsd) if chosen else dataset_resolution(full)
    if resolution is not None:
        full = at_resolution(full, mpp=resolution.mpp, gsd=resolution.gsd, strict=chosen)
    train_ds = split_dataset(full, "train", s.seed)
    val_ds = split_dataset(full, "val", s.seed)
    _seed_everything(s.seed)
    # the network first: a wrong name or unavailable pretrained weights fail before any data pass
    net = build_network(s.architecture, s.encoder, full.in_channels, full.num_classes, s.encoder_weights)
    data = _prepare_data(data_root, full, train_ds, val_ds, s, resolution)

    net = net.to(device).to(memory_format=torch.channels_last)
    opt, sched, scaler = optimizer(net, s, device, precision)
    loss_fn = make_loss(data.weights, full.num_classes, s.dice_weight, device)

    fs, out_path = filesystem(out_uri)
    ckdir, ckuri = join(out_path, "checkpoint"), join(out_uri, "checkpoint")
    prog = Progress()
    if resume:
        loaded = load_checkpoint(fs, ckdir, ckuri)
        if loaded is None:
            log.info("%s: no checkpoint, starting from epoch 1", ckuri)
        else:
            meta, tensors = loaded
            check_resumable(meta["settings"], s, ckuri)
            prog = restore_checkpoint(meta, tensors, net, opt, sched, scaler, device)
            log.info("%s: resuming after epoch %d", ckuri, prog.epoch)
    else:
        clear_checkpoints(fs, ckdir)
    if not val_ds.items:
        log.warning("%s: no validation images; keeping the last epoch's weights, no early stopping", data_root)

    # one loader for the whole run: the keys (epoch, i) carry the epoch, so workers can persist
    order = _EpochOrder(s.patches_per_epoch)
    loader = DataLoader(data.sampler, batch_size=s.batch_size, sampler=order, drop_last=True,
                        num_workers=s.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=s.num_workers > 0)

    # a line every PROGRESS_EVERY_S on the log (the flow's run logs): an epoch can take hours
    say = ProgressLog(log)
    steps_per_epoch = s.patches_per_epoch // s.batch_size
    planned = planned_epochs(sched, steps_per_epoch)  # s.epochs, or what a time budget left (resume)

    def on_steps(task: Any, epoch: int, n: int, mean_loss: float) -> None:
        bar.update(task, completed=n, loss=f"{mean_loss:.4f}")
        say(lambda: f"epoch {epoch + 1}/{planned}: step {n}/{steps_per_epoch}, loss {mean_loss:.4f}")

    validated = [0]  # pixels of this epoch's validation so far

    def on_image(task: Any, epoch: int, px: int) -> None:
        bar.advance(task, px)
        validated[0] += px
        say(lambda: f"validation {epoch + 1}/{planned}: {validated[0] / 1e6:.1f} of {data.val.pixels / 1e6:.1f} MP")

    with _progress_bar(progress) as bar:
        while prog.epoch < planned and prog.stop_reason is None:  # a time budget may move ``planned``
            epoch = prog.epoch
            t0 = time.perf_counter()
            order.epoch = epoch
            task = bar.add_task(f"epoch {epoch + 1}/{planned}", total=steps_per_epoch,
                                loss="-")
            loss_sum, n_steps = _train_epoch(
                net, loader, opt, sched, scaler, loss_fn, device=device, amp_dtype=amp_dtype, epoch=epoch, s=s,
                on_steps=lambda n, mean_loss, task=task, epoch=epoch: on_steps(task, epoch, n, mean_loss))
            train_seconds = time.perf_counter() - t0
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(n_steps, 1),
                "lr": float(sched.get_last_lr()[0]),
                "patches_per_s": n_steps * s.batch_size / train_seconds if train_seconds > 0 else None,
            }
            if val_ds.items and ((epoch + 1) % s.val_every == 0 or epoch + 1 == planned):
                validated[0] = 0
                vtask = bar.add_task(f"validation {epoch + 1}/{planned}", total=data.val.pixels, loss="-")
                _validate(net, data, prog, entry, epoch=epoch, s=s, device=device, precision=precision,
                          on_image=lambda px, vtask=vtask, epoch=epoch: on_image(vtask, epoch, px))
            entry["seconds"] = time.perf_counter() - t0
            prog.history.append(entry)
            prog.epoch = epoch + 1
            if s.max_seconds is not None and prog.stop_reason is None:
                # each epoch measures the pace: the epochs left and the schedule are fitted to what remains
                # of the budget (the first epoch is slower: kernels are chosen, the machine may be busy)
                fit = epochs_in_budget(s, prog.epoch, time.perf_counter() - t_start, entry["seconds"])
                if fit != planned:
                    log.info("time budget %.0f s: %d epoch(s) fit, not %d (%.0f s per epoch now)", s.max_seconds,
                             fit, planned, entry["seconds"])
                    planned, sched = fit, replan(opt, sched, s, fit)
            if prog.epoch >= planned and prog.stop_reason is None:
                prog.stop_reason = "completed" if planned == s.epochs else \
                    f"completed {planned} epoch(s), all that fit in the time budget ({s.max_seconds:.0f} s)"
            save_checkpoint(fs, ckdir, net, opt, sched, scaler, prog, s, data_root)
            log.info("%s", epoch_line(entry, planned))
            if on_epoch is not None:
                on_epoch(dict(entry))
            bar.remove_task(task)
    if prog.stop_reason is None:
        prog.stop_reason = "completed"
    return _write_artifact(out_uri, net, prog, data, s, data_root=data_root, device=device, precision=precision,
                           t_start=t_start)


def _write_artifact(out_uri: str, net, prog: Progress, data: _Data, s: TrainSettings, *, data_root: str,
                    device: torch.device, precision: str, t_start: float) -> TrainResult:
    """The artifact: the best validated weights (or the last ones without validation images)."""
    fs, out_path = filesystem(out_uri)
    final = prog.best_weights if prog.best_weights is not None else \
        {k: v.detach().cpu() for k, v in net.state_dict().items()}
    best_entry = next((h for h in prog.history if h["epoch"] == prog.best_epoch), None)
    metrics = {
        "val_mean_iou": best_entry.get("val_mean_iou") if best_entry else None,
        "val_pixel_accuracy": best_entry.get("val_pixel_accuracy") if best_entry else None,
    }
    seconds = time.perf_counter() - t_start  # this call (a resumed run: since the resume)
    spec = ModelSpec(**_spec_fields(data, s), training={
            "settings": settings_dump(s),
            "epochs_run": prog.epoch,
            "best_epoch": prog.best_epoch,
            "stop_reason": prog.stop_reason,
            "history": prog.history,
            "data": data_root,
            "train_images": len(data.train.items),
            "val_images": len(data.val.items),
            "class_pixel_counts": [int(c) for c in data.counts],
            "class_weights": [float(w) for w in data.weights],
            "device": str(device),
            "precision": precision,
            "seconds": seconds,
        },
        metrics=metrics,
    )
    try:
        sha = save_artifact(out_uri, spec, final)
    except OSError as e:
        raise ModelError(out_uri, f"cannot write the artifact ({e})") from None
    if prog.best_scores is not None:
        write_metrics_json(join(out_uri, "metrics.json"), prog.best_scores)
    elif fs.exists(join(out_path, "metrics.json")):  # from an earlier run into the same folder
        fs.rm(join(out_path, "metrics.json"))
    log.info("wrote %s (best epoch %s, val mIoU %s, %s)", out_uri, prog.best_epoch, _fmt(metrics["val_mean_iou"]),
             prog.stop_reason)
    return TrainResult(uri=out_uri, spec=spec, metrics=metrics, history=list(prog.history),
                       best_epoch=prog.best_epoch, epochs_run=prog.epoch, stop_reason=prog.stop_reason,
                       weights_sha256=sha, seconds=seconds)


def epoch_line(entry: dict[str, Any], epochs: int) -> str:
    """One line for an epoch's history entry (the log file's, and what ``segpipe train`` prints without a TTY)."""
    return (f"epoch {entry['epoch']}/{epochs}: loss {entry['train_loss']:.4f}, lr {entry['lr']:.2e}, "
            f"val mIoU {_fmt(entry.get('val_mean_iou'))}, pixel acc {_fmt(entry.get('val_pixel_accuracy'))}, "
            f"{entry.get('patches_per_s') or 0.0:.1f} patches/s, {entry.get('seconds') or 0.0:.1f} s")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
