"""The ground truth of a dataset image as one reader of class ids, whatever was drawn.

:func:`open_truth` gives, for an :class:`~segpipe.labels.dataset.Item`, an
:class:`~segpipe.io.readers.base.ImageReader` of class ids (one uint8 band, 255 = ignore) with
its image's size and georeference, so the mask index, the patch sampler, validation and
evaluation read vector labels exactly as they read raster masks:

* a raster mask → the mask reader (palette indices as class ids);
* vector labels (``DATA/labels/<name>.<ext>``) → :class:`VectorLabelReader`, which burns the
  features of each window (:mod:`segpipe.labels.burn`) through an STRtree: no whole-image array
  is ever made, at any image size;
* labelled regions (``DATA/regions/<name>.<ext>``, a ``regions`` GeoPackage layer, or features
  of a ``region_classes`` class) → pixels outside every region read 255, for vector labels and
  raster masks alike (:class:`RegionMaskedReader`); inside a region, pixels no feature covers
  read ``unlabelled``.

Without regions, ``classes.json``'s ``unlabelled`` decides what uncovered pixels are; vector
labels without it are an error (a dataset never leaves that to a guess). Labels that say nothing
(every feature outside the image, no feature and no regions, regions all outside) are errors too
(:func:`segpipe.labels.checks.check_says_something`).

**Compiled once.** Vector truth is read, reprojected, repaired and burned once per file version,
pixel grid and rules (:func:`segpipe.labels.compiled.compiled_labels`): the result is a tiled class-id raster in the label
cache (:mod:`segpipe.io.labelcache`), which every later reader — in any process — opens like a mask.
Before compiling, the prepared features (repaired, in pixels, indexed) are kept per process
(:func:`prepare_labels`), and their counts of repaired, dropped and outside features are reported
once, when prepared: a warning when any is non-zero.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window, gather, source_indices
from segpipe.core.grid import PixelGrid
from segpipe.io.readers import ImageInfo, ImageReader
from segpipe.labels.burn import BurnStats, LabelShapes, burn_window, cover_window, prepare_shapes
from segpipe.labels.checks import check_says_something
from segpipe.labels.classes import IGNORE_INDEX, LabelClasses
from segpipe.labels.compiled import compiled_labels, file_key
from segpipe.labels.dataset import Dataset, Item, open_mask_on, open_reader, read_label_classes
from segpipe.labels.vectors import VectorFeatures, read_label_file, read_vector_file, to_pixels

log = logging.getLogger("segpipe.labels.truth")

#: prepared label files kept per process (a few images' features, not pixels)
CACHE_SIZE = 8


@dataclass(frozen=True)
class PreparedLabels:
    """One image's features in its pixels, ready to burn window by window."""

    labels: LabelShapes
    regions: LabelShapes | None  #: None = no labelled regions: the whole image counts
    unlabelled: int  #: value of pixels no label covers (inside the regions): a class id or 255
    all_touched: bool

    @property
    def stats(self) -> BurnStats:
        return self.labels.stats + (self.regions.stats if self.regions is not None else BurnStats())


def _window_of(reader_read, window: Window, height: int, width: int) -> np.ndarray:
    """Serve ``window`` from ``reader_read(inner_window) -> (h, w)``: reflection past the image."""
    if window.inside(height, width):
        return reader_read(window)
    ys, xs = source_indices(window, height, width)
    y0, x0 = int(ys.min()), int(xs.min())
    inner = Window(y0, x0, int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1)
    return gather(reader_read(inner), ys - y0, xs - x0)


