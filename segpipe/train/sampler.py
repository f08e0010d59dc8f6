"""Lazy patch sampling for training: :class:`PatchSampler`, plain or class-balanced.

:class:`PatchSampler` reads one window per patch (map-style: patch ``i`` of epoch ``e`` is a
pure function of ``(seed, e, i)``, so any worker count and any resume point give the same
patches); class-balanced sampling picks a class, then a pixel of that class via the cell
index of :mod:`segpipe.train.index`, and centres the patch near it. Augmentations come from
:mod:`segpipe.train.augment`.

Readers: each thread (and DataLoader worker) keeps its own small LRU of open dataset readers
(:class:`_Readers`). It does not use :func:`segpipe.io.readers.cache.thread_reader`: masks must be
opened with :func:`segpipe.labels.truth.open_truth` (a palette mask read as its class ids, which
``thread_reader``'s ``open_image`` would expand to RGB colours; vector labels burned per window),
unreadable files must raise
:class:`~segpipe.core.errors.DatasetError` naming the file, and an image and its mask per
training image need more than ``thread_reader``'s 4 handles per thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window, ceil_div
from segpipe.io.readers import ImageReader
from segpipe.labels.dataset import IGNORE_INDEX, Dataset, Item, open_item_image
from segpipe.labels.truth import open_truth
from segpipe.train.augment import NO_AUGMENT, AugmentSettings, augment_pair, resize_pair
from segpipe.train.index import MaskIndex, index_masks

#: open readers (images and truths together) a sampler keeps per process: a patch picks a random image, so
#: with fewer handles than twice the images most patches reopened a file (header, probing, block cache lost)
HANDLES = 128


class _Readers(threading.local):
    """Open readers of this thread (LRU); dataset handles are not thread-safe and not picklable."""

    def __init__(self) -> None:
        self.cache: OrderedDict[str, ImageReader] = OrderedDict()

    def get(self, item: Item, size: int = HANDLES) -> ImageReader:
        """The image reader of ``item`` (at the dataset's resolution)."""
        return self._get("image:" + item.image_uri, lambda: open_item_image(item), size)

    def truth(self, dataset: Dataset, item: Item, size: int = HANDLES) -> ImageReader:
        """The class-id reader of ``item`` (mask, vector labels, regions)."""
        return self._get("truth:" + item.truth_uri, lambda: open_truth(dataset, item), size)

    def _get(self, key: str, opener: Callable[[], ImageReader], size: int) -> ImageReader:
        r = self.cache.get(key)
        if r is None:
            r = opener()
            self.cache[key] = r
            while len(self.cache) > size:
                self.cache.popitem(last=False)[1].close()
        else:
            self.cache.move_to_end(key)
        return r


@dataclass(frozen=True)
class PatchPlan:
    """Where patch ``i`` comes from and how it is augmented (a pure function of seed, epoch, i)."""

    item: int
    window: Window  #: read window (side = patch · scale factor)
    flip_y: bool
    flip_x: bool
    rot90: int
    contrast: float
    brightness: float
    target_class: int | None  #: the class the patch was centred on (class-balanced sampling)


def _labelled_cells(index: MaskIndex, item: int) -> tuple[np.ndarray, np.ndarray]:
    """The cells of ``item`` holding any labelled pixel, and the running count of those pixels."""
    parts = [p for p in index.cells[item] if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts]).astype(np.int64)
    cells, inverse = np.unique(ids, return_inverse=True)
    return cells, np.cumsum(np.bincount(inverse, weights=counts).astype(np.int64))


