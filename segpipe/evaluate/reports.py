"""Evaluation reports: one self-contained HTML file and a Markdown twin.

``report.html`` is meant to be mailed, attached to a Prefect artifact or opened from a bucket
years later, so it carries everything inline: CSS in a ``<style>`` element, every figure as a
base64 PNG data URI, no script, no external URL. This module assembles the document (tables,
deltas, the verdict, HTML and Markdown); the figures come from :mod:`segpipe.evaluate.figures`
(confusion-matrix heatmap, training curves) and :mod:`segpipe.evaluate.overlays` (per-sample
overlays image | truth | prediction | errors).

With a *challenger* (a second ``metrics.json`` dict, e.g. a retrained model), the *champion*
(the model in service, ``metrics``) and the challenger are compared side by side; differences are
challenger − champion, green when better, red when worse (every score here is higher-is-better).

``report.md`` holds the same tables (via :func:`markdown_table`, also used for Prefect
markdown artifacts) without the figures.

Why this module is long: the HTML and the Markdown report are one document in two renderings
(verdict, model, scores, deltas, corrections); keeping them together keeps their sections in step.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from segpipe.core.errors import DatasetError, OutputError
from segpipe.evaluate.figures import class_palette, confusion_png, history_groups, line_plot_png
from segpipe.evaluate.markdown_html import markdown_section_html
from segpipe.evaluate.overlays import Sample, sample_png

#: differences smaller than this are shown as unchanged (scores are printed with 4 decimals)
DELTA_TOLERANCE = 5e-5

_SCORES = ("iou", "precision", "recall", "f1")
_SCORE_NAMES = {"iou": "IoU", "precision": "precision", "recall": "recall", "f1": "F1"}
_OVERALL = (("mean_iou", "mean IoU"), ("frequency_weighted_iou", "frequency-weighted IoU"),
            ("pixel_accuracy", "pixel accuracy"))


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
                 class_colors: list[str] | None = None,
                 corrections_md: str | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md``; returns both paths.

    ``metrics`` (and ``challenger``) are ``metrics.json`` dicts (:func:`segpipe.core.metrics.scores`);
    ``history`` is a list of per-epoch dicts (``{"epoch": 1, "train_loss": …, "val_mean_iou": …}``);
    ``class_colors`` are hex strings in class order (a model's ``class_colors``); missing ones come
    from :func:`segpipe.core.classes.class_colors`, as in the Zarr outputs. ``corrections_md`` is the
    corrections section (:func:`segpipe.evaluate.corrections.corrections_markdown`), in both files.
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
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
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

    if corrections_md:
        parts.append(markdown_section_html(corrections_md))
    groups = history_groups(history) if history else {}
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
    if corrections_md:
        markdown += "\n" + corrections_md
    out = Path(out_dir)
    html_path, md_path = out / "report.html", out / "report.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        html_path.write_text(document, encoding="utf-8")
        md_path.write_text(markdown, encoding="utf-8")
    except OSError as e:
        raise OutputError(str(out), f"cannot be written ({e.strerror or e})") from None
    return html_path, md_path
