"""Per-sample overlays for the reports: image | truth | prediction | errors, as one PNG.

Owns :class:`Sample` (one evaluated image), :func:`sample_png`, the error colour
(:func:`error_rgb`: magenta unless a class colour comes close) and how ignored truth and
*nodata* predictions are shown (hatched grey). Fonts and PNG encoding come from
:mod:`segpipe.evaluate.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from segpipe.core.classes import nodata_label
from segpipe.core.errors import DatasetError
from segpipe.evaluate.figures import INK, load_font, png_bytes, text_size

IGNORE_RGB = (128, 128, 128)
#: colour of wrong pixels in the error panel: magenta, which no default class colour is near;
#: :func:`error_rgb` picks another one when a class colour comes close to it
ERROR_RGB = (255, 0, 255)
#: candidates for the error colour, in order of preference
_ERROR_CANDIDATES = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0),
                     (0, 0, 0), (255, 255, 255), (128, 0, 255), (255, 128, 0))
#: RGB distance under which two colours count as confusable
_MIN_COLOR_DISTANCE = 80.0
#: sample panels are scaled to this width range (px): readable, yet the report stays small
MIN_PANEL, MAX_PANEL = 256, 512


@dataclass(frozen=True, eq=False)
class Sample:
    """One evaluated image for the report: RGB (H, W, 3) uint8, truth and prediction (H, W) class ids."""

    name: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    #: truth pixels with this id are not scored (shown grey)
    ignore_index: int | None = 255


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
        (f"errors ({rate * 100:.1f} %)" if scored else "errors", errors_p),
    ]
    # text grows with the panels: a browser shows wide figures scaled down to the page width
    scale = max(1.0, pw / 256)
    font, title_font = load_font(round(14 * scale)), load_font(round(16 * scale))
    gap, pad, sw = round(12 * scale), round(14 * scale), round(18 * scale)
    title_h = text_size(title_font, "Ag")[1] + 10
    # legend entries: classes, then the error colours; wrapped into rows
    entries = [(n, c) for n, c in zip(class_names, palette)] + [("error", error_color), ("ignored", None)]
    width = pad * 2 + 4 * pw + 3 * gap
    rows: list[list[tuple[str, tuple | None]]] = [[]]
    x = pad
    for name, color in entries:
        ew = sw + 6 + text_size(font, name)[0] + sw
        if x + ew > width - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((name, color))
        x += ew
    line_h = text_size(font, "Ag")[1] + 10
    height = pad + text_size(title_font, sample.name)[1] + 10 + title_h + ph + 12 + len(rows) * line_h + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), sample.name, font=title_font, fill=INK)
    y = pad + text_size(title_font, sample.name)[1] + 10
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
            draw.text((x + sw + 6, y), name, font=font, fill=INK)
            x += sw + 6 + text_size(font, name)[0] + sw
        y += line_h
    return png_bytes(img)
