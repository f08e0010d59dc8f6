"""Which reader opens a file, and on which pixel grid: a fixed registry, decided by content, not extension.

Whole slides first (OpenSlide recognises SVS/NDPI/MRXS/SCN/… and generic tiled TIFF pyramids;
tifffile recognises OME-TIFF), then anything GDAL reads through rasterio. A new reader is added
here, in :data:`READERS`; nothing registers itself on import.

Every image is opened on one :class:`~segpipe.core.grid.PixelGrid` (:func:`open_image`): the grid
is decided from the source's header (:func:`choose_grid`: a ``level``, an ``mpp``, a ``gsd``, or
the native pixels) or passed in by a caller that decided it already, and the reader serves exactly
that grid (:func:`segpipe.io.readers.resample.on_grid`: the nearest finer pyramid level or
overview, then area averaging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.grid import PixelGrid, grid_at, grid_at_level
from segpipe.io.readers.base import ImageInfo, ImageReader
from segpipe.io.readers.omezarr import open_omezarr
from segpipe.io.readers.raster import RasterioReader, check_local_file
from segpipe.io.readers.resample import on_grid
from segpipe.io.readers.slide import open_slide


def _rasterio(uri: str, bands: Sequence[int] | None, level: int | None = None) -> ImageReader:
    return RasterioReader(uri, bands, level=level)


#: tried in order; each returns a reader at a pyramid level (None = level 0), or None for "not mine"
READERS: tuple[Callable[..., ImageReader | None], ...] = (open_slide, open_omezarr, _rasterio)


def choose_grid(info: ImageInfo, *, level: int | None = None, mpp: float | None = None,
                gsd: float | None = None) -> PixelGrid:
    """The grid an image (``info``: its level-0 header) is read on: pyramid level ``level`` as it is,
    ``mpp`` microns (slides) or ``gsd`` CRS units (georeferenced rasters) per pixel, else its own pixels.
    A resolution that matches a level's (:data:`~segpipe.core.grid.SAME_PIXEL_SIZE`) is that level."""
    uri = info.uri
    native = info.grid
    if sum(v is not None for v in (level, mpp, gsd)) > 1:
        raise ConfigError(uri, "choose one of a pyramid level, an mpp or a gsd")
    if level is not None:
        count = len(info.levels)
        if not 0 <= level < count:
            raise InputError(uri, f"has {count} pyramid level(s) (0–{count - 1}); level {level} does not exist")
        return grid_at_level(native, info.levels, level)
    if mpp is None and gsd is None:
        return native
    try:
        return grid_at(native, mpp=mpp, gsd=gsd, level_shapes=info.levels)
    except ValueError:
        if mpp is not None:
            raise InputError(uri, "records no microns-per-pixel; choose a pyramid level instead of an mpp") from None
        raise InputError(uri, f"has no georeference, so it cannot be read at a ground sample distance of {gsd:g}; "
                              "use --level or --mpp, or a model without a recorded gsd") from None


def open_native(uri: str, bands: Sequence[int] | None = None) -> tuple[ImageReader, Callable[[int], ImageReader]]:
    """(the reader of ``uri``'s full-resolution pixels, a function that opens the same file at a pyramid level)."""
    check_local_file(uri)
    for opener in READERS:
        reader = opener(uri, bands)
        if reader is not None:
            return reader, partial(opener, uri, bands)  # type: ignore[return-value]
    raise InputError(uri, "no reader accepts this file")


def open_image(uri: str, bands: Sequence[int] | None = None, level: int | None = None,
               mpp: float | None = None, gsd: float | None = None, *, grid: PixelGrid | None = None) -> ImageReader:
    """Open ``uri`` with the first reader that accepts its content, on ``grid`` (decided by the caller) or on
    the grid ``level`` / ``mpp`` / ``gsd`` choose (:func:`choose_grid`); ``reader.info.grid`` is that grid."""
    reader, at_level = open_native(uri, bands)
    try:
        chosen = grid if grid is not None else choose_grid(reader.info, level=level, mpp=mpp, gsd=gsd)
    except BaseException:
        reader.close()
        raise
    try:
        return on_grid(reader, chosen, reopen_level=at_level)
    except ValueError as e:  # a grid decided for another version of the file
        raise InputError(uri, f"does not match the pixel grid it was planned on ({e})") from None
