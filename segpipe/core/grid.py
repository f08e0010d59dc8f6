"""An image's pixel grid: the one set of pixels every reader of that image is opened on.

An image is read at one resolution for a purpose — the model's, a chosen ``--gsd``/``--mpp``,
a pyramid ``--level`` — and the image, its truth (a mask or vector labels) and its prediction must
then share exactly the same pixels. A :class:`PixelGrid` is that decision, made once per image and
target resolution and passed as a value (anchor: odc-geo's ``GeoBox``, a CRS + an affine + a shape;
slides use level-0 pixels and microns per pixel instead of a CRS):

* ``height`` × ``width`` grid pixels;
* ``scale`` = level-0 (full-resolution) source pixels per grid pixel along each axis: grid pixel
  ``(r, c)`` covers the level-0 rectangle ``[r·scale, (r+1)·scale) × [c·scale, (c+1)·scale)``;
* ``level0`` = the source's full-resolution (height, width);
* ``crs_wkt`` + ``transform`` (the grid pixels' own affine, ``x = a·col + b·row + c``) for
  georeferenced rasters, ``mpp`` (microns per grid pixel) for slides.

Glossary: **native** grid = the source's own level-0 pixels (scale 1). **Same pixel size** = two
sizes within :data:`SAME_PIXEL_SIZE` of each other (an Aperio slide that records 0.2527 µm is a
0.25 µm slide): the one tolerance of that question in segpipe.

Which source pixels serve a grid (no I/O here): the coarsest pyramid level or overview at or finer
than ``scale`` (:func:`choose_level`), area-averaged by the remaining factor (class ids: the pixel
under each grid pixel's centre), so a read costs a bounded multiple of its window at any scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

#: relative difference under which two pixel sizes are the same (no resampling, no warning); the one
#: tolerance for that question: 0.2527 µm (Aperio) counts as 0.25 µm, 0.2270 µm (another scanner) does not
SAME_PIXEL_SIZE = 0.02


def same_pixel_size(a: float, b: float) -> bool:
    """True when ``a`` and ``b`` differ by at most :data:`SAME_PIXEL_SIZE` (relative to the larger)."""
    return abs(a - b) <= SAME_PIXEL_SIZE * max(abs(a), abs(b))


def resampled_size(size: int, scale: float) -> int:
    """Grid pixels along an axis of ``size`` source pixels at ``scale`` source pixels per grid pixel:
    ``max(1, round(size / scale))`` (``size`` itself at scale 1)."""
    return size if scale == 1.0 else max(1, round(size / scale))


def transform_pixel_size(transform: Sequence[float] | None, crs_wkt: str | None) -> float | None:
    """The side of one pixel in CRS units (the mean of the two axes), or None without a georeference."""
    if transform is None or not crs_wkt:
        return None
    a, b, _, d, e, _ = transform[:6]
    sx, sy = math.hypot(a, d), math.hypot(b, e)
    return (sx + sy) / 2 if sx > 0 and sy > 0 else None


@dataclass(frozen=True)
class PixelGrid:
    """The pixels an image is read on (see the module docstring). Frozen, small, picklable."""

    height: int
    width: int
    level0: tuple[int, int]
    scale: float = 1.0
    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"a pixel grid has at least 1×1 pixels, got {self.height}×{self.width}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    # ---- construction

    @classmethod
    def native(cls, height: int, width: int, *, crs_wkt: str | None = None,
               transform: Sequence[float] | None = None, mpp: float | None = None) -> PixelGrid:
        """The source's own full-resolution pixels."""
        return cls(int(height), int(width), (int(height), int(width)), 1.0, crs_wkt,
                   None if transform is None else tuple(float(v) for v in transform[:6]), mpp)

    def at_scale(self, scale: float, shape: tuple[int, int] | None = None) -> PixelGrid:
        """This image's grid at ``scale`` level-0 pixels per pixel (``shape``: a pyramid level's own size,
        else ``round(level0 / scale)``); transform and mpp follow."""
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        h0, w0 = self.level0
        if scale == 1.0 and shape is None:
            return self.native_grid()
        h, w = shape if shape is not None else (resampled_size(h0, scale), resampled_size(w0, scale))
        rel = scale / self.scale
        t = self.transform
        transform = None if t is None else (t[0] * rel, t[1] * rel, t[2], t[3] * rel, t[4] * rel, t[5])
        return replace(self, height=int(h), width=int(w), scale=float(scale), transform=transform,
                       mpp=None if self.mpp is None else self.mpp * rel)

    def native_grid(self) -> PixelGrid:
        """The full-resolution grid of the same image."""
        if self.scale == 1.0 and (self.height, self.width) == self.level0:
            return self
        rel = 1.0 / self.scale
        t = self.transform
        transform = None if t is None else (t[0] * rel, t[1] * rel, t[2], t[3] * rel, t[4] * rel, t[5])
        return replace(self, height=self.level0[0], width=self.level0[1], scale=1.0, transform=transform,
                       mpp=None if self.mpp is None else self.mpp * rel)

    # ---- what it is

    @property
    def is_native(self) -> bool:
        return self.scale == 1.0 and (self.height, self.width) == self.level0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def pixel_size(self) -> float | None:
        """CRS units per grid pixel (georeferenced rasters), else None."""
        return transform_pixel_size(self.transform, self.crs_wkt)

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def describe(self) -> str:
        """``512×512 px at 1.1 CRS units`` / ``… at 0.5 µm`` / ``… (level-0 pixels × 2)``, for messages."""
        size = f"{self.width}×{self.height} px"
        if self.pixel_size is not None:
            return f"{size} at {self.pixel_size:g} CRS units per pixel"
        if self.mpp is not None:
            return f"{size} at {self.mpp:g} µm per pixel"
        return size if self.scale == 1.0 else f"{size} (level-0 pixels × {self.scale:g})"

    # ---- records (an output's provenance, a label cache key)

    def as_dict(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "level0": list(self.level0), "scale": self.scale,
                "crs_wkt": self.crs_wkt, "transform": None if self.transform is None else list(self.transform),
                "mpp": self.mpp}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelGrid:
        t = d.get("transform")
        return cls(int(d["height"]), int(d["width"]), (int(d["level0"][0]), int(d["level0"][1])),
                   float(d.get("scale") or 1.0), d.get("crs_wkt") or None,
                   None if t is None else tuple(float(v) for v in t), d.get("mpp"))


