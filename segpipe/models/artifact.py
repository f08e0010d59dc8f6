"""Model artifacts (a public contract) and the segmentation-models-pytorch factory.

An artifact is a folder (local or any fsspec URL) holding

* ``model.json`` – ``{"format": "segpipe-model/1", "architecture", "encoder", "in_channels",
  "classes", "mean", "std", "input_scale", …extra keys}``
* ``weights.safetensors`` – exactly the ``state_dict()`` of
  ``smp.create_model(architecture, encoder_name=encoder, encoder_weights=None,
  in_channels=in_channels, classes=len(classes))``.

Input normalisation is ``x = (pixel / input_scale - mean) / std``. Loading never unpickles.

Optional keys (left out of ``model.json`` when unset; see docs/pixel-types.md): ``input_scale``
may be a mapping pixel type → divisor; ``input_dtype`` names the pixel type the model was made
for; a ``normalization`` block (``scale`` | ``minmax`` | ``percentile``) says how other raw pixels
map to the model's input. Those blocks, and the rule resolved from them for one image
(:class:`~segpipe.models.normalization.InputNorm`, :func:`~segpipe.models.normalization.check_input`,
:func:`~segpipe.models.normalization.image_normalization`), live in :mod:`segpipe.models.normalization`.
Numbers are validated (finite, ``std`` > 0, ``input_scale`` in [1e-6, 1e12]); weights holding
NaN/infinity are refused when loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segpipe.core.errors import ConfigError, ModelError, validation_problem
from segpipe.io.storage import filesystem, join, strip_file_scheme
from segpipe.models.normalization import (
    DTYPE_BY_SCALE,
    Normalization,
    check_block,
    check_finite,
    check_scales,
    dtype_name,
)

if TYPE_CHECKING:
    import torch

FORMAT = "segpipe-model/1"
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"


class Resolution(BaseModel):
    """The pixel size a model was trained at: ``mpp`` (microns per pixel, slides) or ``gsd`` (CRS units per
    pixel, georeferenced rasters), or both when it was trained on both kinds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mpp: float | None = Field(None, gt=0, description="Microns per pixel of the training images (slides).")
    gsd: float | None = Field(None, gt=0, description="Ground sample distance: CRS units per pixel (rasters).")

    @model_validator(mode="after")
    def _some(self) -> Resolution:
        if self.mpp is None and self.gsd is None:
            raise ValueError("resolution needs mpp or gsd")
        return self


class ModelSpec(BaseModel):
    """The ``model.json`` of an artifact. Extra keys (version, training info, metrics) are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format: str = Field(FORMAT, description="Always 'segpipe-model/1'.")
    architecture: str = Field(description="smp architecture name, e.g. Unet, FPN, DeepLabV3Plus.")
    encoder: str = Field(description="smp encoder name, e.g. resnet18, resnet34, efficientnet-b0, tu-*.")
    in_channels: int = Field(ge=1, description="Bands the model reads.")
    classes: list[str] = Field(min_length=1, description="Class names; the list index is the class id.")
    mean: list[float] = Field(description="Per-band mean after dividing by input_scale.")
    std: list[float] = Field(description="Per-band std after dividing by input_scale.")
    input_scale: float | dict[str, float] = Field(
        255.0, description="Pixels are divided by this first; or a mapping pixel type → divisor.")
    input_dtype: str | None = Field(
        None, description="Pixel type the model was made for (default: from input_scale, 255 → uint8). "
        "Images of another type are refused unless 'normalization' says how to map them.")
    normalization: Normalization | None = Field(
        None, description="How raw pixels map to [0, 1] before mean/std (overrides input_scale); "
        "see docs/pixel-types.md.")
    resolution: Resolution | None = Field(
        None, description="Pixel size the model was trained at; segment reads images at it by default.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.in_channels:
                raise ValueError(f"{name} has {len(values)} values for in_channels={self.in_channels}")
            check_finite(values, name)
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        check_scales(self.input_scale, "input_scale")
        if self.input_dtype is not None:
            dtype_name(self.input_dtype)
        check_block(self.normalization, self.in_channels)
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def core(self) -> dict[str, Any]:
        """The contract fields only (what decides the network and its input); unset optional keys left out."""
        out = {k: getattr(self, k) for k in ModelSpec.model_fields}
        for k in _OPTIONAL_KEYS:
            if out[k] is None:
                del out[k]
            elif k == "normalization":
                out[k] = out[k].model_dump()
            elif k == "resolution":
                out[k] = out[k].model_dump(exclude_none=True)
        return out

    def dump(self) -> dict[str, Any]:
        """The JSON object written as ``model.json`` (unset optional keys left out, extra keys kept)."""
        out = self.model_dump(mode="json", exclude={k for k in _OPTIONAL_KEYS if getattr(self, k) is None})
        if self.resolution is not None:
            out["resolution"] = self.resolution.model_dump(exclude_none=True)
        return out

    def input_dtypes(self) -> list[str] | None:
        """Pixel types a plain ``input_scale`` is meant for; None = not known (a custom scale: any type)."""
        if self.input_dtype is not None:
            return [self.input_dtype]
        if isinstance(self.input_scale, dict):
            return list(self.input_scale)
        known = DTYPE_BY_SCALE.get(float(self.input_scale))
        return [known] if known else None


_OPTIONAL_KEYS = ("input_dtype", "normalization", "resolution")


def check_weights(uri: str, weights: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinity (a diverged training run), naming the first bad tensor
    (by name order)."""
    import torch

    for name in sorted(weights):
        t = weights[name]
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ModelError(uri, f"{WEIGHTS}: tensor {name!r} holds {bad} NaN/infinite value(s) of "
                                 f"{t.numel()} (a diverged training run?); retrain or use another version")


