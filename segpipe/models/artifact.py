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
map to the model's input. An image the model cannot read as it is is refused in one line
(:func:`check_input`); the rule is resolved once per image (:func:`image_normalization`) into an
:class:`InputNorm`, which :class:`segpipe.engine.predictor.Predictor` applies — the one place it happens.
Numbers are validated (finite, ``std`` > 0, ``input_scale`` in [1e-6, 1e12]); weights holding
NaN/infinity are refused when loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segpipe.core.errors import ConfigError, ModelError
from segpipe.io.storage import filesystem, join, strip_file_scheme

if TYPE_CHECKING:
    import torch

FORMAT = "segpipe-model/1"
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"


#: ``input_scale`` values outside this range are refused: 1e-300 or 1e300 is a typo, not a scale
MIN_INPUT_SCALE = 1e-6
MAX_INPUT_SCALE = 1e12

#: the dtype a model was made for when model.json does not say (``input_dtype``), by ``input_scale``
#: (what :func:`segpipe.train.dataset.default_input_scale` gives for each dtype when training)
DTYPE_BY_SCALE = {255.0: "uint8", 65535.0: "uint16", 32767.0: "int16", 1.0: "float32"}

PIXEL_TYPES_DOC = "docs/pixel-types.md"


def _dtype_name(name: str) -> str:
    """A numpy dtype name (``uint8``, ``uint16``, ``float32``…), checked."""
    import numpy as np

    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"{name!r} is not a pixel type (use uint8, uint16, int16, float32, …)") from None
    if dt.kind not in "uif" or dt.name != name:
        raise ValueError(f"{name!r} is not a pixel type (use uint8, uint16, int16, float32, …)")
    return name


def _check_scale(value: float, where: str) -> None:
    if not math.isfinite(value) or not MIN_INPUT_SCALE <= value <= MAX_INPUT_SCALE:
        raise ValueError(f"{where} must be a finite number between {MIN_INPUT_SCALE:g} and {MAX_INPUT_SCALE:g}, "
                         f"got {value!r}")


def _check_scales(scale: float | dict[str, float], where: str) -> None:
    if isinstance(scale, dict):
        if not scale:
            raise ValueError(f"{where} mapping is empty; give a scale per pixel type, e.g. {{\"uint8\": 255}}")
        for k, v in scale.items():
            _dtype_name(k)
            _check_scale(v, f"{where}[{k!r}]")
    else:
        _check_scale(scale, where)


def _check_finite(values: list[float], where: str) -> None:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{where} must hold finite numbers, got {bad[0]!r}")


