"""Cloud-Optimized GeoTIFF exports: the class ids (:func:`export_cog`) and the confidence (:func:`export_confidence`).

rasterio's ``driver="COG"`` buffers the whole raster until close, so the raster is written
window by window into a tiled GTiff next to the target, given internal overviews (mode
resampling for class ids: averaging them would invent classes; average for the confidence),
then copied to a COG with ``OVERVIEWS=FORCE_USE_EXISTING`` (a block-by-block copy). The GDAL
block cache is capped (:data:`GDAL_CACHE_MB`) so it cannot grow to the raster's size.

The class-id COG carries the output's class table (colour table, class names in the tags)
and, by default, the style sidecars of :mod:`segpipe.export.style`; the **nodata label**
(``segpipe.nodata_label``: 255 for uint8 class ids, 65,535 for uint16; absent in older
outputs, which then have none) is its NoData, transparent in its colour table.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from segpipe.core.errors import InputError, OutputError
from segpipe.core.geometry import ChunkGrid
from segpipe.export.meta import level_factor, level_georef, open_group, read_output_meta
from segpipe.export.style import label_lut, pam_xml, qgis_style
from segpipe.export.targets import local_target, output_stem, remove_quietly

#: GDAL block cache for exports, MB: enough to stream 512² blocks, far below a large raster
GDAL_CACHE_MB = 4
#: rasterio passes an integer GDAL_CACHEMAX to GDAL as bytes
GDAL_CACHE_BYTES = GDAL_CACHE_MB * 2**20
#: side of the GeoTIFF blocks (and COG tiles)
COG_BLOCK = 512


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
    with local_target(path, ".tif") as local:
        tmp = f"{local}.segpipe-tmp.tif"
        # stale sidecars of an earlier export would be read back by GDAL with the new COG
        remove_quietly(local + ".aux.xml", output_stem(local) + ".qml")
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
            remove_quietly(tmp, tmp + ".aux.xml", tmp + ".ovr")
        if sidecars is not None:
            try:
                sidecars(local)
            except OSError as e:
                raise OutputError(path, f"cannot write the style files next to the GeoTIFF ({e})") from None
    return path


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
    group = open_group(zarr_uri)
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
        with open(output_stem(local) + ".qml", "w", encoding="utf-8") as f:
            f.write(qgis_style(meta))

    return _write_cog(
        path, height=height, width=width, dtype=str(arr.dtype), read_window=read_window,
        window_side=_window_side(arr.chunks[-1]), crs_wkt=meta.crs_wkt,
        transform=level_georef(meta, level_factor(group, level)), resampling="mode", colormap=colormap,
        tags={"CLASSES": json.dumps(names), "SEGPIPE_SOURCE": meta.source or "",
              **({"NODATA_LABEL": str(nodata)} if nodata is not None else {})},
        band_tags={f"CLASS_{i}": n for i, n in enumerate(names)}, description="class_id",
        nodata=nodata, sidecars=sidecars if style else None,
    )


def export_confidence(zarr_uri: str, path: str, *, array: str = "probabilities") -> str:
    """Write the per-pixel maximum class probability (uint8, p × 255) as a COG (average overviews)."""
    meta = read_output_meta(zarr_uri)
    group = open_group(zarr_uri)
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
