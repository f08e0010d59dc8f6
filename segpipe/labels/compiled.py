"""Labels compiled once: an item's vector truth burned on its pixel grid, kept in the label cache.

A label file is read, reprojected, repaired and burned once per **file version, pixel grid and
rules** (:func:`compiled_labels`): the burned class ids go into a tiled raster of the label cache
(:mod:`segpipe.io.labelcache`), and every later reader — the mask index, the patch sampler,
validation, evaluation, corrections, in any process — opens that raster like a mask. The key is
every input of the pixels, so an edited file, another grid or other rules are compiled again and
nothing is ever served stale. How the truth is burned is the caller's (:mod:`segpipe.labels.truth`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable

import numpy as np

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window
from segpipe.core.grid import PixelGrid
from segpipe.io.labelcache import BLOCK, label_entry, write_class_raster
from segpipe.io.readers import ImageReader
from segpipe.io.readers.raster import RasterioReader
from segpipe.io.readers.resample import grid_info
from segpipe.io.storage import file_version
from segpipe.labels.dataset import Item

#: what a compiled label raster's key says about how it was made (bump when burning changes)
COMPILED_FORMAT = "segpipe-compiled-labels/1"


def file_key(uri: str | None) -> tuple:
    """A file's version (:func:`segpipe.io.storage.file_version`) with its URI; ``(None,)`` for no file."""
    if uri is None:
        return (None,)
    try:
        version = file_version(uri)
    except OSError:
        version = None
    if version is None:
        raise DatasetError(uri, "does not exist")
    return (uri, version)


def compiled_labels(item: Item, grid: PixelGrid, rules: str, burn: Callable[[], ImageReader]) -> ImageReader:
    """``item``'s vector truth on ``grid`` from the label cache; ``burn()`` makes the burning reader on a miss.

    ``rules`` is the fingerprint of the label rules (``classes.json``). The key also holds the files'
    versions (:func:`file_key`), the grid and the image's name (a COCO file holds several images).
    The reader returned has the grid's header and is named after the file people drew.
    """
    files = [file_key(item.labels_uri), file_key(item.regions_uri),
             file_key(item.mask_uri if item.labels_uri is None else None)]
    blob = json.dumps([COMPILED_FORMAT, files, grid.as_dict(), rules, item.name], sort_keys=True, default=str)
    path = label_entry(hashlib.sha256(blob.encode()).hexdigest()[:40])
    if not os.path.exists(path):
        _compile(burn(), path)
    # the cache's own format: opened straight with GDAL, without probing which reader a file needs
    reader = RasterioReader(path)
    reader.info = dataclasses.replace(grid_info(reader.info, grid), uri=item.truth_uri, driver="compiled-labels",
                                      extra={"compiled": path, "image": item.image_uri})
    return reader


def _compile(reader: ImageReader, path: str) -> None:
    """Burn ``reader`` (vector labels, regions) tile by tile into ``path``: one pass over the grid, in strips."""
    h, w = reader.info.height, reader.info.width

    def strips():
        for y0 in range(0, h, BLOCK):
            sh = min(BLOCK, h - y0)
            strip = np.empty((sh, w), dtype=np.uint8)
            for x0 in range(0, w, BLOCK):
                sw = min(BLOCK, w - x0)
                strip[:, x0:x0 + sw] = reader.read(Window(y0, x0, sh, sw))[0]
            yield strip

    with reader:
        write_class_raster(path, h, w, strips())
