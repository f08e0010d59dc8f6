"""segpipe.engine.tiled without Dask or a network: split → predict → merge → sink on small arrays.

The fake predictor's label of a pixel depends only on that pixel's value, so for *any* tiling
(chunk, tile = k · chunk, halo, padding to ``multiple_of``) the stitched labels must equal the
same function applied to the whole image: every misplaced crop, lost edge row, wrong halo
offset or double write shows up as a wrong pixel.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from segpipe.core.geometry import ChunkGrid, Window, effective_tile_size, source_indices, tile_side
from segpipe.core.settings import TilingSettings
from segpipe.engine.tiled import ArraySink, TilePlan, TileStats, infer_tiles, merge, whole_image_work
from segpipe.io.readers.base import ImageInfo

K = 7  # classes of the fake model


def label_of(values: np.ndarray) -> np.ndarray:
    """The fake model: a pixel's class from its own value only."""
    return (values % K).astype(np.uint8)


class MemoryReader:
    """An in-memory image behind the reader interface: ``read`` reflects outside, like every reader."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.image = image
        self.valid = valid
        bands, h, w = image.shape
        self.info = ImageInfo(uri="memory://image", height=h, width=w, count=bands, dtype=image.dtype.name)
        self.windows: list[Window] = []
        self.valid_windows: list[Window] = []

    @property
    def has_mask(self) -> bool:
        return self.valid is not None

    def read(self, window: Window) -> np.ndarray:
        self.windows.append(window)
        ys, xs = source_indices(window, self.info.height, self.info.width)
        return self.image[:, ys][:, :, xs]

    def read_valid(self, window: Window) -> np.ndarray | None:
        self.valid_windows.append(window)
        assert window.inside(self.info.height, self.info.width)  # only tile cores are asked for
        return self.valid[window.y0:window.y1, window.x0:window.x1]

    def close(self) -> None:
        pass


class PixelwisePredictor:
    """Labels (and one-hot probabilities) from band 0 of each window, pixel by pixel; records its batches."""

    def __init__(self, side: int, probabilities: bool = False) -> None:
        self.side = side
        self.probabilities = probabilities
        self.batches: list[int] = []

    def predict(self, tiles: np.ndarray, norm=None, crop=None) -> tuple[np.ndarray, np.ndarray | None]:
        n, _, h, w = tiles.shape
        assert (h, w) == (self.side, self.side)  # every window has the same size, so tiles batch together
        self.batches.append(n)
        labels = label_of(tiles[:, 0])
        if crop is not None:  # the predictor's contract: only [offset, offset + side) of both axes
            o, side = crop
            assert o + side <= min(h, w)
            labels = labels[:, o:o + side, o:o + side]
        probs = None
        if self.probabilities:
            probs = (np.arange(K)[None, :, None, None] == labels[:, None]).astype(np.uint8) * 255
        return labels, probs


class RecordingSink:
    """Every write, by chunk key (a chunk written twice fails the test)."""

    def __init__(self) -> None:
        self.writes: dict[tuple[int, int], tuple] = {}

    def write(self, chunk, labels, probs) -> None:
        assert chunk.key not in self.writes, f"chunk {chunk.key} written twice"
        assert labels.shape == (chunk.h, chunk.w)
        self.writes[chunk.key] = (chunk, labels.copy(), None if probs is None else probs.copy())


def make_image(h: int, w: int, bands: int = 2, seed: int = 0) -> np.ndarray:
    """Band 0: a value unique to each pixel (mixed with noise), so misplaced pixels change class."""
    rng = np.random.default_rng(seed)
    first = (np.arange(h * w, dtype=np.int64).reshape(h, w) * 3 + rng.integers(0, 5, (h, w))).astype(np.int32)
    rest = rng.integers(0, 255, (bands - 1, h, w)).astype(np.int32)
    return np.concatenate([first[None], rest])


def plan_for(h: int, w: int, chunk: int, k: int, halo: int, multiple_of: int = 32) -> TilePlan:
    return TilePlan(h, w, chunk, effective_tile_size(k * chunk, chunk, h, w), halo, multiple_of)


# (height, width, chunk, k = tile / chunk, halo, multiple_of)
CASES = [
    (1, 1, 16, 1, 0, 32),  # one pixel
    (1, 1, 16, 3, 8, 32),
    (1, 1, 4, 2, 5, 1),  # halo larger than the image: reflection of a 1-pixel axis
    (1, 37, 16, 3, 4, 32),  # one row
    (37, 1, 16, 2, 4, 32),  # one column
    (5, 7, 16, 1, 16, 32),  # smaller than a chunk
    (5, 7, 16, 3, 2, 8),
    (3, 5, 16, 1, 20, 32),  # halo bigger than the image: reflection over several periods
    (16, 16, 16, 1, 0, 32),  # exactly one chunk
    (17, 33, 16, 1, 3, 32),  # one pixel past a chunk: 1-pixel edge chunks
    (64, 64, 16, 2, 0, 1),  # halo 0, no padding, whole tiles
    (50, 70, 16, 3, 5, 32),  # edge tiles holding fewer than k × k chunks
    (70, 50, 16, 2, 16, 16),
    (100, 45, 32, 3, 32, 32),  # halo = chunk
    (33, 95, 8, 4, 1, 8),
    (96, 96, 32, 3, 0, 32),  # one tile holds the whole image
    (97, 96, 32, 3, 7, 32),  # ... and one more row of tiles
    (41, 29, 6, 5, 3, 4),
]


@pytest.mark.parametrize(("h", "w", "chunk", "k", "halo", "multiple_of"), CASES)
def test_tiled_labels_equal_the_pixelwise_function_of_the_whole_image(h, w, chunk, k, halo, multiple_of):
    image = make_image(h, w)
    plan = plan_for(h, w, chunk, k, halo, multiple_of)
    assert plan.window_side == tile_side(plan.tile_size, halo, multiple_of) >= plan.tile_size + 2 * halo
    reader = MemoryReader(image)
    predictor = PixelwisePredictor(plan.window_side)
    sink = ArraySink(h, w)
    work = whole_image_work(plan)
    stats = infer_tiles(reader, predictor, plan, work, sink, batch_size=1)
    expected = label_of(image[0])
    np.testing.assert_array_equal(sink.labels, expected)
    # one window per tile, each the tile core plus the halo, starting halo pixels before it
    assert len(reader.windows) == len(plan.tiles) == len(work)
    assert [(win.y0, win.x0) for win in reader.windows] == [(t.y0 - halo, t.x0 - halo) for t in plan.tiles]
    assert stats.chunks == len(plan.grid) and stats.skipped == 0
    assert (stats.min_label, stats.max_label) == (int(expected.min()), int(expected.max()))
    assert stats.content  # band 0 and band 1 differ, so every window holds more than one value
    # a constant image: no content, one class everywhere (what segment_image warns about)
    flat = infer_tiles(MemoryReader(np.full((1, h, w), 9, np.int32)), predictor, plan, work, ArraySink(h, w))
    assert not flat.content and flat.min_label == flat.max_label == 9 % K


def test_every_chunk_is_written_once_with_its_own_probabilities():
    h, w = 45, 61
    image = make_image(h, w)
    plan = plan_for(h, w, 8, 3, 4, 16)
    predictor = PixelwisePredictor(plan.window_side, probabilities=True)
    sink = RecordingSink()
    infer_tiles(MemoryReader(image), predictor, plan, whole_image_work(plan), sink, batch_size=4)
    assert set(sink.writes) == {c.key for c in ChunkGrid(h, w, 8)}
    expected = label_of(image[0])
    for chunk, labels, probs in sink.writes.values():
        core = expected[chunk.y0:chunk.y0 + chunk.h, chunk.x0:chunk.x0 + chunk.w]
        np.testing.assert_array_equal(labels, core)
        assert probs.shape == (K, chunk.h, chunk.w)
        np.testing.assert_array_equal(probs.argmax(0), core)
        assert (probs.sum(0) == 255).all()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
def test_batching_does_not_change_labels(batch_size):
    h, w = 50, 70
    image = make_image(h, w, seed=3)
    plan = plan_for(h, w, 16, 1, 6)
    predictor = PixelwisePredictor(plan.window_side)
    sink = ArraySink(h, w)
    infer_tiles(MemoryReader(image), predictor, plan, whole_image_work(plan), sink, batch_size=batch_size)
    np.testing.assert_array_equal(sink.labels, label_of(image[0]))
    n = len(plan.tiles)  # 4 × 5 tiles
    assert predictor.batches == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])


def test_partial_work_writes_only_the_chunks_asked_for():
    """Resuming: a tile is still read whole, but only its missing chunks reach the sink."""
    h, w = 40, 40
    image = make_image(h, w)
    plan = plan_for(h, w, 8, 2, 3)
    done = {(0, 0), (1, 1), (4, 4), (2, 3)}
    work = [(t, [c for c in plan.chunks(t) if c.key not in done]) for t in plan.tiles]
    work = [(t, cs) for t, cs in work if cs]
    sink = RecordingSink()
    stats = infer_tiles(MemoryReader(image), PixelwisePredictor(plan.window_side), plan, work, sink)
    assert set(sink.writes) == {c.key for c in plan.grid} - done
    assert stats.chunks == len(plan.grid) - len(done)
    expected = label_of(image[0])
    for chunk, labels, _ in sink.writes.values():
        np.testing.assert_array_equal(labels, expected[chunk.y0:chunk.y0 + chunk.h, chunk.x0:chunk.x0 + chunk.w])


def test_tile_plan_of_settings():
    s = TilingSettings(chunk_size=16, halo=4, tile_size=48, multiple_of=8)
    plan = TilePlan.of(s, 100, 30)
    assert (plan.chunk_size, plan.tile_size, plan.halo, plan.multiple_of) == (16, 48, 4, 8)
    assert plan.window_side == 56 and plan.tiles.shape == (3, 1) and plan.grid.shape == (7, 2)
    # never larger than the image in whole chunks
    assert TilePlan.of(s, 20, 30).tile_size == 32
    assert TilePlan.of(TilingSettings(chunk_size=16), 5, 5).tile_size == 16
    # each chunk lies in exactly one tile
    cells = list(itertools.chain.from_iterable(plan.chunks(t) for t in plan.tiles))
    assert sorted(c.key for c in cells) == sorted(c.key for c in plan.grid)


# ----------------------------------------------------------------------------- valid mask and skipping


def test_merge_applies_the_valid_mask():
    plan = TilePlan(20, 20, 8, 16, 2, 4)  # one 16² tile of four 8² chunks, window 20²
    tile = plan.tiles.chunk(0, 0)
    side = plan.window_side
    labels = np.arange(side * side, dtype=np.int64).reshape(side, side).astype(np.uint8) % 5
    probs = np.stack([np.full((side, side), 10 * (k + 1), np.uint8) for k in range(5)])
    valid = np.ones((16, 16), bool)
    valid[:8, :8] = False  # chunk (0, 0): no data at all
    valid[12, 3] = False  # chunk (1, 0): one pixel without data
    original = labels.copy(), probs.copy()
    out = {c.key: (lab, p) for c, lab, p in merge(plan, tile, labels, probs, plan.chunks(tile), valid, nodata=255)}
    assert set(out) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for (iy, ix), (lab, p) in out.items():
        core = labels[2 + 8 * iy:10 + 8 * iy, 2 + 8 * ix:10 + 8 * ix]
        v = valid[8 * iy:8 * iy + 8, 8 * ix:8 * ix + 8]
        np.testing.assert_array_equal(lab, np.where(v, core, 255))
        assert lab.dtype == np.uint8
        np.testing.assert_array_equal(p, np.where(v, probs[:, 2 + 8 * iy:10 + 8 * iy, 2 + 8 * ix:10 + 8 * ix], 0))
    assert (out[(0, 0)][0] == 255).all() and (out[(1, 0)][0] == 255).sum() == 1
    # the tile's prediction is not modified in place
    np.testing.assert_array_equal(labels, original[0])
    np.testing.assert_array_equal(probs, original[1])
    # without a mask: plain crops
    for c, lab, p in merge(plan, tile, labels, None, plan.chunks(tile)):
        np.testing.assert_array_equal(lab, labels[2 + c.y0:2 + c.y0 + c.h, 2 + c.x0:2 + c.x0 + c.w])
        assert p is None


def nodata_layout(h: int, w: int) -> np.ndarray:
    """Valid data except: a 16-px left strip, a whole 16² chunk in the middle, one invalid pixel."""
    valid = np.ones((h, w), bool)
    valid[:, :16] = False
    valid[16:32, 32:48] = False
    valid[h - 5, w - 7] = False
    return valid


@pytest.mark.parametrize("k", [1, 2, 3])
def test_all_nodata_chunks_are_skipped_and_counted(k):
    h, w = 60, 75
    image = make_image(h, w)
    valid = nodata_layout(h, w)
    plan = plan_for(h, w, 16, k, 4, 8)
    reader = MemoryReader(image, valid)
    predictor = PixelwisePredictor(plan.window_side)
    sink = RecordingSink()
    stats = infer_tiles(reader, predictor, plan, whole_image_work(plan), sink, nodata=255, skip_empty=True)
    grid = plan.grid
    empty = {c.key for c in grid if not valid[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w].any()}
    assert empty == {(iy, 0) for iy in range(grid.rows)} | {(1, 2)}
    assert stats.skipped == len(empty) and stats.chunks == len(grid)
    assert set(sink.writes) == {c.key for c in grid}  # skipped chunks are still written (as nodata)
    for key in empty:
        chunk, labels, probs = sink.writes[key]
        assert (labels == 255).all() and labels.dtype == np.uint8 and probs is None
    out = np.full((h, w), 0, np.uint8)
    for chunk, labels, _ in sink.writes.values():
        out[chunk.y0:chunk.y0 + chunk.h, chunk.x0:chunk.x0 + chunk.w] = labels
    np.testing.assert_array_equal(out, np.where(valid, label_of(image[0]), 255))
    # tiles whose core has no data at all never reach the model
    all_empty_tiles = [t for t in plan.tiles if not valid[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w].any()]
    assert len(reader.windows) == len(plan.tiles) - len(all_empty_tiles) == sum(predictor.batches)
    assert len(reader.valid_windows) == len(plan.tiles)
    if k == 1:
        assert len(all_empty_tiles) == len(empty)
    # labels seen exclude nodata
    assert stats.max_label < 255


def test_skip_empty_off_runs_the_model_everywhere():
    """Without skip_empty the mask is not read: every chunk goes through the model, none is skipped."""
    h, w = 40, 50
    image = make_image(h, w)
    reader = MemoryReader(image, nodata_layout(h, w))
    plan = plan_for(h, w, 16, 1, 2)
    sink = ArraySink(h, w)
    stats = infer_tiles(reader, PixelwisePredictor(plan.window_side), plan, whole_image_work(plan), sink,
                        skip_empty=False)
    assert stats.skipped == 0 and reader.valid_windows == []
    np.testing.assert_array_equal(sink.labels, label_of(image[0]))


def test_fully_valid_mask_changes_nothing_and_fill_gets_the_empty_chunks():
    h, w = 40, 50
    image = make_image(h, w)
    plan = plan_for(h, w, 16, 2, 2)
    sink = ArraySink(h, w)
    stats = infer_tiles(MemoryReader(image, np.ones((h, w), bool)), PixelwisePredictor(plan.window_side), plan,
                        whole_image_work(plan), sink)
    assert stats.skipped == 0
    np.testing.assert_array_equal(sink.labels, label_of(image[0]))

    # with a fill callable, skipped chunks go to it (not to the sink)
    filled: list[tuple] = []
    sink = RecordingSink()
    valid = nodata_layout(h, w)
    stats = infer_tiles(MemoryReader(image, valid), PixelwisePredictor(plan.window_side), plan,
                        whole_image_work(plan), sink, fill=lambda c, value: filled.append((c.key, value)))
    empty = {c.key for c in plan.grid if not valid[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w].any()}
    assert sorted(k for k, _ in filled) == sorted(empty) and all(v is None for _, v in filled)
    assert set(sink.writes) == {c.key for c in plan.grid} - empty
    assert stats.skipped == len(empty)


def test_uint16_nodata_for_many_classes():
    """Above 255 classes the nodata label is 65,535, and skipped chunks are written as uint16."""
    h, w = 20, 40
    image = make_image(h, w)
    valid = np.ones((h, w), bool)
    valid[:, :16] = False
    plan = plan_for(h, w, 16, 1, 2)
    sink = RecordingSink()
    stats = infer_tiles(MemoryReader(image, valid), PixelwisePredictor(plan.window_side), plan,
                        whole_image_work(plan), sink, nodata=65535)
    assert stats.skipped == 2
    for key in [(0, 0), (1, 0)]:
        labels = sink.writes[key][1]
        assert labels.dtype == np.uint16 and (labels == 65535).all()


def test_tile_stats_add_and_labels_seen():
    a, b = TileStats(), TileStats()
    a.labels_seen(np.array([[3, 255], [4, 255]], np.uint8), 255)
    a.labels_seen(np.full((2, 2), 255, np.uint8), 255)  # only nodata: nothing seen
    b.labels_seen(np.array([1, 2], np.uint8), 255)
    b.chunks, b.skipped, b.content = 5, 2, True
    a.add(b)
    assert (a.chunks, a.skipped, a.content, a.min_label, a.max_label) == (5, 2, True, 1, 4)
    empty = TileStats()
    empty.labels_seen(np.zeros((0, 0), np.uint8), 255)
    assert (empty.min_label, empty.max_label) == (1 << 30, -1)


def test_memory_reader_reflects_like_numpy_pad():
    """The test reader is a faithful reader: windows past the edges are numpy's reflect padding."""
    image = make_image(7, 9, bands=1)
    pad = 12
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    r = MemoryReader(image)
    for y0, x0, hh, ww in [(-12, -12, 31, 33), (-3, 5, 10, 10), (4, -7, 5, 20), (0, 0, 7, 9)]:
        np.testing.assert_array_equal(r.read(Window(y0, x0, hh, ww)),
                                      padded[:, y0 + pad:y0 + pad + hh, x0 + pad:x0 + pad + ww])


