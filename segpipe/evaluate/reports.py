"""Evaluation reports: one self-contained HTML file and a Markdown twin.

``report.html`` is meant to be mailed, attached to a Prefect artifact or opened from a bucket
years later, so it carries everything inline: CSS in a ``<style>`` element, every figure as a
base64 PNG data URI, no script, no external URL. Figures are drawn with numpy + Pillow only
(no matplotlib dependency): a row-normalised confusion-matrix heatmap, training curves, and
per-sample overlays (image | truth | prediction | errors).

With a *challenger* (a second ``metrics.json`` dict, e.g. a retrained model), the *champion*
(the model in service, ``metrics``) and the challenger are compared side by side; differences are
challenger − champion, green when better, red when worse (every score here is higher-is-better).

``report.md`` holds the same tables (via :func:`markdown_table`, also used for Prefect
markdown artifacts) without the figures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segpipe.core.classes import nodata_label, palette_rgba
from segpipe.core.errors import DatasetError, OutputError

IGNORE_RGB = (128, 128, 128)
#: colour of wrong pixels in the error panel: magenta, which no default class colour is near;
#: :func:`error_rgb` picks another one when a class colour comes close to it
ERROR_RGB = (255, 0, 255)
#: candidates for the error colour, in order of preference
_ERROR_CANDIDATES = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0),
                     (0, 0, 0), (255, 255, 255), (128, 0, 255), (255, 128, 0))
#: RGB distance under which two colours count as confusable
_MIN_COLOR_DISTANCE = 80.0
#: differences smaller than this are shown as unchanged (scores are printed with 4 decimals)
DELTA_TOLERANCE = 5e-5
#: sample panels are scaled to this width range (px): readable, yet the report stays small
MIN_PANEL, MAX_PANEL = 256, 512

_SCORES = ("iou", "precision", "recall", "f1")
_SCORE_NAMES = {"iou": "IoU", "precision": "precision", "recall": "recall", "f1": "F1"}
_OVERALL = (("mean_iou", "mean IoU"), ("frequency_weighted_iou", "frequency-weighted IoU"),
            ("pixel_accuracy", "pixel accuracy"))
# sequential colour map for the heatmap (ColorBrewer "Blues" anchors), 0 → 1
_BLUES = np.array([[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]], np.float32)
_INK = (33, 37, 41)
_GRID = (222, 226, 230)


@dataclass(frozen=True, eq=False)
class Sample:
    """One evaluated image for the report: RGB (H, W, 3) uint8, truth and prediction (H, W) class ids."""

    name: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    #: truth pixels with this id are not scored (shown grey)
    ignore_index: int | None = 255


# --------------------------------------------------------------------------- small helpers
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (a fixed-size bitmap font when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    box = font.getbbox(text)
    return int(math.ceil(box[2] - min(box[0], 0))), int(math.ceil(box[3] - min(box[1], 0)))


def class_palette(num_classes: int, class_colors: Sequence[str | None] | None = None) -> list[tuple[int, int, int]]:
    """RGB colour per class from the one class table (:func:`segpipe.core.classes.class_colors`):
    the given hex colours, missing ones from the default palette, so a report shows each class
    in the colour the Zarr outputs, COGs and viewers show it in."""
    return [(int(r), int(g), int(b)) for r, g, b, _ in palette_rgba(num_classes, class_colors)]


def error_rgb(palette: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The error-panel colour: the first candidate (magenta first) far from every class colour,
    else the candidate farthest from all of them."""
    if not len(palette):
        return ERROR_RGB
    classes = np.asarray(palette, np.float64)[:, :3]

    def distance(c: tuple[int, int, int]) -> float:
        return float(np.sqrt(((classes - np.asarray(c, np.float64)) ** 2).sum(axis=1)).min())

    for c in _ERROR_CANDIDATES:
        if distance(c) >= _MIN_COLOR_DISTANCE:
            return c
    return max(_ERROR_CANDIDATES, key=distance)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _delta(champion: float | None, challenger: float | None) -> float | None:
    if champion is None or challenger is None:
        return None
    return float(challenger) - float(champion)