def build_network(architecture: str, encoder: str, in_channels: int, num_classes: int,
                  encoder_weights: str | None = None) -> torch.nn.Module:
    """``smp.create_model`` with errors that list the valid names."""
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.encoders import get_encoder_names

    archs = list(smp.MODEL_ARCHITECTURES_MAPPING)
    if architecture.lower() not in archs:
        names = [a.__name__ for a in smp.MODEL_ARCHITECTURES_MAPPING.values()]
        raise ConfigError(architecture, f"unknown architecture; valid: {', '.join(names)}")
    if encoder not in get_encoder_names() and not encoder.startswith("tu-"):
        raise ConfigError(encoder, f"unknown encoder; valid: {', '.join(get_encoder_names())} or tu-<timm name>")
    try:
        return smp.create_model(architecture, encoder_name=encoder, encoder_weights=encoder_weights,
                                in_channels=in_channels, classes=num_classes)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{architecture}/{encoder}", str(e).strip("'\"")) from e
    except OSError as e:  # pretrained weights could not be downloaded
        raise ConfigError(f"{encoder} weights={encoder_weights}", f"cannot download pretrained weights ({e})") from e


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its spec, its weights, and the sha256 of ``weights.safetensors``."""

    uri: str
    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    sha256: str

    def network(self) -> torch.nn.Module:
        """Build the network and load the weights (strict: names and shapes must match)."""
        net = build_network(self.spec.architecture, self.spec.encoder, self.spec.in_channels, self.spec.num_classes)
        expected = net.state_dict()
        for name, tensor in expected.items():
            if name not in self.weights:
                raise ModelError(self.uri, f"weights lack tensor {name!r} that {self.spec.architecture}/"
                                 f"{self.spec.encoder} needs")
            if tuple(self.weights[name].shape) != tuple(tensor.shape):
                raise ModelError(self.uri, f"tensor {name!r} has shape {tuple(self.weights[name].shape)}, "
                                 f"the architecture needs {tuple(tensor.shape)}")
        extra = [k for k in self.weights if k not in expected]
        if extra:
            raise ModelError(self.uri, f"weights hold tensor {extra[0]!r} that {self.spec.architecture}/"
                             f"{self.spec.encoder} does not have")
        net.load_state_dict(self.weights, strict=True)
        return net.eval()


def read_spec(uri: str) -> ModelSpec:
    """Read and validate ``model.json`` of an artifact (no weights)."""
    fs, path = filesystem(strip_file_scheme(uri))
    mj = join(path, MODEL_JSON)
    if not fs.exists(path):
        raise ModelError(uri, "model folder does not exist")
    if not fs.exists(mj):
        raise ModelError(uri, f"missing {MODEL_JSON}")
    try:
        data = json.loads(fs.cat_file(mj))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(uri, f"{MODEL_JSON} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(uri, f"{MODEL_JSON} must hold a JSON object")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        where, msg = validation_problem(e.errors()[0])
        raise ModelError(uri, f"{MODEL_JSON}: {where or 'model.json'}: {msg}") from None


def load_artifact(uri: str) -> Artifact:
    """Load an artifact folder (local path or fsspec URL): spec, weights and their sha256.

    A registry folder or ``REGISTRY@vN`` is resolved by the registry first:
    ``load_artifact(registry.resolve(uri))``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    spec = read_spec(uri)
    fs, path = filesystem(strip_file_scheme(uri))
    wp = join(path, WEIGHTS)
    if not fs.exists(wp):
        raise ModelError(uri, f"missing {WEIGHTS}")
    blob = fs.cat_file(wp)
    try:
        weights = load_safetensors(blob)
    except (SafetensorError, ValueError, OSError) as e:
        raise ModelError(uri, f"{WEIGHTS} is not a valid safetensors file ({e})") from None
    check_weights(uri, weights)
    return Artifact(uri, spec, weights, hashlib.sha256(blob).hexdigest())


def save_artifact(out: str, spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> str:
    """Write ``model.json`` + ``weights.safetensors``; returns the weights' sha256."""
    from safetensors.torch import save as save_safetensors

    fs, path = filesystem(strip_file_scheme(out))
    fs.makedirs(path, exist_ok=True)
    blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
    with fs.open(join(path, WEIGHTS), "wb") as f:
        f.write(blob)
    with fs.open(join(path, MODEL_JSON), "w") as f:
        f.write(json.dumps(spec.dump(), indent=2) + "\n")
    return hashlib.sha256(blob).hexdigest()


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def default_normalization(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics for 3 bands; 0.5/0.25 per band otherwise."""
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * in_channels, [0.25] * in_channels


def create_artifact(out: str, architecture: str, encoder: str, classes: list[str], in_channels: int = 3,
                    seed: int = 0, mean: list[float] | None = None, std: list[float] | None = None,
                    input_scale: float = 255.0, **extra: Any) -> ModelSpec:
    """Write a randomly initialised (seeded) artifact, for smoke runs and benchmarks."""
    import torch

    dm, ds = default_normalization(in_channels)
    try:
        spec = ModelSpec(architecture=architecture, encoder=encoder, in_channels=in_channels,
                         classes=list(classes), mean=mean or dm, std=std or ds, input_scale=input_scale,
                         **extra)
    except ValidationError as e:
        raise ConfigError("model", validation_problem(e.errors()[0])[1]) from None
    torch.manual_seed(seed)
    net = build_network(architecture, encoder, in_channels, len(classes))
    save_artifact(out, spec, net.state_dict())
    return spec
