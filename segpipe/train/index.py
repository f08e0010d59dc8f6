"""The mask index: one windowed pass over a dataset's masks (class ids checked, class statistics).

:func:`index_masks` reads every mask (or vector labels, burned per window:
:func:`segpipe.labels.truth.open_truth`) once in 1024² windows, counts pixels per class, checks the
class ids against ``classes.json`` (naming the mask, row and column of the first bad id), and
records which 64-px **cells** hold which class (:class:`MaskIndex`), so class-balanced
sampling (:mod:`segpipe.train.sampler`) finds a pixel of a class without reading the masks again.
:func:`class_pixel_counts` gives the pixels per class (for the loss class weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window, ceil_div
from segpipe.io.readers import ImageReader
from segpipe.labels.dataset import IGNORE_INDEX, Dataset, Item
from segpipe.labels.truth import open_truth

#: side of the windows in which masks and images are scanned (never a whole raster at once)
SCAN_WINDOW = 1024
#: side of the cells of the class index used by class-balanced sampling
INDEX_CELL = 64


@dataclass
class MaskIndex:
    """What one windowed pass over the masks found.

    ``counts[i, c]`` = pixels of class ``c`` in item ``i``; ``ignored[i]`` = pixels marked 255.
    ``cells[i][c]`` = (flat cell ids, pixels of class ``c`` per cell) for the 64-px cells of
    item ``i`` that hold class ``c``; cell id = ``cy · ceil(width / cell) + cx``.
    """

    cell: int
    counts: np.ndarray
    ignored: np.ndarray
    cells: list[list[tuple[np.ndarray, np.ndarray]]]
    _cumulative: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def class_counts(self) -> np.ndarray:
        """Pixels per class over all items."""
        return self.counts.sum(axis=0)

    def cumulative(self, item: int, cls: int) -> np.ndarray:
        """Running pixel count over the cells of ``cls`` in ``item`` (for weighted picks)."""
        key = (item, cls)
        cum = self._cumulative.get(key)
        if cum is None:
            cum = np.cumsum(self.cells[item][cls][1], dtype=np.int64)
            self._cumulative[key] = cum
        return cum


def _scan_mask(item: Item, num_classes: int, cell: int, window: int,
               reader: ImageReader) -> tuple[np.ndarray, int, list[tuple[np.ndarray, np.ndarray]]]:
    k = num_classes + 1  # the last bin collects ignore pixels
    ncx = ceil_div(item.width, cell)
    counts = np.zeros(k, dtype=np.int64)
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(num_classes)]
    step = max(cell, window // cell * cell)  # windows aligned on the cell grid
    for y0 in range(0, item.height, step):
        for x0 in range(0, item.width, step):
            h, w = min(step, item.height - y0), min(step, item.width - x0)
            m = reader.read(Window(y0, x0, h, w))[0]
            lo, hi = int(m.min()), int(m.max())
            bad = (m < 0) | ((m >= num_classes) & (m != IGNORE_INDEX)) if lo < 0 or hi >= num_classes else None
            if bad is not None and bad.any():
                by, bx = (int(v[0]) for v in np.nonzero(bad))
                raise DatasetError(item.truth_uri, f"holds class id {int(m[by, bx])} (row {y0 + by}, column {x0 + bx}) "
                                                  f"but classes.json lists {num_classes} classes "
                                                  f"(valid ids 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")
            ids = m.astype(np.int64)
            ids[ids == IGNORE_INDEX] = num_classes
            # one bincount over (cell, class) pairs: cell index of each pixel within this window
            cy = (np.arange(h) // cell)[:, None]
            cx = (np.arange(w) // cell)[None, :]
            wcx = ceil_div(w, cell)
            local = (cy * wcx + cx) * k + ids
            nloc = ceil_div(h, cell) * wcx
            table = np.bincount(local.ravel(), minlength=nloc * k).reshape(nloc, k)
            counts += table.sum(axis=0)
            lcy, lcx = np.divmod(np.arange(nloc), wcx)
            global_ids = ((y0 // cell + lcy) * ncx + (x0 // cell + lcx)).astype(np.int64)
            for c in range(num_classes):
                col = table[:, c]
                nz = np.flatnonzero(col)
                if nz.size:
                    parts[c].append((global_ids[nz], col[nz].astype(np.uint16)))
    cells = []
    for c in range(num_classes):
        if parts[c]:
            ids_c = np.concatenate([p[0] for p in parts[c]])
            cnt_c = np.concatenate([p[1] for p in parts[c]])
        else:
            ids_c, cnt_c = np.zeros(0, np.int64), np.zeros(0, np.uint16)
        cells.append((ids_c, cnt_c))
    return counts[:num_classes], int(counts[num_classes]), cells


def index_masks(dataset: Dataset, *, cell: int = INDEX_CELL, window: int = SCAN_WINDOW,
                on_item: Callable[[int, int], None] | None = None) -> MaskIndex:
    """Read every mask once in ``window``² windows: class counts, id checks and the cell index.

    Raises :class:`DatasetError` naming the mask at the first class id outside ``classes.json``
    (255 = ignore is allowed). ``on_item(done, total)`` reports progress.
    """
    if cell < 1 or cell > 4096:
        raise ValueError("cell must be in 1..4096 (per-cell counts are uint16)")
    n, k = len(dataset.items), dataset.num_classes
    counts = np.zeros((n, k), dtype=np.int64)
    ignored = np.zeros(n, dtype=np.int64)
    cells: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for i, item in enumerate(dataset.items):
        reader = open_truth(dataset, item)
        try:
            c, ign, cl = _scan_mask(item, k, cell, window, reader)
        finally:
            reader.close()
        counts[i], ignored[i] = c, ign
        cells.append(cl)
        if on_item is not None:
            on_item(i + 1, n)
    return MaskIndex(cell, counts, ignored, cells)


def class_pixel_counts(dataset: Dataset, index: MaskIndex | None = None) -> np.ndarray:
    """Pixels per class over the dataset (int64, length = number of classes), read window by window."""
    return (index or index_masks(dataset)).class_counts()
