"""Patch augmentations: their settings, and the resize and geometric/photometric changes that
keep image and mask aligned.

What is drawn for a patch (flip, rotation, contrast, brightness, scale) is decided by
:meth:`segpipe.train.sampler.PatchSampler.plan` from ``(seed, epoch, index)``; this module
applies it to pixels.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class AugmentSettings(BaseModel):
    """Patch augmentations; every one keeps image and mask aligned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flips: bool = Field(True, description="Random horizontal and vertical flips.")
    rotate90: bool = Field(True, description="Random rotation by a multiple of 90°.")
    brightness: float = Field(0.1, ge=0, le=2, description="Add b ~ U(-v, v) to the normalised image (std units).")
    contrast: float = Field(0.1, ge=0, lt=1, description="Multiply the normalised image by c ~ U(1-v, 1+v).")
    scale: float = Field(
        0.1, ge=0, le=1,
        description="Read a window of side patch·f, f log-uniform in [1/(1+v), 1+v], and resize it to the "
        "patch (bilinear for the image, nearest for the mask). 0 = off.",
    )


NO_AUGMENT = AugmentSettings(flips=False, rotate90=False, brightness=0, contrast=0, scale=0)


def _resize_axis_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # pixel centres (align_corners=False): output i samples input at (i + 0.5)·n_in/n_out − 0.5
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    # nearest = the input pixel whose extent holds the sampling point: floor((i + 0.5)·n_in/n_out)
    nearest = np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
    return i0, i1, frac, nearest


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize (bands, s, s) float image bilinearly and (s, s) mask by nearest neighbour to ``size``².

    Both sample the same points (pixel centres), so image and mask stay aligned.
    """
    s = image.shape[-1]
    if s == size and image.shape[-2] == size:
        return image, mask
    y0, y1, fy, ny = _resize_axis_indices(image.shape[-2], size)
    x0, x1, fx, nx = _resize_axis_indices(image.shape[-1], size)
    rows = image[:, y0, :] * (1 - fy)[None, :, None] + image[:, y1, :] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]
    return out.astype(np.float32, copy=False), mask[ny[:, None], nx[None, :]]


def augment_pair(image: np.ndarray, mask: np.ndarray, *, flip_y: bool, flip_x: bool, rot90: int,
                 contrast: float, brightness: float) -> tuple[np.ndarray, np.ndarray]:
    """Flip, rotate (the same for (bands, P, P) image and (P, P) mask), then ``image · contrast + brightness``.

    Returns views where possible (flips and rotations do not copy).
    """
    if flip_y:
        image, mask = image[:, ::-1], mask[::-1]
    if flip_x:
        image, mask = image[:, :, ::-1], mask[:, ::-1]
    if rot90:
        image, mask = np.rot90(image, rot90, axes=(1, 2)), np.rot90(mask, rot90)
    if contrast != 1.0 or brightness != 0.0:
        image = image * np.float32(contrast) + np.float32(brightness)
    return image, mask
