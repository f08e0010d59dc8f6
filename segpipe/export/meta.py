"""Reading a finished output for the exports: its metadata, its levels, its place on the map or slide.

This module owns what every export needs to know about an output before reading pixels:

* :class:`OutputMeta` / :func:`read_output_meta` — the output's root attributes (size, class
  table, colours, CRS and transform, source, pyramid levels, nodata label, reader record),
  refusing outputs whose status says unfinished;
* :func:`_level_factor` and :func:`_georef` — a pyramid level's scale and transform;
* :class:`Level0` / :func:`level0_mapping` — whole-slide outputs (segmented at any pyramid
  level or mpp) map to the slide's **level-0 pixel coordinates**, which is what QuPath and
  other slide viewers expect; vectors of such outputs are written in them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segpipe.core.classes import class_colors, palette_rgba
from segpipe.core.errors import ConfigError, InputError
from segpipe.io.storage import strip_file_scheme

#: readers that read a level (and optionally an mpp) of a whole-slide pyramid
_SLIDE_DRIVERS = frozenset({"openslide", "ome-tiff"})

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading an output


@dataclass(frozen=True)
class OutputMeta:
    """What the exports need from an output's root attributes."""

    uri: str
    height: int
    width: int
    classes: tuple[str, ...]
    #: (K, 4) uint8 RGBA per class id
    colors: np.ndarray
    crs_wkt: str | None
    #: rasterio Affine order (a, b, c, d, e, f), or None when not georeferenced
    transform: tuple[float, ...] | None
    source: str | None
    #: NGFF dataset paths, level 0 first
    levels: tuple[str, ...]
    #: the label value meaning "no data" (``segpipe.nodata_label``); None for outputs written before it existed
    nodata: int | None = None
    #: ``#rrggbb[aa]`` per class id (the same colours as :attr:`colors`)
    class_colors: tuple[str, ...] = ()
    #: what the reader recorded (``segpipe.reader``: driver, level, resample_factor, …)
    reader: dict = field(default_factory=dict)
    mpp: float | None = None

    @property
    def is_slide(self) -> bool:
        """The source was a whole-slide / OME-TIFF pyramid read at some level or mpp."""
        return self.transform is None and not self.crs_wkt and self.reader.get("driver") in _SLIDE_DRIVERS


def output_colors(attrs: dict, num_classes: int) -> list[str]:
    """Hex colour per class: ``segpipe.class_colors``, else NGFF ``image-label.colors``, else the defaults.

    All parsing and defaults are :mod:`segpipe.core.classes`' (:func:`~segpipe.core.classes.class_colors`).
    """
    given: list[Any] = [None] * num_classes
    label_colors = ((attrs.get("ome") or {}).get("image-label") or {}).get("colors") or []
    for entry in label_colors:
        value, rgba = entry.get("label-value"), entry.get("rgba")
        if isinstance(value, int) and 0 <= value < num_classes and rgba and len(rgba) == 4:
            given[value] = list(rgba)
    hexes = (attrs.get("segpipe") or {}).get("class_colors") or []
    for i, color in enumerate(hexes[:num_classes]):
        if color:
            given[i] = color
    return class_colors(num_classes, given)


def output_palette(attrs: dict, num_classes: int) -> np.ndarray:
    """(K, 4) RGBA per class (see :func:`output_colors`)."""
    return palette_rgba(num_classes, output_colors(attrs, num_classes))


def _open_group(zarr_uri: str) -> Any:
    import zarr

    try:
        return zarr.open_group(strip_file_scheme(zarr_uri), mode="r")
    except (FileNotFoundError, ValueError) as e:
        raise InputError(zarr_uri, f"is not a segpipe output (no Zarr group: {e})") from None


