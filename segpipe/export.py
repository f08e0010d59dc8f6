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
  size, sampled with orthogonal indexing (only the chunks needed are decoded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.errors import ConfigError, InputError, OutputError
from segpipe.io.storage import filesystem, has_scheme, strip_file_scheme
from segpipe.tiling import ChunkGrid

#: GDAL block cache for exports, MB: enough to stream 512² blocks, far below a large raster
GDAL_CACHE_MB = 4
#: rasterio passes an integer GDAL_CACHEMAX to GDAL as bytes
GDAL_CACHE_BYTES = GDAL_CACHE_MB * 2**20
#: side of the GeoTIFF blocks (and COG tiles)
COG_BLOCK = 512
#: polygons buffered before they are appended to the vector file
_FEATURES_PER_WRITE = 2_000


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


def _hex_rgba(color: str) -> tuple[int, int, int, int]:
    c = color.lstrip("#")
    if len(c) not in (6, 8):
        raise ValueError(f"colour {color!r} is not #rrggbb")
    rgba = [int(c[i : i + 2], 16) for i in range(0, len(c), 2)]
    return (rgba[0], rgba[1], rgba[2], rgba[3] if len(rgba) == 4 else 255)


def output_palette(attrs: dict, num_classes: int) -> np.ndarray:
    """(K, 4) RGBA per class: ``segpipe.class_colors``, else NGFF ``image-label.colors``, else the default palette."""
    from segpipe.stitching import class_colors

    palette = np.array([_hex_rgba(c) for c in class_colors(num_classes)], np.uint8)
    label_colors = ((attrs.get("ome") or {}).get("image-label") or {}).get("colors") or []
    for entry in label_colors:
        value, rgba = entry.get("label-value"), entry.get("rgba")
        if isinstance(value, int) and 0 <= value < num_classes and rgba and len(rgba) == 4:
            palette[value] = rgba
    hexes = (attrs.get("segpipe") or {}).get("class_colors") or []
    for i, color in enumerate(hexes[:num_classes]):
        palette[i] = _hex_rgba(color)
    return palette


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
    return OutputMeta(
        uri=zarr_uri, height=int(height), width=int(width), classes=classes,
        colors=output_palette(attrs, num), crs_wkt=seg.get("crs_wkt"),
        transform=tuple(float(v) for v in transform) if transform else None,
        source=seg.get("source"), levels=levels,
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


@contextlib.contextmanager
def _local_target(path: str, suffix: str) -> Iterator[str]:
    """A local file path to write; for a remote ``path`` a temp file uploaded afterwards."""
    if not has_scheme(path):
        local = strip_file_scheme(path)
        parent = os.path.dirname(os.path.abspath(local))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise OutputError(path, f"cannot be written ({e.strerror or e})") from None
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
        local = os.path.join(tmp, "export" + suffix)
        yield local
        fs, remote = filesystem(path)
        try:
            fs.put_file(local, remote)
        except OSError as e:
            raise OutputError(path, f"cannot be uploaded ({e})") from None


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
) -> str:
    """Stream a one-band raster into a COG: tiled GTiff → internal overviews → COG copy."""
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
    with _local_target(path, ".tif") as local:
        tmp = f"{local}.segpipe-tmp.tif"
        try:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(tmp, "w", **profile) as ds:
                    for y0, x0, h, w in _windows(height, width, window_side):
                        ds.write(read_window(y0, x0, h, w), 1, window=RWindow(x0, y0, w, h))
                    if colormap:
                        ds.write_colormap(1, colormap)
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
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return path


def _georef(meta: OutputMeta, factor: float) -> tuple[float, ...] | None:
    if meta.transform is None:
        return None
    a, b, c, d, e, f = meta.transform
    return (a * factor, b * factor, c, d * factor, e * factor, f)


def export_cog(zarr_uri: str, path: str, *, level: str = "0") -> str:
    """Write the class ids of ``level`` as a Cloud-Optimized GeoTIFF (colour table, class names in tags).

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

    def read_window(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return arr[y0 : y0 + h, x0 : x0 + w]

    colormap = None
    if arr.dtype == np.uint8:  # GDAL colour tables are for 8-bit (and 16-bit) bands; classes fit in 8
        colormap = {i: tuple(int(v) for v in meta.colors[i]) for i in range(len(meta.colors))}
    names = list(meta.classes)
    return _write_cog(
        path, height=height, width=width, dtype=str(arr.dtype), read_window=read_window,
        window_side=_window_side(arr.chunks[-1]), crs_wkt=meta.crs_wkt,
        transform=_georef(meta, _level_factor(group, level)), resampling="mode", colormap=colormap,
        tags={"CLASSES": json.dumps(names), "SEGPIPE_SOURCE": meta.source or ""},
        band_tags={f"CLASS_{i}": n for i, n in enumerate(names)}, description="class_id",
    )


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

_VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


def vector_driver(path: str) -> str:
    """OGR driver for ``path`` by extension (.gpkg, .geojson, .json)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _VECTOR_DRIVERS:
        raise ConfigError(path, f"unknown vector format {ext!r}; use .gpkg or .geojson")
    return _VECTOR_DRIVERS[ext]


def sieve_block(read: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                y0: int, x0: int, h: int, w: int, size: int) -> np.ndarray:
    """Core ``(y0, x0, h, w)`` of ``rasterio.features.sieve(size)`` applied to core + a margin of ``size + 1``.

    Which pixels are removed is the same as a whole-image sieve: a 4-connected region with
    fewer than ``size`` pixels that touches the core lies within ``size`` pixels of it, and a
    larger region reaching past the margin has ≥ ``size`` pixels inside it. The class a
    removed region takes (GDAL: its largest neighbour) can differ from a whole-image sieve
    when competing neighbours are cut by the margin — a documented approximation.
    """
    from rasterio.features import sieve

    m = size + 1
    ya, xa = max(0, y0 - m), max(0, x0 - m)
    yb, xb = min(height, y0 + h + m), min(width, x0 + w + m)
    block = np.ascontiguousarray(read(ya, xa, yb - ya, xb - xa))
    sieved = sieve(block, size=size, connectivity=4)
    return sieved[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]


class _FeatureSink:
    """Buffers (class id, pixel-space polygon) and appends them, transformed, to the vector file."""

    def __init__(self, path: str, driver: str, meta: OutputMeta, factor: float, min_area: float) -> None:
        self.path, self.driver, self.meta, self.min_area = path, driver, meta, min_area
        t = _georef(meta, factor) or (factor, 0.0, 0.0, 0.0, factor, 0.0)
        self.matrix = np.array([[t[0], t[1]], [t[3], t[4]]])
        self.offset = np.array([t[2], t[5]])
        self.ids: list[int] = []
        self.geoms: list[Any] = []
        self.written = 0
        self.started = False

    def add(self, class_id: int, polygon: Any) -> None:
        self.ids.append(class_id)
        self.geoms.append(polygon)
        if len(self.geoms) >= _FEATURES_PER_WRITE:
            self.flush()

    def flush(self, final: bool = False) -> None:
        import shapely
        from pyogrio.raw import write

        if not self.geoms and (self.started or not final):
            return
        geoms = np.array(self.geoms, dtype=object)
        ids = np.array(self.ids, dtype=np.int32)
        self.geoms, self.ids = [], []
        if len(geoms):
            geoms = shapely.transform(geoms, lambda xy: xy @ self.matrix.T + self.offset)
        areas = shapely.area(geoms).astype(np.float64) if len(geoms) else np.zeros(0)
        keep = areas >= self.min_area
        geoms, ids, areas = geoms[keep], ids[keep], areas[keep]
        names = np.array([self.meta.classes[i] if i < len(self.meta.classes) else str(i) for i in ids], dtype=object)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
            write(
                self.path, shapely.to_wkb(geoms) if len(geoms) else np.array([], dtype=object),
                field_data=[ids, names, areas], fields=["class_id", "class_name", "area"],
                crs=self.meta.crs_wkt, geometry_type="Polygon", driver=self.driver,
                layer="segments" if self.driver == "GPKG" else None, append=self.started,
            )
        self.started = True
        self.written += len(geoms)


def export_vectors(
    zarr_uri: str, path: str, *, min_area: float = 0.0, sieve: int = 0, level: str = "0",
    classes: Sequence[int] | None = None, block_size: int | None = None,
) -> int:
    """Polygonise the class ids into one polygon per 4-connected region; returns the feature count.

    Written to GeoPackage (.gpkg, layer ``segments``) or GeoJSON (.geojson/.json) with
    attributes ``class_id``, ``class_name``, ``area`` (CRS units², pixels² when not
    georeferenced), in the output's CRS — pixel coordinates (x = column, y = row) when
    it has none (prefer .gpkg then: GeoJSON has no "no CRS", readers assume WGS 84).

    Blocks of ``block_size`` (default: the chunk side) are polygonised in pixel
    coordinates. A polygon that does not touch an internal block seam is complete and
    written at once. The others are merged row by row: after each block row, the open
    pieces of each class are unioned (exact: integer coordinates, and pieces of one class
    share an edge exactly where their pixels are 4-adjacent); merged polygons that do not
    reach the next block row are complete. Only pieces open along one block row are held.

    ``min_area`` drops polygons smaller than it (CRS units²); ``sieve`` > 0 first removes
    regions of fewer than ``sieve`` pixels per block with a margin (see :func:`sieve_block`);
    ``classes`` limits the export to those class ids (None = all, background included).
    """
    import shapely
    from affine import Affine
    from rasterio.features import shapes

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
    wanted = None if classes is None else np.array(sorted(set(int(c) for c in classes)))

    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return arr[y0 : y0 + h, x0 : x0 + w]

    with _local_target(path, os.path.splitext(path)[1]) as local:
        if os.path.exists(local):
            os.remove(local)
        sink = _FeatureSink(local, driver, meta, _level_factor(group, level), float(min_area))
        grid = ChunkGrid(height, width, side)
        pending: dict[int, list[Any]] = {}
        for iy in range(grid.rows):
            row_pieces: dict[int, list[Any]] = defaultdict(list)
            row_y0 = iy * side
            row_y1 = min(height, row_y0 + side)
            for ix in range(grid.cols):
                c = grid.chunk(iy, ix)
                if sieve > 0:
                    block = sieve_block(read, height, width, c.y0, c.x0, c.h, c.w, sieve)
                else:
                    block = read(c.y0, c.x0, c.h, c.w)
                block = np.ascontiguousarray(block)
                if block.dtype not in (np.uint8, np.uint16, np.int16, np.int32):
                    block = block.astype(np.int32)
                mask = None if wanted is None else np.isin(block, wanted)
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
        sink.flush(final=True)
    return sink.written


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
    from segpipe.io.readers import gdal_options, gdal_path

    try:
        from segpipe.io.slide import open_slide

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


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(h, w) class ids → (h, w, 4) RGBA; ids without a colour are grey."""
    lut = np.full((max(int(labels.max(initial=0)) + 1, len(colors)), 4), (128, 128, 128, 255), np.uint8)
    lut[: len(colors)] = colors
    return lut[labels]


def export_preview(
    zarr_uri: str, path: str, *, source: str | None = None, max_size: int = 1024, alpha: float = 0.5,
) -> str:
    """PNG preview: class colours blended (``alpha`` × the class colour's alpha) over the source thumbnail.

    ``source`` defaults to the output's recorded source; when it cannot be read the
    preview is the coloured mask alone. Size: the image fitted into ``max_size``.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError("alpha", f"must be within [0, 1], got {alpha}")
    meta = read_output_meta(zarr_uri)
    group = _open_group(zarr_uri)
    out_h, out_w = preview_shape(meta.height, meta.width, max_size)
    labels = _sample_labels(group, meta.levels, out_h, out_w)
    rgba = colorize(labels, meta.colors)
    background = source_thumbnail(source or meta.source, out_h, out_w) if (source or meta.source) else None
    if background is None:
        image = np.ascontiguousarray(rgba[..., :3])
    else:
        a = (alpha / 255.0) * rgba[..., 3:4].astype(np.float32)
        blended = background.astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a
        image = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    with _local_target(path, ".png") as local:
        Image.fromarray(image).save(local)
    return path


@dataclass(frozen=True)
class Exports:
    """Which exports to write next to an output (``OUT/name.zarr`` → ``OUT/name.tif|.gpkg|.png``)."""

    cog: bool = False
    vector: str | None = None  #: "gpkg" or "geojson"
    preview: bool = False
    min_area: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.cog or self.vector or self.preview)


def write_exports(zarr_uri: str, source: str | None, exports: Exports, *, recompute: bool = True) -> dict[str, str]:
    """Write the requested exports next to a complete output; existing files are kept unless ``recompute``."""
    if not exports:
        return {}
    stem = zarr_uri[: -len(".zarr")] if zarr_uri.endswith(".zarr") else zarr_uri
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
    return done
