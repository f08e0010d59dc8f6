"""Training data: the dataset layout, its checks, class statistics and lazy patch sampling.

Layout (local folder or any fsspec URL)::

    DATA/images/<name>.<ext>      any image the readers open (GeoTIFF, PNG, JPEG, …)
    DATA/masks/<name>.<ext>       one band of class ids, same height × width; 255 = ignore
    DATA/classes.json             {"classes": [{"name": "background", "color": "#000000"}, …]}
                                  (colours optional: missing ones come from segpipe.core.classes)
    DATA/split.json               optional {"train": [<name>, …], "val": [<name>, …]}

``<name>`` is the path relative to ``images/`` without its extension (``tiles/a`` for
``images/tiles/a.tif``); a mask may have another extension than its image. The class id
is the index in ``classes.json``. Without ``split.json`` the images are split by a seeded
shuffle: about 20 % validation, at least one validation image when there are two or more.

Nothing here reads a whole image or mask at once, so training images may be as large as
inference images:

* :func:`index_masks` reads every mask once in 1024² windows, counts pixels per class,
  checks the class ids, and records which 64-px **cells** hold which class;
* :class:`PatchSampler` reads one window per patch (map-style: patch ``i`` of epoch ``e`` is
  a pure function of ``(seed, e, i)``, so any worker count and any resume point give the
  same patches); class-balanced sampling picks a class, then a pixel of that class via
  the cell index, and centres the patch near it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segpipe.core.classes import class_colors, parse_color, to_hex
from segpipe.core.errors import ConfigError, DatasetError, InputError
from segpipe.io.readers import ImageReader, open_image
from segpipe.io.storage import filesystem, join, list_images, strip_file_scheme
from segpipe.core.geometry import Window, ceil_div

log = logging.getLogger("segpipe.train.dataset")

#: mask value that is not trained on nor scored; the same value as the nodata label of a
#: ≤ 255-class output (:func:`segpipe.core.classes.nodata_label`), so an output used as a mask
#: leaves its no-data pixels out too
IGNORE_INDEX = 255
#: side of the windows in which masks and images are scanned (never a whole raster at once)
SCAN_WINDOW = 1024
#: side of the cells of the class index used by class-balanced sampling
INDEX_CELL = 64
#: fraction of images that go to validation when there is no split.json
VAL_FRACTION = 0.2



class Item(NamedTuple):
    """One training image and its mask."""

    name: str  #: path relative to images/ without extension
    image_uri: str
    mask_uri: str
    height: int
    width: int


@dataclass(frozen=True)
class Dataset:
    """A loaded (and header-checked) dataset, or one split of it."""

    root: str
    classes: list[str]
    colors: list[str]
    items: list[Item]
    in_channels: int
    dtype: str  #: image dtype (the same for every image)
    split: str | None = None  #: "train", "val" or None (all images)
    #: split.json contents (validated), or None when the split is the seeded default
    split_file: dict[str, list[str]] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def pixels(self) -> int:
        return sum(it.height * it.width for it in self.items)


# --------------------------------------------------------------------------- layout


class _ClassEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    color: str | None = None

    @field_validator("color")
    @classmethod
    def _color(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return to_hex(parse_color(v))  # the one parser: #rgb, #rrggbb, #rrggbbaa
        except ConfigError:
            raise ValueError(f"{v!r} is not a colour; expected '#rrggbb'") from None


class _ClassesFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    classes: list[_ClassEntry] = Field(min_length=1, max_length=IGNORE_INDEX)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[_ClassEntry]) -> list[_ClassEntry]:
        names = [c.name for c in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"class name {dup!r} appears twice")
        return v


def _read_json(fs, path: str, uri: str) -> object:
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetError(uri, "does not exist") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(uri, f"is not valid JSON ({e})") from None


def read_classes(root: str) -> tuple[list[str], list[str]]:
    """Class names and colours from ``ROOT/classes.json``; missing colours come from
    :func:`segpipe.core.classes.class_colors`, so every output shows the same colours."""
    uri = join(strip_file_scheme(root), "classes.json")
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DatasetError(uri, "missing (expected {\"classes\": [{\"name\": ..., \"color\": \"#rrggbb\"}, ...]})")
    data = _read_json(fs, path, uri)
    try:
        parsed = _ClassesFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "top level"
        raise DatasetError(uri, f"{where}: {err['msg']} (expected {{\"classes\": [{{\"name\": ..., "
                                f"\"color\": \"#rrggbb\"}}, ...]}})") from None
    names = [c.name for c in parsed.classes]
    colors = class_colors(len(names), [c.color for c in parsed.classes])
    return names, colors


def _read_split_file(root: str, names: Sequence[str]) -> dict[str, list[str]] | None:
    uri = join(strip_file_scheme(root), "split.json")
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return None
    data = _read_json(fs, path, uri)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise DatasetError(uri, 'must hold a JSON object {"train": [names], "val": [names]}')
    known = set(names)
    out: dict[str, list[str]] = {}
    for key, value in data.items():
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise DatasetError(uri, f"{key!r} must be a list of image names (paths under images/ without extension)")
        # names may carry their extension ("a.tif" for images/a.tif): accept both spellings
        out[key] = [n if n in known or posixpath.splitext(n)[0] not in known else posixpath.splitext(n)[0]
                    for n in value]
    if "train" not in out:
        raise DatasetError(uri, 'has no "train" list')
    for key, value in out.items():
        missing = [n for n in value if n not in known]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DatasetError(uri, f"{key!r} names image(s) not found under images/: "
                                    f"{', '.join(missing[:3])}{more}")
    both = sorted(set(out["train"]) & set(out.get("val", [])))
    if both:
        raise DatasetError(uri, f"image {both[0]!r} is in both train and val")
    return out


def seeded_split(names: Sequence[str], seed: int = 0, val_fraction: float = VAL_FRACTION) -> dict[str, list[str]]:
    """Split image names by a seeded shuffle: ``round(val_fraction·n)`` validation images, at least 1 when n ≥ 2."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = 0 if len(order) < 2 else max(1, round(val_fraction * len(order)))
    val = set(order[:n_val])
    return {"train": [n for n in sorted(names) if n not in val], "val": [n for n in sorted(names) if n in val]}


