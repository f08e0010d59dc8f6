"""The label cache: compiled class-id rasters on local disk, written once, read by any process.

Where: ``$SEGPIPE_CACHE/labels`` (default ``$XDG_CACHE_HOME/segpipe/labels``, else
``~/.cache/segpipe/labels``). Each entry is one tiled, zstd-compressed single-band GeoTIFF named by a
key the caller derives from everything that decides its pixels; an entry is never modified, so the
folder can be deleted at any time (entries are recompiled on demand).

Written the way nothing half-written is ever seen: strips go into a hidden temporary file beside the
entry, which is renamed over the entry's name only once complete. Two processes compiling the same
entry (DataLoader workers, two Dask workers) both finish; the second rename replaces an identical file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable

import numpy as np

from segpipe.io.storage import cache_root

#: strip height a compiled raster is written in (and the side of the tiles it is burned in)
BLOCK = 512
#: tile side of a compiled raster: a training patch decodes a few small tiles, not a few 512² ones
TILE = 256


def label_entry(key: str) -> str:
    """The path of the compiled labels keyed ``key`` (it may not exist yet)."""
    return os.path.join(cache_root(), "labels", key[:2], f"{key}.tif")


def write_class_raster(path: str, height: int, width: int, strips: Iterable[np.ndarray]) -> str:
    """Write a uint8 ``height`` × ``width`` class-id raster at ``path`` from consecutive strips of
    :data:`BLOCK` rows (the last may be shorter), atomically; returns ``path``."""
    import rasterio
    from rasterio.windows import Window

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    profile = dict(driver="GTiff", height=height, width=width, count=1, dtype="uint8", tiled=True,
                   blockxsize=TILE, blockysize=TILE, compress="zstd", BIGTIFF="IF_SAFER")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            y0 = 0
            for strip in strips:
                dst.write(strip.astype(np.uint8, copy=False), 1, window=Window(0, y0, width, strip.shape[0]))
                y0 += strip.shape[0]
            if y0 != height:
                raise ValueError(f"{y0} rows written of {height}")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path
