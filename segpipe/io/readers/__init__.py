"""Image readers behind one interface (:mod:`.base`), chosen by content (:mod:`.registry`).

:mod:`.raster` reads anything GDAL reads through rasterio (EXIF rotation: :mod:`.orientation`);
:mod:`.slide` reads whole slides (OpenSlide, OME-TIFF through tifffile) at a pyramid level or
resolution (:mod:`.levels`); :mod:`.tissue` finds the tissue of a slide so empty chunks can be
skipped; :mod:`.cache` shares handles within a worker process.
"""

from segpipe.io.readers.base import ImageInfo, ImageReader
from segpipe.io.readers.cache import shared_reader, thread_reader, unpin_reader
from segpipe.io.readers.registry import open_image

__all__ = ["ImageInfo", "ImageReader", "open_image", "shared_reader", "thread_reader", "unpin_reader"]
