"""Pickle-free training checkpoints: save, find the newest complete one, check and resume.

Checkpoints (``out_uri/checkpoint/epoch-NNNN.{safetensors,json}``) hold everything a resume
needs: model, best-model and optimizer tensors in safetensors, and scheduler, optimizer
hyper-parameters, RNG states and history as JSON — nothing is unpickled. The JSON is
written last and names the sha256 of its tensors, so a half-written checkpoint is never
used. Only the newest checkpoint is kept. :class:`Progress` is the loop state a checkpoint
carries besides tensors and RNG states.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.errors import ConfigError
from segpipe.io.storage import join, write_atomic
from segpipe.train.settings import TrainSettings, settings_dump

if TYPE_CHECKING:
    import torch

log = logging.getLogger("segpipe.train.checkpoint")

CHECKPOINT_FORMAT = "segpipe-checkpoint/1"
#: settings a resume may change (they do not change the numbers, or only how fast they come)
_RESUMABLE_CHANGES = frozenset({"num_workers", "threads", "device"})


@dataclass
class Progress:
    """Loop state that a checkpoint carries besides tensors and RNGs."""

    epoch: int = 0  #: epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    best_scores: dict[str, Any] | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    bad_validations: int = 0
    stop_reason: str | None = None


def _checkpoint_files(fs, ckdir: str) -> list[tuple[int, str]]:
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(ckdir, detail=False)]
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = re.match(r"^epoch-(\d+)\.json$", n)
        if m:
            out.append((int(m.group(1)), n[: -len(".json")]))
    return sorted(out)


def save_checkpoint(fs, ckdir: str, net, opt, sched, scaler, prog: Progress, settings: TrainSettings,
                     data_root: str) -> None:
    import torch
    from safetensors.torch import save as save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().contiguous()
    # the best weights are stored only when they are not this epoch's (saves a model's size)
    best_is_model = prog.best_weights is not None and prog.best_epoch == prog.epoch
    if prog.best_weights is not None and not best_is_model:
        for k, v in prog.best_weights.items():
            tensors[f"best/{k}"] = v.contiguous()
    osd = opt.state_dict()
    opt_state: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        meta: dict[str, Any] = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{pid}/{key}"] = val.detach().cpu().contiguous()
                meta[key] = "<tensor>"
            else:
                meta[key] = val
        opt_state[str(pid)] = meta
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = st
    blob = save_safetensors(tensors)
    name = f"epoch-{prog.epoch:04d}"
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": prog.epoch,
        "settings": settings_dump(settings),
        "data": data_root,
        "tensors": f"{name}.safetensors",
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "optimizer": {"param_groups": osd["param_groups"], "state": opt_state},
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
        "history": prog.history,
        "best_metric": prog.best_metric,
        "best_epoch": prog.best_epoch,
        "best_is_model": best_is_model,
        "best_scores": prog.best_scores,
        "bad_validations": prog.bad_validations,
        "stop_reason": prog.stop_reason,
    }
    fs.makedirs(ckdir, exist_ok=True)
    write_atomic(fs, join(ckdir, f"{name}.safetensors"), blob)
    # the JSON commits the checkpoint: written after its tensors, which it names by hash
    write_atomic(fs, join(ckdir, f"{name}.json"), (json.dumps(meta) + "\n").encode())
    for epoch, old in _checkpoint_files(fs, ckdir):
        if epoch != prog.epoch:
            for suffix in (".json", ".safetensors"):
                try:
                    fs.rm(join(ckdir, old + suffix))
                except FileNotFoundError:
                    pass


def clear_checkpoints(fs, ckdir: str) -> None:
    for _, name in _checkpoint_files(fs, ckdir):
        for suffix in (".json", ".safetensors"):
            try:
                fs.rm(join(ckdir, name + suffix))
            except FileNotFoundError:
                pass


def load_checkpoint(fs, ckdir: str, ckuri: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The newest complete checkpoint (JSON + tensors whose hash matches), or None."""
    from safetensors.torch import load as load_safetensors

    for _, name in reversed(_checkpoint_files(fs, ckdir)):
        try:
            meta = json.loads(fs.cat_file(join(ckdir, name + ".json")))
            blob = fs.cat_file(join(ckdir, meta["tensors"]))
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s: skipping damaged checkpoint %s", ckuri, name)
            continue
        if meta.get("format") != CHECKPOINT_FORMAT or hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            log.warning("%s: skipping damaged checkpoint %s", ckuri, name)
            continue
        return meta, load_safetensors(blob)
    return None


def check_resumable(saved: dict[str, Any], settings: TrainSettings, ckuri: str) -> None:
    now = settings_dump(settings)
    for key in sorted(set(saved) | set(now)):
        if key in _RESUMABLE_CHANGES:
            continue
        if saved.get(key) != now.get(key):
            raise ConfigError(ckuri, f"cannot resume: setting {key!r} was {saved.get(key)!r} in the checkpoint, "
                                     f"now {now.get(key)!r} (train without resume to start over)")


def restore_checkpoint(meta: dict[str, Any], tensors: dict[str, torch.Tensor], net, opt, sched, scaler,
             device: torch.device) -> Progress:
    import torch

    net.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["optimizer"]["state"].items():
        entry: dict[str, Any] = {}
        for key, val in st.items():
            if val != "<tensor>":
                entry[key] = val
                continue
            t = tensors[f"optim/{pid}/{key}"]
            p = params[int(pid)]
            if t.shape == p.shape:
                # the same memory layout as the parameter (channels-last): fused AdamW walks
                # parameter and moments element by element in memory order
                t = torch.empty_like(p, dtype=t.dtype).copy_(t)
            entry[key] = t
        state[int(pid)] = entry
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if meta.get("best_is_model"):
        best = {k[len("model/"):]: v.clone() for k, v in tensors.items() if k.startswith("model/")}
    else:
        best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    # RNG states last: nothing may draw from them between here and the next epoch
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = meta["rng"]["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng/cuda/"))]
    if cuda_states and device.type == "cuda":
        torch.cuda.set_rng_state_all(cuda_states)
    return Progress(epoch=meta["epoch"], history=meta["history"], best_metric=meta["best_metric"],
                     best_epoch=meta["best_epoch"], best_scores=meta.get("best_scores"), best_weights=best,
                     bad_validations=meta["bad_validations"], stop_reason=meta["stop_reason"])
