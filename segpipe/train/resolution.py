"""The pixel size a model is trained at, recorded in ``model.json`` (``resolution``).

``segment`` reads every image at that pixel size by default (:func:`segpipe.engine.segment.at_model_resolution`):
a model trained at 0.5 µm per pixel and run on a 0.25 µm slide otherwise sees cells twice their size
and gives garbage, silently. The resolution is the median over the training images (headers only):
``mpp`` for slides, ``gsd`` (CRS units per pixel) for georeferenced rasters; photos without either
record nothing. Images whose pixel sizes differ by more than 10 % are named in a warning: the
model then learns several scales, and the recorded one is their median.
"""

from __future__ import annotations

import logging
import statistics

from segpipe.io.readers.resample import pixel_size
from segpipe.labels.dataset import Dataset, open_reader
from segpipe.models.artifact import Resolution

log = logging.getLogger("segpipe.train.resolution")

#: relative spread of pixel sizes above which the training images are said to mix scales
MIXED_SCALES = 0.10


def dataset_resolution(dataset: Dataset) -> Resolution | None:
    """The median mpp and/or ground sample distance of ``dataset``'s images (None when none has one)."""
    mpps: dict[str, float] = {}
    gsds: dict[str, float] = {}
    for item in dataset.items:
        reader = open_reader(item.image_uri)
        try:
            if reader.info.mpp:
                mpps[item.image_uri] = reader.info.mpp
            size = pixel_size(reader.info)
            if size:
                gsds[item.image_uri] = size
        finally:
            reader.close()
    out = {}
    for key, found in (("mpp", mpps), ("gsd", gsds)):
        if not found:
            continue
        median = statistics.median(found.values())
        odd = [u for u, v in found.items() if abs(v / median - 1) > MIXED_SCALES]
        if odd:
            log.warning("%s: %d training image(s) differ from the median pixel size %g (%s) by more than %d %% "
                        "(first: %s); the model is recorded at the median", dataset.root, len(odd), median, key,
                        round(MIXED_SCALES * 100), odd[0])
        out[key] = median
    return Resolution(**out) if out else None
