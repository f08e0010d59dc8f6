"""Validation during training: the confusion matrix of a network over whole validation images.

:func:`evaluate_network` predicts each validation image (in tiles with context when large) and
scores it against its mask; the training loop (:mod:`segpipe.train.loop`) keeps the weights of
the best validation mean IoU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import ChunkGrid, Window, core_in_window, input_window
from segpipe.evaluate.metrics import ConfusionMatrix
from segpipe.train.dataset import IGNORE_INDEX, Dataset, open_mask, open_reader

if TYPE_CHECKING:
    import torch


def evaluate_network(net: torch.nn.Module, dataset: Dataset, *, mean: list[float], std: list[float],
                     input_scale: float, device: torch.device, precision: str = "fp32", tile: int = 1024,
                     halo: int = 32, batch_size: int = 2) -> ConfusionMatrix:
    """Confusion matrix of ``net`` over whole images of ``dataset`` (255 in the masks is ignored).

    An image up to ``tile`` pixels on each side is predicted in one pass (reflect-padded to a
    multiple of 32); a larger one in ``tile``² chunks with ``halo`` context, read window by
    window, so validation images may be as large as inference images.
    """
    import torch

    cm = ConfusionMatrix(dataset.num_classes, ignore_index=IGNORE_INDEX)
    scale = torch.tensor([1.0 / (input_scale * s) for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32,
                        device=device).view(1, -1, 1, 1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    was_training = net.training
    net.eval()
    try:
        for item in dataset.items:
            single = item.height <= tile and item.width <= tile
            chunk_size = max(item.height, item.width) if single else tile
            h = 0 if single else halo
            grid = ChunkGrid(item.height, item.width, chunk_size)
            image = open_reader(item.image_uri)
            mask = open_mask(item.mask_uri)
            try:
                chunks = list(grid)
                for b in range(0, len(chunks), batch_size):
                    batch = chunks[b:b + batch_size]
                    tiles = np.stack([image.read(input_window(c, chunk_size, h)) for c in batch])
                    x = torch.from_numpy(tiles.astype(np.float32)).to(device).mul_(scale).add_(bias)
                    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        labels = net(x).argmax(dim=1).to(torch.int32).cpu().numpy()
                    for c, lab in zip(batch, labels, strict=True):
                        ys, xs = core_in_window(c, h)
                        truth = mask.read(Window(c.y0, c.x0, c.h, c.w))[0]
                        try:
                            cm.update(truth, lab[ys, xs])
                        except DatasetError as e:
                            raise DatasetError(item.mask_uri, e.problem) from None
            finally:
                image.close()
                mask.close()
    finally:
        net.train(was_training)
    return cm
