"""The pixel size a model is trained at, recorded in ``model.json`` (``resolution``).

``segment`` reads every image at that pixel size by default (:func:`segpipe.engine.segment.at_model_resolution`):
a model trained at 0.5 µm per pixel and run on a 0.25 µm slide otherwise sees cells twice their size
and gives garbage, silently. The resolution is the median over the training images (headers only):
``mpp`` for slides, ``gsd`` (CRS units per pixel) for georeferenced rasters; photos without either
record nothing. Every image is then read at that pixel size for training and validation (the same
pixel grid ``segment``, evaluation and corrections read it on), and a warning says how many are
resampled.
"""

from __future__ import annotations

import logging
import statistics

from segpipe.labels.dataset import Dataset, read_header
from segpipe.models.artifact import Resolution

log = logging.getLogger("segpipe.train.resolution")


def dataset_resolution(dataset: Dataset) -> Resolution | None:
    """The median mpp and/or ground sample distance of ``dataset``'s images (headers only; None when none has
    one). The images are then read at it (:func:`segpipe.labels.dataset.at_resolution`, which says how many
    are resampled), as ``segment`` will read them."""
    mpps: list[float] = []
    gsds: list[float] = []
    for item in dataset.items:
        grid = item.grid if item.grid is not None else read_header(item.image_uri).grid
        if grid.mpp:
            mpps.append(grid.mpp)
        if grid.pixel_size:
            gsds.append(grid.pixel_size)
    out = {key: statistics.median(found) for key, found in (("mpp", mpps), ("gsd", gsds)) if found}
    return Resolution(**out) if out else None
