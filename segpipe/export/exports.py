"""Exports of a finished output: Cloud-Optimized GeoTIFF, polygons, PNG preview, confidence COG.

Every export streams the Zarr output window by window; none holds the whole raster:

* **COG** — rasterio's ``driver="COG"`` buffers the whole raster until close, so the
  class ids are written window by window into a tiled GTiff next to the target, given
  internal overviews (mode resampling: averaging class ids would invent classes), then
  copied to a COG with ``OVERVIEWS=FORCE_USE_EXISTING`` (a block-by-block copy). The GDAL
  block cache is capped (:data:`GDAL_CACHE_MB`) so it cannot grow to the raster's size.
* **vectors** — blocks are polygonised one by one in pixel coordinates (exact integers);
  polygons that touch an internal block seam are merged across it with a row sweep
  (see :func:`export_vectors`), so no polygon is cut at a chunk border and only the
  pieces still open at the current block row are held.
* **preview** — read from the coarsest pyramid level that is still at least the preview
  size, sampled with orthogonal indexing (only the chunks needed are decoded), with a
  legend of the classes below it.

One class table everywhere (:mod:`segpipe.core.classes`): the COG's colour table, its GDAL
category names and raster attribute table (``<cog>.aux.xml``), its QGIS style
(``<cog stem>.qml``), the vectors' class names and QuPath classifications and the preview
legend all come from the output's ``classes``/``class_colors``. The **nodata label**
(``segpipe.nodata_label``: 255 for uint8 class ids, 65,535 for uint16; absent in older
outputs, which then have none) is the COG's NoData, transparent in its colour table and in
the preview, and never becomes a polygon.

Whole-slide outputs (segmented at any pyramid level or mpp) are vectorised in **level-0
pixel coordinates** of the slide, which is what QuPath and other slide viewers expect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segpipe.core.classes import class_colors, lookup_table, palette_rgba, parse_color
from segpipe.core.errors import ConfigError, InputError, OutputError
from segpipe.io.storage import filesystem, has_scheme, strip_file_scheme
from segpipe.core.geometry import ChunkGrid

#: GDAL block cache for exports, MB: enough to stream 512² blocks, far below a large raster
GDAL_CACHE_MB = 4
#: rasterio passes an integer GDAL_CACHEMAX to GDAL as bytes
GDAL_CACHE_BYTES = GDAL_CACHE_MB * 2**20
#: side of the GeoTIFF blocks (and COG tiles)
COG_BLOCK = 512
#: polygons buffered before they are appended to the vector file
_FEATURES_PER_WRITE = 2_000
#: readers that read a level (and optionally an mpp) of a whole-slide pyramid
_SLIDE_DRIVERS = frozenset({"openslide", "ome-tiff"})

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading an output


@dataclass(frozen=True)
class OutputMeta:
    """What the exports need from an output's root attributes."""

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

    @property
    def is_slide(self) -> bool:
        """The source was a whole-slide / OME-TIFF pyramid read at some level or mpp."""
        return self.transform is None and not self.crs_wkt and self.reader.get("driver") in _SLIDE_DRIVERS


def output_colors(attrs: dict, num_classes: int) -> list[str]:
    """Hex colour per class: ``segpipe.class_colors``, else NGFF ``image-label.colors``, else the defaults.

    All parsing and defaults are :mod:`segpipe.core.classes`' (:func:`~segpipe.core.classes.class_colors`).
    """
    given: list[Any] = [None] * num_classes
    label_colors = ((attrs.get("ome") or {}).get("image-label") or {}).get("colors") or []
    for entry in label_colors:
        value, rgba = entry.get("label-value"), entry.get("rgba")
        if isinstance(value, int) and 0 <= value < num_classes and rgba and len(rgba) == 4:
            given[value] = list(rgba)
    hexes = (attrs.get("segpipe") or {}).get("class_colors") or []
    for i, color in enumerate(hexes[:num_classes]):
        if color:
            given[i] = color
    return class_colors(num_classes, given)


def output_palette(attrs: dict, num_classes: int) -> np.ndarray:
    """(K, 4) RGBA per class (see :func:`output_colors`)."""
    return palette_rgba(num_classes, output_colors(attrs, num_classes))


def _open_group(zarr_uri: str) -> Any:
    import zarr

    try:
        return zarr.open_group(strip_file_scheme(zarr_uri), mode="r")
    except (FileNotFoundError, ValueError) as e:
        raise InputError(zarr_uri, f"is not a segpipe output (no Zarr group: {e})") from None


def read_output_meta(zarr_uri: str) -> OutputMeta:
    """Read and check an output's attributes (refuses outputs whose status says unfinished)."""
    group = _open_group(zarr_uri)
    attrs = dict(group.attrs)
    seg = attrs.get("segpipe") or {}
    status = seg.get("status")
    if status is not None and status != "complete":
        raise InputError(zarr_uri, f"is not finished (status {status!r}); run the segmentation again")
    if "0" not in group:
        raise InputError(zarr_uri, "has no array '0' (class ids)")
    height, width = group["0"].shape[-2:]
    classes = tuple(seg.get("classes") or ())
    if not classes:
        props = ((attrs.get("ome") or {}).get("image-label") or {}).get("properties") or []
        names = {p["label-value"]: str(p.get("class", p["label-value"])) for p in props if "label-value" in p}
        classes = tuple(names.get(i, str(i)) for i in range(max(names, default=-1) + 1))
    num = max(len(classes), 1)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or [{}]
    levels = tuple(d["path"] for d in multiscales[0].get("datasets") or [] if d.get("path") in group) or ("0",)
    transform = seg.get("transform")
    nodata = seg.get("nodata_label")
    hexes = output_colors(attrs, num)
    return OutputMeta(
        uri=zarr_uri, height=int(height), width=int(width), classes=classes,
        colors=palette_rgba(num, hexes), crs_wkt=seg.get("crs_wkt"),
        transform=tuple(float(v) for v in transform) if transform else None,
        source=seg.get("source"), levels=levels,
        nodata=int(nodata) if nodata is not None else None, class_colors=tuple(hexes),
        reader=dict(seg.get("reader") or {}), mpp=seg.get("mpp"),
    )