def _delta_text(d: float | None) -> str:
    if d is None:
        return "n/a"
    if abs(d) < DELTA_TOLERANCE:
        return "±0.0000"
    return f"{d:+.4f}".replace("-", "−")


def _delta_class(d: float | None) -> str:
    if d is None or abs(d) < DELTA_TOLERANCE:
        return "same"
    return "up" if d > 0 else "down"


def _check_metrics(metrics: dict[str, Any], what: str) -> None:
    missing = [k for k in ("classes", "confusion_matrix", "per_class", "mean_iou") if k not in metrics]
    if missing:
        raise DatasetError(what, f"metrics lack key {missing[0]!r}")


# --------------------------------------------------------------------------- figures
def _sequential(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 along the Blues anchors."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(_BLUES) - 1)
    i = np.minimum(np.floor(v).astype(int), len(_BLUES) - 2)
    f = (v - i)[..., None]
    return np.rint(_BLUES[i] * (1 - f) + _BLUES[i + 1] * f).astype(np.uint8)


def _paste_vertical_text(img: Image.Image, xy: tuple[int, int], text: str, font: Any, fill: tuple) -> None:
    """Draw ``text`` rotated 90° (reading bottom to top) with its top-left corner at ``xy``."""
    w, h = _text_size(font, text)
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
    label_font, value_font = _font(14), _font(int(np.clip(cell * 0.3, 10, 15)))
    title_font = _font(16)
    label_w = max(_text_size(label_font, n)[0] for n in names) + 12
    label_h = label_w  # column labels are the same names, rotated
    axis = 22
    pad = 16
    title_h = (_text_size(title_font, title)[1] + 12) if title else 0
    bar_w, bar_gap, bar_label = 16, 18, 40
    x0 = pad + axis + label_w
    y0 = pad + title_h + axis + label_h
    width = x0 + k * cell + bar_gap + bar_w + bar_label + pad
    height = y0 + k * cell + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, font=title_font, fill=_INK)

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
                ink = (255, 255, 255) if value > 0.5 else _INK
            tw, th = _text_size(value_font, text)
            draw.text((box[0] + (cell - tw) / 2, box[1] + (cell - th) / 2 - 1), text, font=value_font, fill=ink)
        # diagonal cells outlined: where a good model's mass sits
        draw.rectangle((x0 + t * cell, y0 + t * cell, x0 + (t + 1) * cell - 1, y0 + (t + 1) * cell - 1),
                       outline=(52, 58, 64))
    for i, name in enumerate(names):
        tw, th = _text_size(label_font, name)
        draw.text((x0 - tw - 8, y0 + i * cell + (cell - th) / 2 - 1), name, font=label_font, fill=_INK)
        _paste_vertical_text(img, (x0 + i * cell + (cell - th) // 2 - 2, y0 - tw - 8), name, label_font, _INK)
    # axis titles
    tw, _ = _text_size(label_font, "predicted class")
    draw.text((x0 + (k * cell - tw) / 2, pad + title_h), "predicted class", font=label_font, fill=(73, 80, 87))
    tw, _ = _text_size(label_font, "true class")
    _paste_vertical_text(img, (pad, y0 + (k * cell - tw) // 2), "true class", label_font, (73, 80, 87))
    # colour bar 0..1
    bx = x0 + k * cell + bar_gap
    bar_h = k * cell
    ramp = _sequential(np.linspace(1, 0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    img.paste(Image.fromarray(ramp), (bx, y0))
    draw.rectangle((bx, y0, bx + bar_w - 1, y0 + bar_h - 1), outline=(173, 181, 189))
    for v in (0.0, 0.5, 1.0):
        y = y0 + round((1 - v) * (bar_h - 1))
        draw.line((bx + bar_w, y, bx + bar_w + 4, y), fill=_INK)
        _, th = _text_size(value_font, "0")
        draw.text((bx + bar_w + 7, y - th / 2 - 1), f"{v:.1f}", font=value_font, fill=_INK)
    return _png_bytes(img)


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
    title_font, font = _font(16), _font(13)
    pts = [(x, y) for s in series.values() for x, y in s]
    xs, ys = [p[0] for p in pts] or [1.0], [p[1] for p in pts] or [0.0]
    xt = _nice_ticks(min(xs), max(xs), n=min(8, max(2, len(set(xs)))), integer=True)
    yt = _nice_ticks(min(ys), max(ys), n=5)
    legend_w = max((_text_size(font, n)[0] for n in series), default=0) + 48
    left = max(_text_size(font, _tick_label(v, yt))[0] for v in yt) + 22
    top = 16 + _text_size(title_font, title)[1] + 14
    right, bottom = legend_w + 16, 48
    pw, ph = width - left - right, height - top - bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 14), title, font=title_font, fill=_INK)

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    for v in yt:
        y = py(v)
        draw.line((left, y, left + pw, y), fill=_GRID)
        label = _tick_label(v, yt)
        tw, th = _text_size(font, label)
        draw.text((left - tw - 8, y - th / 2 - 1), label, font=font, fill=_INK)
    for v in xt:
        x = px(v)
        draw.line((x, top + ph, x, top + ph + 5), fill=_INK)
        label = _tick_label(v, xt)
        tw, _ = _text_size(font, label)
        draw.text((x - tw / 2, top + ph + 8), label, font=font, fill=_INK)
    draw.line((left, top, left, top + ph), fill=_INK)
    draw.line((left, top + ph, left + pw, top + ph), fill=_INK)
    tw, _ = _text_size(font, xlabel)
    draw.text((left + (pw - tw) / 2, top + ph + 26), xlabel, font=font, fill=(73, 80, 87))

    for (name, s), color in zip(series.items(), palette):
        line = [(px(x), py(y)) for x, y in sorted(s)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2, joint="curve")
        if len(line) <= 40:
            for x, y in line:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    ly = top + 4
    for (name, _), color in zip(series.items(), palette):
        lx = left + pw + 16
        _, th = _text_size(font, name)
        draw.line((lx, ly + th / 2 + 1, lx + 24, ly + th / 2 + 1), fill=color, width=3)
        draw.text((lx + 32, ly), name, font=font, fill=_INK)
        ly += th + 10
    return _png_bytes(img)


def _history_groups(history: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
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


def _colorize(labels: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """Class ids → RGB; ids outside the palette (including an ignore id) are black."""
    lut = np.zeros((max(256, len(palette) + 1), 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    return lut[np.clip(labels.astype(np.int64), 0, len(lut) - 1)]


def _hatch(height: int, width: int) -> np.ndarray:
    """Grey diagonal stripes: "ignored", unmistakable for any flat class colour (even a grey one)."""
    yy, xx = np.mgrid[0:height, 0:width]
    light = ((yy + xx) // 4) % 2 == 0
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[light] = (215, 215, 215)
    out[~light] = IGNORE_RGB
    return out


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise DatasetError(name, f"sample image must be (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def sample_png(sample: Sample, palette: Sequence[tuple[int, int, int]], class_names: Sequence[str]) -> bytes:
    """Four panels side by side — image | truth | prediction | errors — with a legend, as PNG bytes.

    Errors are magenta (:func:`error_rgb`: a colour no class has) where prediction ≠ truth;
    ignored truth pixels and predicted *nodata* pixels (:func:`segpipe.core.classes.nodata_label`:
    the source had no data there) are hatched grey and not scored; correct pixels show a faded
    copy of the image for orientation. Panels are scaled to 256–512 px wide (nearest neighbour
    for labels so class boundaries stay exact).
    """
    image = _as_rgb(sample.image, sample.name)
    truth, pred = np.asarray(sample.truth), np.asarray(sample.prediction)
    if truth.shape != image.shape[:2] or pred.shape != truth.shape:
        raise DatasetError(sample.name, f"image {image.shape[:2]}, truth {truth.shape} and prediction "
                                        f"{pred.shape} must have the same height and width")
    h, w = truth.shape
    palette = list(palette)
    error_color = error_rgb(palette)
    truth_ignored = truth == sample.ignore_index if sample.ignore_index is not None else np.zeros_like(truth, bool)
    no_data = pred == nodata_label(max(len(class_names), 1))
    ignored = truth_ignored | no_data
    wrong = (pred != truth) & ~ignored
    gray = image.astype(np.float32).mean(axis=2)
    errors = np.repeat((185 + 0.27 * gray)[..., None], 3, axis=2).astype(np.uint8)
    errors[wrong] = error_color
    scored = int((~ignored).sum())
    rate = wrong.sum() / scored if scored else float("nan")

    pw = int(np.clip(w, MIN_PANEL, MAX_PANEL))
    ph = max(1, round(h * pw / w))
    if w < MIN_PANEL:  # integer upscaling keeps pixels square and crisp
        pw, ph = w * math.ceil(MIN_PANEL / w), h * math.ceil(MIN_PANEL / w)

    def panel(a: np.ndarray, smooth: bool) -> np.ndarray:
        im = Image.fromarray(a)
        if im.size != (pw, ph):
            im = im.resize((pw, ph), Image.Resampling.BOX if smooth and pw < w else Image.Resampling.NEAREST)
        return np.asarray(im).copy()

    # the ignore hatch is drawn at panel resolution, after scaling, so its stripes stay sharp
    ignored_p = panel(ignored.astype(np.uint8) * 255, False) > 0
    no_data_p = panel(no_data.astype(np.uint8) * 255, False) > 0
    truth_ignored_p = panel(truth_ignored.astype(np.uint8) * 255, False) > 0
    hatch = _hatch(ph, pw)
    truth_p, errors_p = panel(_colorize(truth, palette), False), panel(errors, False)
    pred_p = panel(_colorize(pred, palette), False)
    truth_p[truth_ignored_p] = hatch[truth_ignored_p]
    pred_p[no_data_p] = hatch[no_data_p]
    errors_p[ignored_p] = hatch[ignored_p]
    panels = [
        ("image", panel(image, True)),
        ("truth", truth_p),
        ("prediction", pred_p),
        (f"errors ({_num(rate * 100, 1)} %)" if scored else "errors", errors_p),
    ]
    # text grows with the panels: a browser shows wide figures scaled down to the page width
    scale = max(1.0, pw / 256)
    font, title_font = _font(round(14 * scale)), _font(round(16 * scale))
    gap, pad, sw = round(12 * scale), round(14 * scale), round(18 * scale)
    title_h = _text_size(title_font, "Ag")[1] + 10
    # legend entries: classes, then the error colours; wrapped into rows
    entries = [(n, c) for n, c in zip(class_names, palette)] + [("error", error_color), ("ignored", None)]
    width = pad * 2 + 4 * pw + 3 * gap
    rows: list[list[tuple[str, tuple | None]]] = [[]]
    x = pad
    for name, color in entries:
        ew = sw + 6 + _text_size(font, name)[0] + sw
        if x + ew > width - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((name, color))
        x += ew
    line_h = _text_size(font, "Ag")[1] + 10
    height = pad + _text_size(title_font, sample.name)[1] + 10 + title_h + ph + 12 + len(rows) * line_h + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), sample.name, font=title_font, fill=_INK)
    y = pad + _text_size(title_font, sample.name)[1] + 10
    for i, (label, im) in enumerate(panels):
        x = pad + i * (pw + gap)
        draw.text((x, y), label, font=font, fill=(73, 80, 87))
        img.paste(Image.fromarray(im), (x, y + title_h))
        draw.rectangle((x - 1, y + title_h - 1, x + pw, y + title_h + ph), outline=(173, 181, 189))
    y += title_h + ph + 12
    for row in rows:
        x = pad
        for name, color in row:
            box = (x, y + 2, x + sw - 1, y + sw - 3)
            if color is None:
                img.paste(Image.fromarray(_hatch(sw - 4, sw)), (x, y + 2))
                draw.rectangle(box, outline=(120, 120, 120))
            else:
                draw.rectangle(box, fill=tuple(color), outline=(120, 120, 120))
            draw.text((x + sw + 6, y), name, font=font, fill=_INK)
            x += sw + 6 + _text_size(font, name)[0] + sw
        y += line_h
    return _png_bytes(img)


# --------------------------------------------------------------------------- tables
def _class_rows(metrics: dict[str, Any], challenger: dict[str, Any] | None) -> list[str]:
    """Class names in the champion's order, then classes only the challenger has."""
    names = [str(n) for n in metrics["classes"]]
    if challenger is not None:
        names += [str(n) for n in challenger["classes"] if str(n) not in names]
    return names


def _score(metrics: dict[str, Any] | None, name: str, key: str) -> float | None:
    if metrics is None:
        return None
    entry = metrics["per_class"].get(name)
    return None if entry is None else entry.get(key)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(metrics: dict[str, Any], challenger: dict[str, Any] | None = None) -> str:
    """Per-class and overall scores as Markdown tables (4 decimals, ``n/a`` for undefined).

    With ``challenger``: champion, challenger and Δ = challenger − champion for IoU and F1 per
    class, and for every overall score.
    """
    _check_metrics(metrics, "champion")
    if challenger is not None:
        _check_metrics(challenger, "challenger")
    lines: list[str] = []
    if challenger is None:
        lines += ["| class | IoU | precision | recall | F1 | support |",
                  "|:--|--:|--:|--:|--:|--:|"]
        for name in _class_rows(metrics, None):
            c = metrics["per_class"][name]
            lines.append(f"| {_md_cell(name)} | " + " | ".join(_num(c[k]) for k in _SCORES)
                         + f" | {c['support']:,} |")
        lines += ["", "| score | value |", "|:--|--:|"]
        lines += [f"| {label} | {_num(metrics.get(key))} |" for key, label in _OVERALL]
        return "\n".join(lines) + "\n"

    lines += ["| class | IoU champion | IoU challenger | Δ IoU | F1 champion | F1 challenger | Δ F1 | support |",
              "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for name in _class_rows(metrics, challenger):
        cells = [_md_cell(name)]
        for key in ("iou", "f1"):
            a, b = _score(metrics, name, key), _score(challenger, name, key)
            cells += [_num(a), _num(b), _delta_text(_delta(a, b))]
        support = _score(metrics, name, "support")
        if support is None:
            support = _score(challenger, name, "support")
        cells.append(f"{support:,}" if support is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| score | champion | challenger | Δ |", "|:--|--:|--:|--:|"]
    for key, label in _OVERALL:
        a, b = metrics.get(key), challenger.get(key)
        lines.append(f"| {label} | {_num(a)} | {_num(b)} | {_delta_text(_delta(a, b))} |")
    return "\n".join(lines) + "\n"


def verdict(champion: dict[str, Any], challenger: dict[str, Any]) -> str:
    """One line comparing the challenger with the champion on mean IoU, with the class-level picture.

    Descriptive only: whether to promote is the registry's decision.
    """
    a, b = champion.get("mean_iou"), challenger.get("mean_iou")
    if a is None or b is None:
        return "No verdict: mean IoU is undefined for " + ("the champion" if a is None else "the challenger") + "."
    d = b - a
    shared = [n for n in champion["classes"] if n in challenger["per_class"]]
    diffs = {n: _delta(_score(champion, n, "iou"), _score(challenger, n, "iou")) for n in shared}
    diffs = {n: v for n, v in diffs.items() if v is not None}
    better = sum(v >= DELTA_TOLERANCE for v in diffs.values())
    worse = {n: v for n, v in diffs.items() if v <= -DELTA_TOLERANCE}
    if abs(d) < DELTA_TOLERANCE:
        head = f"Challenger and champion are level: mean IoU {a:.4f} → {b:.4f}"
    elif d > 0:
        head = f"Challenger is better: mean IoU {a:.4f} → {b:.4f} ({_delta_text(d)})"
    else:
        head = f"Challenger is worse: mean IoU {a:.4f} → {b:.4f} ({_delta_text(d)})"
    tail = f"; IoU improves for {better} of {len(diffs)} classes"
    if worse:
        name = min(worse, key=worse.get)
        tail += f", largest drop: {name} ({_delta_text(worse[name])})"
    if set(champion["classes"]) != set(challenger["classes"]):
        tail += "; the class lists differ"
    return head + tail + "."


# --------------------------------------------------------------------------- HTML
_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f1f3f5; color: #212529;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #dee2e6; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.meta { color: #6c757d; margin: 0 0 12px; }
.verdict { margin: 16px 0; padding: 10px 14px; border-radius: 6px; border-left: 5px solid #adb5bd;
           background: #f8f9fa; font-weight: 600; }
.verdict.up { border-color: #2b8a3e; background: #ebfbee; }
.verdict.down { border-color: #c92a2a; background: #fff5f5; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e9ecef; text-align: right; }
.scroll { overflow-x: auto; }
table.compare th, table.compare td { padding: 4px 7px; font-size: 14px; }
table.compare th.group { text-align: center; border-left: 2px solid #dee2e6; }
table.compare td.first, table.compare th.first { border-left: 2px solid #dee2e6; }
th { background: #f8f9fa; font-weight: 600; white-space: nowrap; }
td.name, th.name { text-align: left; white-space: nowrap; }
table.kv td { text-align: left; }
table.kv td:first-child { color: #495057; font-weight: 600; white-space: nowrap; }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
td.up { color: #2b8a3e; background: #ebfbee; font-weight: 600; }
td.down { color: #c92a2a; background: #fff5f5; font-weight: 600; }
td.same { color: #868e96; }
td.na { color: #adb5bd; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 7px; vertical-align: -1px;
          border: 1px solid rgba(0,0,0,.25); border-radius: 2px; }
figure { margin: 10px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #dee2e6; }
figcaption { color: #6c757d; font-size: 13px; margin-top: 4px; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.note { color: #6c757d; font-size: 13px; }
"""


def _img(png: bytes, alt: str) -> str:
    with Image.open(io.BytesIO(png)) as im:
        w, h = im.size
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}" width="{w}" height="{h}">'


def _td(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


def _swatch(rgb: tuple[int, int, int] | None) -> str:
    if rgb is None:
        return ""
    return f'<span class="swatch" style="background:#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}"></span>'


def _model_table(model_info: dict[str, Any]) -> str:
    rows = []
    for key, value in model_info.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f"<tr><td>{html.escape(str(key))}</td><td><code>{html.escape(text)}</code></td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def _overall_table(metrics: dict[str, Any], challenger: dict[str, Any] | None) -> str:
    if challenger is None:
        head = '<tr><th class="name">score</th><th>value</th></tr>'
        body = "".join(f'<tr><td class="name">{label}</td>{_td(_num(metrics.get(key)))}</tr>'
                       for key, label in _OVERALL)
        return f"<table>{head}{body}</table>"
    head = '<tr><th class="name">score</th><th>champion</th><th>challenger</th><th>Δ</th></tr>'
    body = ""
    for key, label in _OVERALL:
        a, b = metrics.get(key), challenger.get(key)
        d = _delta(a, b)
        body += (f'<tr><td class="name">{label}</td>{_td(_num(a))}{_td(_num(b))}'
                 f"{_td(_delta_text(d), _delta_class(d) if d is not None else 'na')}</tr>")
    return f"<table>{head}{body}</table>"


def _class_table(metrics: dict[str, Any], challenger: dict[str, Any] | None,
                 colors: dict[str, tuple[int, int, int]]) -> str:
    names = _class_rows(metrics, challenger)
    if challenger is None:
        head = ('<tr><th class="name">class</th>' + "".join(f"<th>{_SCORE_NAMES[k]}</th>" for k in _SCORES)
                + "<th>support (px)</th></tr>")
        body = ""
        for name in names:
            c = metrics["per_class"][name]
            cells = "".join(_td(_num(c[k]), "" if c[k] is not None else "na") for k in _SCORES)
            support = f"{c['support']:,}"
            body += (f'<tr><td class="name">{_swatch(colors.get(name))}{html.escape(name)}</td>'
                     f"{cells}{_td(support)}</tr>")
        return f"<table>{head}{body}</table>"
    # two tables of two scores each: one table of all four would not fit a page width
    tables = []
    for pair in (("iou", "f1"), ("precision", "recall")):
        head = ('<tr><th class="name" rowspan="2">class</th>'
                + "".join(f'<th class="group" colspan="3">{_SCORE_NAMES[k]}</th>' for k in pair)
                + '<th class="group" rowspan="2">support (px)</th></tr><tr>'
                + '<th class="first">champion</th><th>challenger</th><th>Δ</th>' * len(pair) + "</tr>")
        body = ""
        for name in names:
            cells = ""
            for key in pair:
                a, b = _score(metrics, name, key), _score(challenger, name, key)
                d = _delta(a, b)
                cells += _td(_num(a), "first" if a is not None else "first na")
                cells += _td(_num(b), "" if b is not None else "na")
                cells += _td(_delta_text(d), _delta_class(d) if d is not None else "na")
            support = _score(metrics, name, "support")
            if support is None:
                support = _score(challenger, name, "support")
            support_text = f"{support:,}" if support is not None else "n/a"
            body += (f'<tr><td class="name">{_swatch(colors.get(name))}{html.escape(name)}</td>{cells}'
                     f'{_td(support_text, "first")}</tr>')
        tables.append(f'<div class="scroll"><table class="compare">{head}{body}</table></div>')
    return "\n".join(tables)


def _markdown_report(title: str, generated: str, metrics: dict[str, Any], model_info: dict[str, Any] | None,
                     history: list[dict[str, Any]] | None, challenger: dict[str, Any] | None,
                     n_samples: int) -> str:
    out = [f"# {title}", "", f"_Generated {generated}._", ""]
    if challenger is not None:
        out += ["## Verdict", "", verdict(metrics, challenger), ""]
    if model_info:
        out += ["## Model", ""]
        out += [f"- **{_md_cell(k)}**: `{v if isinstance(v, str) else json.dumps(v, default=str)}`"
                for k, v in model_info.items()]
        out.append("")
    out += ["## Scores" + (" (champion vs challenger)" if challenger is not None else ""), "",
            markdown_table(metrics, challenger)]
    names = [str(n) for n in metrics["classes"]]
    if len(names) <= 15:
        out += ["## Confusion matrix (pixels; rows = truth, columns = prediction)", "",
                "| truth \\ prediction | " + " | ".join(_md_cell(n) for n in names) + " |",
                "|:--|" + "--:|" * len(names)]
        for name, row in zip(names, metrics["confusion_matrix"]):
            out.append(f"| {_md_cell(name)} | " + " | ".join(f"{int(v):,}" for v in row) + " |")
        out.append("")
    if history:
        last = history[-1]
        out += ["## Training", "", f"{len(history)} epochs; last epoch: "
                + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in last.items()), ""]
    figures = ["the confusion-matrix heatmap"] + (["training curves"] if history else []) + \
        ([f"{n_samples} sample overlays"] if n_samples else [])
    out += [f"Figures ({', '.join(figures)}) are in report.html.", ""]
    return "\n".join(out)


def write_report(out_dir: str | Path, metrics: dict[str, Any], *, title: str,
                 model_info: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                 samples: list[Sample] | None = None, challenger: dict[str, Any] | None = None,
                 class_colors: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md``; returns both paths.

    ``metrics`` (and ``challenger``) are ``metrics.json`` dicts (:func:`segpipe.evaluate.metrics.scores`);
    ``history`` is a list of per-epoch dicts (``{"epoch": 1, "train_loss": …, "val_mean_iou": …}``);
    ``class_colors`` are hex strings in class order (a model's ``class_colors``); missing ones come
    from :func:`segpipe.core.classes.class_colors`, as in the Zarr outputs.
    """
    _check_metrics(metrics, "champion")
    if challenger is not None:
        _check_metrics(challenger, "challenger")
    names = [str(n) for n in metrics["classes"]]
    palette = class_palette(len(names), class_colors)
    colors = dict(zip(names, palette))
    if challenger is not None:
        extra = [str(n) for n in challenger["classes"] if str(n) not in colors]
        colors.update(zip(extra, class_palette(len(names) + len(extra))[len(names):]))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    esc = html.escape

    parts = [f"<h1>{esc(title)}</h1>", f'<p class="meta">Generated {esc(generated)} · '
             f"{len(names)} classes · {sum(int(c['support']) for c in metrics['per_class'].values()):,} "
             "scored pixels" + (" (champion)" if challenger is not None else "") + "</p>"]
    if challenger is not None:
        line = verdict(metrics, challenger)
        d = _delta(metrics.get("mean_iou"), challenger.get("mean_iou"))
        parts.append(f'<p class="verdict {_delta_class(d)}">{esc(line)}</p>')
    if model_info:
        parts += ["<h2>Model</h2>", _model_table(model_info)]
    parts += ["<h2>Overall scores</h2>", _overall_table(metrics, challenger),
              "<h2>Per-class scores</h2>", _class_table(metrics, challenger, colors)]
    if challenger is not None:
        parts.append('<p class="note">Δ = challenger − champion; green: better, red: worse.</p>')

    parts.append("<h2>Confusion matrix</h2>")
    caption = ("Rows: true class, columns: predicted class; each row is normalised to sum to 1, "
               "so the diagonal is the recall of each class.")
    if challenger is None:
        parts.append(f"<figure>{_img(confusion_png(metrics), 'confusion matrix')}"
                     f"<figcaption>{caption}</figcaption></figure>")
    else:
        parts.append('<div class="row">'
                     f"<figure>{_img(confusion_png(metrics, 'champion'), 'champion confusion matrix')}</figure>"
                     f"<figure>{_img(confusion_png(challenger, 'challenger'), 'challenger confusion matrix')}"
                     "</figure></div>" f'<p class="note">{caption}</p>')

    groups = _history_groups(history) if history else {}
    if groups:
        parts.append('<h2>Training curves</h2><div class="row">')
        for group, series in groups.items():
            parts.append(f"<figure>{_img(line_plot_png(series, group), group)}</figure>")
        parts.append("</div>")
    if samples:
        parts.append("<h2>Samples</h2>")
        parts.append('<p class="note">image | truth | prediction | errors (magenta: wrong, hatched grey: '
                     'ignored or no data).</p>')
        for s in samples:
            parts.append(f"<figure>{_img(sample_png(s, palette, names), s.name)}</figure>")

    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # an empty inline icon: otherwise browsers request /favicon.ico (a failed load)
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(parts) + "\n</main>\n</body>\n</html>\n"
    )
    markdown = _markdown_report(title, generated, metrics, model_info, history, challenger, len(samples or []))
    out = Path(out_dir)
    html_path, md_path = out / "report.html", out / "report.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        html_path.write_text(document, encoding="utf-8")
        md_path.write_text(markdown, encoding="utf-8")
    except OSError as e:
        raise OutputError(str(out), f"cannot be written ({e.strerror or e})") from None
    return html_path, md_path