def _by_stem(found, folder_uri: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for img in found:
        stem = posixpath.splitext(img.relative)[0]
        if stem in out:
            raise DatasetError(img.uri, f"two files under {folder_uri} share the name {stem!r} "
                                        f"({posixpath.basename(out[stem])} and {posixpath.basename(img.uri)})")
        out[stem] = img.uri
    return out


def _header(uri: str, mask: bool = False) -> tuple[int, int, int, str]:
    reader = open_mask(uri) if mask else open_reader(uri)
    try:
        i = reader.info
        return i.height, i.width, i.count, i.dtype
    finally:
        reader.close()


def load_dataset(root: str, split: str | None = None, seed: int = 0) -> Dataset:
    """Read and check the layout under ``root``; ``split`` = None (all images), "train" or "val".

    Checks every image's and mask's header (sizes, band counts, dtypes), ``classes.json`` and
    ``split.json``. Class ids inside the masks are checked by :func:`index_masks` (one windowed
    pass), not here, so loading stays cheap. ``seed`` decides the default split (no split.json).
    """
    return split_dataset(_load_all(root), split, seed)


def split_dataset(dataset: Dataset, split: str | None, seed: int = 0) -> Dataset:
    """One split of a dataset loaded with ``split=None`` (see :func:`load_dataset`)."""
    sf = dataset.split_file
    if split is None:
        return dataset
    if split not in ("train", "val") and (sf is None or split not in sf):
        known = ["train", "val"] + [k for k in (sf or {}) if k not in ("train", "val")]
        raise DatasetError(dataset.root, f"unknown split {split!r}; known: {', '.join(known)}")
    names = set(sf.get(split, [])) if sf is not None else set(seeded_split(dataset.names, seed)[split])
    items = [it for it in dataset.items if it.name in names]
    if split == "train" and not items:
        raise DatasetError(join(dataset.root, "split.json"), "the train split holds no images")
    return Dataset(dataset.root, dataset.classes, dataset.colors, items, dataset.in_channels, dataset.dtype,
                   split, sf)


def _load_all(root: str) -> Dataset:
    root = strip_file_scheme(root).rstrip("/") or "/"
    images_uri, masks_uri = join(root, "images"), join(root, "masks")
    classes, colors = read_classes(root)
    try:
        images = _by_stem(list_images(images_uri), images_uri)
    except InputError:
        raise DatasetError(images_uri, "does not exist (expected DATA/images/ and DATA/masks/)") from None
    if not images:
        raise DatasetError(images_uri, "holds no images: the dataset is empty")
    try:
        masks = _by_stem(list_images(masks_uri), masks_uri)
    except InputError:
        raise DatasetError(masks_uri, "does not exist (expected a mask per image under DATA/masks/)") from None

    split_file = _read_split_file(root, list(images))
    chosen = sorted(images)
    items: list[Item] = []
    in_channels, dtype, first = None, None, None
    for name in chosen:
        image_uri = images[name]
        mask_uri = masks.get(name)
        if mask_uri is None:
            raise DatasetError(image_uri, f"has no mask (expected {join(masks_uri, name)}.<ext>)")
        h, w, count, dt = _header(image_uri)
        if in_channels is None:
            in_channels, dtype, first = count, dt, image_uri
        elif count != in_channels:
            raise DatasetError(image_uri, f"has {count} band(s) but {first} has {in_channels}; "
                                          "all images need the same bands")
        elif dt != dtype:
            raise DatasetError(image_uri, f"has dtype {dt} but {first} has {dtype}; "
                                          "all images need the same dtype")
        mh, mw, mcount, mdt = _header(mask_uri, mask=True)
        if (mh, mw) != (h, w):
            raise DatasetError(mask_uri, f"is {mh}×{mw} pixels but its image {image_uri} is {h}×{w}")
        if mcount != 1:
            raise DatasetError(mask_uri, f"has {mcount} bands; a mask must be one band of class ids")
        if not np.issubdtype(np.dtype(mdt), np.integer):
            raise DatasetError(mask_uri, f"holds {mdt} values; a mask must hold integer class ids")
        items.append(Item(name, image_uri, mask_uri, h, w))
    stray = sorted(set(masks) - set(images))
    if stray:
        log.warning("%s: %d mask(s) without an image are ignored (first: %s)", masks_uri, len(stray), stray[0])
    assert in_channels is not None and dtype is not None
    return Dataset(root, classes, colors, items, in_channels, dtype, None, split_file)


# --------------------------------------------------------------------------- mask scan


@dataclass
class MaskIndex:
    """What one windowed pass over the masks found.

    ``counts[i, c]`` = pixels of class ``c`` in item ``i``; ``ignored[i]`` = pixels marked 255.
    ``cells[i][c]`` = (flat cell ids, pixels of class ``c`` per cell) for the 64-px cells of
    item ``i`` that hold class ``c``; cell id = ``cy · ceil(width / cell) + cx``.
    """

    cell: int
    counts: np.ndarray
    ignored: np.ndarray
    cells: list[list[tuple[np.ndarray, np.ndarray]]]
    _cumulative: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def class_counts(self) -> np.ndarray:
        """Pixels per class over all items."""
        return self.counts.sum(axis=0)

    def cumulative(self, item: int, cls: int) -> np.ndarray:
        """Running pixel count over the cells of ``cls`` in ``item`` (for weighted picks)."""
        key = (item, cls)
        cum = self._cumulative.get(key)
        if cum is None:
            cum = np.cumsum(self.cells[item][cls][1], dtype=np.int64)
            self._cumulative[key] = cum
        return cum


def _scan_mask(item: Item, num_classes: int, cell: int, window: int,
               reader: ImageReader) -> tuple[np.ndarray, int, list[tuple[np.ndarray, np.ndarray]]]:
    k = num_classes + 1  # the last bin collects ignore pixels
    ncx = ceil_div(item.width, cell)
    counts = np.zeros(k, dtype=np.int64)
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(num_classes)]
    step = max(cell, window // cell * cell)  # windows aligned on the cell grid
    for y0 in range(0, item.height, step):
        for x0 in range(0, item.width, step):
            h, w = min(step, item.height - y0), min(step, item.width - x0)
            m = reader.read(Window(y0, x0, h, w))[0]
            lo, hi = int(m.min()), int(m.max())
            bad = (m < 0) | ((m >= num_classes) & (m != IGNORE_INDEX)) if lo < 0 or hi >= num_classes else None
            if bad is not None and bad.any():
                by, bx = (int(v[0]) for v in np.nonzero(bad))
                raise DatasetError(item.mask_uri, f"holds class id {int(m[by, bx])} (row {y0 + by}, column {x0 + bx}) "
                                                  f"but classes.json lists {num_classes} classes "
                                                  f"(valid ids 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")
            ids = m.astype(np.int64)
            ids[ids == IGNORE_INDEX] = num_classes
            # one bincount over (cell, class) pairs: cell index of each pixel within this window
            cy = (np.arange(h) // cell)[:, None]
            cx = (np.arange(w) // cell)[None, :]
            wcx = ceil_div(w, cell)
            local = (cy * wcx + cx) * k + ids
            nloc = ceil_div(h, cell) * wcx
            table = np.bincount(local.ravel(), minlength=nloc * k).reshape(nloc, k)
            counts += table.sum(axis=0)
            lcy, lcx = np.divmod(np.arange(nloc), wcx)
            global_ids = ((y0 // cell + lcy) * ncx + (x0 // cell + lcx)).astype(np.int64)
            for c in range(num_classes):
                col = table[:, c]
                nz = np.flatnonzero(col)
                if nz.size:
                    parts[c].append((global_ids[nz], col[nz].astype(np.uint16)))
    cells = []
    for c in range(num_classes):
        if parts[c]:
            ids_c = np.concatenate([p[0] for p in parts[c]])
            cnt_c = np.concatenate([p[1] for p in parts[c]])
        else:
            ids_c, cnt_c = np.zeros(0, np.int64), np.zeros(0, np.uint16)
        cells.append((ids_c, cnt_c))
    return counts[:num_classes], int(counts[num_classes]), cells


def index_masks(dataset: Dataset, *, cell: int = INDEX_CELL, window: int = SCAN_WINDOW,
                on_item: Callable[[int, int], None] | None = None) -> MaskIndex:
    """Read every mask once in ``window``² windows: class counts, id checks and the cell index.

    Raises :class:`DatasetError` naming the mask at the first class id outside ``classes.json``
    (255 = ignore is allowed). ``on_item(done, total)`` reports progress.
    """
    if cell < 1 or cell > 4096:
        raise ValueError("cell must be in 1..4096 (per-cell counts are uint16)")
    n, k = len(dataset.items), dataset.num_classes
    counts = np.zeros((n, k), dtype=np.int64)
    ignored = np.zeros(n, dtype=np.int64)
    cells: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for i, item in enumerate(dataset.items):
        reader = open_mask(item.mask_uri)
        try:
            c, ign, cl = _scan_mask(item, k, cell, window, reader)
        finally:
            reader.close()
        counts[i], ignored[i] = c, ign
        cells.append(cl)
        if on_item is not None:
            on_item(i + 1, n)
    return MaskIndex(cell, counts, ignored, cells)


def class_pixel_counts(dataset: Dataset, index: MaskIndex | None = None) -> np.ndarray:
    """Pixels per class over the dataset (int64, length = number of classes), read window by window."""
    return (index or index_masks(dataset)).class_counts()


def open_reader(uri: str) -> ImageReader:
    """A reader for a dataset file; unreadable files raise :class:`DatasetError` naming them."""
    try:
        return open_image(uri)
    except InputError as e:
        raise DatasetError(uri, e.problem) from None


def open_mask(uri: str) -> ImageReader:
    """A reader of a mask's class ids: a palette (colour-mapped) PNG/TIFF is read as its indices.

    The image readers expand a palette to RGB (what a model reads); in a mask the palette
    indices *are* the class ids and the colour table only shows them.
    """
    reader = open_reader(uri)
    if reader.info.extra.get("layout") == "palette":
        _serve_palette_indices(reader, uri)
    return reader


def _serve_palette_indices(reader: ImageReader, uri: str) -> None:
    # The readers offer no switch for this yet, so the expansion is turned off on this reader
    # (RasterioReader reads band 1 as is when it has no colour table). Replace with an option of
    # segpipe.io.readers.raster (e.g. open_image(uri, palette="index")) once it exists.
    ds = getattr(reader, "_ds", None)
    if ds is None or not hasattr(reader, "_lut") or not hasattr(reader, "_indexes"):
        reader.close()
        raise DatasetError(uri, "is a palette image whose class ids this reader cannot serve")
    reader._lut = None  # type: ignore[attr-defined]
    reader._indexes = [1]  # type: ignore[attr-defined]
    reader.info = dataclasses.replace(reader.info, count=1, dtype=str(np.dtype(ds.dtypes[0])),
                                      extra={**reader.info.extra, "layout": "palette indices"})


# --------------------------------------------------------------------------- normalisation


def default_input_scale(dtype: str) -> float:
    """What pixels are divided by first: the dtype's maximum for 8/16-bit integers, 1 otherwise."""
    dt = np.dtype(dtype)
    if dt == np.uint8:
        return 255.0
    if dt in (np.uint16, np.int16):
        return float(np.iinfo(dt).max)
    return 1.0


def band_statistics(dataset: Dataset, input_scale: float, *, window: int = 512, windows_per_image: int = 4,
                    stride: int = 2, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-band mean and std of ``pixel / input_scale`` over the images (windowed and subsampled).

    Each image contributes up to ``windows_per_image`` seeded random ``window``² windows of its
    grid, every ``stride``-th pixel of them, so the cost is bounded for any image size.
    A band with zero spread gets std 1 (it carries no information; don't blow it up).
    """
    if not dataset.items:
        raise DatasetError(dataset.root, "no images to compute band statistics from")
    rng = np.random.default_rng(seed)
    bands = dataset.in_channels
    s = np.zeros(bands, dtype=np.float64)
    ss = np.zeros(bands, dtype=np.float64)
    n = 0
    for item in dataset.items:
        grid = [(y, x) for y in range(0, item.height, window) for x in range(0, item.width, window)]
        if len(grid) > windows_per_image:
            grid = [grid[j] for j in sorted(rng.choice(len(grid), windows_per_image, replace=False))]
        reader = open_reader(item.image_uri)
        try:
            for y0, x0 in grid:
                h, w = min(window, item.height - y0), min(window, item.width - x0)
                px = reader.read(Window(y0, x0, h, w))[:, ::stride, ::stride].astype(np.float64) / input_scale
                px = px.reshape(bands, -1)
                s += px.sum(axis=1)
                ss += np.square(px).sum(axis=1)
                n += px.shape[1]
        finally:
            reader.close()
    mean = s / n
    var = np.maximum(ss / n - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0
    return [float(v) for v in mean], [float(v) for v in std]


# --------------------------------------------------------------------------- patches


class AugmentSettings(BaseModel):
    """Patch augmentations; every one keeps image and mask aligned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flips: bool = Field(True, description="Random horizontal and vertical flips.")
    rotate90: bool = Field(True, description="Random rotation by a multiple of 90°.")
    brightness: float = Field(0.1, ge=0, le=2, description="Add b ~ U(-v, v) to the normalised image (std units).")
    contrast: float = Field(0.1, ge=0, lt=1, description="Multiply the normalised image by c ~ U(1-v, 1+v).")
    scale: float = Field(
        0.1, ge=0, le=1,
        description="Read a window of side patch·f, f log-uniform in [1/(1+v), 1+v], and resize it to the "
        "patch (bilinear for the image, nearest for the mask). 0 = off.",
    )


NO_AUGMENT = AugmentSettings(flips=False, rotate90=False, brightness=0, contrast=0, scale=0)


def _resize_axis_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # pixel centres (align_corners=False): output i samples input at (i + 0.5)·n_in/n_out − 0.5
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    # nearest = the input pixel whose extent holds the sampling point: floor((i + 0.5)·n_in/n_out)
    nearest = np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
    return i0, i1, frac, nearest


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize (bands, s, s) float image bilinearly and (s, s) mask by nearest neighbour to ``size``².

    Both sample the same points (pixel centres), so image and mask stay aligned.
    """
    s = image.shape[-1]
    if s == size and image.shape[-2] == size:
        return image, mask
    y0, y1, fy, ny = _resize_axis_indices(image.shape[-2], size)
    x0, x1, fx, nx = _resize_axis_indices(image.shape[-1], size)
    rows = image[:, y0, :] * (1 - fy)[None, :, None] + image[:, y1, :] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]
    return out.astype(np.float32, copy=False), mask[ny[:, None], nx[None, :]]


class _Readers(threading.local):
    """Open readers of this thread (LRU); dataset handles are not thread-safe and not picklable."""

    def __init__(self) -> None:
        self.cache: OrderedDict[str, ImageReader] = OrderedDict()

    def get(self, uri: str, size: int = 16, mask: bool = False) -> ImageReader:
        key = ("mask:" if mask else "image:") + uri
        r = self.cache.get(key)
        if r is None:
            r = open_mask(uri) if mask else open_reader(uri)
            self.cache[key] = r
            while len(self.cache) > size:
                self.cache.popitem(last=False)[1].close()
        else:
            self.cache.move_to_end(key)
        return r


@dataclass(frozen=True)
class PatchPlan:
    """Where patch ``i`` comes from and how it is augmented (a pure function of seed, epoch, i)."""

    item: int
    window: Window  #: read window (side = patch · scale factor)
    flip_y: bool
    flip_x: bool
    rot90: int
    contrast: float
    brightness: float
    target_class: int | None  #: the class the patch was centred on (class-balanced sampling)


class PatchSampler:
    """Map-style dataset of ``patches_per_epoch`` random patches, read lazily window by window.

    ``sampler[i]`` → ``(image float32 (bands, P, P) normalised, mask int64 (P, P))``; it is a
    pure function of ``(seed, epoch, i)`` (set the epoch with :meth:`set_epoch`), so a
    ``torch.utils.data.DataLoader`` over it gives the same batches with any number of workers
    and after a resume. Positions:

    * plain: an image with probability ∝ its area, then a window uniformly inside it;
    * class-balanced: a class ``c`` with probability ∝ freq_c^(−power) over the classes present
      (power 0 = uniform over classes), an image ∝ its pixels of ``c``, a pixel of ``c``
      uniformly (via the cell index: a cell ∝ its count, then the r-th such pixel in the cell,
      read from a one-cell window), and the patch centred on it ± P/4.

    Windows past the image edge are filled by reflection, in the image and the mask alike.
    """

    def __init__(self, dataset: Dataset, *, patch_size: int, patches_per_epoch: int,
                 mean: Sequence[float], std: Sequence[float], input_scale: float,
                 augment: AugmentSettings = NO_AUGMENT, index: MaskIndex | None = None,
                 class_balanced: bool = False, balance_power: float = 0.0, seed: int = 0) -> None:
        if not dataset.items:
            raise DatasetError(dataset.root, "no images to sample patches from")
        if class_balanced and index is None:
            index = index_masks(dataset)
        self.dataset = dataset
        self.patch_size = patch_size
        self.patches_per_epoch = patches_per_epoch
        self.scale = np.float32(1.0 / input_scale)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.augment = augment
        self.index = index
        self.class_balanced = class_balanced
        self.seed = seed
        self.epoch = 0
        areas = np.array([it.height * it.width for it in dataset.items], dtype=np.float64)
        self._item_p = areas / areas.sum()
        self._class_p: np.ndarray | None = None
        if class_balanced:
            assert index is not None
            totals = index.class_counts().astype(np.float64)
            present = totals > 0
            if not present.any():
                raise DatasetError(dataset.root, "the masks hold no labelled pixels (all 255 = ignore)")
            freq = totals / totals.sum()
            w = np.zeros_like(freq)
            w[present] = freq[present] ** (-balance_power)
            self._class_p = w / w.sum()
        self._readers = _Readers()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = None  # open dataset handles stay in their process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._readers = _Readers()

    def set_epoch(self, epoch: int) -> None:
        """Patches of another epoch (0-based)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.patches_per_epoch

    def class_probabilities(self) -> np.ndarray | None:
        """Probability of picking each class (class-balanced sampling), else None."""
        return None if self._class_p is None else self._class_p.copy()

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def plan(self, i: int) -> PatchPlan:
        """The window and augmentation of patch ``i`` of the current epoch (no pixels read, except
        one index cell when class-balanced)."""
        if not 0 <= i < self.patches_per_epoch:
            raise IndexError(i)
        rng = self._rng(i)
        a = self.augment
        p = self.patch_size
        f = float(np.exp(rng.uniform(-np.log1p(a.scale), np.log1p(a.scale)))) if a.scale > 0 else 1.0
        side = max(8, int(round(p * f)))
        target = None
        if self._class_p is not None:
            assert self.index is not None
            target = int(rng.choice(len(self._class_p), p=self._class_p))
            per_item = self.index.counts[:, target].astype(np.float64)
            item = int(rng.choice(len(per_item), p=per_item / per_item.sum()))
            py, px = self._pixel_of_class(item, target, rng)
            jitter = rng.integers(-(side // 4), side // 4 + 1, size=2)
            y0, x0 = py + int(jitter[0]) - side // 2, px + int(jitter[1]) - side // 2
        else:
            item = int(rng.choice(len(self._item_p), p=self._item_p))
            it = self.dataset.items[item]
            y0 = int(rng.integers(0, max(it.height - side, 0) + 1))
            x0 = int(rng.integers(0, max(it.width - side, 0) + 1))
        flips = rng.random(2) < 0.5 if a.flips else (False, False)
        rot = int(rng.integers(0, 4)) if a.rotate90 else 0
        contrast = float(rng.uniform(1 - a.contrast, 1 + a.contrast)) if a.contrast > 0 else 1.0
        brightness = float(rng.uniform(-a.brightness, a.brightness)) if a.brightness > 0 else 0.0
        return PatchPlan(item, Window(int(y0), int(x0), side, side), bool(flips[0]), bool(flips[1]), rot,
                         contrast, brightness, target)

    def _pixel_of_class(self, item: int, cls: int, rng: np.random.Generator) -> tuple[int, int]:
        assert self.index is not None
        cell = self.index.cell
        it = self.dataset.items[item]
        ids, _ = self.index.cells[item][cls]
        cum = self.index.cumulative(item, cls)
        r = int(rng.integers(0, int(cum[-1])))
        j = int(np.searchsorted(cum, r, side="right"))
        rank = r - (int(cum[j - 1]) if j else 0)
        cy, cx = divmod(int(ids[j]), ceil_div(it.width, cell))
        y0, x0 = cy * cell, cx * cell
        win = Window(y0, x0, min(cell, it.height - y0), min(cell, it.width - x0))
        m = self._readers.get(it.mask_uri, mask=True).read(win)[0]
        ys, xs = np.nonzero(m == cls)
        if rank >= ys.size:  # the mask changed since it was indexed
            raise DatasetError(it.mask_uri, "changed since its class index was built; index the dataset again")
        return y0 + int(ys[rank]), x0 + int(xs[rank])

    def read(self, plan: PatchPlan) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of a plan: (normalised float32 image, int64 mask), augmented and resized to the patch."""
        it = self.dataset.items[plan.item]
        image = self._readers.get(it.image_uri).read(plan.window)
        mask = self._readers.get(it.mask_uri, mask=True).read(plan.window)[0]
        x = (image.astype(np.float32) * self.scale - self.mean) / self.std
        x, mask = resize_pair(x, mask, self.patch_size)
        if plan.flip_y:
            x, mask = x[:, ::-1], mask[::-1]
        if plan.flip_x:
            x, mask = x[:, :, ::-1], mask[:, ::-1]
        if plan.rot90:
            x, mask = np.rot90(x, plan.rot90, axes=(1, 2)), np.rot90(mask, plan.rot90)
        if plan.contrast != 1.0 or plan.brightness != 0.0:
            x = x * np.float32(plan.contrast) + np.float32(plan.brightness)
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(mask, dtype=np.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i`` of the current epoch, or ``(epoch, i)``: the key then carries the epoch, so
        persistent DataLoader workers (which hold a copy of the sampler) need no epoch update."""
        if isinstance(key, tuple):
            epoch, i = key
            if epoch != self.epoch:
                self.epoch = epoch
        else:
            i = key
        return self.read(self.plan(i))
