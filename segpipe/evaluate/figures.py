"""Report figures, drawn with numpy + Pillow only (no matplotlib): PNG bytes for the reports.

Owns the class palette of a report (:func:`class_palette`, the same colours as the Zarr outputs),
the row-normalised confusion-matrix heatmap (:func:`confusion_png`), training curves
(:func:`line_plot_png`, grouped by :func:`history_groups`) and the drawing helpers the figures
share (:func:`load_font`, :func:`text_size`, :func:`png_bytes`). Per-sample overlays live in
:mod:`segpipe.evaluate.overlays`; :mod:`segpipe.evaluate.reports` assembles all into ``report.html``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segpipe.core.classes import palette_rgba

# sequential colour map for the heatmap (ColorBrewer "Blues" anchors), 0 → 1
_BLUES = np.array([[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]], np.float32)
#: text colour of every figure
INK = (33, 37, 41)
_GRID = (222, 226, 230)


# --------------------------------------------------------------------------- small helpers
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (a fixed-size bitmap font when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def text_size(font: Any, text: str) -> tuple[int, int]:
    box = font.getbbox(text)
    return int(math.ceil(box[2] - min(box[0], 0))), int(math.ceil(box[3] - min(box[1], 0)))


def class_palette(num_classes: int, class_colors: Sequence[str | None] | None = None) -> list[tuple[int, int, int]]:
    """RGB colour per class from the one class table (:func:`segpipe.core.classes.class_colors`):
    the given hex colours, missing ones from the default palette, so a report shows each class
    in the colour the Zarr outputs, COGs and viewers show it in."""
    return [(int(r), int(g), int(b)) for r, g, b, _ in palette_rgba(num_classes, class_colors)]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- figures
def _sequential(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 along the Blues anchors."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(_BLUES) - 1)
    i = np.minimum(np.floor(v).astype(int), len(_BLUES) - 2)
    f = (v - i)[..., None]
    return np.rint(_BLUES[i] * (1 - f) + _BLUES[i + 1] * f).astype(np.uint8)


def _paste_vertical_text(img: Image.Image, xy: tuple[int, int], text: str, font: Any, fill: tuple) -> None:
    """Draw ``text`` rotated 90° (reading bottom to top) with its top-left corner at ``xy``."""
    w, h = text_size(font, text)
    layer = Image.new("L", (w + 2, h + 4), 0)
    ImageDraw.Draw(layer).text((1, 1), text, font=font, fill=255)
    layer = layer.rotate(90, expand=True)
    img.paste(Image.new("RGB", layer.size, fill), xy, layer)


def confusion_png(metrics: dict[str, Any], title: str = "") -> bytes:
    """Row-normalised confusion-matrix heatmap as PNG bytes.

    Cell (t, p) = share of the truth pixels of class t predicted as p (each row sums to 1), so
    the diagonal reads as recall and rare classes are as visible as common ones. Rows without
    truth pixels are grey.
    """
    names = [str(n) for n in metrics["classes"]]
    m = np.asarray(metrics["confusion_matrix"], dtype=np.float64).reshape(len(names), len(names))
    k = len(names)
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, m / np.where(rows > 0, rows, 1), np.nan)

    cell = int(np.clip(600 // max(k, 1), 26, 64))
    label_font, value_font = load_font(14), load_font(int(np.clip(cell * 0.3, 10, 15)))
    title_font = load_font(16)
    label_w = max(text_size(label_font, n)[0] for n in names) + 12
    label_h = label_w  # column labels are the same names, rotated
    axis = 22
    pad = 16
    title_h = (text_size(title_font, title)[1] + 12) if title else 0
    bar_w, bar_gap, bar_label = 16, 18, 40
    x0 = pad + axis + label_w
    y0 = pad + title_h + axis + label_h
    width = x0 + k * cell + bar_gap + bar_w + bar_label + pad
    height = y0 + k * cell + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, font=title_font, fill=INK)

    colors = _sequential(norm)
    for t in range(k):
        for p in range(k):
            box = (x0 + p * cell, y0 + t * cell, x0 + (p + 1) * cell - 1, y0 + (t + 1) * cell - 1)
            value = norm[t, p]
            if math.isnan(value):
                draw.rectangle(box, fill=(233, 236, 239))
                text, ink = "-", (134, 142, 150)  # the bundled font has no en dash
            else:
                draw.rectangle(box, fill=tuple(int(c) for c in colors[t, p]))
                text = f"{value:.2f}" if cell >= 34 else f"{round(value * 100)}"
                ink = (255, 255, 255) if value > 0.5 else INK
            tw, th = text_size(value_font, text)
            draw.text((box[0] + (cell - tw) / 2, box[1] + (cell - th) / 2 - 1), text, font=value_font, fill=ink)
        # diagonal cells outlined: where a good model's mass sits
        draw.rectangle((x0 + t * cell, y0 + t * cell, x0 + (t + 1) * cell - 1, y0 + (t + 1) * cell - 1),
                       outline=(52, 58, 64))
    for i, name in enumerate(names):
        tw, th = text_size(label_font, name)
        draw.text((x0 - tw - 8, y0 + i * cell + (cell - th) / 2 - 1), name, font=label_font, fill=INK)
        _paste_vertical_text(img, (x0 + i * cell + (cell - th) // 2 - 2, y0 - tw - 8), name, label_font, INK)
    # axis titles
    tw, _ = text_size(label_font, "predicted class")
    draw.text((x0 + (k * cell - tw) / 2, pad + title_h), "predicted class", font=label_font, fill=(73, 80, 87))
    tw, _ = text_size(label_font, "true class")
    _paste_vertical_text(img, (pad, y0 + (k * cell - tw) // 2), "true class", label_font, (73, 80, 87))
    # colour bar 0..1
    bx = x0 + k * cell + bar_gap
    bar_h = k * cell
    ramp = _sequential(np.linspace(1, 0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    img.paste(Image.fromarray(ramp), (bx, y0))
    draw.rectangle((bx, y0, bx + bar_w - 1, y0 + bar_h - 1), outline=(173, 181, 189))
    for v in (0.0, 0.5, 1.0):
        y = y0 + round((1 - v) * (bar_h - 1))
        draw.line((bx + bar_w, y, bx + bar_w + 4, y), fill=INK)
        _, th = text_size(value_font, "0")
        draw.text((bx + bar_w + 7, y - th / 2 - 1), f"{v:.1f}", font=value_font, fill=INK)
    return png_bytes(img)


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round tick values (1, 2, 2.5, 5 × 10^k steps) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        spread = abs(hi) * 0.1 or 1.0
        lo, hi = lo - spread, hi + spread
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    ticks = [start]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(ticks[-1] + step)
    return ticks


def _tick_label(v: float, ticks: list[float]) -> str:
    """``v`` with the fewest decimals that write every tick exactly (0.25 steps get 2, 0.1 steps 1)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if max(abs(ticks[0]), abs(ticks[-1])) >= 1e5 or step < 1e-4:
        return f"{v:.3g}"
    digits = next((d for d in range(7) if all(abs(round(t, d) - t) < 1e-6 * step for t in ticks)), 6)
    return f"{v:.{digits}f}"


