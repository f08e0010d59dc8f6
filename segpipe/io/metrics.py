"""``metrics.json``: strict JSON (NaN → null) with the contract keys checked, local or any fsspec URL.

The scores themselves come from :func:`segpipe.core.metrics.scores`; this module only reads and
writes them, so training (which writes the run's metrics) and evaluation share one format.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

import numpy as np

from segpipe.core.errors import DatasetError, InputError, OutputError
from segpipe.core.metrics import METRICS_KEYS
from segpipe.io.storage import filesystem, strip_file_scheme


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, NaN and ±inf as None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON token {token}")


def write_metrics_json(uri: str, metrics: dict[str, Any]) -> str:
    """Write ``metrics`` as strict JSON (NaN → null) to a local path or fsspec URL; returns ``uri``."""
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise DatasetError(uri, f"metrics lack key {missing[0]!r}")
    text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n"
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise OutputError(uri, f"cannot be written ({getattr(e, 'strerror', None) or e})") from None
    return uri


def read_metrics_json(uri: str) -> dict[str, Any]:
    """Read a ``metrics.json`` written by :func:`write_metrics_json` (strict JSON, contract keys checked)."""
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(uri, "does not exist") from None
    except OSError as e:
        raise InputError(uri, f"cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        metrics = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise InputError(uri, f"is not valid strict JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise InputError(uri, "is not a metrics.json (not a JSON object)")
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise InputError(uri, f"is not a metrics.json (missing key {missing[0]!r})")
    return metrics