class VectorLabelReader:
    """An :class:`~segpipe.io.readers.base.ImageReader` of class ids burned from vector labels.

    ``info`` is the image's size and georeference with one uint8 band; ``read(window)`` burns
    only the features that reach the window (STRtree), so memory follows the window, not the
    image. Windows past the image are filled by reflection, as every reader does.
    """

    def __init__(self, prepared: PreparedLabels, image: ImageInfo, uri: str) -> None:
        self.prepared = prepared
        self.info = ImageInfo(uri=uri, height=image.height, width=image.width, count=1, dtype="uint8",
                              crs_wkt=image.crs_wkt, transform=image.transform, mpp=image.mpp,
                              driver="vector-labels", extra={"image": image.uri}, on_grid=image.grid)

    def _read_inside(self, window: Window) -> np.ndarray:
        p = self.prepared
        out = burn_window(p.labels, window, fill=p.unlabelled, all_touched=p.all_touched)
        if p.regions is not None:
            out[~cover_window(p.regions, window, all_touched=p.all_touched)] = IGNORE_INDEX
        return out

    def read(self, window: Window) -> np.ndarray:
        """Class ids of ``window`` as (1, h, w) uint8; 255 = ignore."""
        return _window_of(self._read_inside, window, self.info.height, self.info.width)[None]

    def close(self) -> None:
        pass

    def __enter__(self) -> VectorLabelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegionMaskedReader:
    """A raster mask read only inside the labelled regions: 255 outside every region."""

    def __init__(self, mask: ImageReader, regions: LabelShapes, all_touched: bool = False) -> None:
        self.mask, self.regions, self.all_touched = mask, regions, all_touched
        self.info = mask.info

    def _read_inside(self, window: Window) -> np.ndarray:
        m = self.mask.read(window)[0]
        inside = cover_window(self.regions, window, all_touched=self.all_touched)
        return np.where(inside, m, np.asarray(IGNORE_INDEX, dtype=m.dtype))

    def read(self, window: Window) -> np.ndarray:
        return _window_of(self._read_inside, window, self.info.height, self.info.width)[None]

    def close(self) -> None:
        self.mask.close()

    def __enter__(self) -> RegionMaskedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- preparing features


def _resolve(features: VectorFeatures, classes: LabelClasses) -> tuple[list[int], list[int], np.ndarray]:
    """(values, ranks, region flags) of a file's features."""
    values, ranks = [], []
    region = np.zeros(len(features), dtype=bool)
    ids = features.class_ids
    for i, c in enumerate(features.classes):
        if classes.is_region(c):
            region[i] = True
            values.append(0)
            ranks.append(0)
            continue
        where = functools.partial(features.where, i)
        v = classes.resolve(c, uri=features.uri, feature=features.idents[i], where=where)
        if ids is not None and ids[i] is not None and ids[i] is not c:  # (c is the id where class_name was empty)
            _check_class_id(features, i, v, classes)
        values.append(v)
        ranks.append(classes.rank(v))
    return values, ranks, region


def _check_class_id(features: VectorFeatures, i: int, value: int, classes: LabelClasses) -> None:
    """segpipe's export writes ``class_id`` and ``class_name``; an annotator who changed one of them
    and not the other left two answers, and guessing which one was meant would train one of them wrong."""
    cid = features.class_ids[i] if features.class_ids is not None else None
    if isinstance(cid, float) and cid.is_integer():
        cid = int(cid)
    if cid == value:
        return

    def named(v: object) -> str:
        if v == IGNORE_INDEX:
            return "ignore"
        return repr(classes.names[v]) if isinstance(v, int) and 0 <= v < classes.num_classes else "no class"

    name = features.classes[i]
    also = "" if named(value) == repr(name) else f" ({named(value)})"
    raise DatasetError(features.uri, f"{features.idents[i]} {features.where(i)}: class_name {name!r}{also} "
                                     f"and class_id {cid!r} ({named(cid)} in {classes.source}) "
                                     "disagree; correct the one that is wrong, or delete the class_id field to "
                                     "go by class_name")


def _shapes(features: VectorFeatures, pixels: np.ndarray, keep: np.ndarray, values: list[int], ranks: list[int],
            image: ImageInfo, classes: LabelClasses) -> LabelShapes:
    idx = np.flatnonzero(keep)
    return prepare_shapes(pixels[idx], [values[i] for i in idx], [ranks[i] for i in idx], height=image.height,
                          width=image.width, buffer=classes.burn.buffer, source=features.uri,
                          idents=[features.idents[i] for i in idx])


