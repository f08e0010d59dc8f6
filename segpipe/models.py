"""Model artifacts (a public contract) and the segmentation-models-pytorch factory.

An artifact is a folder (local or any fsspec URL) holding

* ``model.json`` – ``{"format": "segpipe-model/1", "architecture", "encoder", "in_channels",
  "classes", "mean", "std", "input_scale", …extra keys}``
* ``weights.safetensors`` – exactly the ``state_dict()`` of
  ``smp.create_model(architecture, encoder_name=encoder, encoder_weights=None,
  in_channels=in_channels, classes=len(classes))``.

Input normalisation is ``x = (pixel / input_scale - mean) / std``. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segpipe.errors import ConfigError, ModelError
from segpipe.io.storage import filesystem, join, strip_file_scheme

if TYPE_CHECKING:
    import torch

FORMAT = "segpipe-model/1"
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"


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
    input_scale: float = Field(255.0, gt=0, description="Pixels are divided by this first.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.in_channels:
                raise ValueError(f"{name} has {len(values)} values for in_channels={self.in_channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def core(self) -> dict[str, Any]:
        """The contract fields only (what decides the network and its input)."""
        return {k: getattr(self, k) for k in ModelSpec.model_fields}


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
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "model.json"
        raise ModelError(uri, f"{MODEL_JSON}: {where}: {err['msg']}") from None


def load_artifact(uri: str) -> Artifact:
    """Load an artifact folder (local path or fsspec URL): spec, weights and their sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    uri = resolve_model_uri(uri)
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
    return Artifact(uri, spec, weights, hashlib.sha256(blob).hexdigest())


def resolve_model_uri(uri: str) -> str:
    """An artifact folder as is; a registry folder → its champion; ``REGISTRY@vN`` → that version."""
    try:
        from segpipe import registry
    except ImportError:  # registry not installed in this build
        return uri
    return registry.resolve(uri)


def save_artifact(out: str, spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> str:
    """Write ``model.json`` + ``weights.safetensors``; returns the weights' sha256."""
    from safetensors.torch import save as save_safetensors

    fs, path = filesystem(strip_file_scheme(out))
    fs.makedirs(path, exist_ok=True)
    blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
    with fs.open(join(path, WEIGHTS), "wb") as f:
        f.write(blob)
    with fs.open(join(path, MODEL_JSON), "w") as f:
        f.write(json.dumps(spec.model_dump(), indent=2) + "\n")
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
        raise ConfigError("model", e.errors()[0]["msg"]) from None
    torch.manual_seed(seed)
    net = build_network(architecture, encoder, in_channels, len(classes))
    save_artifact(out, spec, net.state_dict())
    return spec
