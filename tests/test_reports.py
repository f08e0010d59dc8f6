"""Reports: self-contained HTML (inline PNGs only), Markdown tables that match the metrics, figures."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.core.errors import ConfigError, DatasetError
from segpipe.core.metrics import ConfusionMatrix
from segpipe.evaluate.figures import class_palette, confusion_png, line_plot_png
from segpipe.evaluate.overlays import ERROR_RGB, MIN_PANEL, Sample, error_rgb, sample_png
from segpipe.evaluate.reports import markdown_table, verdict, write_report

NAMES = ["bare_soil", "water", "vegetation", "building", "road"]
COLORS = ["#c8a26e", "#1f77b4", "#2ca02c", "#d62728", "#7f7f7f"]


def _noisy(truth: np.ndarray, rate: float, seed: int, k: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flip = rng.random(truth.shape) < rate
    return np.where(flip, rng.integers(0, k, truth.shape), truth).astype(np.uint8)


def _scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocky truth with an ignored corner and a matching textured RGB image."""
    rng = np.random.default_rng(seed)
    truth = np.kron(rng.integers(0, 5, (h // 16 + 1, w // 16 + 1)), np.ones((16, 16), int))[:h, :w].astype(np.uint8)
    truth[: h // 5, : w // 5] = 255
    image = (np.array([[200, 160, 110], [30, 70, 140], [50, 140, 50], [180, 60, 50], [110, 110, 110]],
                      np.uint8)[np.minimum(truth, 4)] + rng.integers(0, 20, (h, w, 3))).astype(np.uint8)
    return image, truth


@pytest.fixture(scope="module")
def metrics_pair() -> tuple[dict, dict]:
    _, truth = _scene(240, 320, 0)
    champion = ConfusionMatrix(5).update(truth, np.where(truth == 255, 0, _noisy(truth, 0.2, 1)))
    challenger = ConfusionMatrix(5).update(truth, np.where(truth == 255, 0, _noisy(truth, 0.1, 2)))
    return champion.scores(NAMES), challenger.scores(NAMES)


def _history() -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e + 0.05, "val_mean_iou": 0.4 + 0.04 * e,
             "lr": 1e-3 * 0.9 ** e} for e in range(1, 9)]


def _samples() -> list[Sample]:
    small_img, small_truth = _scene(60, 90, 3)      # upscaled to ≥ 256 px panels
    big_img, big_truth = _scene(300, 700, 4)        # downscaled to 512 px panels
    return [Sample("small tile", small_img, small_truth, np.where(small_truth == 255, 1, _noisy(small_truth, .1, 5))),
            Sample("wide tile", big_img, big_truth, _noisy(np.minimum(big_truth, 4), .05, 6))]


class _Images(HTMLParser):
    """Collects <img> sources and every src/href attribute of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data") and value is not None:
                self.links.append(value)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")


def _decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    raw = base64.b64decode(src[len(prefix):], validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(io.BytesIO(raw)).verify()  # checks the chunks and their CRCs
    img = Image.open(io.BytesIO(raw))
    img.load()
    assert img.format == "PNG"
    return img


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory, metrics_pair: tuple[dict, dict]) -> tuple[Path, Path]:
    champion, challenger = metrics_pair
    out = tmp_path_factory.mktemp("report")
    return write_report(out, champion, title="Evaluation of unet-resnet18 v2", challenger=challenger,
                        model_info={"architecture": "Unet", "encoder": "resnet18", "classes": NAMES,
                                    "weights_sha256": "0" * 64},
                        history=_history(), samples=_samples(), class_colors=COLORS)


def test_report_files_exist(full_report: tuple[Path, Path]) -> None:
    html_path, md_path = full_report
    assert html_path.name == "report.html" and md_path.name == "report.md"
    assert html_path.parent == md_path.parent
    assert html_path.stat().st_size > 10_000 and md_path.stat().st_size > 500


def test_html_is_self_contained(full_report: tuple[Path, Path]) -> None:
    text = full_report[0].read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    parser = _Images()
    parser.feed(text)
    assert parser.links and all(link.startswith("data:") for link in parser.links), parser.links
    assert "script" not in parser.tags and "iframe" not in parser.tags
    assert not re.search(r"url\(\s*['\"]?(?!data:)", text), "CSS must not load anything"
    assert not re.search(r"@import", text)
    assert text.lstrip().startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text


def test_every_image_is_an_embedded_png(full_report: tuple[Path, Path]) -> None:
    parser = _Images()
    parser.feed(full_report[0].read_text(encoding="utf-8"))
    # 2 heatmaps (champion, challenger) + 3 training plots (loss, scores, lr) + 2 samples
    assert len(parser.images) == 7
    sizes = [_decode_png(src).size for src in parser.images]
    small, wide = sizes[-2], sizes[-1]
    assert small[0] >= 4 * MIN_PANEL and wide[0] >= 4 * 512  # every panel at least 256 px wide


def test_html_holds_the_tables_and_verdict(full_report: tuple[Path, Path], metrics_pair: tuple[dict, dict]) -> None:
    champion, challenger = metrics_pair
    text = full_report[0].read_text(encoding="utf-8")
    for name in NAMES:
        assert name in text
        assert f"{champion['per_class'][name]['iou']:.4f}" in text
        assert f"{challenger['per_class'][name]['iou']:.4f}" in text
    assert f"{champion['mean_iou']:.4f}" in text and f"{challenger['mean_iou']:.4f}" in text
    assert "Challenger is better" in text
    assert 'class="verdict up"' in text
    assert 'class="up"' in text  # the challenger is less noisy: its differences are highlighted green
    assert "weights_sha256" in text


def _md_rows(table: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set(":-") for c in r)]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def test_markdown_table_matches_metrics(metrics_pair: tuple[dict, dict]) -> None:
    champion, _ = metrics_pair
    rows = _md_rows(markdown_table(champion))
    assert rows[0] == ["class", "IoU", "precision", "recall", "F1", "support"]
    per_class = {r[0]: r[1:] for r in rows[1:6]}
    assert list(per_class) == NAMES
    for name, cells in per_class.items():
        c = champion["per_class"][name]
        assert cells[:4] == [_fmt(c["iou"]), _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"])]
        assert int(cells[4].replace(",", "")) == c["support"]
    overall = {r[0]: r[1] for r in rows[7:]}
    assert overall == {"mean IoU": _fmt(champion["mean_iou"]),
                       "frequency-weighted IoU": _fmt(champion["frequency_weighted_iou"]),
                       "pixel accuracy": _fmt(champion["pixel_accuracy"])}


def test_markdown_table_with_challenger(metrics_pair: tuple[dict, dict]) -> None:
    champion, challenger = metrics_pair
    rows = _md_rows(markdown_table(champion, challenger))
    assert rows[0][:4] == ["class", "IoU champion", "IoU challenger", "Δ IoU"]
    for r in rows[1:6]:
        a, b = champion["per_class"][r[0]], challenger["per_class"][r[0]]
        assert r[1:3] == [_fmt(a["iou"]), _fmt(b["iou"])]
        assert float(r[3].replace("−", "-")) == pytest.approx(b["iou"] - a["iou"], abs=5e-5)
        assert r[4:6] == [_fmt(a["f1"]), _fmt(b["f1"])]
    mean_row = next(r for r in rows if r[0] == "mean IoU")
    assert mean_row[1:3] == [_fmt(champion["mean_iou"]), _fmt(challenger["mean_iou"])]
    assert mean_row[3].startswith("+")


def _md_section(md: str, heading: str) -> str:
    """The text of one ``## heading`` section of a Markdown report."""
    start = md.index(f"## {heading}")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def test_markdown_report_file(full_report: tuple[Path, Path], metrics_pair: tuple[dict, dict]) -> None:
    champion, challenger = metrics_pair
    md = full_report[1].read_text(encoding="utf-8")
    assert md.startswith("# Evaluation of unet-resnet18 v2\n")
    assert _md_section(md, "Verdict").strip() == f"## Verdict\n\n{verdict(champion, challenger)}"
    assert verdict(champion, challenger).startswith("Challenger is better")
    scores = _md_section(md, "Scores (champion vs challenger)")
    assert markdown_table(champion, challenger) in scores
    # the confusion matrix printed is the champion's, count for count
    cm = _md_rows(_md_section(md, "Confusion matrix"))
    assert cm[0] == ["truth \\ prediction", *NAMES]
    assert [[int(v.replace(",", "")) for v in r[1:]] for r in cm[1:]] == champion["confusion_matrix"]
    assert champion["confusion_matrix"] != challenger["confusion_matrix"]
    assert "report.html" in md


@pytest.mark.parametrize("with_challenger", [False, True])
def test_report_with_and_without_a_champion(tmp_path: Path, metrics_pair: tuple[dict, dict],
                                            with_challenger: bool) -> None:
    """A first run (one model, nothing to compare) and a comparison differ in what they claim and show."""
    champion, challenger = metrics_pair
    single = not with_challenger
    html_path, md_path = write_report(tmp_path, champion, title="t", challenger=None if single else challenger)
    md, text = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(text)
    if single:
        body = text[text.index("<body>"):]
        assert "## Verdict" not in md and 'class="verdict' not in body
        assert "challenger" not in md.lower() and "challenger" not in body.lower()
        assert "## Scores\n" in md and markdown_table(champion) in md
        rows = {r[0]: r for r in _md_rows(markdown_table(champion))}
        for name in NAMES:  # the numbers of the one model, per class
            c = champion["per_class"][name]
            assert rows[name][1:5] == [_fmt(c["iou"]), _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"])]
            assert f"{c['iou']:.4f}" in text
        assert len(parser.images) == 1  # one confusion heatmap
    else:
        assert verdict(champion, challenger) in md and 'class="verdict up"' in text
        assert markdown_table(champion, challenger) in md
        for name in NAMES:
            for m in (champion, challenger):
                assert f"{m['per_class'][name]['iou']:.4f}" in text
        assert len(parser.images) == 2  # champion and challenger heatmaps
    support = sum(int(c["support"]) for c in champion["per_class"].values())
    assert f"{support:,} scored pixels" + ("" if single else " (champion)") in text


def test_undefined_scores_and_all_ignored(tmp_path: Path) -> None:
    empty = ConfusionMatrix(3).update(np.full((4, 4), 255), np.zeros((4, 4), int)).scores(["a", "b", "c"])
    html_path, md_path = write_report(tmp_path, empty, title="nothing scored")
    rows = _md_rows(markdown_table(empty))
    assert rows[1] == ["a", "n/a", "n/a", "n/a", "n/a", "0"]
    assert {r[0]: r[1] for r in rows[5:]}["mean IoU"] == "n/a"
    parser = _Images()
    parser.feed(html_path.read_text(encoding="utf-8"))
    assert len(parser.images) == 1
    _decode_png(parser.images[0])
    assert "No verdict" in verdict(empty, empty)


def test_user_text_is_escaped(tmp_path: Path, metrics_pair: tuple[dict, dict]) -> None:
    html_path, _ = write_report(tmp_path, metrics_pair[0], title="<script>alert(1)</script> & co",
                                model_info={"note": "<b>bold</b>"})
    text = html_path.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;" in text and "&amp; co" in text


def test_verdict_wording(metrics_pair: tuple[dict, dict]) -> None:
    champion, challenger = metrics_pair
    assert verdict(champion, challenger).startswith("Challenger is better: mean IoU ")
    worse = verdict(challenger, champion)
    assert worse.startswith("Challenger is worse") and "largest drop" in worse
    assert verdict(champion, champion).startswith("Challenger and champion are level")


def test_sample_png_panels_and_colours() -> None:
    image, truth = _scene(40, 50, 9)
    pred = np.where(truth == 255, 0, truth)
    pred[30:, 40:] = (pred[30:, 40:] + 1) % 5  # a block of errors
    png = sample_png(Sample("s", image, truth, pred), class_palette(5, COLORS), NAMES)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[1] >= 4 * MIN_PANEL + 3 * 12
    pixels = {tuple(p) for p in img.reshape(-1, 3)}
    assert ERROR_RGB in pixels
    assert (215, 215, 215) in pixels and (128, 128, 128) in pixels  # the ignore hatch
    assert all(tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) in pixels for c in COLORS)


def test_sample_shape_mismatch_raises() -> None:
    image, truth = _scene(40, 50, 9)
    with pytest.raises(DatasetError, match="same height and width"):
        sample_png(Sample("bad", image, truth, truth[:-1]), class_palette(5), NAMES)


def test_bad_colour_raises() -> None:
    with pytest.raises(ConfigError, match="not a colour"):
        class_palette(2, ["#12345", "#000000"])
    assert len(set(class_palette(40))) == 40  # extended beyond the default palette, still distinct


def test_report_palette_is_the_class_table() -> None:
    """The report shows each class in the colour the outputs show it in (segpipe.core.classes)."""
    from segpipe.core.classes import DEFAULT_COLORS, palette_rgba

    assert class_palette(5, COLORS) == [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in COLORS]
    given = ["#ff0000", None, "#0a0"]
    assert class_palette(20, given) == [tuple(int(v) for v in rgba[:3]) for rgba in palette_rgba(20, given)]
    assert class_palette(3)[1] == tuple(int(DEFAULT_COLORS[1][i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.parametrize("colors", [None, COLORS, ["#ff00ff", "#00ffff", "#fe01fd"], ["#ff0000"] * 3])
def test_error_colour_is_no_class_colour(colors) -> None:
    palette = class_palette(len(colors) if colors else 16, colors)
    err = np.array(error_rgb(palette), float)
    assert min(np.linalg.norm(np.array(palette, float) - err, axis=1)) >= 80
    if colors is None or colors == COLORS:
        assert error_rgb(palette) == ERROR_RGB  # magenta: far from every default colour


def test_predicted_nodata_is_hatched_and_not_an_error() -> None:
    image, truth = _scene(40, 50, 9)
    truth[truth == 255] = 0
    pred = truth.copy()
    pred[:, 25:] = 255  # the nodata label of 5 classes: no source data there

    def render(p: np.ndarray) -> np.ndarray:
        png = sample_png(Sample("s", image, truth, p), class_palette(5, COLORS), NAMES)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def error_pixels(img: np.ndarray) -> int:
        return int((img == np.array(ERROR_RGB, np.uint8)).all(axis=2).sum())

    perfect, img = render(truth), render(pred)
    assert error_pixels(perfect) > 0  # the legend swatch
    assert error_pixels(img) == error_pixels(perfect)  # nodata is not wrong
    hatch = np.array((215, 215, 215), np.uint8)
    # hatched where there is no data: prediction and error panels, half of each (beyond the legend's swatch)
    assert (img == hatch).all(axis=2).sum() > (perfect == hatch).all(axis=2).sum() + 2 * 128 * 256 // 4


@pytest.mark.parametrize("k", [1, 2, 30])
def test_confusion_png_any_class_count(k: int) -> None:
    names = [f"class {i}" for i in range(k)]
    m = np.diag(np.arange(1, k + 1)) + 1
    img = Image.open(io.BytesIO(confusion_png({"classes": names, "confusion_matrix": m.tolist()})))
    assert img.format == "PNG" and min(img.size) >= 26 * k


def test_line_plot_draws_its_series() -> None:
    """The line goes where the data goes: a rising series rises, a flat one is level, none draws nothing."""
    from segpipe.evaluate.figures import class_palette

    color = np.array(class_palette(2)[1][:3])

    def series_pixels(series) -> np.ndarray:
        a = np.asarray(Image.open(io.BytesIO(line_plot_png(series, "t"))).convert("RGB"))
        assert a.shape == (320, 540, 3)
        ys, xs = np.nonzero((a == color).all(axis=2))
        plot = xs < 400  # the legend's colour swatch sits right of the plot
        return np.stack([ys[plot], xs[plot]], axis=1)

    rising = series_pixels({"loss": [(float(e), e / 10) for e in range(1, 11)]})
    left, right = rising[rising[:, 1] < rising[:, 1].min() + 5], rising[rising[:, 1] > rising[:, 1].max() - 5]
    assert left[:, 0].mean() > right[:, 0].mean() + 100  # image rows grow downwards: higher value, smaller row
    flat = series_pixels({"a": [(1.0, 2.0), (2.0, 2.0)]})
    assert np.ptp(flat[:, 0]) <= 8 and np.ptp(flat[:, 1]) > 200  # a level line across the plot (dots ±3 px)
    assert len(series_pixels({"loss": [(1.0, 0.5)]})) > 0  # one point is still drawn
    assert len(series_pixels({})) == 0


@pytest.mark.slow
def test_report_renders_in_headless_chromium(full_report: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    browser, driver_bin = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
    if not Path(browser).exists() or driver_bin is None:
        missing = " and ".join(n for n, ok in (("chromium", Path(browser).exists()), ("chromium-driver", driver_bin))
                               if not ok)
        pytest.skip(f"{missing} not installed: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(full_report[0].resolve().as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) == 7
        assert all(complete and width > 0 for complete, width, _ in images), images
        # the layout fits the window: nothing forces a horizontal scroll bar on the page
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height + 100, 8000))
        assert driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[0] == 1280 and shot.size[1] > 900
