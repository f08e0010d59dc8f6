"""Reading a finished output for the exports: its metadata, its levels, its place on the map or slide.

This module owns what every export needs to know about an output before reading pixels:

* :func:`read_output_meta` — the output's root attributes, parsed by :mod:`segpipe.io.meta`
  (:class:`~segpipe.io.meta.OutputMeta`: size, class table, colours, CRS and transform, source,
  pyramid levels, nodata label, reader record), refusing outputs whose status says unfinished;
* :func:`level_factor` and :func:`level_georef` — a pyramid level's scale and transform;
* :class:`Level0` / :func:`level0_mapping` — whole-slide outputs (segmented at any pyramid
  level or mpp) map to the slide's **level-0 pixel coordinates**, which is what QuPath and
  other slide viewers expect; vectors of such outputs are written in them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.classes import palette_rgba
from segpipe.core.errors import ConfigError, InputError, OutputError
from segpipe.io.meta import OutputMeta, level_factors, open_output_group, output_colors, output_meta

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading an output
# The attributes are parsed by segpipe.io.meta (one reader for the exports and the xarray view);
# the exports refuse an unfinished output where the xarray view only warns.


def output_palette(attrs: dict, num_classes: int) -> np.ndarray:
    """(K, 4) RGBA per class (see :func:`segpipe.io.meta.output_colors`)."""
    return palette_rgba(num_classes, output_colors(attrs, num_classes))


def open_group(zarr_uri: str) -> Any:
    try:
        return open_output_group(zarr_uri)
    except OutputError as e:
        raise InputError(zarr_uri, e.problem) from None


def read_output_meta(zarr_uri: str) -> OutputMeta:
    """Read and check an output's attributes (refuses outputs whose status says unfinished)."""
    group = open_group(zarr_uri)
    status = (group.attrs.get("segpipe") or {}).get("status")
    if status is not None and status != "complete":
        raise InputError(zarr_uri, f"is not finished (status {status!r}); run the segmentation again")
    try:
        return output_meta(zarr_uri, group)
    except OutputError as e:
        raise InputError(zarr_uri, e.problem) from None


def level_factor(group: Any, level: str) -> float:
    """Level-0 pixels per ``level`` pixel along x (:func:`segpipe.io.meta.level_factors`)."""
    return level_factors(group, dict(group.attrs), level)[1]


def level_georef(meta: OutputMeta, factor: float) -> tuple[float, ...] | None:
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
    if meta.grid_recorded and meta.grid is not None:
        return Level0(scale=meta.grid.scale, height=meta.grid.level0[0], width=meta.grid.level0[1])
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