def _level_factor(group: Any, level: str) -> float:
    """Level-0 pixels per ``level`` pixel: from the NGFF scales, else the shape ratio rounded to 2^k."""
    if level == "0":
        return 1.0
    datasets = ((group.attrs.get("ome") or {}).get("multiscales") or [{}])[0].get("datasets") or []
    scales = {}
    for d in datasets:
        for t in d.get("coordinateTransformations") or []:
            if t.get("type") == "scale":
                scales[d["path"]] = float(t["scale"][-1])
    if level in scales and "0" in scales:
        return scales[level] / scales["0"]
    ratio = group["0"].shape[-1] / group[level].shape[-1]
    return float(2 ** round(math.log2(ratio)))


# --------------------------------------------------------------------------- local targets


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


@contextlib.contextmanager
def _local_target(path: str, suffix: str | None = None) -> Iterator[str]:
    """A local file path to write; for a remote ``path`` a temp file uploaded afterwards.

    Sidecars written next to the temp file (``export.tif.aux.xml``, ``export.qml``, a
    shapefile's ``.shx``/``.dbf``/``.prj``) are uploaded next to ``path`` under the same rule:
    the temp name's ``export`` is replaced by ``path`` without its extension.
    """
    if not has_scheme(path):
        local = strip_file_scheme(path)
        parent = os.path.dirname(os.path.abspath(local))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise OutputError(path, f"cannot be written ({e.strerror or e})") from None
        yield local
        return
    ext = os.path.splitext(path)[1] or (suffix or "")
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
        local = os.path.join(tmp, "export" + ext)
        yield local
        fs, remote = filesystem(path)
        remote_stem = _stem(remote)
        try:
            for name in sorted(os.listdir(tmp)):
                if name.startswith("export"):
                    fs.put_file(os.path.join(tmp, name), remote_stem + name[len("export"):])
        except OSError as e:
            raise OutputError(path, f"cannot be uploaded ({e})") from None


