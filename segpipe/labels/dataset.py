"""Training data layout: the folders, ``classes.json``, ``split.json``, their checks, and readers.

Layout (local folder or any fsspec URL)::

    DATA/images/<name>.<ext>      any image the readers open (GeoTIFF, PNG, JPEG, …)
    DATA/masks/<name>.<ext>       one band of class ids, same height × width; 255 = ignore
    DATA/labels/<name>.<ext>      or vector labels (GeoPackage, GeoJSON, QuPath, COCO, …; see
                                  segpipe.labels.vectors); a mask beside them wins, with a note
    DATA/regions/<name>.<ext>     optional polygons: the exhaustively labelled areas (outside: 255)
    DATA/classes.json             {"classes": [{"name": "background", "color": "#000000"}, …]}
                                  (colours optional: missing ones come from segpipe.core.classes;
                                  aliases, ignore, unlabelled, priority: segpipe.labels.classes)
    DATA/split.json               optional {"train": [<name>, …], "val": [<name>, …]}

``<name>`` is the path relative to ``images/`` without its extension (``tiles/a`` for
``images/tiles/a.tif``); a mask may have another extension than its image. The class id
is the index in ``classes.json``. Without ``split.json`` the images are split by a seeded
shuffle: about 20 % validation, at least one validation image when there are two or more.

This module owns :class:`Dataset` / :class:`Item`, :func:`load_dataset` and
:func:`split_dataset` (headers, classes and split checked, naming the offending file), and the
readers of dataset files (:func:`open_reader`, :func:`open_mask`: palette masks read as their
indices; :func:`segpipe.labels.truth.open_truth`: any item's class ids, vector labels and
regions included). Nothing here reads a whole image or mask; the rest of the training data lives in:

* :mod:`segpipe.train.index` — one windowed pass over the masks: class ids checked, pixels
  per class, and the 64-px cell index that class-balanced sampling uses;
* :mod:`segpipe.train.normalization` — input scale and per-band mean/std of the images;
* :mod:`segpipe.train.augment` — augmentation settings and the aligned image/mask resize;
* :mod:`segpipe.train.sampler` — :class:`~segpipe.train.sampler.PatchSampler`, lazy random
  (optionally class-balanced) patches, reproducible per ``(seed, epoch, index)``.

Why this module is long: the layout's checks (headers, ``split.json``, the mask beside its image) and
the readers of an item on its pixel grid (:func:`at_resolution`, :func:`open_item_image`,
:func:`open_mask_on`) are the two halves of one question — which pixels of which file an item is —
and split apart they would each need the other's private details.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from segpipe.core.errors import DatasetError, InputError
from segpipe.core.grid import PixelGrid, same_pixel_size
from segpipe.io.readers import ImageInfo, ImageReader, open_image
from segpipe.io.readers.registry import choose_grid
from segpipe.io.readers.resample import on_grid
from segpipe.io.storage import filesystem, join, list_images, strip_file_scheme

# IGNORE_INDEX (255) is re-exported: the mask value that is not trained on nor scored; the same
# value as the nodata label of a ≤ 255-class output (segpipe.core.classes.nodata_label), so an
# output used as a mask leaves its no-data pixels out too
from segpipe.labels.classes import IGNORE_INDEX as IGNORE_INDEX
from segpipe.labels.classes import LabelClasses, parse_label_classes
from segpipe.labels.vectors import VECTOR_EXTENSIONS

log = logging.getLogger("segpipe.labels.dataset")

#: fraction of images that go to validation when there is no split.json
VAL_FRACTION = 0.2


class Item(NamedTuple):
    """One training image and its ground truth: a raster mask, vector labels and/or regions.

    ``grid`` is the pixel grid the image and its truth are read on (:mod:`segpipe.core.grid`): the
    image's own pixels when loaded, the dataset's resolution after :func:`at_resolution`; ``height``
    and ``width`` are the grid's.
    """

    name: str  #: path relative to images/ without extension
    image_uri: str
    mask_uri: str | None  #: DATA/masks/<name>.<ext>, or None (vector labels or regions only)
    height: int
    width: int
    labels_uri: str | None = None  #: DATA/labels/<name>.<ext> (or <stem>.<ext> for a.ome.tif); unused with a mask
    regions_uri: str | None = None  #: DATA/regions/<name>.<ext>: the exhaustively labelled areas
    grid: PixelGrid | None = None  #: None only for items made by hand: the image's own pixels

    def on(self, grid: PixelGrid) -> Item:
        """This item read on ``grid`` (an output's, the dataset's resolution)."""
        return self._replace(grid=grid, height=grid.height, width=grid.width)

    @property
    def truth_uri(self) -> str:
        """The file that holds this image's class ids (named in errors): mask, labels, else regions."""
        uri = self.mask_uri or self.labels_uri or self.regions_uri
        assert uri is not None
        return uri


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
    #: classes.json's label rules (aliases, ignore, unlabelled, …); None = read from root when needed
    label_classes: LabelClasses | None = field(default=None, repr=False)

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