def line_plot_png(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "epoch",
                  width: int = 540, height: int = 320) -> bytes:
    """A simple line plot (axes, ticks, grid, legend) of named (x, y) series as PNG bytes."""
    palette = class_palette(len(series) + 1)[1:]  # class 0's dark grey is no line colour
    title_font, font = load_font(16), load_font(13)
    pts = [(x, y) for s in series.values() for x, y in s]
    xs, ys = [p[0] for p in pts] or [1.0], [p[1] for p in pts] or [0.0]
    xt = _nice_ticks(min(xs), max(xs), n=min(8, max(2, len(set(xs)))), integer=True)
    yt = _nice_ticks(min(ys), max(ys), n=5)
    legend_w = max((text_size(font, n)[0] for n in series), default=0) + 48
    left = max(text_size(font, _tick_label(v, yt))[0] for v in yt) + 22
    top = 16 + text_size(title_font, title)[1] + 14
    right, bottom = legend_w + 16, 48
    pw, ph = width - left - right, height - top - bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 14), title, font=title_font, fill=INK)

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    for v in yt:
        y = py(v)
        draw.line((left, y, left + pw, y), fill=_GRID)
        label = _tick_label(v, yt)
        tw, th = text_size(font, label)
        draw.text((left - tw - 8, y - th / 2 - 1), label, font=font, fill=INK)
    for v in xt:
        x = px(v)
        draw.line((x, top + ph, x, top + ph + 5), fill=INK)
        label = _tick_label(v, xt)
        tw, _ = text_size(font, label)
        draw.text((x - tw / 2, top + ph + 8), label, font=font, fill=INK)
    draw.line((left, top, left, top + ph), fill=INK)
    draw.line((left, top + ph, left + pw, top + ph), fill=INK)
    tw, _ = text_size(font, xlabel)
    draw.text((left + (pw - tw) / 2, top + ph + 26), xlabel, font=font, fill=(73, 80, 87))

    for s, color in zip(series.values(), palette):
        line = [(px(x), py(y)) for x, y in sorted(s)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2, joint="curve")
        if len(line) <= 40:
            for x, y in line:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    ly = top + 4
    for (name, _), color in zip(series.items(), palette):
        lx = left + pw + 16
        _, th = text_size(font, name)
        draw.line((lx, ly + th / 2 + 1, lx + 24, ly + th / 2 + 1), fill=color, width=3)
        draw.text((lx + 32, ly), name, font=font, fill=INK)
        ly += th + 10
    return png_bytes(img)


def history_groups(history: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Split per-epoch records into plots: losses, learning rate, scores (0–1), and speed/time.

    Scores (IoU, accuracy) live in [0, 1]; throughput and seconds would flatten them on a shared axis.
    """
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {"Loss": {}, "Scores": {}, "Learning rate": {},
                                                                "Speed": {}}
    for i, record in enumerate(history):
        epoch = record.get("epoch", i + 1)
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            low = key.lower()
            group = ("Loss" if "loss" in low else
                     "Learning rate" if low in ("lr", "learning_rate") or low.startswith("lr_") else
                     "Speed" if any(w in low for w in ("second", "per_s", "time", "throughput")) else
                     "Scores")
            groups[group].setdefault(key, []).append((float(epoch), float(value)))
    return {k: v for k, v in groups.items() if v}
