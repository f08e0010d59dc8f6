"""An output's metadata, parsed in one place: size, class table, colours, nodata, georeference, levels.

Every reader of a finished output — the exports (:mod:`segpipe.export`) and the xarray view
(:func:`segpipe.io.xarray.open_output`) — reads the root attributes through here, so a class
name, a colour, the nodata label or a level's scale means the same thing everywhere:

* classes: ``segpipe.classes``, else the model's, else NGFF ``image-label.properties``;
* colours: ``segpipe.class_colors``, else NGFF ``image-label.colors``, else the model's, else
  segpipe's palette (:func:`segpipe.core.classes.class_colors`);
* a pyramid level: its NGFF dataset path and its (y, x) scale relative to level 0 (the NGFF
  ``scale`` transforms; else the shape ratio, levels halving with ceil).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segpipe.core.classes import class_colors, colors_from_spec, palette_rgba
from segpipe.core.errors import OutputError
from segpipe.core.grid import PixelGrid
from segpipe.io.storage import strip_file_scheme

#: readers that read a level (and optionally an mpp) of a whole-slide pyramid
SLIDE_DRIVERS = frozenset({"openslide", "ome-tiff", "ome-zarr"})


def ngff(attrs: dict[str, Any]) -> dict[str, Any]:
    """The NGFF block: under ``ome`` (NGFF 0.5, Zarr v3), or at the root (NGFF ≤ 0.4)."""
    return attrs.get("ome") or attrs


def _scale(dataset: dict[str, Any]) -> list[float] | None:
    for t in dataset.get("coordinateTransformations") or []:
        if t.get("type") == "scale" and t.get("scale"):
            return [float(v) for v in t["scale"]]
    return None


def _datasets(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    multiscales = ngff(attrs).get("multiscales") or []
    return (multiscales[0].get("datasets") or []) if multiscales else []


def level_path(group: Any, attrs: dict[str, Any], level: int, uri: str) -> str:
    """The array path of pyramid ``level`` (NGFF datasets in order; else arrays named 0, 1, 2, …)."""
    datasets = _datasets(attrs)
    if datasets:
        if not 0 <= level < len(datasets):
            raise OutputError(uri, f"has no pyramid level {level} (levels 0..{len(datasets) - 1})")
        return str(datasets[level]["path"])
    if str(level) not in group:
        levels = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
        raise OutputError(uri, f"has no pyramid level {level} (arrays: {', '.join(levels) or 'none'})")
    return str(level)


def level_factors(group: Any, attrs: dict[str, Any], path: str) -> tuple[float, float]:
    """Level-0 pixels per pixel of the array at ``path``, as (y, x)."""
    datasets = _datasets(attrs)
    by_path = {str(d.get("path")): d for d in datasets}
    base = str(datasets[0]["path"]) if datasets else "0"
    if path == base:
        return 1.0, 1.0
    s0, sl = (_scale(by_path[base]) if base in by_path else None), (_scale(by_path[path]) if path in by_path else None)
    if s0 and sl and len(s0) >= 2 and len(sl) >= 2 and s0[-1] and s0[-2]:
        return sl[-2] / s0[-2], sl[-1] / s0[-1]
    h0, w0 = group[base].shape[-2:]
    h, w = group[path].shape[-2:]
    # levels halve with ceil: 433 → 217 is a factor 2, not 1.995
    return float(max(1, round(h0 / h))), float(max(1, round(w0 / w)))


def output_classes(attrs: dict[str, Any]) -> tuple[str, ...]:
    """Class names by id: ``segpipe.classes``, else the model's, else NGFF ``image-label.properties``."""
    seg = attrs.get("segpipe") or {}
    classes = seg.get("classes") or (seg.get("model") or {}).get("classes")
    if classes:
        return tuple(str(c) for c in classes)
    props = (ngff(attrs).get("image-label") or {}).get("properties") or []
    names = {p["label-value"]: str(p.get("class", p["label-value"])) for p in props if "label-value" in p}
    return tuple(names.get(i, str(i)) for i in range(max(names, default=-1) + 1))


def output_colors(attrs: dict[str, Any], num_classes: int) -> list[str]:
    """Hex colour per class: ``segpipe.class_colors``, else NGFF ``image-label.colors``, else the model's,
    else the defaults (all parsing and defaults are :func:`segpipe.core.classes.class_colors`')."""
    seg = attrs.get("segpipe") or {}
    given: list[Any] = list(colors_from_spec(seg.get("model")) or [])[:num_classes]
    given += [None] * (num_classes - len(given))
    for entry in (ngff(attrs).get("image-label") or {}).get("colors") or []:
        value, rgba = entry.get("label-value"), entry.get("rgba")
        if isinstance(value, int) and 0 <= value < num_classes and rgba and len(rgba) == 4:
            given[value] = list(rgba)
    for i, color in enumerate((seg.get("class_colors") or [])[:num_classes]):
        if color:
            given[i] = color
    return class_colors(num_classes, given)


