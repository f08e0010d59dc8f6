"""PNG preview of an output: class colours over a thumbnail of the source, with a legend (:func:`export_preview`).

The labels are read from the coarsest pyramid level that is still at least the preview
size, sampled chunk by chunk (only the chunks needed are decoded); the legend below the map
lists each class's colour and name from the output's class table. The nodata label is
transparent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError, InputError
from segpipe.export.meta import OutputMeta, open_group, read_output_meta
from segpipe.export.style import class_table, label_lut
from segpipe.export.targets import local_target


def preview_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a preview: the image scaled to fit ``max_size`` (never enlarged), aspect kept."""
    if max_size < 1:
        raise ConfigError("max_size", f"must be positive, got {max_size}")
    if max(height, width) <= max_size:
        return height, width
    s = max_size / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def _sample_labels(group: Any, levels: Sequence[str], out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour sample of the coarsest level with both sides ≥ the preview's."""
    chosen = levels[0]
    for path in levels:
        h, w = group[path].shape[-2:]
        if h >= out_h and w >= out_w:
            chosen = path
    arr = group[chosen]
    h, w = arr.shape[-2:]
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    out = np.zeros((out_h, out_w), arr.dtype)
    ch, cw = arr.chunks[-2:]
    # chunk by chunk: zarr's orthogonal selection decodes every chunk it touches at once,
    # which for level 0 of a large output is the whole raster
    row_chunks, col_chunks = rows // ch, cols // cw
    for iy in np.unique(row_chunks):
        r_sel = np.flatnonzero(row_chunks == iy)
        for ix in np.unique(col_chunks):
            c_sel = np.flatnonzero(col_chunks == ix)
            y0, x0 = int(iy) * ch, int(ix) * cw
            block = arr[y0 : min(y0 + ch, h), x0 : min(x0 + cw, w)]
            out[np.ix_(r_sel, c_sel)] = block[np.ix_(rows[r_sel] - y0, cols[c_sel] - x0)]
    return out


def _to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """(bands, h, w) source pixels → (h, w, 3) uint8 for display (2–98 % stretch unless uint8)."""
    bands = pixels[:3] if pixels.shape[0] >= 3 else np.repeat(pixels[:1], 3, axis=0)
    if bands.dtype != np.uint8:
        out = np.empty(bands.shape, np.uint8)
        for i, b in enumerate(bands.astype(np.float64)):
            finite = b[np.isfinite(b)]
            lo, hi = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
            out[i] = np.clip((np.nan_to_num(b) - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
        bands = out
    return np.moveaxis(bands, 0, -1)


def source_thumbnail(source: str, out_h: int, out_w: int) -> np.ndarray | None:
    """(h, w, 3) uint8 thumbnail of ``source`` or None when it cannot be read.

    Whole-slide images use the slide reader's coarsest level; anything else a decimated
    rasterio read (GDAL picks the overview that fits, so this is cheap for COGs).
    """
    from segpipe.io.readers.raster import gdal_options, gdal_path

    try:
        from segpipe.io.readers.slide import open_slide

        reader = open_slide(source)
    except (ImportError, InputError):
        reader = None
    if reader is not None:
        try:
            thumb = reader.thumbnail(max(out_h, out_w))
        finally:
            reader.close()
        return _resize_nearest(_to_uint8_rgb(thumb), out_h, out_w)
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    try:
        with rasterio.Env(**gdal_options()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(gdal_path(source)) as ds:
                indexes = [1, 2, 3] if ds.count >= 3 else [1]
                pixels = ds.read(indexes, out_shape=(len(indexes), out_h, out_w), resampling=Resampling.average)
    except (RasterioError, OSError):
        return None
    return _to_uint8_rgb(pixels)


def _resize_nearest(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return image[rows[:, None], cols[None, :]]


def colorize(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(h, w) label values → (h, w, 4) RGBA through ``lut`` (:func:`~segpipe.export.style.label_lut`);
    values past its end are grey."""
    top = int(labels.max(initial=0))
    if top >= len(lut):
        lut = np.concatenate([lut, np.tile(np.array([[128, 128, 128, 255]], np.uint8), (top + 1 - len(lut), 1))])
    return lut[labels]


#: legend layout, pixels: padding, swatch side, swatch–text gap, space between entries, row height
_LEGEND = {"pad": 8, "swatch": 14, "gap": 5, "sep": 16, "row": 20}
#: classes listed in a preview legend at most (then "+N more")
LEGEND_MAX_CLASSES = 64


def _legend_font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def render_legend(meta: OutputMeta, min_width: int) -> np.ndarray:
    """(h, w, 4) opaque legend panel: a colour swatch and the name of each class, in rows.

    ``w`` is ``min_width`` unless one entry needs more. The nodata label is not listed (it is
    transparent in the preview).
    """
    from PIL import Image, ImageDraw

    font = _legend_font()
    table = class_table(meta)
    extra = len(table) - LEGEND_MAX_CLASSES
    table = table[:LEGEND_MAX_CLASSES]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    L = _LEGEND
    widths = [L["swatch"] + L["gap"] + math.ceil(measure.textlength(name, font=font)) for _, name, _ in table]
    more = f"+{extra} more" if extra > 0 else ""
    if more:
        widths.append(math.ceil(measure.textlength(more, font=font)))
    width = max(min_width, max(widths, default=0) + 2 * L["pad"])
    # flow the entries into rows
    positions, x, row = [], L["pad"], 0
    for w in widths:
        if x > L["pad"] and x + w > width - L["pad"]:
            x, row = L["pad"], row + 1
        positions.append((x, row))
        x += w + L["sep"]
    rows = row + 1 if widths else 0
    height = 2 * L["pad"] + rows * L["row"]
    panel = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for (x, r), (_, name, rgba) in zip(positions, table):
        top = L["pad"] + r * L["row"] + (L["row"] - L["swatch"]) // 2
        draw.rectangle([x, top, x + L["swatch"] - 1, top + L["swatch"] - 1], fill=tuple(rgba[:3]) + (255,),
                       outline=(96, 96, 96, 255))
        draw.text((x + L["swatch"] + L["gap"], L["pad"] + r * L["row"] + L["row"] // 2), name,
                  fill=(0, 0, 0, 255), font=font, anchor="lm")
    if more:
        x, r = positions[-1]
        draw.text((x, L["pad"] + r * L["row"] + L["row"] // 2), more, fill=(0, 0, 0, 255), font=font, anchor="lm")
    return np.asarray(panel)


def export_preview(
    zarr_uri: str, path: str, *, source: str | None = None, max_size: int = 1024, alpha: float = 0.5,
    legend: bool = True,
) -> str:
    """RGBA PNG preview: class colours blended (``alpha`` × the class colour's alpha) over the source thumbnail.

    ``source`` defaults to the output's recorded source; when it cannot be read the
    preview is the coloured mask alone. The map is the image fitted into ``max_size``; the
    nodata label is transparent (the source shows through unblended, or alpha 0 without a
    source). With ``legend``, a white panel below the map lists each class's colour and name
    (it may make the PNG wider than the map when one name is long).
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError("alpha", f"must be within [0, 1], got {alpha}")
    meta = read_output_meta(zarr_uri)
    group = open_group(zarr_uri)
    out_h, out_w = preview_shape(meta.height, meta.width, max_size)
    labels = _sample_labels(group, meta.levels, out_h, out_w)
    rgba = colorize(labels, label_lut(meta))
    background = source_thumbnail(source or meta.source, out_h, out_w) if (source or meta.source) else None
    if background is None:
        image = np.ascontiguousarray(rgba)
        image[..., 3] = np.where(rgba[..., 3] == 0, 0, 255)  # class colours opaque, nodata transparent
    else:
        a = (alpha / 255.0) * rgba[..., 3:4].astype(np.float32)
        blended = background.astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a
        image = np.dstack([np.clip(blended + 0.5, 0, 255).astype(np.uint8), np.full((out_h, out_w), 255, np.uint8)])
    if legend:
        panel = render_legend(meta, out_w)
        canvas = np.zeros((out_h + panel.shape[0], max(out_w, panel.shape[1]), 4), np.uint8)
        canvas[:out_h, :out_w] = image
        canvas[out_h:, : panel.shape[1]] = panel
        image = canvas
    with local_target(path, ".png") as local:
        Image.fromarray(image, "RGBA").save(local)
    return path
