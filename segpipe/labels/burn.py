"""Burning polygons into label windows: pure (geometry in pixel space in → array out), no files.

The rules (docs/labels.md, tested in tests/test_labels.py):

* a pixel ``(row, col)`` belongs to a polygon when its centre ``(col + ½, row + ½)`` lies inside
  it (GDAL's rule, through :func:`rasterio.features.rasterize`); ``all_touched`` burns every
  pixel the polygon touches instead;
* holes are holes: a pixel whose centre lies in a hole is not burned;
* invalid polygons (self-intersections, bow-ties, rings in the wrong order) are repaired with
  ``shapely.make_valid(method="structure")`` — shells and holes kept as drawn — and Z is
  dropped; a GeometryCollection keeps its polygonal parts;
* lines and points are refused (:class:`~segpipe.core.errors.DatasetError`) unless a buffer
  (in image pixels) is given, which turns them into polygons;
* overlaps: the feature of the higher class *rank* is on top
  (:meth:`segpipe.labels.classes.LabelClasses.rank`); within one rank the smaller feature is
  on top (a small island drawn inside a large one survives), then the later feature;
* features left empty by the repair are *dropped*, features that miss the image are *outside*;
  both are counted in :class:`BurnStats`, with the repaired ones.

Coordinates are image pixels: ``x`` = column, ``y`` = row, the image's top-left corner at
(0, 0) — QuPath's level-0 convention and what :mod:`segpipe.labels.vectors` produces from any CRS.
:class:`LabelShapes` holds the prepared polygons once per file with an STRtree, so a window
costs only the features that reach it (:func:`burn_window`): no whole-image array, ever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely import STRtree

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window

#: polygons with more vertices than this are clipped to a window before burning, so a large
#: region outline is not walked whole for every window it reaches
CLIP_VERTICES = 256


@dataclass(frozen=True)
class BurnStats:
    """What preparing one file's features found (reported once per file)."""

    features: int = 0  #: features read
    repaired: int = 0  #: invalid geometries repaired by make_valid (and kept)
    dropped: int = 0  #: features without area (null, empty, or nothing left after repair)
    outside: int = 0  #: features that miss the image entirely

    def __add__(self, other: BurnStats) -> BurnStats:
        return BurnStats(self.features + other.features, self.repaired + other.repaired,
                         self.dropped + other.dropped, self.outside + other.outside)

    def describe(self) -> str:
        return (f"{self.features} feature(s): {self.repaired} repaired, {self.dropped} dropped (no area), "
                f"{self.outside} outside the image")


@dataclass(frozen=True)
class LabelShapes:
    """Polygons in image pixels ready to burn: ordered bottom to top, with a spatial index."""

    geoms: np.ndarray  #: shapely (Multi)Polygons in burn order (the last is on top)
    values: np.ndarray  #: uint8 label value of each
    stats: BurnStats
    tree: STRtree = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.geoms)

    @property
    def bounds(self) -> tuple[float, float, float, float] | None:
        """(xmin, ymin, xmax, ymax) of all polygons, or None when there are none."""
        if not len(self.geoms):
            return None
        b = shapely.total_bounds(self.geoms)
        return float(b[0]), float(b[1]), float(b[2]), float(b[3])


def _describe(idents: Sequence[str] | None, i: int) -> str:
    return idents[i] if idents is not None else f"feature {i}"


def _polygonal(g: shapely.Geometry) -> tuple[shapely.Geometry | None, bool]:
    """(polygonal part of ``g`` or None, whether ``g`` also had non-polygonal parts)."""
    parts = shapely.get_parts(g)
    polys = [p for p in parts if shapely.get_type_id(p) in (3, 6)]  # Polygon, MultiPolygon
    other = len(polys) < len(parts)
    if not polys:
        return None, other
    return (polys[0] if len(polys) == 1 else shapely.multipolygons(
        [q for p in polys for q in shapely.get_parts(p)])), other


def _repair(g: shapely.Geometry, buffer: float | None, source: str, ident: str) -> tuple[shapely.Geometry | None, bool]:
    """(polygonal geometry or None, whether make_valid repaired it) of one geometry that is not a
    valid (Multi)Polygon: collections keep their polygons, lines and points need ``buffer``."""
    poly, other = _polygonal(g)
    if other:
        if buffer is None:
            c = shapely.centroid(g)
            kind = "GeometryCollection with lines or points" if shapely.get_type_id(g) == 7 else g.geom_type
            raise DatasetError(source, f"{ident} near x={c.x:.1f}, y={c.y:.1f} (pixels) is a {kind}: only polygons "
                                       "have an area; draw polygons or set a buffer (classes.json burn.buffer, "
                                       "in pixels)")
        # buffer the non-polygonal parts, keep the polygonal ones as drawn
        lines = [p for p in shapely.get_parts(g) if shapely.get_type_id(p) not in (3, 6)]
        pieces = ([poly] if poly is not None else []) + [shapely.buffer(p, buffer) for p in lines]
        poly = shapely.union_all(pieces) if len(pieces) > 1 else pieces[0]
    if poly is None or shapely.is_empty(poly):
        return None, False
    if shapely.is_valid(poly):
        return poly, False
    poly, _ = _polygonal(shapely.make_valid(poly, method="structure", keep_collapsed=False))
    return poly, True