@dataclass(frozen=True)
class OutputMeta:
    """What readers of an output need from its root attributes."""

    uri: str
    height: int
    width: int
    classes: tuple[str, ...]
    #: (K, 4) uint8 RGBA per class id
    colors: np.ndarray
    crs_wkt: str | None
    #: rasterio Affine order (a, b, c, d, e, f), or None when not georeferenced
    transform: tuple[float, ...] | None
    source: str | None
    #: NGFF dataset paths, level 0 first
    levels: tuple[str, ...]
    #: the label value meaning "no data" (``segpipe.nodata_label``); None for outputs written before it existed
    nodata: int | None = None
    #: ``#rrggbb[aa]`` per class id (the same colours as :attr:`colors`)
    class_colors: tuple[str, ...] = ()
    #: what the reader recorded (``segpipe.reader``: driver, level, resample_factor, …)
    reader: dict = field(default_factory=dict)
    mpp: float | None = None
    status: str | None = None
    #: the pixel grid the output was computed on (its source's pixels, possibly at another resolution)
    grid: PixelGrid | None = None
    #: the grid is recorded (``segpipe.grid``), not reconstructed for an output written before it was
    grid_recorded: bool = False

    @property
    def is_slide(self) -> bool:
        """The source was a whole-slide / OME-TIFF pyramid read at some level or mpp."""
        return self.transform is None and not self.crs_wkt and self.reader.get("driver") in SLIDE_DRIVERS


def open_output_group(zarr_uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The output's Zarr group, read-only; :class:`OutputError` when there is none."""
    import zarr

    try:
        return zarr.open_group(strip_file_scheme(zarr_uri).rstrip("/"), mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as e:
        raise OutputError(zarr_uri, f"is not a segpipe output (no Zarr group: {e})") from None


def output_meta(zarr_uri: str, group: Any) -> OutputMeta:
    """Parse ``group``'s attributes (no status policy: callers refuse or warn about unfinished outputs)."""
    attrs = dict(group.attrs)
    seg = attrs.get("segpipe") or {}
    if "0" not in group:
        raise OutputError(zarr_uri, "has no array '0' (class ids)")
    height, width = group["0"].shape[-2:]
    classes = output_classes(attrs)
    num = max(len(classes), 1)
    levels = tuple(str(d["path"]) for d in _datasets(attrs) if str(d.get("path")) in group) or ("0",)
    transform = seg.get("transform")
    nodata = seg.get("nodata_label")
    hexes = output_colors(attrs, num)
    return OutputMeta(
        uri=zarr_uri, height=int(height), width=int(width), classes=classes,
        colors=palette_rgba(num, hexes), crs_wkt=seg.get("crs_wkt") or None,
        transform=tuple(float(v) for v in transform) if transform else None,
        source=seg.get("source"), levels=levels,
        nodata=int(nodata) if nodata is not None else None, class_colors=tuple(hexes),
        reader=dict(seg.get("reader") or {}), mpp=seg.get("mpp"), status=seg.get("status"),
        grid=recorded_grid(seg, int(height), int(width)), grid_recorded=isinstance(seg.get("grid"), dict),
    )


def recorded_grid(seg: dict[str, Any], height: int, width: int) -> PixelGrid:
    """The pixel grid an output records (``segpipe.grid``); for outputs written before it was recorded, the
    grid their size, georeference and reader record (a slide level's ``downsample × resample_factor``)."""
    if isinstance(seg.get("grid"), dict):
        return PixelGrid.from_dict(seg["grid"])
    reader = seg.get("reader") or {}
    scale = float(reader.get("downsample") or 1.0) * float(reader.get("resample_factor") or reader.get("resampled_by")
                                                             or 1.0)
    h0, w0 = reader.get("level0_height"), reader.get("level0_width")
    level0 = (int(h0), int(w0)) if h0 and w0 else (round(height * scale), round(width * scale))
    t = seg.get("transform")
    return PixelGrid(height, width, level0, scale, seg.get("crs_wkt") or None,
                     tuple(float(v) for v in t) if t else None, seg.get("mpp"))
