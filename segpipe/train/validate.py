"""Validation during training, through the production engine.

:func:`validate` runs each validation image through :func:`segpipe.engine.tiled.infer_tiles`
— the same split, normalisation (the predictor's), batching, argmax, merge and nodata handling
as ``segpipe segment`` and ``segpipe evaluate`` — with a sink that scores each chunk against its
mask, so the validation mean IoU in the registry and a production evaluation with the same
tiling come from the same code. The training loop (:mod:`segpipe.train.loop`) keeps the
weights of the best validation mean IoU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.classes import nodata_label
from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Chunk, Window
from segpipe.core.metrics import ConfusionMatrix
from segpipe.core.settings import InferenceSettings, TilingSettings
from segpipe.engine.predictor import Predictor
from segpipe.engine.tiled import TilePlan, infer_tiles, whole_image_work
from segpipe.labels.dataset import IGNORE_INDEX, Dataset, open_item_image
from segpipe.labels.truth import open_truth
from segpipe.models.normalization import check_input, image_normalization

if TYPE_CHECKING:
    import torch

    from segpipe.models.artifact import ModelSpec


class ConfusionSink:
    """Scores each merged chunk against the same window of the truth mask."""

    def __init__(self, cm: ConfusionMatrix, mask: Any, mask_uri: str) -> None:
        self.cm, self.mask, self.mask_uri = cm, mask, mask_uri

    def write(self, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None) -> None:
        truth = self.mask.read(Window(chunk.y0, chunk.x0, chunk.h, chunk.w))[0]
        try:
            self.cm.update(truth, labels)
        except DatasetError as e:
            raise DatasetError(self.mask_uri, e.problem) from None


def validate(net: torch.nn.Module, dataset: Dataset, spec: ModelSpec, *, device: torch.device,
             precision: str = "fp32", tile: int = 1024, halo: int = 32, batch_size: int = 1,
             on_image: Callable[[int], None] | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``net`` over the whole images of ``dataset`` (255 in the masks is ignored).

    ``on_image(pixels)`` is called after each image (for a progress bar: validation of large images
    takes as long as an epoch).

    Images are cut into ``tile``² tiles with ``halo`` context (one tile when the image is smaller),
    exactly as ``segpipe segment --chunk-size TILE --tile-size TILE --halo HALO`` would.
    """
    cm = ConfusionMatrix(dataset.num_classes, ignore_index=IGNORE_INDEX, nodata="auto")
    settings = InferenceSettings(precision=precision, batch_size=batch_size)
    predictor = Predictor.from_network(net, spec, settings, device)
    tiling = TilingSettings(chunk_size=tile, halo=halo, tile_size=tile)
    nodata = nodata_label(spec.num_classes)
    was_training = net.training
    net.eval()
    try:
        for item in dataset.items:
            image = open_item_image(item)
            mask = open_truth(dataset, item)
            try:
                norm = check_input(spec, image.info, item.image_uri) or image_normalization(spec, image, item.image_uri)
                plan = TilePlan.of(tiling, image.info.height, image.info.width)
                infer_tiles(image, predictor, plan, whole_image_work(plan), ConfusionSink(cm, mask, item.truth_uri),
                            norm=norm, nodata=nodata, batch_size=batch_size)
                if on_image is not None:
                    on_image(image.info.height * image.info.width)
            finally:
                image.close()
                mask.close()
    finally:
        net.train(was_training)
    return cm