def read_output_meta(zarr_uri: str) -> OutputMeta:
    """Read and check an output's attributes (refuses outputs whose status says unfinished)."""
    group = _open_group(zarr_uri)
    attrs = dict(group.attrs)
    seg = attrs.get("segpipe") or {}
    status = seg.get("status")
    if status is not None and status != "complete":
        raise InputError(zarr_uri, f"is not finished (status {status!r}); run the segmentation again")
    if "0" not in group:
        raise InputError(zarr_uri, "has no array '0' (class ids)")
    height, width = group["0"].shape[-2:]
    classes = tuple(seg.get("classes") or ())
    if not classes:
        props = ((attrs.get("ome") or {}).get("image-label") or {}).get("properties") or []
        names = {p["label-value"]: str(p.get("class", p["label-value"])) for p in props if "label-value" in p}
        classes = tuple(names.get(i, str(i)) for i in range(max(names, default=-1) + 1))
    num = max(len(classes), 1)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or [{}]
    levels = tuple(d["path"] for d in multiscales[0].get("datasets") or [] if d.get("path") in group) or ("0",)
    transform = seg.get("transform")
    nodata = seg.get("nodata_label")
    hexes = output_colors(attrs, num)
    return OutputMeta(
        uri=zarr_uri, height=int(height), width=int(width), classes=classes,
        colors=palette_rgba(num, hexes), crs_wkt=seg.get("crs_wkt"),
        transform=tuple(float(v) for v in transform) if transform else None,
        source=seg.get("source"), levels=levels,
        nodata=int(nodata) if nodata is not None else None, class_colors=tuple(hexes),
        reader=dict(seg.get("reader") or {}), mpp=seg.get("mpp"),
    )


def _level_factor(group: Any, level: str) -> float:
    """Level-0 pixels per ``level`` pixel: from the NGFF scales, else the shape ratio rounded to 2^k."""
    if level == "0":
        return 1.0
    datasets = ((group.attrs.get("ome") or {}).get("multiscales") or [{}])[0].get("datasets") or []
    scales = {}
    for d in datasets:
        for t in d.get("coordinateTransformations") or []:
            if t.get("type") == "scale":
                scales[d["path"]] = float(t["scale"][-1])
    if level in scales and "0" in scales:
        return scales[level] / scales["0"]
    ratio = group["0"].shape[-1] / group[level].shape[-1]
    return float(2 ** round(math.log2(ratio)))


def _georef(meta: OutputMeta, factor: float) -> tuple[float, ...] | None:
    """The output's transform for a level ``factor`` times coarser than level 0 (None when not georeferenced)."""
    if meta.transform is None:
        return None
    a, b, c, d, e, f = meta.transform
    return (a * factor, b * factor, c, d * factor, e * factor, f)


# --------------------------------------------------------------------------- slides: level-0 pixels


@dataclass(frozen=True)
class Level0:
    """How an output's pixels map to its slide's level-0 pixels: ``x0 = x · scale``, ``y0 = y · scale``."""

    scale: float
    #: level-0 size of the slide, when known (polygons are clipped to it)
    height: int | None = None
    width: int | None = None


def _probe_slide(source: str | None, level: int) -> tuple[float, int, int] | None:
    """(downsample of ``level``, level-0 height, level-0 width) read from the slide itself, or None."""
    if not source:
        return None
    try:
        from segpipe.io.readers.slide import open_slide

        r0 = open_slide(source)
        if r0 is None:
            return None
        try:
            h0, w0 = r0.info.height, r0.info.width
        finally:
            r0.close()
        if level == 0:
            return 1.0, h0, w0
        rl = open_slide(source, level=level)
        if rl is None:
            return None
        try:
            lw = rl.info.width
        finally:
            rl.close()
    except (ImportError, InputError, ConfigError, OSError):
        return None
    return w0 / lw, h0, w0


def level0_mapping(meta: OutputMeta) -> Level0 | None:
    """Level-0 mapping of a whole-slide output (None for anything else).

    scale = the read level's downsample × the mpp resampling factor (``segpipe.reader``:
    ``downsample``, ``resample_factor``); the level-0 size is ``level0_height``/``level0_width``.
    Outputs that do not record the downsample or the level-0 size get them from the slide
    itself (level-0 width ÷ the level's width) when it can still be opened; when it cannot,
    a level > 0 output keeps its own pixel coordinates and a warning says so.
    """
    if not meta.is_slide:
        return None
    reader = meta.reader
    level = int(reader.get("level") or 0)
    factor = float(reader.get("resample_factor") or 1.0)
    downsample = reader.get("downsample")
    downsample = float(downsample) if downsample else (1.0 if level == 0 else None)
    h0, w0 = reader.get("level0_height"), reader.get("level0_width")
    if downsample is None or h0 is None or w0 is None:
        probed = _probe_slide(meta.source, level)
        if probed is not None:
            downsample = downsample or probed[0]
            h0, w0 = h0 or probed[1], w0 or probed[2]
    if downsample is None:
        log.warning("%s: slide level %d records no downsample and its source %s cannot be opened; "
                    "vectors stay in that level's pixel coordinates", meta.uri, level, meta.source)
        return None
    return Level0(scale=downsample * factor, height=int(h0) if h0 else None, width=int(w0) if w0 else None)