def _region_shapes(features: VectorFeatures, image: ImageInfo, classes: LabelClasses) -> LabelShapes:
    n = len(features)
    return _shapes(features, to_pixels(features, image), np.ones(n, dtype=bool), [1] * n, [0] * n, image, classes)


def build_labels(labels_uri: str | None, regions_uri: str | None, image: ImageInfo, classes: LabelClasses, *,
                 image_name: str | None = None, layer: str | None = None) -> PreparedLabels:
    """Read, resolve and prepare an image's label and region files (no cache; see :func:`prepare_labels`).

    Regions come from ``regions_uri``, the ``regions`` layer of a GeoPackage label file, and the
    label features whose class is in ``region_classes``; all of them together are the labelled area.

    Labels that say nothing are refused (:func:`segpipe.labels.checks.check_says_something`): a label file whose features
    all miss the image, one without any feature unless regions say where the image is labelled
    (then it means "all unlabelled" there), and regions that all miss the image. Counts of repaired,
    dropped and outside features are reported once per file, as a warning when any is non-zero.
    """
    region_parts: list[LabelShapes] = []
    region_sources: list[VectorFeatures] = []
    labels: LabelShapes | None = None
    feats: VectorFeatures | None = None
    if labels_uri is not None:
        feats, layer_regions = read_label_file(labels_uri, layer=layer, image_name=image_name)
        values, ranks, is_region = _resolve(feats, classes)
        pixels = to_pixels(feats, image)
        labels = _shapes(feats, pixels, ~is_region, values, ranks, image, classes)
        if is_region.any():
            region_parts.append(_shapes(feats, pixels, is_region, [1] * len(feats), [0] * len(feats), image, classes))
            region_sources.append(feats)
        if layer_regions is not None:
            region_parts.append(_region_shapes(layer_regions, image, classes))
            region_sources.append(layer_regions)
    labels_file_parts = [labels] + region_parts if labels is not None else []
    if regions_uri is not None:
        regions_feats = read_vector_file(regions_uri, image_name=image_name)
        region_parts.append(_region_shapes(regions_feats, image, classes))
        region_sources.append(regions_feats)
    if labels is None:
        labels = prepare_shapes([], [], [], height=image.height, width=image.width)
    regions = _merge(region_parts) if region_parts else None
    source = labels_uri or regions_uri or image.uri
    if classes.unlabelled is None:
        where = "inside its labelled regions" if regions is not None else "(it has no labelled regions)"
        raise DatasetError(source, f"{classes.source} does not say what the pixels no label covers are {where}: "
                                   'add "unlabelled": "ignore" or "unlabelled": "<class name>"'
                                   + ("" if regions is not None else ", or draw regions (DATA/regions/<name>)"))
    check_says_something(feats, labels, region_sources, regions, image, image_name=image_name)
    if labels_uri is not None:
        _report(labels_uri, labels_file_parts, regions)
    if regions_uri is not None:
        _report(regions_uri, region_parts[-1:], None)
    return PreparedLabels(labels, regions, classes.unlabelled, classes.burn.all_touched)


#: the report lines already given in this process: a file prepared again (another image size, the
#: cache's bound, DataLoader workers forked after the index) is not reported again
_reported: set[str] = set()


def _report(uri: str, parts: list[LabelShapes], regions: LabelShapes | None) -> None:
    """One line per prepared file: a warning when features were repaired, dropped or left outside
    (each of those changes what is trained on), else a note in the log file; once per process."""
    stats = BurnStats()
    for p in parts:
        stats = stats + p.stats
    line = f"{uri}: {stats.describe()}" + (f"; {len(regions)} labelled region(s)" if regions is not None else "")
    with _cache_lock:
        seen = line in _reported
        _reported.add(line)
    level = logging.WARNING if stats.repaired or stats.dropped or stats.outside else logging.INFO
    log.log(logging.DEBUG if seen else level, "%s", line)


