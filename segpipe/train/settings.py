"""Training settings: :class:`TrainSettings` (one stage's settings, validated and frozen), and the
precision a training run computes in.

The settings are stored in every checkpoint and in the artifact's ``model.json``
(:func:`settings_dump`), so a resume can check that nothing that changes the numbers changed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segpipe.core.settings import Precision
from segpipe.train.augment import AugmentSettings

if TYPE_CHECKING:
    import torch


class TrainSettings(BaseModel):
    """How a model is trained (one stage's settings: frozen, unknown keys rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str = Field("Unet", description="smp architecture, e.g. Unet, FPN, DeepLabV3Plus.")
    encoder: str = Field("resnet18", description="smp encoder, e.g. resnet18, resnet34, efficientnet-b0, tu-*.")
    encoder_weights: str | None = Field(
        None, description="Pretrained encoder weights to start from (e.g. 'imagenet'; needs a network), "
        "None = random initialisation.",
    )
    epochs: int = Field(20, ge=1, le=100_000, description="Epochs to train (at most; early stopping may end sooner).")
    max_seconds: float | None = Field(
        None, gt=0, description="Time budget of the training, validation included: after each epoch, the epochs "
        "that fit in what is left at the last epoch's pace (never more than epochs) are planned, and the "
        "learning-rate schedule with them; an epoch that would end past it is not started. None = epochs alone "
        "decide.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Patches per optimizer step.")
    patch_size: int = Field(256, ge=32, le=8192, description="Side of a training patch in pixels (multiple of 32).")
    patches_per_epoch: int = Field(
        1000, ge=1, description="Random patches per epoch; steps per epoch = patches_per_epoch // batch_size.",
    )
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW decoupled weight decay.")
    schedule: Literal["onecycle", "cosine"] = Field(
        "onecycle", description="Learning-rate schedule over all steps: one-cycle (warm-up then cosine "
        "decay) or cosine decay from lr.",
    )
    class_balanced: bool = Field(
        True, description="Centre patches on pixels of a class drawn with probability ∝ freq^-class_balance_power "
        "instead of uniformly random positions.",
    )
    class_balance_power: float = Field(
        0.0, ge=0, le=2, description="Class-balanced sampling: 0 = every class equally often; larger favours "
        "rare classes more.",
    )
    class_weight_power: float = Field(
        0.5, ge=0, le=2,
        description="Cross-entropy class weights w_c ∝ 1/freq_c^p (normalised to mean 1); 0 = unweighted.",
    )
    class_weight_max: float = Field(10.0, ge=1, description="Class weights are clipped to [1/max, max].")
    dice_weight: float = Field(0.5, ge=0, description="Loss = cross-entropy + dice_weight × Dice loss.")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description="Patch augmentations.")
    val_every: int = Field(1, ge=1, description="Validate every N epochs (and after the last one).")
    val_tile: int = Field(
        1024, ge=64, le=16384, description="Validation images larger than this are predicted in tiles of this side.",
    )
    val_halo: int = Field(32, ge=0, le=1024, description="Context pixels around each validation tile.")
    early_stopping_patience: int | None = Field(
        5, ge=1, description="Stop after this many validations without a better val mean IoU; None = never.",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when present).")
    precision: Precision = Field(
        "auto", description="Autocast dtype: auto = bf16 on CUDA with bf16 or CPUs with AVX-512-BF16/AMX, else fp32; "
        "fp16 (CUDA only) uses a gradient scaler.",
    )
    seed: int = Field(0, ge=0, description="Seeds the default split, initialisation, patches and augmentations.")
    mpp: float | None = Field(
        None, gt=0, description="Train on slides at this many microns per pixel (area-resampled); recorded in "
        "model.json, so segment reads at it too. None: the images' own.")
    gsd: float | None = Field(
        None, gt=0, description="Train on georeferenced rasters at this pixel size in CRS units (area-resampled); "
        "recorded in model.json. None: the images' own.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes (0 = read in this process).")
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads; None = torch's default.")

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"patch_size must be a multiple of 32 (encoders downsample 32×), got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|cuda|cuda:\d+|mps)$", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_resolution(self) -> TrainSettings:
        if self.mpp is not None and self.gsd is not None:
            raise ValueError("train at one resolution: mpp (slides) or gsd (rasters), not both")
        return self

    @model_validator(mode="after")
    def _steps(self) -> TrainSettings:
        if self.patches_per_epoch < self.batch_size:
            raise ValueError(f"patches_per_epoch ({self.patches_per_epoch}) must be at least batch_size "
                             f"({self.batch_size})")
        return self


#: the defaults of every option of ``segpipe train``/``retrain`` and the ``retrain`` flow (one set)
TRAIN_DEFAULTS: dict[str, Any] = {name: f.default for name, f in TrainSettings.model_fields.items()
                                  if not f.is_required() and f.default_factory is None}


def train_settings(*, architecture: str = TRAIN_DEFAULTS["architecture"], encoder: str = TRAIN_DEFAULTS["encoder"],
                   encoder_weights: str | None = None, epochs: int = TRAIN_DEFAULTS["epochs"],
                   batch_size: int = TRAIN_DEFAULTS["batch_size"], patch_size: int = TRAIN_DEFAULTS["patch_size"],
                   patches_per_epoch: int | None = None, lr: float = TRAIN_DEFAULTS["lr"],
                   class_balanced: bool = TRAIN_DEFAULTS["class_balanced"], device: str = "auto",
                   precision: str = "auto", seed: int = 0, mpp: float | None = None,
                   gsd: float | None = None) -> TrainSettings:
    """The one settings builder of ``segpipe train``, ``segpipe retrain`` and the ``retrain`` flow:
    same option names, same defaults (:data:`TRAIN_DEFAULTS`), same checks.

    ``patches_per_epoch`` None keeps the default; the other settings keep theirs too.
    """
    return TrainSettings.model_validate({
        "architecture": architecture, "encoder": encoder, "encoder_weights": encoder_weights, "epochs": epochs,
        "batch_size": batch_size, "patch_size": patch_size, "lr": lr, "class_balanced": class_balanced,
        "device": device, "precision": precision, "seed": seed, "mpp": mpp, "gsd": gsd,
        **({"patches_per_epoch": patches_per_epoch} if patches_per_epoch else {}),
    })


def settings_dump(s: TrainSettings) -> dict[str, Any]:
    """The settings as JSON-ready values (checkpoints, ``model.json``)."""
    return s.model_dump(mode="json")


def resolve_training_precision(precision: str, device: torch.device) -> str:
    """auto → bf16 where the device computes it natively (CUDA with bf16, AVX-512-BF16/AMX CPUs), else fp32."""
    from segpipe.engine.runtime import resolve_precision

    return resolve_precision(precision, device, cuda_without_bf16="fp32", what="precision")
