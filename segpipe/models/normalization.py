"""How an image's raw pixels become network input: the normalisation contract of ``model.json``.

The blocks a ``model.json`` may hold under ``normalization`` (``scale`` | ``minmax`` |
``percentile``; see docs/pixel-types.md), and the rule resolved from them for one image:

* :func:`check_input` refuses, in one line, an image the model cannot read as it is (band
  count, pixel type); :func:`normalization_for` gives the fixed rule for a pixel type;
* :func:`image_normalization` resolves the rule ONCE per image (a ``percentile`` stretch reads a
  decimated overview, :func:`overview_pixels`) into an :class:`InputNorm`, which
  :class:`segpipe.engine.predictor.Predictor` applies — the one place it happens.

The spec itself (:class:`segpipe.models.artifact.ModelSpec`) lives in :mod:`segpipe.models.artifact`,
which imports this module; here it is only read (:class:`SpecLike`), never imported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from segpipe.core.errors import InputError

#: ``input_scale`` values outside this range are refused: 1e-300 or 1e300 is a typo, not a scale
MIN_INPUT_SCALE = 1e-6
MAX_INPUT_SCALE = 1e12

#: the dtype a model was made for when model.json does not say (``input_dtype``), by ``input_scale``
#: (what :func:`segpipe.train.normalization.default_input_scale` gives for each dtype when training)
DTYPE_BY_SCALE = {255.0: "uint8", 65535.0: "uint16", 32767.0: "int16", 1.0: "float32"}

PIXEL_TYPES_DOC = "docs/pixel-types.md"


def dtype_name(name: str) -> str:
    """A numpy dtype name (``uint8``, ``uint16``, ``float32``…), checked."""
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


def check_scales(scale: float | dict[str, float], where: str) -> None:
    """Check an ``input_scale`` (a number, or a mapping pixel type → number); ValueError names ``where``."""
    if isinstance(scale, dict):
        if not scale:
            raise ValueError(f"{where} mapping is empty; give a scale per pixel type, e.g. {{\"uint8\": 255}}")
        for k, v in scale.items():
            dtype_name(k)
            _check_scale(v, f"{where}[{k!r}]")
    else:
        _check_scale(scale, where)


def check_finite(values: list[float], where: str) -> None:
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


def check_block(n: ScaleNormalization | MinMaxNormalization | PercentileNormalization | None,
                in_channels: int) -> None:
    """Check a ``normalization`` block against the model's band count (ValueError, as pydantic wants)."""
    if isinstance(n, ScaleNormalization):
        check_scales(n.input_scale, "normalization.input_scale")
    elif isinstance(n, MinMaxNormalization):
        for name in ("min", "max"):
            values = getattr(n, name)
            if len(values) not in (1, in_channels):
                raise ValueError(f"normalization.{name} has {len(values)} values for "
                                 f"in_channels={in_channels} (give one per band, or one for all)")
            check_finite(values, f"normalization.{name}")
        lo, hi = per_band(n.min, in_channels), per_band(n.max, in_channels)
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            raise ValueError("normalization.max must be greater than normalization.min in every band")
    elif isinstance(n, PercentileNormalization) and not (
            math.isfinite(n.low) and math.isfinite(n.high) and 0 <= n.low < n.high <= 100):
        raise ValueError(f"normalization percentiles need 0 <= low < high <= 100, got {n.low}, {n.high}")


def per_band(values: list[float], bands: int) -> list[float]:
    """One value per band: a single value repeated, or the values as given."""
    return list(values) * bands if len(values) == 1 else list(values)


class SpecLike(Protocol):
    """What this module reads of a :class:`segpipe.models.artifact.ModelSpec`."""

    @property
    def in_channels(self) -> int: ...

    @property
    def input_scale(self) -> float | dict[str, float]: ...

    @property
    def normalization(self) -> ScaleNormalization | MinMaxNormalization | PercentileNormalization | None: ...

    def input_dtypes(self) -> list[str] | None: ...


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


def _hint(spec: SpecLike, dtype: str) -> str:
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


def normalization_for(spec: SpecLike, dtype: str, uri: str | None = None) -> InputNorm | None:
    """The fixed normalisation of ``dtype`` pixels, None for a per-image one (percentile: see
    :func:`image_normalization`). Raises :class:`InputError` (one line) when the model does not
    say how to read this pixel type: never a silent saturation."""
    dtype = str(np.dtype(dtype))
    bands = spec.in_channels
    n = spec.normalization
    what = uri or "input"
    if isinstance(n, PercentileNormalization):
        return None
    if isinstance(n, MinMaxNormalization):
        return InputNorm("minmax", tuple(per_band(n.min, bands)), tuple(per_band(n.max, bands)), True, dtype)
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


def image_normalization(spec: SpecLike, reader: Any, uri: str) -> InputNorm:
    """The normalisation of one image, resolved ONCE per image (never per tile: that would make seams).

    Fixed rules come from :func:`normalization_for`; a ``percentile`` stretch reads a decimated
    overview of the whole image (at most :data:`OVERVIEW_SIDE` pixels a side, nodata excluded)
    and fixes each band's low/high there. Record :meth:`InputNorm.as_dict` in the provenance.
    """
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


def _band_hint(spec: SpecLike, info: Any) -> str:
    n, want = info.count, spec.in_channels
    alpha = " (its alpha band is the nodata mask, not a model band)" if info.extra.get("alpha") else ""
    if n == 1 and want == 3:
        return f"; it is grayscale{alpha}: repeat the band with --bands 1,1,1"
    if n < want:
        return (f"{alpha}; choose {want} bands with --bands (a band may repeat, e.g. --bands "
                f"{','.join(['1'] * want)}) or use a model made for {n} band(s)")
    return f"{alpha}; choose {want} of them with --bands, e.g. --bands {','.join(str(i + 1) for i in range(want))}"


def check_input(spec: SpecLike, info: Any, uri: str) -> InputNorm | None:
    """Refuse (one :class:`InputError` line) an image the model cannot read as it is.

    Checks the band count (with a hint that works: ``--bands 1,1,1`` for grayscale) and the
    pixel type (:func:`normalization_for`). Returns the fixed normalisation, or None when it is
    per image (percentile: call :func:`image_normalization` with an open reader).
    """
    if info.count != spec.in_channels:
        raise InputError(uri, f"has {info.count} band(s) but the model expects {spec.in_channels}"
                         + _band_hint(spec, info))
    return normalization_for(spec, info.dtype, uri)