@pytest.mark.slow
def test_an_evicted_predictor_stops_its_compute_thread(model_dir, photo):
    """Defect 11: cached_predictor dropped the old entry of a device but not its compute thread, so two
    settings on one device (evicting each other per image) left a thread and a network behind each time.
    An evicted predictor still held by a task keeps predicting, in the task's own thread."""
    import threading

    from segpipe.core.settings import InferenceSettings
    from segpipe.engine import predictor as pr
    from segpipe.engine.job import check_model

    ref, _ = check_model(model_dir)
    tiles = np.ascontiguousarray(photo[None, :, :64, :64])

    def compute_threads() -> int:
        return sum(t.name.startswith("segpipe-compute") and t.is_alive() for t in threading.enumerate())

    settings = [InferenceSettings(device="cpu", precision="fp32", tta=tta) for tta in (False, True)]
    first = pr.cached_predictor(ref.uri, ref.sha256, settings[0])
    expected = first.predict(tiles)[0]
    start = compute_threads()
    for i in range(4):  # the two settings evict each other
        held = pr.cached_predictor(ref.uri, ref.sha256, settings[i % 2])
        held.predict(tiles)
    time.sleep(0.2)
    assert compute_threads() <= start + 1  # the live predictor's thread, not one per eviction
    np.testing.assert_array_equal(first.predict(tiles)[0], expected)  # evicted, still usable by its holder
    assert first._executor is None