def _remove_quietly(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


# --------------------------------------------------------------------------- COG


def _overview_factors(height: int, width: int, block: int = COG_BLOCK) -> list[int]:
    """2, 4, 8, … until the coarsest overview fits in one block (what GDAL's COG driver does)."""
    factors, f = [], 2
    while max(height, width) / (f // 2) > block:
        factors.append(f)
        f *= 2
    return factors


def _windows(height: int, width: int, side: int) -> Iterator[tuple[int, int, int, int]]:
    for chunk in ChunkGrid(height, width, side):
        yield chunk.y0, chunk.x0, chunk.h, chunk.w


def _window_side(chunk: int) -> int:
    """Write windows aligned to both the Zarr chunks and the GeoTIFF blocks when one divides the other."""
    if chunk % COG_BLOCK == 0 or COG_BLOCK % chunk == 0:
        return max(chunk, COG_BLOCK)
    return COG_BLOCK


def _write_cog(
    path: str, *, height: int, width: int, dtype: str, read_window: Callable[[int, int, int, int], np.ndarray],
    window_side: int, crs_wkt: str | None, transform: tuple[float, ...] | None, resampling: str,
    colormap: dict[int, tuple[int, int, int, int]] | None = None, tags: dict[str, str] | None = None,
    band_tags: dict[str, str] | None = None, description: str = "", scale: float | None = None,
    nodata: int | None = None, sidecars: Callable[[str], None] | None = None,
) -> str:
    """Stream a one-band raster into a COG: tiled GTiff → internal overviews → COG copy.

    The colour table, NoData, description and tags are set on the GTiff *before* its
    overviews are built, so GDAL resamples palette indices knowing they are palette indices
    and never averages NoData into a class (mode and average skip NoData pixels).
    ``sidecars(local_cog_path)`` writes files next to the finished COG (uploaded with it).
    """
    import rasterio
    import rasterio.shutil
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.windows import Window as RWindow

    profile: dict[str, Any] = {
        "driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": dtype,
        "tiled": True, "blockxsize": COG_BLOCK, "blockysize": COG_BLOCK, "compress": "zstd",
        "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS",
    }
    if crs_wkt:
        profile["crs"] = crs_wkt
    if transform is not None:
        profile["transform"] = Affine(*transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with _local_target(path, ".tif") as local:
        tmp = f"{local}.segpipe-tmp.tif"
        # stale sidecars of an earlier export would be read back by GDAL with the new COG
        _remove_quietly(local + ".aux.xml", _stem(local) + ".qml")
        try:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(tmp, "w", **profile) as ds:
                    if colormap:
                        # before any pixel: libtiff cannot switch the photometric tag to palette once
                        # blocks are written, and overviews of a band without it warn and resample badly
                        ds.write_colormap(1, colormap)
                    for y0, x0, h, w in _windows(height, width, window_side):
                        ds.write(read_window(y0, x0, h, w), 1, window=RWindow(x0, y0, w, h))
                    if description:
                        ds.set_band_description(1, description)
                    if scale is not None:
                        ds.scales = (scale,)
                    if tags:
                        ds.update_tags(**tags)
                    if band_tags:
                        ds.update_tags(1, **band_tags)
                factors = _overview_factors(height, width)
                if factors:
                    with rasterio.open(tmp, "r+") as ds:
                        ds.build_overviews(factors, Resampling[resampling])
                rasterio.shutil.copy(
                    tmp, local, driver="COG", COMPRESS="ZSTD", BLOCKSIZE=COG_BLOCK,
                    OVERVIEWS="FORCE_USE_EXISTING" if factors else "NONE", BIGTIFF="IF_SAFER",
                    NUM_THREADS="ALL_CPUS",
                )
        except RasterioError as e:
            raise OutputError(path, f"cannot write the GeoTIFF ({e})") from None
        finally:
            _remove_quietly(tmp, tmp + ".aux.xml", tmp + ".ovr")
        if sidecars is not None:
            try:
                sidecars(local)
            except OSError as e:
                raise OutputError(path, f"cannot write the style files next to the GeoTIFF ({e})") from None
    return path


def _georef(meta: OutputMeta, factor: float) -> tuple[float, ...] | None:
    if meta.transform is None:
        return None
    a, b, c, d, e, f = meta.transform
    return (a * factor, b * factor, c, d * factor, e * factor, f)


def export_cog(zarr_uri: str, path: str, *, level: str = "0", style: bool = True) -> str:
    """Write the class ids of ``level`` as a Cloud-Optimized GeoTIFF with the output's class table.

    * colour table = the class colours (uint8 class ids; GDAL tables stop at 8/16 bits), the
      nodata label's entry transparent; band NoData = the nodata label (when the output has one);
    * class names in the tags (``CLASSES`` JSON, band ``CLASS_<i>``);
    * with ``style`` (default), two sidecars GIS tools pick up by name:
      ``<path>.aux.xml`` (GDAL PAM: category names and a raster attribute table
      Value/Class/Red/Green/Blue/Alpha; rasterio has no API for either) and
      ``<path stem>.qml`` (QGIS paletted style: one entry per class, nodata not drawn).

    CRS and transform come from the output's attributes (a coarser level's transform is
    scaled by its factor); an output without them gives a COG without georeferencing.
    """
    meta = read_output_meta(zarr_uri)
    group = _open_group(zarr_uri)
    if level not in group:
        raise InputError(zarr_uri, f"has no level {level!r} (levels: {', '.join(meta.levels)})")
    arr = group[level]
    if arr.ndim != 2:
        raise InputError(zarr_uri, f"level {level!r} has shape {arr.shape}, expected (y, x)")
    height, width = arr.shape
    nodata = meta.nodata
    if nodata is not None and not 0 <= nodata <= np.iinfo(arr.dtype).max:
        raise InputError(zarr_uri, f"nodata label {nodata} does not fit its class ids ({arr.dtype})")

    def read_window(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return arr[y0 : y0 + h, x0 : x0 + w]

    colormap = None
    if arr.dtype == np.uint8:  # GDAL colour tables are for 8-bit (and 16-bit) bands; classes fit in 8
        colormap = {i: tuple(int(v) for v in meta.colors[i]) for i in range(min(len(meta.colors), 256))}
        if nodata is not None:
            colormap[nodata] = tuple(int(v) for v in label_lut(meta)[nodata])  # transparent
    names = list(meta.classes)

    def sidecars(local: str) -> None:
        with open(local + ".aux.xml", "w", encoding="utf-8") as f:
            f.write(pam_xml(meta))
        with open(_stem(local) + ".qml", "w", encoding="utf-8") as f:
            f.write(qgis_style(meta))

    return _write_cog(
        path, height=height, width=width, dtype=str(arr.dtype), read_window=read_window,
        window_side=_window_side(arr.chunks[-1]), crs_wkt=meta.crs_wkt,
        transform=_georef(meta, _level_factor(group, level)), resampling="mode", colormap=colormap,
        tags={"CLASSES": json.dumps(names), "SEGPIPE_SOURCE": meta.source or "",
              **({"NODATA_LABEL": str(nodata)} if nodata is not None else {})},
        band_tags={f"CLASS_{i}": n for i, n in enumerate(names)}, description="class_id",
        nodata=nodata, sidecars=sidecars if style else None,
    )


def _class_table(meta: OutputMeta) -> list[tuple[int, str, tuple[int, int, int, int]]]:
    """(value, name, RGBA) per class — the one table every style file is written from."""
    n = len(meta.class_colors)
    names = [meta.classes[i] if i < len(meta.classes) else str(i) for i in range(n)]
    return [(i, names[i], tuple(int(v) for v in parse_color(meta.class_colors[i]))) for i in range(n)]


def pam_xml(meta: OutputMeta) -> str:
    """GDAL PAM sidecar (``.aux.xml``) of band 1: ``<CategoryNames>`` and a thematic raster attribute table.

    Categories are indexed by class id (0 … K−1); the attribute table has one row per class
    with columns Value (usage MinMax), Class (Name), Red, Green, Blue, Alpha. The nodata label is
    the band's NoData, not a category.
    """
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    table = _class_table(meta)
    cats = ET.SubElement(band, "CategoryNames")
    for _, name, _ in table:
        ET.SubElement(cats, "Category").text = name
    rat = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    # GDALRATFieldType: 0 integer, 2 string; GDALRATFieldUsage: 2 name, 5 min-max, 6–9 red/green/blue/alpha
    columns = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9)]
    for i, (name, ftype, usage) in enumerate(columns):
        fd = ET.SubElement(rat, "FieldDefn", index=str(i))
        ET.SubElement(fd, "Name").text = name
        ET.SubElement(fd, "Type").text = str(ftype)
        ET.SubElement(fd, "Usage").text = str(usage)
    for row, (value, name, rgba) in enumerate(table):
        r = ET.SubElement(rat, "Row", index=str(row))
        for v in (value, name, *rgba):
            ET.SubElement(r, "F").text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def qgis_style(meta: OutputMeta, band: int = 1) -> str:
    """QGIS layer style (``.qml``): a paletted renderer with one entry per class (value, colour, alpha, label).

    QGIS loads ``name.qml`` for ``name.tif`` by itself. The nodata label has no entry (QGIS
    draws values without an entry and the band's NoData transparent); nearest-neighbour
    resampling so zoomed views never blend class ids.
    """
    root = ET.Element("qgis", version="3.28.0", styleCategories="AllStyleCategories",
                      hasScaleBasedVisibilityFlag="0", minScale="1e+08", maxScale="0")
    pipe = ET.SubElement(root, "pipe")
    provider = ET.SubElement(pipe, "provider")
    ET.SubElement(provider, "resampling", enabled="false", maxOversampling="2",
                  zoomedInResamplingMethod="nearestNeighbour", zoomedOutResamplingMethod="nearestNeighbour")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band=str(band), opacity="1",
                             alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for value, name, rgba in _class_table(meta):
        ET.SubElement(palette, "paletteEntry", value=str(value), color="#{:02x}{:02x}{:02x}".format(*rgba[:3]),
                      alpha=str(rgba[3]), label=name)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", invertColors="0")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def export_confidence(zarr_uri: str, path: str, *, array: str = "probabilities") -> str:
    """Write the per-pixel maximum class probability (uint8, p × 255) as a COG (average overviews)."""
    meta = read_output_meta(zarr_uri)
    group = _open_group(zarr_uri)
    if array not in group:
        raise InputError(zarr_uri, f"has no {array!r} array (segment with --probabilities)")
    probs = group[array]
    if probs.ndim != 3 or probs.shape[-2:] != (meta.height, meta.width):
        raise InputError(zarr_uri, f"{array!r} has shape {probs.shape}, expected (class, {meta.height}, {meta.width})")

    def read_window(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return probs[:, y0 : y0 + h, x0 : x0 + w].max(axis=0)

    return _write_cog(
        path, height=meta.height, width=meta.width, dtype=str(probs.dtype), read_window=read_window,
        window_side=_window_side(probs.chunks[-1]), crs_wkt=meta.crs_wkt, transform=meta.transform,
        resampling="average", description="confidence", scale=1 / 255,
        tags={"SEGPIPE_SOURCE": meta.source or ""},
    )


# --------------------------------------------------------------------------- vectors

#: vector formats by extension → OGR driver ("Parquet": GeoParquet written with pyarrow)
_VECTOR_DRIVERS = {
    ".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile",
    ".fgb": "FlatGeobuf", ".parquet": "Parquet",
}
VECTOR_EXTENSIONS = tuple(_VECTOR_DRIVERS)


def vector_driver(path: str) -> str:
    """OGR driver for ``path`` by extension: .gpkg, .geojson/.json, .shp, .fgb, .parquet (GeoParquet)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _VECTOR_DRIVERS:
        raise ConfigError(path, f"unknown vector format {ext!r}; use one of {', '.join(VECTOR_EXTENSIONS)}")
    return _VECTOR_DRIVERS[ext]


# --------------------------------------------------------------------------- slides: level-0 pixels


@dataclass(frozen=True)
class Level0:
    """How an output's pixels map to its slide's level-0 pixels: ``x0 = x · scale``, ``y0 = y · scale``."""

    scale: float
    #: level-0 size of the slide, when known (polygons are clipped to it)
    height: int | None = None
    width: int | None = None


def _probe_slide(source: str | None, level: int) -> tuple[float, int, int] | None:
    """(downsample of ``level``, level-0 height, level-0 width) read from the slide itself, or None."""
    if not source:
        return None
    try:
        from segpipe.io.readers.slide import open_slide

        r0 = open_slide(source)
        if r0 is None:
            return None
        try:
            h0, w0 = r0.info.height, r0.info.width
        finally:
            r0.close()
        if level == 0:
            return 1.0, h0, w0
        rl = open_slide(source, level=level)
        if rl is None:
            return None
        try:
            lw = rl.info.width
        finally:
            rl.close()
    except (ImportError, InputError, ConfigError, OSError):
        return None
    return w0 / lw, h0, w0


def level0_mapping(meta: OutputMeta) -> Level0 | None:
    """Level-0 mapping of a whole-slide output (None for anything else).

    scale = the read level's downsample × the mpp resampling factor (``segpipe.reader``:
    ``downsample``, ``resample_factor``); the level-0 size is ``level0_height``/``level0_width``.
    Outputs that do not record the downsample or the level-0 size get them from the slide
    itself (level-0 width ÷ the level's width) when it can still be opened; when it cannot,
    a level > 0 output keeps its own pixel coordinates and a warning says so.
    """
    if not meta.is_slide:
        return None
    reader = meta.reader
    level = int(reader.get("level") or 0)
    factor = float(reader.get("resample_factor") or 1.0)
    downsample = reader.get("downsample")
    downsample = float(downsample) if downsample else (1.0 if level == 0 else None)
    h0, w0 = reader.get("level0_height"), reader.get("level0_width")
    if downsample is None or h0 is None or w0 is None:
        probed = _probe_slide(meta.source, level)
        if probed is not None:
            downsample = downsample or probed[0]
            h0, w0 = h0 or probed[1], w0 or probed[2]
    if downsample is None:
        log.warning("%s: slide level %d records no downsample and its source %s cannot be opened; "
                    "vectors stay in that level's pixel coordinates", meta.uri, level, meta.source)
        return None
    return Level0(scale=downsample * factor, height=int(h0) if h0 else None, width=int(w0) if w0 else None)


def sieve_block(read: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                y0: int, x0: int, h: int, w: int, size: int, nodata: int | None = None) -> np.ndarray:
    """Core ``(y0, x0, h, w)`` of ``rasterio.features.sieve(size)`` applied to core + a margin of ``size + 1``.

    Which pixels are removed is the same as a whole-image sieve: a 4-connected region with
    fewer than ``size`` pixels that touches the core lies within ``size`` pixels of it, and a
    larger region reaching past the margin has ≥ ``size`` pixels inside it. The class a
    removed region takes (GDAL: its largest neighbour) can differ from a whole-image sieve
    when competing neighbours are cut by the margin — a documented approximation.
    Pixels with the ``nodata`` label are masked: they are never removed nor given to a region.
    """
    from rasterio.features import sieve

    m = size + 1
    ya, xa = max(0, y0 - m), max(0, x0 - m)
    yb, xb = min(height, y0 + h + m), min(width, x0 + w + m)
    block = np.ascontiguousarray(read(ya, xa, yb - ya, xb - xa))
    # nodata pixels are neither sieved away nor grown into
    valid = None if nodata is None else block != nodata
    sieved = sieve(block, size=size, connectivity=4, mask=valid)
    return sieved[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]


class _FeatureSink:
    """Buffers (class id, pixel-space polygon) and appends them, transformed, to the vector file.

    GPKG, GeoJSON and Shapefile are appended to in place; FlatGeobuf (whose appends rewrite
    the file) is collected in a temporary GeoPackage and streamed into the .fgb at the end;
    GeoParquet is written row group by row group with pyarrow.
    """

    def __init__(self, path: str, driver: str, meta: OutputMeta, transform: tuple[float, ...], min_area: float,
                 *, qupath: bool = False, clip: tuple[float, float, float, float] | None = None) -> None:
        self.path, self.driver, self.meta, self.min_area = path, driver, meta, min_area
        self.matrix = np.array([[transform[0], transform[1]], [transform[3], transform[4]]])
        self.offset = np.array([transform[2], transform[5]])
        self.qupath = qupath and driver == "GeoJSON"
        self.clip = clip
        self.ids: list[int] = []
        self.geoms: list[Any] = []
        self.written = 0
        self.started = False
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._parquet: Any = None
        self.target = path
        if driver == "FlatGeobuf":
            self._tmpdir = tempfile.TemporaryDirectory(prefix="segpipe-fgb-")
            self.target = os.path.join(self._tmpdir.name, "features.gpkg")
        colors = meta.colors
        self._qupath_class = [
            json.dumps({"name": n, "color": [int(v) for v in colors[i][:3]]}) if i < len(colors) else
            json.dumps({"name": n}) for i, n in enumerate(meta.classes)
        ]

    def add(self, class_id: int, polygon: Any) -> None:
        self.ids.append(class_id)
        self.geoms.append(polygon)
        if len(self.geoms) >= _FEATURES_PER_WRITE:
            self.flush()

    def _clip(self, geoms: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut polygons at the slide's level-0 edge (the last resampled pixels may reach past it)."""
        import shapely

        x0, y0, x1, y1 = self.clip
        b = shapely.bounds(geoms)
        out = (b[:, 2] > x1) | (b[:, 3] > y1) | (b[:, 0] < x0) | (b[:, 1] < y0)
        if not out.any():
            return geoms, ids
        cut = shapely.intersection(geoms[out], shapely.box(x0, y0, x1, y1))
        parts, index = shapely.get_parts(cut, return_index=True)
        keep = (shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)  # 3: Polygon
        return (np.concatenate([geoms[~out], parts[keep]]),
                np.concatenate([ids[~out], ids[out][index[keep]]]))

    def flush(self, final: bool = False) -> None:
        import shapely

        if not self.geoms and (self.started or not final):
            return
        geoms = np.array(self.geoms, dtype=object)
        ids = np.array(self.ids, dtype=np.int32)
        self.geoms, self.ids = [], []
        if len(geoms):
            geoms = shapely.transform(geoms, lambda xy: xy @ self.matrix.T + self.offset)
            if self.clip is not None:
                geoms, ids = self._clip(geoms, ids)
        areas = shapely.area(geoms).astype(np.float64) if len(geoms) else np.zeros(0)
        keep = areas >= self.min_area
        geoms, ids, areas = geoms[keep], ids[keep], areas[keep]
        names = np.array([self.meta.classes[i] if i < len(self.meta.classes) else str(i) for i in ids], dtype=object)
        fields: list[tuple[str, np.ndarray]] = [("class_id", ids), ("class_name", names), ("area", areas)]
        if self.qupath:
            # QuPath's GeoJSON: objectType + classification {name, color [r, g, b]} (a JSON object:
            # GDAL writes a string field holding a JSON object as that object)
            fields.append(("objectType", np.full(len(ids), "annotation", dtype=object)))
            fields.append(("classification", np.array(
                [self._qupath_class[i] if i < len(self._qupath_class) else json.dumps({"name": str(i)}) for i in ids],
                dtype=object)))
        if self.driver == "Parquet":
            self._write_parquet(geoms, fields)
        else:
            self._write_ogr(geoms, fields)
        self.started = True
        self.written += len(geoms)

    def _write_ogr(self, geoms: np.ndarray, fields: list[tuple[str, np.ndarray]]) -> None:
        import shapely
        from pyogrio.raw import write

        driver = "GPKG" if self.driver == "FlatGeobuf" else self.driver
        options: dict[str, Any] = {}
        if driver == "GPKG":
            options["layer"] = "segments"
        if driver == "GeoJSON" and self.qupath:
            options["layer_options"] = {"AUTODETECT_JSON_STRINGS": "YES"}
        if driver == "ESRI Shapefile":
            options["encoding"] = "UTF-8"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
            write(
                self.target, shapely.to_wkb(geoms) if len(geoms) else np.array([], dtype=object),
                field_data=[f for _, f in fields], fields=[n for n, _ in fields],
                crs=self.meta.crs_wkt, geometry_type="Polygon", driver=driver, append=self.started, **options,
            )

    def _write_parquet(self, geoms: np.ndarray, fields: list[tuple[str, np.ndarray]]) -> None:
        import shapely

        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(self.path, "GeoParquet needs pyarrow (pip install pyarrow)") from None
        schema = pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area", pa.float64()),
                            ("geometry", pa.binary())])
        if self._parquet is None:
            crs: Any = None  # GeoParquet: null = no/unknown CRS (pixel coordinates); absent would mean WGS 84
            if self.meta.crs_wkt:
                from rasterio.crs import CRS

                crs = CRS.from_wkt(self.meta.crs_wkt).to_dict(projjson=True)
            geo = {"version": "1.1.0", "primary_column": "geometry",
                   "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
            schema = schema.with_metadata({b"geo": json.dumps(geo).encode()})
            self._parquet = pq.ParquetWriter(self.target, schema, compression="zstd")
        data = dict(fields)
        table = pa.table({
            "class_id": pa.array(data["class_id"], pa.int32()), "class_name": pa.array(data["class_name"], pa.string()),
            "area": pa.array(data["area"], pa.float64()),
            "geometry": pa.array(list(shapely.to_wkb(geoms)) if len(geoms) else [], pa.binary()),
        }, schema=self._parquet.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        """Write what is buffered and finish the file (GeoParquet footer, FlatGeobuf conversion)."""
        self.flush(final=True)
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._tmpdir is not None:
            from pyogrio.raw import open_arrow, write_arrow

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
                with open_arrow(self.target, layer="segments", use_pyarrow=False) as (info, stream):
                    write_arrow(stream, self.path, driver="FlatGeobuf", geometry_type="Polygon",
                                geometry_name=info["geometry_name"] or "geom", crs=self.meta.crs_wkt,
                                layer=_stem(os.path.basename(self.path)))
            self._tmpdir.cleanup()
            self._tmpdir = None

    def abort(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def export_vectors(
    zarr_uri: str, path: str, *, min_area: float = 0.0, sieve: int = 0, level: str = "0",
    classes: Sequence[int] | None = None, block_size: int | None = None,
) -> int:
    """Polygonise the class ids into one polygon per 4-connected region; returns the feature count.

    The format follows the extension (:func:`vector_driver`): GeoPackage (.gpkg, layer
    ``segments``), GeoJSON (.geojson/.json), Shapefile (.shp), FlatGeobuf (.fgb) or
    GeoParquet (.parquet, needs pyarrow). Attributes ``class_id``, ``class_name``, ``area``
    (in the coordinates' units²). Coordinates:

    * georeferenced output → its CRS;
    * whole-slide output → **level-0 pixels** of the slide, whatever level or mpp was
      segmented (see :func:`level0_mapping`), clipped to the slide's level-0 size;
    * anything else → pixel coordinates (x = column, y = row) of the output.

    In pixel coordinates GeoJSON features also carry QuPath's ``objectType: "annotation"`` and
    ``classification: {name, color: [r, g, b]}``, so the file imports into QuPath as classified
    annotations (GeoJSON has no "no CRS": GIS readers assume WGS 84; prefer .gpkg for GIS).
    The nodata label is never polygonised.

    Blocks of ``block_size`` (default: the chunk side) are polygonised in pixel
    coordinates. A polygon that does not touch an internal block seam is complete and
    written at once. The others are merged row by row: after each block row, the open
    pieces of each class are unioned (exact: integer coordinates, and pieces of one class
    share an edge exactly where their pixels are 4-adjacent); merged polygons that do not
    reach the next block row are complete. Only pieces open along one block row are held.

    ``min_area`` drops polygons smaller than it (CRS units²); ``sieve`` > 0 first removes
    regions of fewer than ``sieve`` pixels per block with a margin (see :func:`sieve_block`);
    ``classes`` limits the export to those class ids (None = all classes, background included;
    never the nodata label).
    """
    if min_area < 0 or sieve < 0:
        raise ConfigError("export", f"min_area and sieve must be ≥ 0, got {min_area} and {sieve}")
    driver = vector_driver(path)
    meta = read_output_meta(zarr_uri)
    group = _open_group(zarr_uri)
    if level not in group:
        raise InputError(zarr_uri, f"has no level {level!r} (levels: {', '.join(meta.levels)})")
    arr = group[level]
    height, width = arr.shape
    side = block_size or arr.chunks[-1]
    nodata = meta.nodata
    wanted = None if classes is None else np.array(sorted({int(c) for c in classes} - {nodata}))

    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return arr[y0 : y0 + h, x0 : x0 + w]

    factor = _level_factor(group, level)
    transform = _georef(meta, factor)
    clip = None
    if transform is None:
        l0 = level0_mapping(meta)
        scale = factor * (l0.scale if l0 else 1.0)
        transform = (scale, 0.0, 0.0, 0.0, scale, 0.0)
        if l0 is not None and l0.height and l0.width:
            clip = (0.0, 0.0, float(l0.width), float(l0.height))
    qupath = meta.crs_wkt is None and meta.transform is None

    with _local_target(path, os.path.splitext(path)[1]) as local:
        stem = _stem(local)
        _remove_quietly(local, *(stem + e for e in (".shx", ".dbf", ".prj", ".cpg", ".qix"))
                        if driver == "ESRI Shapefile" else ())
        sink = _FeatureSink(local, driver, meta, transform, float(min_area), qupath=qupath, clip=clip)
        try:
            _polygonize(sink, read, height, width, side, sieve, wanted, nodata)
            sink.close()
        except BaseException:
            sink.abort()
            raise
    return sink.written


def _polygonize(sink: _FeatureSink, read: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                side: int, sieve: int, wanted: np.ndarray | None, nodata: int | None) -> None:
    """Blocks → polygons in pixel coordinates, merged across block seams row by row (see :func:`export_vectors`)."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    grid = ChunkGrid(height, width, side)
    pending: dict[int, list[Any]] = {}
    for iy in range(grid.rows):
        row_pieces: dict[int, list[Any]] = defaultdict(list)
        row_y0 = iy * side
        row_y1 = min(height, row_y0 + side)
        for ix in range(grid.cols):
            c = grid.chunk(iy, ix)
            if sieve > 0:
                block = sieve_block(read, height, width, c.y0, c.x0, c.h, c.w, sieve, nodata)
            else:
                block = read(c.y0, c.x0, c.h, c.w)
            block = np.ascontiguousarray(block)
            if block.dtype not in (np.uint8, np.uint16, np.int16, np.int32):
                block = block.astype(np.int32)
            mask = None if wanted is None else np.isin(block, wanted)
            if nodata is not None and wanted is None:
                mask = block != nodata
            if mask is not None and not mask.any():
                continue
            y1, x1 = c.y0 + c.h, c.x0 + c.w
            for geom, value in shapes(block, mask=mask, connectivity=4, transform=Affine.translation(c.x0, c.y0)):
                poly = shapely.geometry.shape(geom)
                minx, miny, maxx, maxy = poly.bounds
                open_piece = ((minx == c.x0 and c.x0 > 0) or (maxx == x1 and x1 < width)
                              or (miny == c.y0 and c.y0 > 0) or (maxy == y1 and y1 < height))
                if open_piece:
                    row_pieces[int(value)].append(poly)
                else:
                    sink.add(int(value), poly)
        next_pending: dict[int, list[Any]] = {}
        for cls in sorted(set(pending) | set(row_pieces)):
            merged = shapely.unary_union(pending.get(cls, []) + row_pieces.get(cls, []))
            still_open = []
            for part in shapely.get_parts(merged):
                if row_y1 < height and part.bounds[3] == row_y1:
                    still_open.append(part)
                else:
                    sink.add(cls, part)
            if still_open:
                next_pending[cls] = still_open
        pending = next_pending


# --------------------------------------------------------------------------- preview


def preview_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a preview: the image scaled to fit ``max_size`` (never enlarged), aspect kept."""
    if max_size < 1:
        raise ConfigError("max_size", f"must be positive, got {max_size}")
    if max(height, width) <= max_size:
        return height, width
    s = max_size / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def _sample_labels(group: Any, levels: Sequence[str], out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour sample of the coarsest level with both sides ≥ the preview's."""
    chosen = levels[0]
    for path in levels:
        h, w = group[path].shape[-2:]
        if h >= out_h and w >= out_w:
            chosen = path
    arr = group[chosen]
    h, w = arr.shape[-2:]
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    out = np.zeros((out_h, out_w), arr.dtype)
    ch, cw = arr.chunks[-2:]
    # chunk by chunk: zarr's orthogonal selection decodes every chunk it touches at once,
    # which for level 0 of a large output is the whole raster
    row_chunks, col_chunks = rows // ch, cols // cw
    for iy in np.unique(row_chunks):
        r_sel = np.flatnonzero(row_chunks == iy)
        for ix in np.unique(col_chunks):
            c_sel = np.flatnonzero(col_chunks == ix)
            y0, x0 = int(iy) * ch, int(ix) * cw
            block = arr[y0 : min(y0 + ch, h), x0 : min(x0 + cw, w)]
            out[np.ix_(r_sel, c_sel)] = block[np.ix_(rows[r_sel] - y0, cols[c_sel] - x0)]
    return out


def _to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """(bands, h, w) source pixels → (h, w, 3) uint8 for display (2–98 % stretch unless uint8)."""
    bands = pixels[:3] if pixels.shape[0] >= 3 else np.repeat(pixels[:1], 3, axis=0)
    if bands.dtype != np.uint8:
        out = np.empty(bands.shape, np.uint8)
        for i, b in enumerate(bands.astype(np.float64)):
            finite = b[np.isfinite(b)]
            lo, hi = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
            out[i] = np.clip((np.nan_to_num(b) - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
        bands = out
    return np.moveaxis(bands, 0, -1)


def source_thumbnail(source: str, out_h: int, out_w: int) -> np.ndarray | None:
    """(h, w, 3) uint8 thumbnail of ``source`` or None when it cannot be read.

    Whole-slide images use the slide reader's coarsest level; anything else a decimated
    rasterio read (GDAL picks the overview that fits, so this is cheap for COGs).
    """
    from segpipe.io.readers.raster import gdal_options, gdal_path

    try:
        from segpipe.io.readers.slide import open_slide

        reader = open_slide(source)
    except (ImportError, InputError):
        reader = None
    if reader is not None:
        try:
            thumb = reader.thumbnail(max(out_h, out_w))
        finally:
            reader.close()
        return _resize_nearest(_to_uint8_rgb(thumb), out_h, out_w)
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    try:
        with rasterio.Env(**gdal_options()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(gdal_path(source)) as ds:
                indexes = [1, 2, 3] if ds.count >= 3 else [1]
                pixels = ds.read(indexes, out_shape=(len(indexes), out_h, out_w), resampling=Resampling.average)
    except (RasterioError, OSError):
        return None
    return _to_uint8_rgb(pixels)


def _resize_nearest(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return image[rows[:, None], cols[None, :]]


def label_lut(meta: OutputMeta) -> np.ndarray:
    """RGBA indexed by label value (:func:`segpipe.core.classes.lookup_table`): class colours, the nodata
    label transparent, grey for any other value. An output without a nodata label has none."""
    k = max(len(meta.class_colors), 1)
    lut = lookup_table(k, list(meta.class_colors))
    top = len(lut) - 1  # where lookup_table puts the nodata label
    if meta.nodata == top:
        return lut
    transparent = lut[top].copy()
    other = lut[k].copy() if k < top else np.array([128, 128, 128, 255], np.uint8)  # its "any other value"
    lut[top] = other
    if meta.nodata is not None:
        if meta.nodata >= len(lut):
            lut = np.concatenate([lut, np.tile(other, (meta.nodata + 1 - len(lut), 1))])
        lut[meta.nodata] = transparent
    return lut


def colorize(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(h, w) label values → (h, w, 4) RGBA through ``lut`` (:func:`label_lut`); values past its end are grey."""
    top = int(labels.max(initial=0))
    if top >= len(lut):
        lut = np.concatenate([lut, np.tile(np.array([[128, 128, 128, 255]], np.uint8), (top + 1 - len(lut), 1))])
    return lut[labels]


#: legend layout, pixels: padding, swatch side, swatch–text gap, space between entries, row height
_LEGEND = {"pad": 8, "swatch": 14, "gap": 5, "sep": 16, "row": 20}
#: classes listed in a preview legend at most (then "+N more")
LEGEND_MAX_CLASSES = 64


def _legend_font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def render_legend(meta: OutputMeta, min_width: int) -> np.ndarray:
    """(h, w, 4) opaque legend panel: a colour swatch and the name of each class, in rows.

    ``w`` is ``min_width`` unless one entry needs more. The nodata label is not listed (it is
    transparent in the preview).
    """
    from PIL import Image, ImageDraw

    font = _legend_font()
    table = _class_table(meta)
    extra = len(table) - LEGEND_MAX_CLASSES
    table = table[:LEGEND_MAX_CLASSES]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    L = _LEGEND
    widths = [L["swatch"] + L["gap"] + math.ceil(measure.textlength(name, font=font)) for _, name, _ in table]
    more = f"+{extra} more" if extra > 0 else ""
    if more:
        widths.append(math.ceil(measure.textlength(more, font=font)))
    width = max(min_width, max(widths, default=0) + 2 * L["pad"])
    # flow the entries into rows
    positions, x, row = [], L["pad"], 0
    for w in widths:
        if x > L["pad"] and x + w > width - L["pad"]:
            x, row = L["pad"], row + 1
        positions.append((x, row))
        x += w + L["sep"]
    rows = row + 1 if widths else 0
    height = 2 * L["pad"] + rows * L["row"]
    panel = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for (x, r), (_, name, rgba) in zip(positions, table):
        top = L["pad"] + r * L["row"] + (L["row"] - L["swatch"]) // 2
        draw.rectangle([x, top, x + L["swatch"] - 1, top + L["swatch"] - 1], fill=tuple(rgba[:3]) + (255,),
                       outline=(96, 96, 96, 255))
        draw.text((x + L["swatch"] + L["gap"], L["pad"] + r * L["row"] + L["row"] // 2), name,
                  fill=(0, 0, 0, 255), font=font, anchor="lm")
    if more:
        x, r = positions[-1]
        draw.text((x, L["pad"] + r * L["row"] + L["row"] // 2), more, fill=(0, 0, 0, 255), font=font, anchor="lm")
    return np.asarray(panel)


def export_preview(
    zarr_uri: str, path: str, *, source: str | None = None, max_size: int = 1024, alpha: float = 0.5,
    legend: bool = True,
) -> str:
    """RGBA PNG preview: class colours blended (``alpha`` × the class colour's alpha) over the source thumbnail.

    ``source`` defaults to the output's recorded source; when it cannot be read the
    preview is the coloured mask alone. The map is the image fitted into ``max_size``; the
    nodata label is transparent (the source shows through unblended, or alpha 0 without a
    source). With ``legend``, a white panel below the map lists each class's colour and name
    (it may make the PNG wider than the map when one name is long).
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError("alpha", f"must be within [0, 1], got {alpha}")
    meta = read_output_meta(zarr_uri)
    group = _open_group(zarr_uri)
    out_h, out_w = preview_shape(meta.height, meta.width, max_size)
    labels = _sample_labels(group, meta.levels, out_h, out_w)
    rgba = colorize(labels, label_lut(meta))
    background = source_thumbnail(source or meta.source, out_h, out_w) if (source or meta.source) else None
    if background is None:
        image = np.ascontiguousarray(rgba)
        image[..., 3] = np.where(rgba[..., 3] == 0, 0, 255)  # class colours opaque, nodata transparent
    else:
        a = (alpha / 255.0) * rgba[..., 3:4].astype(np.float32)
        blended = background.astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a
        image = np.dstack([np.clip(blended + 0.5, 0, 255).astype(np.uint8), np.full((out_h, out_w), 255, np.uint8)])
    if legend:
        panel = render_legend(meta, out_w)
        canvas = np.zeros((out_h + panel.shape[0], max(out_w, panel.shape[1]), 4), np.uint8)
        canvas[:out_h, :out_w] = image
        canvas[out_h:, : panel.shape[1]] = panel
        image = canvas
    with _local_target(path, ".png") as local:
        Image.fromarray(image, "RGBA").save(local)
    return path


@dataclass(frozen=True)
class Exports:
    """Which exports to write next to an output (``OUT/name.zarr`` → ``OUT/name.tif|.gpkg|.png``)."""

    cog: bool = False
    #: vector format = file extension without the dot: gpkg, geojson, json, shp, fgb or parquet
    vector: str | None = None
    preview: bool = False
    min_area: float = 0.0

    def __post_init__(self) -> None:
        if self.vector:
            object.__setattr__(self, "vector", self.vector.lower().lstrip("."))
            vector_driver("x." + self.vector)  # a one-line ConfigError for an unknown format

    def __bool__(self) -> bool:
        return bool(self.cog or self.vector or self.preview)


def write_exports(zarr_uri: str, source: str | None, exports: Exports, *, recompute: bool = True) -> dict[str, str]:
    """Write the requested exports next to a complete output; existing files are kept unless ``recompute``.

    Returns the written paths by kind: ``cog`` (plus its sidecars ``cog_style`` = the .qml and
    ``cog_aux`` = the .aux.xml), ``vector``, ``preview``.
    """
    if not exports:
        return {}
    stem = zarr_uri.removesuffix(".zarr")
    done: dict[str, str] = {}
    jobs = []
    if exports.cog:
        jobs.append(("cog", stem + ".tif", lambda p: export_cog(zarr_uri, p)))
    if exports.vector:
        jobs.append(("vector", f"{stem}.{exports.vector}",
                     lambda p: export_vectors(zarr_uri, p, min_area=exports.min_area)))
    if exports.preview:
        jobs.append(("preview", stem + ".png", lambda p: export_preview(zarr_uri, p, source=source)))
    for name, path, fn in jobs:
        fs, p = filesystem(strip_file_scheme(path))
        if recompute or not fs.exists(p):
            fn(path)
        done[name] = path
        if name == "cog":
            done["cog_style"], done["cog_aux"] = stem + ".qml", path + ".aux.xml"
    return done