def _read_json(fs, path: str, uri: str) -> object:
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetError(uri, "does not exist") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(uri, f"is not valid JSON ({e})") from None


def read_label_classes(root: str) -> LabelClasses:
    """The class table of ``ROOT/classes.json`` with its label rules (aliases, ignore,
    unlabelled, priority, regions, burning): see :mod:`segpipe.labels.classes`."""
    uri = join(strip_file_scheme(root), "classes.json")
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DatasetError(uri, "missing (expected {\"classes\": [{\"name\": ..., \"color\": \"#rrggbb\"}, ...]})")
    return parse_label_classes(_read_json(fs, path, uri), uri)


def read_classes(root: str) -> tuple[list[str], list[str]]:
    """Class names and colours from ``ROOT/classes.json``; missing colours come from
    :func:`segpipe.core.classes.class_colors`, so every output shows the same colours."""
    lc = read_label_classes(root)
    return list(lc.names), list(lc.colors)


def _read_split_file(root: str, names: Sequence[str]) -> dict[str, list[str]] | None:
    uri = join(strip_file_scheme(root), "split.json")
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return None
    data = _read_json(fs, path, uri)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise DatasetError(uri, 'must hold a JSON object {"train": [names], "val": [names]}')
    spelling = split_spellings(names)
    names_set = set(names)
    out: dict[str, list[str]] = {}
    for key, value in data.items():
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise DatasetError(uri, f"{key!r} must be a list of image names (paths under images/ without extension)")
        out[key] = [_split_name(n, spelling) for n in value]
    if "train" not in out:
        raise DatasetError(uri, 'has no "train" list')
    for key, value in out.items():
        missing = [n for n in value if n not in names_set]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            listed = sorted(names)
            known = ", ".join(listed[:10]) + (f" (and {len(listed) - 10} more)" if len(listed) > 10 else "")
            raise DatasetError(uri, f"{key!r} names image(s) not found under images/: "
                                    f"{', '.join(missing[:3])}{more}; known names: {known}")
    both = sorted(set(out["train"]) & set(out.get("val", [])))
    if both:
        raise DatasetError(uri, f"image {both[0]!r} is in both train and val")
    return out


def split_spellings(names: Sequence[str]) -> dict[str, str]:
    """Every spelling ``split.json`` may use for an image → its name: the name (``tiles/a``, ``a.ome`` for
    ``images/a.ome.tif``), the name with the file's extension (``a.tif``, ``a.ome.tif``), and a double
    extension's stem (``a`` for ``a.ome.tif``) when no other image has it."""
    out = {n: n for n in names}
    extra: dict[str, set[str]] = {}
    for n in names:
        stem, ext = posixpath.splitext(n)
        if ext and stem:
            extra.setdefault(stem, set()).add(n)
    for stem, found in extra.items():
        if stem not in out and len(found) == 1:
            out[stem] = next(iter(found))
    return out


def _split_name(name: str, spelling: dict[str, str]) -> str:
    """``name`` as written in split.json → the image's name (a trailing file extension is dropped)."""
    if name in spelling:
        return spelling[name]
    stem = posixpath.splitext(name)[0]
    return spelling.get(stem, name)


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


def read_header(uri: str, mask: bool = False) -> ImageInfo:
    reader = open_mask(uri) if mask else open_reader(uri)
    try:
        return reader.info
    finally:
        reader.close()


