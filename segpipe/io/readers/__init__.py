"""Image readers behind one interface (:mod:`.base`), chosen by content (:mod:`.registry`).

:mod:`.raster` reads anything GDAL reads through rasterio; :mod:`.slide` reads whole slides
(OpenSlide, OME-TIFF through tifffile) and computes tissue masks; :mod:`.cache` shares handles
within a worker process.
"""

from segpipe.io.readers.base import ImageInfo, ImageReader
from segpipe.io.readers.cache import shared_reader, thread_reader
from segpipe.io.readers.registry import open_image

__all__ = ["ImageInfo", "ImageReader", "open_image", "shared_reader", "thread_reader"]