def grid_at(native: PixelGrid, *, mpp: float | None = None, gsd: float | None = None,
            level_shapes: Sequence[tuple[int, int]] = ()) -> PixelGrid:
    """``native``'s image at ``mpp`` microns (slides) or ``gsd`` CRS units (rasters) per pixel.

    When a pyramid level (``level_shapes``, level 0 first) has the same pixel size as asked
    (:func:`same_pixel_size`), the grid is that level exactly — its own shape, read as it is; the
    native grid when that level is 0. Otherwise ``round(level0 / scale)`` pixels at the exact scale.
    Raises ``ValueError`` (the caller names the file) when the image has no such pixel size.
    """
    if (mpp is None) == (gsd is None):
        raise ValueError("give one of mpp or gsd")
    have = native.mpp if mpp is not None else native.pixel_size
    want = mpp if mpp is not None else gsd
    if have is None:
        raise ValueError("records no microns per pixel" if mpp is not None else "has no georeference")
    assert want is not None and native.is_native
    scale = want / have
    shapes = list(level_shapes) or [native.level0]
    for i, (h, w) in enumerate(shapes):
        ds = native.level0[1] / w
        if same_pixel_size(ds, scale):
            return native if i == 0 else native.at_scale(ds, shape=(h, w))
    return native.at_scale(scale)


def grid_at_level(native: PixelGrid, level_shapes: Sequence[tuple[int, int]], level: int) -> PixelGrid:
    """``native``'s image at pyramid level ``level`` as it is (its own shape; scale = level-0 width / its width)."""
    if level == 0:
        return native
    h, w = level_shapes[level]
    return native.at_scale(native.level0[1] / w, shape=(h, w))


def choose_level(level_shapes: Sequence[tuple[int, int]], scale: float) -> tuple[int, float, float]:
    """(level, residual_y, residual_x): the pyramid level that serves a grid at ``scale`` level-0 pixels
    per pixel, and how many of that level's pixels make one grid pixel along each axis.

    The level is the coarsest whose downsample ``level0 width / level width`` is at most ``scale``
    (within :data:`SAME_PIXEL_SIZE`): never coarser than asked, so area averaging only ever reduces
    and one read costs a bounded multiple of its window. Residuals within the tolerance of 1 are 1.0.
    """
    w0 = level_shapes[0][1]
    best, best_ds = 0, 1.0
    for i, (_, w) in enumerate(level_shapes):
        ds = w0 / w
        if ds > best_ds and (ds <= scale or same_pixel_size(ds, scale)):
            best, best_ds = i, ds
    return (best, *residual(scale, level_shapes[best], level_shapes[0]))


def residual(scale: float, level_shape: tuple[int, int], level0: tuple[int, int]) -> tuple[float, float]:
    """(ry, rx): pixels of a level of ``level_shape`` per pixel of a grid at ``scale`` level-0 pixels per pixel,
    ``scale · level / level0`` per axis; both 1.0 when within :data:`SAME_PIXEL_SIZE` of 1 (the level is read
    as it is)."""
    ry, rx = scale * level_shape[0] / level0[0], scale * level_shape[1] / level0[1]
    if same_pixel_size(ry, 1.0) and same_pixel_size(rx, 1.0):
        return 1.0, 1.0
    return ry, rx
