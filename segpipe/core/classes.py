"""The class table: names, colours, label dtype and the reserved *nodata* label.

One place for every rule about classes, so the Zarr output, the COG colour table, the QGIS
style, vectors, previews, reports and napari all show the same class in the same colour:

- colours are ``#rrggbb`` (or ``#rrggbbaa``) strings; :func:`parse_color` is the only parser;
- a model artifact stores them under ``class_colors`` (the contract key); older artifacts
  written by ``segpipe train`` used ``colors`` and are still read (:func:`colors_from_spec`);
- class ids are ``uint8`` while there are at most 255 classes, ``uint16`` above;
- the highest value of that dtype (255 or 65,535) is never a class: it is the **nodata
  label**, written where the source has no data (nodata value, mask band, alpha = 0) and,
  unless a background class is chosen, outside a slide's tissue. Viewers show it
  transparent, exports write it as NoData, vectors skip it and evaluation ignores it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError

#: colours for classes without one (index = class id); class 0 is dark grey, not black,
#: so it stays visible on a dark background and is never confused with "no data"
DEFAULT_COLORS = (
    "#4d4d4d", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
)

#: RGBA of the nodata label everywhere (fully transparent)
NODATA_RGBA = (0, 0, 0, 0)
NODATA_NAME = "nodata"


def label_dtype(num_classes: int) -> np.dtype:
    """``uint8`` for up to 255 classes, ``uint16`` up to 65,535: the top value is the nodata label."""
    if num_classes < 1:
        raise ConfigError(None, f"a model needs at least one class, got {num_classes}")
    if num_classes <= 255:
        return np.dtype(np.uint8)
    if num_classes <= 65535:
        return np.dtype(np.uint16)
    raise ConfigError(None, f"at most 65,535 classes are supported, got {num_classes}")


def nodata_label(num_classes: int) -> int:
    """The reserved label value for pixels without data: the dtype's maximum (255 or 65,535)."""
    return int(np.iinfo(label_dtype(num_classes)).max)


def parse_color(color: str | Sequence[int]) -> tuple[int, int, int, int]:
    """``#rgb``, ``#rrggbb``, ``#rrggbbaa`` or an ``[r, g, b(, a)]`` list → ``(r, g, b, a)``."""
    if not isinstance(color, str):
        vals = [int(v) for v in color]
        if len(vals) not in (3, 4) or not all(0 <= v <= 255 for v in vals):
            raise ConfigError(str(color), "is not a colour; expected '#rrggbb' or [r, g, b]")
        return (vals[0], vals[1], vals[2], vals[3] if len(vals) == 4 else 255)
    c = color.strip().lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    if len(c) not in (6, 8):
        raise ConfigError(color, "is not a colour; expected '#rrggbb'")
    try:
        rgba = [int(c[i:i + 2], 16) for i in range(0, len(c), 2)]
    except ValueError:
        raise ConfigError(color, "is not a colour; expected '#rrggbb'") from None
    return (rgba[0], rgba[1], rgba[2], rgba[3] if len(rgba) == 4 else 255)


def to_hex(rgba: Sequence[int]) -> str:
    """``(r, g, b[, a])`` → ``#rrggbb`` (alpha dropped when opaque)."""
    r, g, b = (int(v) for v in rgba[:3])
    a = int(rgba[3]) if len(rgba) > 3 else 255
    return f"#{r:02x}{g:02x}{b:02x}" + (f"{a:02x}" if a != 255 else "")


def _generated(i: int) -> str:
    h = (i * 0.618033988749895 + 0.11) % 1.0  # golden-ratio hue steps stay distinct
    r, g, b = colorsys.hsv_to_rgb(h, 0.65, 0.85)
    return to_hex((round(r * 255), round(g * 255), round(b * 255)))


def class_colors(num_classes: int, colors: Sequence[str | None] | None = None) -> list[str]:
    """``num_classes`` hex colours: the given ones (``None`` entries filled), then the default palette."""
    given = list(colors or [])[:num_classes]
    out: list[str] = []
    for i in range(num_classes):
        c = given[i] if i < len(given) else None
        if c:
            out.append(to_hex(parse_color(c)))  # validates and normalises
        else:
            out.append(DEFAULT_COLORS[i] if i < len(DEFAULT_COLORS) else _generated(i))
    return out


def palette_rgba(num_classes: int, colors: Sequence[str | None] | None = None) -> np.ndarray:
    """``(num_classes, 4)`` uint8 RGBA per class id."""
    return np.array([parse_color(c) for c in class_colors(num_classes, colors)], np.uint8)


def lookup_table(num_classes: int, colors: Sequence[str | None] | None = None) -> np.ndarray:
    """``(nodata_label + 1, 4)`` RGBA indexed by label value: classes, transparent nodata, grey elsewhere."""
    nodata = nodata_label(num_classes)
    lut = np.full((nodata + 1, 4), (128, 128, 128, 255), np.uint8)
    lut[:num_classes] = palette_rgba(num_classes, colors)
    lut[nodata] = NODATA_RGBA
    return lut


def colors_from_spec(extra: Mapping[str, Any] | None) -> list[str] | None:
    """Class colours stored in a model artifact: ``class_colors`` (the contract), else the legacy ``colors``."""
    extra = extra or {}
    colors = extra.get("class_colors") or extra.get("colors")
    return list(colors) if colors else None
