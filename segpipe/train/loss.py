"""The training loss: weighted cross-entropy + ``dice_weight`` × multiclass Dice; 255 = ignore.

Class weights ``w_c ∝ 1/freq_c^p`` (:func:`class_weights`) are normalised to mean 1 over the
classes present and clipped to ``[1/max, max]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from segpipe.labels.dataset import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def class_weights(counts: np.ndarray, power: float, max_weight: float = 10.0) -> np.ndarray:
    """``w_c ∝ 1/freq_c^power`` over the classes present, clipped to [1/max, max] and normalised to mean 1.

    Classes without pixels get weight 1 (they never occur as a target, so it does not matter).
    """
    counts = np.asarray(counts, dtype=np.float64)
    w = np.ones_like(counts)
    present = counts > 0
    if power > 0 and present.any():
        freq = counts[present] / counts[present].sum()
        raw = freq ** (-power)
        raw = raw / raw.mean()
        raw = np.clip(raw, 1.0 / max_weight, max_weight)
        w[present] = raw / raw.mean()
    return w.astype(np.float32)


def make_loss(weights: np.ndarray, num_classes: int, dice_weight: float,
              device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits, target)``: class-``weights`` cross-entropy (a weighted mean over labelled pixels)
    + ``dice_weight`` × multiclass Dice; targets equal to ``IGNORE_INDEX`` count in neither."""
    import segmentation_models_pytorch as smp
    import torch
    import torch.nn.functional as F  # noqa: N812

    ce_weight = torch.from_numpy(weights).to(device)
    dice = smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX, from_logits=True)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        # weighted mean CE = Σ w_t·ce / Σ w_t over labelled pixels, written out so that an
        # all-ignore batch gives 0 instead of 0/0, without a device sync to check for it
        valid = target != IGNORE_INDEX
        total_weight = (ce_weight[target.clamp(max=num_classes - 1)] * valid).sum()
        ce = F.cross_entropy(logits, target, weight=ce_weight, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = ce / total_weight.clamp_min(1e-6)
        if dice_weight > 0:
            loss = loss + dice_weight * dice(logits, target)
        return loss

    return loss_fn