def prepare_shapes(geoms: Sequence[shapely.Geometry | None] | np.ndarray, values: Sequence[int],
                   ranks: Sequence[int], *,
                   height: int, width: int, buffer: float | None = None, source: str = "labels",
                   idents: Sequence[str] | None = None) -> LabelShapes:
    """Repair, filter and order features (pixel coordinates) for :func:`burn_window`.

    ``values`` are the label values (class id or 255), ``ranks`` their drawing ranks (higher on
    top). ``buffer`` (pixels) turns lines and points into polygons; without it they raise a
    :class:`DatasetError` naming ``source`` and the feature (``idents[i]``, default
    ``"feature i"``) with its pixel position.
    """
    n = len(geoms)
    if not (len(values) == len(ranks) == n):
        raise ValueError("geoms, values and ranks must have the same length")
    arr = shapely.force_2d(np.asarray(geoms, dtype=object))
    vals = np.asarray(values, dtype=np.int64)
    if ((vals < 0) | (vals > 255)).any():
        raise ValueError("label values must be 0..255")
    # the common case in one vectorised pass: valid (Multi)Polygons are kept as they are
    types = shapely.get_type_id(arr)  # -1 for None
    out_geoms = arr.copy()
    fixed = np.zeros(n, dtype=bool)
    odd = np.flatnonzero((types >= 0) & ~(np.isin(types, (3, 6)) & shapely.is_valid(arr)))
    for i in odd:  # invalid polygons, collections, lines and points: one by one
        out_geoms[i], fixed[i] = _repair(arr[i], buffer, source, _describe(idents, int(i)))
    has_area = np.zeros(n, dtype=bool)
    present = np.flatnonzero(shapely.get_type_id(out_geoms) >= 0)  # -1: None
    has_area[present] = shapely.area(out_geoms[present]) > 0
    touches = np.zeros(n, dtype=bool)
    touches[has_area] = shapely.intersects(out_geoms[has_area], shapely.box(0, 0, width, height))
    keep = has_area & touches
    dropped, outside, repaired = int((~has_area).sum()), int((has_area & ~touches).sum()), int((fixed & has_area).sum())
    idx = np.flatnonzero(keep)
    kept = out_geoms[idx]
    r = np.asarray(ranks, dtype=np.int64)[idx]
    area = shapely.area(kept) if len(kept) else np.zeros(0)
    # bottom to top: lower rank first; within a rank the larger first (smaller on top); then file order
    order = np.lexsort((idx, -area, r))
    kept, kept_vals = kept[order], vals[idx][order].astype(np.uint8)
    stats = BurnStats(n, repaired, dropped, outside)
    return LabelShapes(kept, kept_vals, stats, STRtree(kept))


def _candidates(shapes: LabelShapes, window: Window) -> np.ndarray:
    if not len(shapes):
        return np.zeros(0, dtype=np.int64)
    hits = shapes.tree.query(shapely.box(window.x0, window.y0, window.x1, window.y1))
    return np.sort(hits)  # burn order = index order


def _burn(geoms: np.ndarray, values: np.ndarray, window: Window, fill: int, all_touched: bool) -> np.ndarray:
    from affine import Affine
    from rasterio.features import rasterize

    out = np.full((window.h, window.w), fill, dtype=np.uint8)
    if not len(geoms) or window.h == 0 or window.w == 0:
        return out
    # a large outline is cut to the window (+1 px so edges stay where they are) before burning
    big = shapely.get_num_coordinates(geoms) > CLIP_VERTICES
    if big.any():
        geoms = geoms.copy()
        geoms[big] = shapely.clip_by_rect(geoms[big], window.x0 - 1, window.y0 - 1, window.x1 + 1, window.y1 + 1)
        nonempty = ~shapely.is_empty(geoms)
        geoms, values = geoms[nonempty], values[nonempty]
        if not len(geoms):
            return out
    transform = Affine(1.0, 0.0, float(window.x0), 0.0, 1.0, float(window.y0))
    return rasterize(zip(geoms, values.tolist()), out_shape=(window.h, window.w), transform=transform,
                     fill=fill, out=out, all_touched=all_touched, dtype="uint8")


def _covered_from(shapes: LabelShapes, hits: np.ndarray, window: Window) -> int:
    """Position in ``hits`` of the topmost polygon that covers the whole window (-1: none).

    Everything below it is hidden: a window inside one large polygon costs no burning at all.
    """
    if not len(hits):
        return -1
    b = shapely.bounds(shapes.geoms[hits])
    maybe = np.flatnonzero((b[:, 0] <= window.x0) & (b[:, 1] <= window.y0) & (b[:, 2] >= window.x1)
                           & (b[:, 3] >= window.y1))
    if not len(maybe):
        return -1
    box = shapely.box(window.x0, window.y0, window.x1, window.y1)
    inside = shapely.covers(shapes.geoms[hits[maybe]], box)
    return int(maybe[np.flatnonzero(inside)[-1]]) if inside.any() else -1


def burn_window(shapes: LabelShapes, window: Window, *, fill: int, all_touched: bool = False) -> np.ndarray:
    """Label values of ``window`` (uint8, h × w): ``fill`` where no polygon is, else the top one's value.

    ``window`` is in image pixels and may lie partly or wholly outside the image; polygons are
    burned where they are (no reflection here: see :class:`segpipe.labels.truth.VectorLabelReader`).
    """
    hits = _candidates(shapes, window)
    top = _covered_from(shapes, hits, window)
    if top >= 0:  # the window lies inside one polygon: it is the background of those above it
        fill, hits = int(shapes.values[hits[top]]), hits[top + 1:]
    return _burn(shapes.geoms[hits], shapes.values[hits], window, fill, all_touched)


def cover_window(shapes: LabelShapes, window: Window, *, all_touched: bool = False) -> np.ndarray:
    """Boolean h × w: which pixels of ``window`` any of ``shapes`` covers (labelled regions)."""
    hits = _candidates(shapes, window)
    if _covered_from(shapes, hits, window) >= 0:
        return np.ones((window.h, window.w), dtype=bool)
    ones = np.ones(len(hits), dtype=np.uint8)
    return _burn(shapes.geoms[hits], ones, window, 0, all_touched).astype(bool)