def _merge(parts: list[LabelShapes]) -> LabelShapes:
    if len(parts) == 1:
        return parts[0]
    from shapely import STRtree

    geoms = np.concatenate([p.geoms for p in parts])
    stats = parts[0].stats
    for p in parts[1:]:
        stats = stats + p.stats
    return LabelShapes(geoms, np.concatenate([p.values for p in parts]), stats, STRtree(geoms))


_cache: OrderedDict[tuple, PreparedLabels] = OrderedDict()
_cache_lock = threading.Lock()


def prepare_labels(labels_uri: str | None, regions_uri: str | None, image: ImageInfo, classes: LabelClasses, *,
                   image_name: str | None = None) -> PreparedLabels:
    """:func:`build_labels` through a small per-process cache (keyed by the files' size and time,
    the image's geometry and the rules); logs the feature counts when a file is first prepared."""
    key = (file_key(labels_uri), file_key(regions_uri), image.grid, classes.fingerprint, image_name)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    prepared = build_labels(labels_uri, regions_uri, image, classes, image_name=image_name)  # reports its counts
    with _cache_lock:
        _cache[key] = prepared
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return prepared


# --------------------------------------------------------------------------- dataset items


def _label_classes(dataset: Dataset) -> LabelClasses:
    return dataset.label_classes if dataset.label_classes is not None else read_label_classes(dataset.root)


def open_truth(dataset: Dataset, item: Item, grid: PixelGrid | None = None) -> ImageReader:
    """The class ids of ``item`` as a reader (raster mask, vector labels, regions: see the module docstring) on
    ``grid`` — by default the item's own (the dataset's resolution); an output's grid to score that output.

    Vector labels and regions are burned on the grid itself (pixel centres of the grid, as
    ``gdal_rasterize`` would at that resolution) **once** per file version, grid and rules: compiled into
    the label cache (:func:`segpipe.labels.compiled.compiled_labels`) and read from there by the index, the sampler, validation,
    evaluation and corrections alike. A raster mask gives the class id under each grid pixel's centre
    (never averaged).
    """
    grid = grid if grid is not None else item.grid
    if grid is None:
        grid = _image_info(item.image_uri).grid
    if item.labels_uri is None and item.regions_uri is None:
        assert item.mask_uri is not None
        return open_mask_on(item.mask_uri, grid)
    classes = _label_classes(dataset)
    return compiled_labels(item, grid, classes.fingerprint, lambda: _burned_truth(item, grid, classes))


def _burned_truth(item: Item, grid: PixelGrid, classes: LabelClasses) -> ImageReader:
    """The vector truth of ``item`` burned window by window on ``grid`` (what the label cache stores)."""
    info = _grid_image(item.image_uri, grid)
    if item.mask_uri is not None:
        assert item.regions_uri is not None
        regions = prepare_labels(None, item.regions_uri, info, classes.with_unlabelled(IGNORE_INDEX),
                                 image_name=item.name).regions
        assert regions is not None
        return RegionMaskedReader(open_mask_on(item.mask_uri, grid), regions, classes.burn.all_touched)
    prepared = prepare_labels(item.labels_uri, item.regions_uri, info, classes, image_name=item.name)
    return VectorLabelReader(prepared, info, item.truth_uri)


def _image_info(uri: str) -> ImageInfo:
    image = open_reader(uri)
    try:
        return image.info
    finally:
        image.close()


def _grid_image(image_uri: str, grid: PixelGrid) -> ImageInfo:
    """The header labels are burned against: the image's URI on ``grid`` (its size, georeference, scale)."""
    return ImageInfo(uri=image_uri, height=grid.height, width=grid.width, count=1, dtype="uint8",
                     crs_wkt=grid.crs_wkt, transform=grid.transform, mpp=grid.mpp, on_grid=grid)