class PatchSampler:
    """Map-style dataset of ``patches_per_epoch`` random patches, read lazily window by window.

    ``sampler[i]`` → ``(image float32 (bands, P, P) normalised, mask int64 (P, P))``; it is a
    pure function of ``(seed, epoch, i)`` (set the epoch with :meth:`set_epoch`), so a
    ``torch.utils.data.DataLoader`` over it gives the same batches with any number of workers
    and after a resume. Positions:

    * plain: an image with probability ∝ its area, then a window uniformly inside it; when the
      index shows ignored pixels (sparse labels, regions), only where there are labels: an image
      ∝ its labelled pixels, a labelled pixel uniformly (via the cell index, as below), then a
      window uniformly among those inside the image that contain it;
    * class-balanced: a class ``c`` with probability ∝ freq_c^(−power) over the classes present
      (power 0 = uniform over classes), an image ∝ its pixels of ``c``, a pixel of ``c``
      uniformly (via the cell index: a cell ∝ its count, then the r-th such pixel in the cell,
      read from a one-cell window), and the patch centred on it ± P/4.

    Windows past the image edge are filled by reflection, in the image and the mask alike.
    """

    def __init__(self, dataset: Dataset, *, patch_size: int, patches_per_epoch: int,
                 mean: Sequence[float], std: Sequence[float], input_scale: float,
                 augment: AugmentSettings = NO_AUGMENT, index: MaskIndex | None = None,
                 class_balanced: bool = False, balance_power: float = 0.0, seed: int = 0) -> None:
        if not dataset.items:
            raise DatasetError(dataset.root, "no images to sample patches from")
        if class_balanced and index is None:
            index = index_masks(dataset)
        self.dataset = dataset
        self.patch_size = patch_size
        self.patches_per_epoch = patches_per_epoch
        self.scale = np.float32(1.0 / input_scale)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.augment = augment
        self.index = index
        self.class_balanced = class_balanced
        self.seed = seed
        self.epoch = 0
        areas = np.array([it.height * it.width for it in dataset.items], dtype=np.float64)
        self._item_p = areas / areas.sum()
        self._class_p: np.ndarray | None = None
        if class_balanced:
            assert index is not None
            totals = index.class_counts().astype(np.float64)
            present = totals > 0
            if not present.any():
                raise DatasetError(dataset.root, "the masks hold no labelled pixels (all 255 = ignore)")
            freq = totals / totals.sum()
            w = np.zeros_like(freq)
            w[present] = freq[present] ** (-balance_power)
            self._class_p = w / w.sum()
        #: sparse labels: per item (labelled cell ids, cumulative labelled pixels)
        self._labelled: list[tuple[np.ndarray, np.ndarray]] | None = None
        if not class_balanced and index is not None and int(index.ignored.sum()) > 0:
            self._labelled = [_labelled_cells(index, i) for i in range(len(dataset.items))]
            labelled = index.counts.sum(axis=1).astype(np.float64)
            if labelled.sum() == 0:
                raise DatasetError(dataset.root, "the masks hold no labelled pixels (all 255 = ignore)")
            self._item_p = labelled / labelled.sum()
        self._readers = _Readers()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = None  # open dataset handles stay in their process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._readers = _Readers()

    def set_epoch(self, epoch: int) -> None:
        """Patches of another epoch (0-based)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.patches_per_epoch

    def class_probabilities(self) -> np.ndarray | None:
        """Probability of picking each class (class-balanced sampling), else None."""
        return None if self._class_p is None else self._class_p.copy()

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def plan(self, i: int) -> PatchPlan:
        """The window and augmentation of patch ``i`` of the current epoch (no pixels read, except
        one index cell when class-balanced)."""
        if not 0 <= i < self.patches_per_epoch:
            raise IndexError(i)
        rng = self._rng(i)
        a = self.augment
        p = self.patch_size
        f = float(np.exp(rng.uniform(-np.log1p(a.scale), np.log1p(a.scale)))) if a.scale > 0 else 1.0
        side = max(8, int(round(p * f)))
        target = None
        if self._class_p is not None:
            assert self.index is not None
            target = int(rng.choice(len(self._class_p), p=self._class_p))
            per_item = self.index.counts[:, target].astype(np.float64)
            item = int(rng.choice(len(per_item), p=per_item / per_item.sum()))
            py, px = self._pixel_of_class(item, target, rng)
            jitter = rng.integers(-(side // 4), side // 4 + 1, size=2)
            y0, x0 = py + int(jitter[0]) - side // 2, px + int(jitter[1]) - side // 2
        elif self._labelled is not None:
            item = int(rng.choice(len(self._item_p), p=self._item_p))
            y0, x0 = self._window_on_labels(item, side, rng)
        else:
            item = int(rng.choice(len(self._item_p), p=self._item_p))
            it = self.dataset.items[item]
            y0 = int(rng.integers(0, max(it.height - side, 0) + 1))
            x0 = int(rng.integers(0, max(it.width - side, 0) + 1))
        flips = rng.random(2) < 0.5 if a.flips else (False, False)
        rot = int(rng.integers(0, 4)) if a.rotate90 else 0
        contrast = float(rng.uniform(1 - a.contrast, 1 + a.contrast)) if a.contrast > 0 else 1.0
        brightness = float(rng.uniform(-a.brightness, a.brightness)) if a.brightness > 0 else 0.0
        return PatchPlan(item, Window(int(y0), int(x0), side, side), bool(flips[0]), bool(flips[1]), rot,
                         contrast, brightness, target)

    def _window_on_labels(self, item: int, side: int, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of a ``side`` window holding a labelled pixel: a cell ∝ its labelled
        pixels, one of those pixels uniformly (read from a one-cell window), then a window
        uniformly among those inside the image that contain it."""
        assert self._labelled is not None and self.index is not None
        cell = self.index.cell
        it = self.dataset.items[item]
        ids, cum = self._labelled[item]
        r = int(rng.integers(0, int(cum[-1])))
        j = int(np.searchsorted(cum, r, side="right"))
        cy, cx = divmod(int(ids[j]), ceil_div(it.width, cell))
        y0, x0 = cy * cell, cx * cell
        m = self._readers.truth(self.dataset, it).read(
            Window(y0, x0, min(cell, it.height - y0), min(cell, it.width - x0)))[0]
        ys, xs = np.nonzero(m != IGNORE_INDEX)
        rank = r - (int(cum[j - 1]) if j else 0)
        if rank >= ys.size:
            raise DatasetError(it.truth_uri, "changed since its class index was built; index the dataset again")
        py, px = y0 + int(ys[rank]), x0 + int(xs[rank])

        def corner(p: int, size: int) -> int:
            # windows inside the image (when it is large enough) that contain p: lo ≤ hi always holds
            lo, hi = max(p - side + 1, 0), min(p, max(size - side, 0))
            return int(rng.integers(lo, hi + 1))

        return corner(py, it.height), corner(px, it.width)

    def _pixel_of_class(self, item: int, cls: int, rng: np.random.Generator) -> tuple[int, int]:
        assert self.index is not None
        cell = self.index.cell
        it = self.dataset.items[item]
        ids, _ = self.index.cells[item][cls]
        cum = self.index.cumulative(item, cls)
        r = int(rng.integers(0, int(cum[-1])))
        j = int(np.searchsorted(cum, r, side="right"))
        rank = r - (int(cum[j - 1]) if j else 0)
        cy, cx = divmod(int(ids[j]), ceil_div(it.width, cell))
        y0, x0 = cy * cell, cx * cell
        win = Window(y0, x0, min(cell, it.height - y0), min(cell, it.width - x0))
        m = self._readers.truth(self.dataset, it).read(win)[0]
        ys, xs = np.nonzero(m == cls)
        if rank >= ys.size:  # the mask changed since it was indexed
            raise DatasetError(it.truth_uri, "changed since its class index was built; index the dataset again")
        return y0 + int(ys[rank]), x0 + int(xs[rank])

    def read(self, plan: PatchPlan) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of a plan: (normalised float32 image, int64 mask), augmented and resized to the patch."""
        it = self.dataset.items[plan.item]
        image = self._readers.get(it).read(plan.window)
        mask = self._readers.truth(self.dataset, it).read(plan.window)[0]
        x = (image.astype(np.float32) * self.scale - self.mean) / self.std
        x, mask = resize_pair(x, mask, self.patch_size)
        x, mask = augment_pair(x, mask, flip_y=plan.flip_y, flip_x=plan.flip_x, rot90=plan.rot90,
                               contrast=plan.contrast, brightness=plan.brightness)
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(mask, dtype=np.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i`` of the current epoch, or ``(epoch, i)``: the key then carries the epoch, so
        persistent DataLoader workers (which hold a copy of the sampler) need no epoch update."""
        if isinstance(key, tuple):
            epoch, i = key
            if epoch != self.epoch:
                self.epoch = epoch
        else:
            i = key
        return self.read(self.plan(i))