class ScaleNormalization(BaseModel):
    """``pixel / input_scale``: a fixed divisor, or one per pixel type (``{"uint8": 255, "uint16": 65535}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["scale"]
    input_scale: float | dict[str, float]


class MinMaxNormalization(BaseModel):
    """``(pixel - min) / (max - min)`` per band, clipped to [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["minmax"]
    min: list[float]
    max: list[float]


class PercentileNormalization(BaseModel):
    """Like minmax, with min/max = the ``low``/``high`` percentiles of each band, computed once per image."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["percentile"]
    low: float = 2.0
    high: float = 98.0


Normalization = Annotated[ScaleNormalization | MinMaxNormalization | PercentileNormalization,
                          Field(discriminator="type")]


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

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.in_channels:
                raise ValueError(f"{name} has {len(values)} values for in_channels={self.in_channels}")
            _check_finite(values, name)
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        _check_scales(self.input_scale, "input_scale")
        if self.input_dtype is not None:
            _dtype_name(self.input_dtype)
        n = self.normalization
        if isinstance(n, ScaleNormalization):
            _check_scales(n.input_scale, "normalization.input_scale")
        elif isinstance(n, MinMaxNormalization):
            for name in ("min", "max"):
                values = getattr(n, name)
                if len(values) not in (1, self.in_channels):
                    raise ValueError(f"normalization.{name} has {len(values)} values for "
                                     f"in_channels={self.in_channels} (give one per band, or one for all)")
                _check_finite(values, f"normalization.{name}")
            lo, hi = _per_band(n.min, self.in_channels), _per_band(n.max, self.in_channels)
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                raise ValueError("normalization.max must be greater than normalization.min in every band")
        elif isinstance(n, PercentileNormalization) and not (
                math.isfinite(n.low) and math.isfinite(n.high) and 0 <= n.low < n.high <= 100):
            raise ValueError(f"normalization percentiles need 0 <= low < high <= 100, got {n.low}, {n.high}")
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
        return out

    def dump(self) -> dict[str, Any]:
        """The JSON object written as ``model.json`` (unset optional keys left out, extra keys kept)."""
        return self.model_dump(mode="json", exclude={k for k in _OPTIONAL_KEYS if getattr(self, k) is None})

    def input_dtypes(self) -> list[str] | None:
        """Pixel types a plain ``input_scale`` is meant for; None = not known (a custom scale: any type)."""
        if self.input_dtype is not None:
            return [self.input_dtype]
        if isinstance(self.input_scale, dict):
            return list(self.input_scale)
        known = DTYPE_BY_SCALE.get(float(self.input_scale))
        return [known] if known else None


_OPTIONAL_KEYS = ("input_dtype", "normalization")


def _per_band(values: list[float], bands: int) -> list[float]:
    return list(values) * bands if len(values) == 1 else list(values)


# --------------------------------------------------------------------------- input normalisation


@dataclass(frozen=True)
class InputNorm:
    """How one image's raw pixels become network input, per band.

    ``u = (pixel - low) / (high - low)``, clipped to [0, 1] when ``clip``; then ``x = (u - mean) / std``.
    :meth:`fold` turns that into one multiply-add (and a clamp): the only place the rule is computed.
    Recorded in the output's provenance (:meth:`as_dict`) so a run can be reproduced.
    """

    method: str  #: scale | minmax | percentile
    low: tuple[float, ...]
    high: tuple[float, ...]
    clip: bool = False
    dtype: str = ""  #: the source pixel type it was resolved for

    def fold(self, mean: list[float], std: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                   np.ndarray | None]:
        """``(scale, bias, lo, hi)`` (float32, per band) with ``x = clamp(pixel * scale + bias, lo, hi)``."""
        low = np.asarray(self.low, np.float64)
        span = np.asarray(self.high, np.float64) - low
        m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        scale = 1.0 / (span * s)
        bias = -low / (span * s) - m / s
        if not self.clip:
            return scale.astype(np.float32), bias.astype(np.float32), None, None
        return (scale.astype(np.float32), bias.astype(np.float32), (-m / s).astype(np.float32),
                ((1.0 - m) / s).astype(np.float32))

    def apply(self, pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
        """Normalise (bands, …) or (N, bands, …) pixels with numpy (training, evaluation, tests)."""
        scale, bias, lo, hi = self.fold(mean, std)
        axis = 0 if pixels.ndim == 3 else 1
        shape = [1] * pixels.ndim
        shape[axis] = -1
        x = pixels.astype(np.float32) * scale.reshape(shape) + bias.reshape(shape)
        if lo is not None:
            np.clip(x, lo.reshape(shape), hi.reshape(shape), out=x)
        return x

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "low": list(self.low), "high": list(self.high), "clip": self.clip,
                "dtype": self.dtype}


def _hint(spec: ModelSpec, dtype: str) -> str:
    return (f"declare how {dtype} pixels map to the model's input with a \"normalization\" block in "
            f"model.json, e.g. {{\"type\": \"scale\", \"input_scale\": {{\"{dtype}\": {_example_scale(dtype)}}}}}"
            f" or {{\"type\": \"minmax\", \"min\": [..], \"max\": [..]}} (see {PIXEL_TYPES_DOC})")


def _example_scale(dtype: str) -> str:
    dt = np.dtype(dtype)
    return f"{np.iinfo(dt).max}" if dt.kind in "ui" else "1.0"


def _scale_for(scale: float | dict[str, float], dtype: str) -> float | None:
    if isinstance(scale, dict):
        return scale.get(dtype)
    return float(scale)


def normalization_for(spec: ModelSpec, dtype: str, uri: str | None = None) -> InputNorm | None:
    """The fixed normalisation of ``dtype`` pixels, None for a per-image one (percentile: see
    :func:`image_normalization`). Raises :class:`InputError` (one line) when the model does not
    say how to read this pixel type: never a silent saturation."""
    from segpipe.core.errors import InputError

    dtype = str(np.dtype(dtype))
    bands = spec.in_channels
    n = spec.normalization
    what = uri or "input"
    if isinstance(n, PercentileNormalization):
        return None
    if isinstance(n, MinMaxNormalization):
        return InputNorm("minmax", tuple(_per_band(n.min, bands)), tuple(_per_band(n.max, bands)), True, dtype)
    if isinstance(n, ScaleNormalization):
        s = _scale_for(n.input_scale, dtype)
        if s is None:
            raise InputError(what, f"has {dtype} pixels; model.json's normalization.input_scale covers only "
                             f"{', '.join(n.input_scale)} — add a scale for {dtype} (see {PIXEL_TYPES_DOC})")
        return InputNorm("scale", (0.0,) * bands, (s,) * bands, False, dtype)
    s = _scale_for(spec.input_scale, dtype)
    allowed = spec.input_dtypes()
    if s is None or (allowed is not None and dtype not in allowed):
        made_for = " or ".join(allowed) if allowed else "other"
        raise InputError(what, f"has {dtype} pixels but the model was made for {made_for} "
                         f"(input_scale {_fmt_scale(spec.input_scale)}; reading them would "
                         f"{'saturate them' if _wider(dtype, allowed) else 'scale them wrongly'}): "
                         f"{_hint(spec, dtype)}")
    return InputNorm("scale", (0.0,) * bands, (s,) * bands, False, dtype)


def _fmt_scale(scale: float | dict[str, float]) -> str:
    if isinstance(scale, dict):
        return json.dumps(scale)
    return f"{scale:g}"


def _wider(dtype: str, allowed: list[str] | None) -> bool:
    """An integer type with more bits than every type the model was made for."""
    dt = np.dtype(dtype)
    if not allowed or dt.kind not in "ui":
        return False
    return all(np.dtype(a).itemsize < dt.itemsize for a in allowed)


#: longest side of the decimated read that per-image statistics (percentile) come from
OVERVIEW_SIDE = 1024


def overview_pixels(reader: Any, max_side: int = OVERVIEW_SIDE) -> np.ndarray:
    """(bands, n) valid pixels of a decimated whole-image read (at most ``max_side`` a side).

    Uses the reader's ``overview(max_side)`` (GDAL overviews when the file has them); otherwise
    reads every k-th row (one row at a time: bounded memory) and keeps every k-th pixel.
    """
    from segpipe.core.geometry import Window

    info = reader.info
    overview = getattr(reader, "overview", None)
    if callable(overview):
        px, valid = overview(max_side)
        px = px.reshape(px.shape[0], -1)
        return px if valid is None else px[:, valid.reshape(-1)]
    thumbnail = getattr(reader, "thumbnail", None)
    if callable(thumbnail):  # slides: from the coarsest pyramid level
        px = thumbnail(max_side)
        return px.reshape(px.shape[0], -1)
    step = max(1, -(-max(info.height, info.width) // max_side))
    masked = bool(getattr(reader, "has_mask", False))
    rows = []
    for y in range(0, info.height, step):
        w = Window(y, 0, 1, info.width)
        row = reader.read(w)[:, 0, ::step]
        if masked:
            valid = reader.read_valid(w)
            if valid is not None:
                row = row[:, valid[0, ::step]]
        rows.append(row)
    return np.concatenate(rows, axis=1)


def image_normalization(spec: ModelSpec, reader: Any, uri: str) -> InputNorm:
    """The normalisation of one image, resolved ONCE per image (never per tile: that would make seams).

    Fixed rules come from :func:`normalization_for`; a ``percentile`` stretch reads a decimated
    overview of the whole image (at most :data:`OVERVIEW_SIDE` pixels a side, nodata excluded)
    and fixes each band's low/high there. Record :meth:`InputNorm.as_dict` in the provenance.
    """
    from segpipe.core.errors import InputError

    dtype = reader.info.dtype
    fixed = normalization_for(spec, dtype, uri)
    if fixed is not None:
        return fixed
    n = spec.normalization
    assert isinstance(n, PercentileNormalization)
    px = overview_pixels(reader).astype(np.float64)
    px = px.reshape(px.shape[0], -1)
    if px.shape[1] == 0:
        raise InputError(uri, "has no valid pixels to compute the percentile stretch from")
    finite = np.isfinite(px).all(axis=0)
    px = px[:, finite]
    if px.shape[1] == 0:
        raise InputError(uri, "has no finite pixel values to compute the percentile stretch from")
    low = np.percentile(px, n.low, axis=1)
    high = np.percentile(px, n.high, axis=1)
    flat = high <= low
    if flat.any():  # a constant band: stretch nothing, map it to 0
        high = np.where(flat, low + 1.0, high)
    return InputNorm("percentile", tuple(float(v) for v in low), tuple(float(v) for v in high), True, dtype)


def _band_hint(spec: ModelSpec, info: Any) -> str:
    n, want = info.count, spec.in_channels
    alpha = " (its alpha band is the nodata mask, not a model band)" if info.extra.get("alpha") else ""
    if n == 1 and want == 3:
        return f"; it is grayscale{alpha}: repeat the band with --bands 1,1,1"
    if n < want:
        return (f"{alpha}; choose {want} bands with --bands (a band may repeat, e.g. --bands "
                f"{','.join(['1'] * want)}) or use a model made for {n} band(s)")
    return f"{alpha}; choose {want} of them with --bands, e.g. --bands {','.join(str(i + 1) for i in range(want))}"


def check_input(spec: ModelSpec, info: Any, uri: str) -> InputNorm | None:
    """Refuse (one :class:`InputError` line) an image the model cannot read as it is.

    Checks the band count (with a hint that works: ``--bands 1,1,1`` for grayscale) and the
    pixel type (:func:`normalization_for`). Returns the fixed normalisation, or None when it is
    per image (percentile: call :func:`image_normalization` with an open reader).
    """
    from segpipe.core.errors import InputError

    if info.count != spec.in_channels:
        raise InputError(uri, f"has {info.count} band(s) but the model expects {spec.in_channels}"
                         + _band_hint(spec, info))
    return normalization_for(spec, info.dtype, uri)


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
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "model.json"
        msg = err["msg"].removeprefix("Value error, ")
        raise ModelError(uri, f"{MODEL_JSON}: {where}: {msg}") from None


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
        raise ConfigError("model", e.errors()[0]["msg"]) from None
    torch.manual_seed(seed)
    net = build_network(architecture, encoder, in_channels, len(classes))
    save_artifact(out, spec, net.state_dict())
    return spec
