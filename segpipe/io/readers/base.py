"""The reader interface: what every image reader knows (:class:`ImageInfo`) and does (:class:`ImageReader`).

A reader knows an image's size, bands, dtype and georeference, and reads any window of it —
including windows that extend past the image, filled by reflection
(:func:`segpipe.core.geometry.source_indices`). It never reads the whole image. Dataset
handles are not thread-safe: workers share one per image (:mod:`segpipe.io.readers.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from segpipe.core.geometry import Window
from segpipe.core.grid import PixelGrid


@dataclass(frozen=True)
class ImageInfo:
    """What the pipeline needs to know about a source image."""

    uri: str
    height: int
    width: int
    count: int  #: bands the reader returns (after band selection)
    dtype: str
    crs_wkt: str | None = None
    #: affine transform as (a, b, c, d, e, f): x = a·col + b·row + c, y = d·col + e·row + f
    transform: tuple[float, ...] | None = None
    nodata: float | None = None
    mpp: float | None = None  #: microns per pixel (slides)
    driver: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: the pixel grid served (:mod:`segpipe.core.grid`); None = the source's own full-resolution pixels
    on_grid: PixelGrid | None = None
    #: (height, width) of each pyramid level / overview of the source, level 0 first (() = one level)
    level_shapes: tuple[tuple[int, int], ...] = ()

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6

    @property
    def grid(self) -> PixelGrid:
        """The pixels this reader serves: its :attr:`on_grid`, else the native grid of its size and georeference."""
        if self.on_grid is not None:
            return self.on_grid
        return PixelGrid.native(self.height, self.width, crs_wkt=self.crs_wkt, transform=self.transform,
                                mpp=self.mpp)

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """:attr:`level_shapes`, or the image's own size alone."""
        return self.level_shapes or ((self.height, self.width),)


class ImageReader(Protocol):
    info: ImageInfo

    def read(self, window: Window) -> np.ndarray:
        """Pixels of ``window`` as (bands, h, w) in the source dtype; reflected outside the image."""

    def close(self) -> None: ...

    def __enter__(self) -> ImageReader:
        """Readers are context managers: ``with open_image(uri) as r:`` closes the handle."""

    def __exit__(self, *exc: object) -> None: ...