def load_dataset(root: str, split: str | None = None, seed: int = 0) -> Dataset:
    """Read and check the layout under ``root``; ``split`` = None (all images), "train" or "val".

    Checks every image's and mask's header (sizes, band counts, dtypes), ``classes.json`` and
    ``split.json``. Class ids inside the masks are checked by
    :func:`segpipe.train.index.index_masks` (one windowed pass), not here, so loading stays cheap.
    ``seed`` decides the default split (no split.json).
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
    return dataclasses.replace(dataset, items=items, split=split)


def _list_by_stem(folder_uri: str, extensions: tuple[str, ...] | None = None) -> dict[str, str]:
    """Files under an optional folder by name (path without extension); {} when the folder is absent."""
    fs, path = filesystem(folder_uri)
    if not fs.exists(path):
        return {}
    found = list_images(folder_uri) if extensions is None else list_images(folder_uri, extensions)
    return _by_stem(found, folder_uri)


def _to_images(found: dict[str, str], images: dict[str, str], spelling: dict[str, str]) -> dict[str, str]:
    """Mask or label files by the name of the image they belong to: ``labels/a.gpkg`` belongs to
    ``images/a.ome.tif`` (name ``a.ome``) when no other image is spelled ``a``, as in split.json
    (:func:`split_spellings`); two files for one image are refused, naming both."""
    out: dict[str, str] = {}
    for name in sorted(found, key=lambda n: n not in images):  # exact names first
        image = name if name in images else spelling.get(name, name)
        if image in out:
            raise DatasetError(found[name], f"labels the same image as {posixpath.basename(out[image])} "
                                            f"({posixpath.basename(images[image])}); keep one of them")
        out[image] = found[name]
    return out


def _load_all(root: str) -> Dataset:
    root = strip_file_scheme(root).rstrip("/") or "/"
    images_uri, masks_uri = join(root, "images"), join(root, "masks")
    labels_uri, regions_uri = join(root, "labels"), join(root, "regions")
    label_classes = read_label_classes(root)
    try:
        images = _by_stem(list_images(images_uri), images_uri)
    except InputError:
        raise DatasetError(images_uri, "does not exist (expected DATA/images/ and DATA/masks/ or DATA/labels/)") from None
    if not images:
        raise DatasetError(images_uri, "holds no images: the dataset is empty")
    spelling = split_spellings(list(images))
    masks = _to_images(_list_by_stem(masks_uri), images, spelling)
    labels = _to_images(_list_by_stem(labels_uri, VECTOR_EXTENSIONS), images, spelling)
    regions = _to_images(_list_by_stem(regions_uri, VECTOR_EXTENSIONS), images, spelling)

    split_file = _read_split_file(root, list(images))
    items: list[Item] = []
    in_channels, dtype, first = None, None, None
    both: list[str] = []
    for name in sorted(images):
        image_uri = images[name]
        mask_uri, label_uri, region_uri = masks.get(name), labels.get(name), regions.get(name)
        if mask_uri is None and label_uri is None and region_uri is None:
            raise DatasetError(image_uri, f"has no mask (expected {join(masks_uri, name)}.<ext>) "
                                          f"nor labels ({join(labels_uri, name)}.<ext>)")
        if mask_uri is not None and label_uri is not None:
            both.append(name)
            label_uri = None  # the mask wins
        info = read_header(image_uri)
        h, w, count, dt = info.height, info.width, info.count, info.dtype
        if in_channels is None:
            in_channels, dtype, first = count, dt, image_uri
        elif count != in_channels:
            raise DatasetError(image_uri, f"has {count} band(s) but {first} has {in_channels}; "
                                          "all images need the same bands")
        elif dt != dtype:
            raise DatasetError(image_uri, f"has dtype {dt} but {first} has {dtype}; "
                                          "all images need the same dtype")
        if mask_uri is not None:
            _check_mask(mask_uri, image_uri, h, w)
        items.append(Item(name, image_uri, mask_uri, h, w, label_uri, region_uri, info.grid))
    if both:
        log.warning("%s: %d image(s) have both a mask and vector labels; the mask is used (first: %s)",
                    root, len(both), both[0])
    for what, found, uri in (("mask", masks, masks_uri), ("label file", labels, labels_uri),
                             ("region file", regions, regions_uri)):
        stray = sorted(set(found) - set(images))
        if stray:
            log.warning("%s: %d %s(s) without an image are ignored (first: %s)", uri, len(stray), what, stray[0])
    assert in_channels is not None and dtype is not None
    return Dataset(root, list(label_classes.names), list(label_classes.colors), items, in_channels, dtype, None,
                   split_file, label_classes)


def _check_mask(mask_uri: str, image_uri: str, h: int, w: int) -> None:
    m = read_header(mask_uri, mask=True)
    mh, mw, mcount, mdt = m.height, m.width, m.count, m.dtype
    if (mh, mw) != (h, w):
        raise DatasetError(mask_uri, f"is {mh}×{mw} pixels but its image {image_uri} is {h}×{w}")
    if mcount != 1:
        raise DatasetError(mask_uri, f"has {mcount} bands; a mask must be one band of class ids")
    if not np.issubdtype(np.dtype(mdt), np.integer):
        raise DatasetError(mask_uri, f"holds {mdt} values; a mask must hold integer class ids")


# --------------------------------------------------------------------------- readers


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
    reader._lut = None
    reader._indexes = [1]
    reader.info = dataclasses.replace(reader.info, count=1, dtype=str(np.dtype(ds.dtypes[0])),
                                      extra={**reader.info.extra, "layout": "palette indices"})


def open_item_image(item: Item) -> ImageReader:
    """The image of ``item`` on its pixel grid (the dataset's resolution: nearest finer level, area-averaged)."""
    try:
        return open_image(item.image_uri, grid=item.grid)
    except InputError as e:
        raise DatasetError(item.image_uri, e.problem) from None


def open_mask_on(uri: str, grid: PixelGrid | None) -> ImageReader:
    """A mask (:func:`open_mask`) on ``grid``: the class id under each grid pixel's centre (never averaged)."""
    reader = open_mask(uri)
    if grid is None:
        return reader
    try:
        return on_grid(reader, grid, labels=True)
    except ValueError as e:
        raise DatasetError(uri, f"cannot be read on its image's pixel grid ({e})") from None


def at_resolution(dataset: Dataset, *, mpp: float | None = None, gsd: float | None = None,
                  strict: bool = True) -> Dataset:
    """``dataset`` read at one pixel size: ``mpp`` (slides: microns per pixel) and/or ``gsd`` (georeferenced
    rasters: CRS units per pixel). Each item gets its pixel grid at that size
    (:func:`segpipe.io.readers.registry.choose_grid`; an image at the same pixel size keeps its own), read by
    :func:`open_item_image` and :func:`segpipe.labels.truth.open_truth`.

    ``strict`` (a resolution the user chose): an image without that kind of pixel size, or coarser than
    asked, is refused (training on upsampled pixels would teach detail that is not there). Otherwise (the
    dataset's own median, recorded in the model): such images keep their pixels or are upsampled, and one
    warning says how many images are resampled, because the model then sees them as ``segment`` will.
    """
    if mpp is None and gsd is None:
        raise DatasetError(dataset.root, "give one resolution to train at: mpp (slides) or gsd (rasters)")
    items, resampled, upsampled = [], [], []
    for item in dataset.items:
        reader = open_reader(item.image_uri)  # the header: pixel size and pyramid levels
        try:
            info = reader.info
        finally:
            reader.close()
        native = info.grid
        # slides by their microns per pixel, georeferenced rasters by their ground sample distance
        use_mpp = mpp is not None and (native.mpp is not None or gsd is None)
        want = mpp if use_mpp else gsd
        have = native.mpp if use_mpp else native.pixel_size
        unit = "µm per pixel" if use_mpp else "CRS units per pixel"
        assert want is not None
        if have is None:
            if strict:
                what = "records no microns per pixel" if use_mpp else "has no georeference"
                raise DatasetError(item.image_uri, f"{what}, so it cannot be trained on at {want:g} {unit}")
            items.append(item.on(native))
            continue
        if have > want and not same_pixel_size(have, want):
            if strict:
                raise DatasetError(item.image_uri, f"has {have:g} {unit}, coarser than the {want:g} asked to "
                                                   "train at")
            upsampled.append(item.image_uri)
        grid = choose_grid(info, mpp=want) if use_mpp else choose_grid(info, gsd=want)
        if not grid.is_native:
            resampled.append(item.image_uri)
        items.append(item.on(grid))
    if resampled:
        log.warning("%s: %d of %d image(s) are read resampled to the dataset's pixel size%s (first: %s)%s",
                    dataset.root, len(resampled), len(items),
                    "".join(f" {v:g} {k}" for k, v in (("µm", mpp), ("CRS units", gsd)) if v is not None),
                    resampled[0], f"; {len(upsampled)} of them coarser, so upsampled" if upsampled else "")
    return dataclasses.replace(dataset, items=items)
