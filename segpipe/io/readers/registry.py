"""Which reader opens a file: a fixed registry, decided by content, not extension.

Whole slides first (OpenSlide recognises SVS/NDPI/MRXS/SCN/… and generic tiled TIFF pyramids;
tifffile recognises OME-TIFF), then anything GDAL reads through rasterio. A new reader is added
here, in :data:`READERS`; nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from segpipe.core.errors import InputError
from segpipe.io.readers.base import ImageReader
from segpipe.io.readers.omezarr import open_omezarr
from segpipe.io.readers.raster import RasterioReader, check_local_file
from segpipe.io.readers.resample import at_pixel_size
from segpipe.io.readers.slide import open_slide


def _rasterio(uri: str, bands: Sequence[int] | None, level: int | None = None,
              mpp: float | None = None) -> ImageReader:
    return RasterioReader(uri, bands, level=level)


#: tried in order; each returns a reader, or None for "not mine"
READERS: tuple[Callable[..., ImageReader | None], ...] = (open_slide, open_omezarr, _rasterio)


def open_image(uri: str, bands: Sequence[int] | None = None, level: int | None = None,
               mpp: float | None = None, gsd: float | None = None) -> ImageReader:
    """Open ``uri`` with the first reader that accepts its content (``level``/``mpp``/``gsd``: which resolution;
    ``gsd`` = pixel size in CRS units, for georeferenced rasters: :func:`~segpipe.io.readers.resample.at_pixel_size`)."""
    check_local_file(uri)
    for opener in READERS:
        reader = opener(uri, bands, level=level, mpp=mpp)
        if reader is not None:
            return reader if gsd is None else at_pixel_size(reader, gsd, uri)
    raise InputError(uri, "no reader accepts this file")
