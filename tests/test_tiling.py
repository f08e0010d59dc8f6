import numpy as np
import pytest

from segpipe.core.geometry import (
    ChunkGrid,
    Window,
    batches,
    core_in_window,
    gather,
    index_runs,
    input_window,
    reflect_index,
    source_indices,
    strip_order,
    tile_side,
)


@pytest.mark.parametrize(
    ("h", "w", "c", "rows", "cols", "last_h", "last_w"),
    [
        (1024, 1024, 512, 2, 2, 512, 512),
        (1000, 700, 512, 2, 2, 488, 188),    # odd sizes
        (100, 60, 512, 1, 1, 100, 60),       # image smaller than one chunk
        (1, 777, 256, 1, 4, 1, 9),           # 1 pixel tall
        (777, 1, 256, 4, 1, 9, 1),           # 1 pixel wide
        (513, 513, 512, 2, 2, 1, 1),
    ],
)
def test_grid(h, w, c, rows, cols, last_h, last_w):
    g = ChunkGrid(h, w, c)
    assert g.shape == (rows, cols) and len(g) == rows * cols
    last = g.chunk(rows - 1, cols - 1)
    assert (last.h, last.w) == (last_h, last_w)
    # cores tile the image exactly once
    cover = np.zeros((h, w), np.int32)
    for ch in g:
        cover[ch.y0:ch.y0 + ch.h, ch.x0:ch.x0 + ch.w] += 1
    assert (cover == 1).all()


@pytest.mark.parametrize(("c", "halo", "m", "side"), [(512, 64, 32, 640), (512, 0, 32, 512), (500, 7, 32, 544),
                                                       (100, 10, 1, 120)])
def test_tile_side(c, halo, m, side):
    assert tile_side(c, halo, m) == side


def test_windows_and_cores():
    g = ChunkGrid(1000, 700, 512)
    ch = g.chunk(1, 1)
    win = input_window(ch, 512, 64)
    assert win == Window(512 - 64, 512 - 64, 640, 640)
    ys, xs = core_in_window(ch, 64)
    assert (ys.start, ys.stop, xs.start, xs.stop) == (64, 64 + 488, 64, 64 + 188)
    assert not win.inside(1000, 700) and Window(0, 0, 10, 10).inside(10, 10)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("pad", [0, 1, 5, 100])
def test_reflect_matches_numpy(size, pad):
    a = np.arange(size)
    expected = np.pad(a, pad, mode="reflect")
    got = a[reflect_index(np.arange(-pad, size + pad), size)]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("h", "w", "c", "halo"), [(37, 53, 16, 5), (1, 40, 16, 8), (40, 1, 16, 0), (9, 9, 32, 16)])
def test_windows_equal_numpy_pad(h, w, c, halo):
    img = np.random.default_rng(0).integers(0, 255, (h, w))
    side = tile_side(c, halo, 8)
    big = np.pad(img, side * 2, mode="reflect")
    for ch in ChunkGrid(h, w, c):
        win = input_window(ch, c, halo, 8)
        ys, xs = source_indices(win, h, w)
        got = img[ys[:, None], xs[None, :]]
        ref = big[win.y0 + side * 2: win.y1 + side * 2, win.x0 + side * 2: win.x1 + side * 2]
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    ("idx", "runs"),
    [
        ([], []),
        ([4], [(0, 1, 4, 1)]),
        ([2, 1, 0, 1, 2, 3], [(0, 3, 2, -1), (3, 6, 1, 1)]),  # a reflected margin, then the inside
        ([0, 1, 2, 1, 0], [(0, 3, 0, 1), (3, 5, 1, -1)]),
        ([0, 0, 0], [(0, 1, 0, 1), (1, 2, 0, 1), (2, 3, 0, 1)]),  # a 1-pixel axis: no run longer than 1
        ([5, 0, 1, 2], [(0, 1, 5, 1), (1, 2, 0, 1), (2, 4, 1, 1)]),
    ],
)
def test_index_runs(idx, runs):
    assert index_runs(np.array(idx, dtype=np.int64)) == runs


def test_gather_equals_fancy_indexing_for_every_reflected_window():
    """A window assembled from runs of its block equals the per-pixel gather it replaced, on windows inside,
    across and far past the edges (many runs: the fallback), 2-D and with a band axis."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        block = rng.integers(0, 255, (3, h, w)).astype(np.uint8)
        y0, x0 = (int(v) for v in rng.integers(-70, 70, 2))
        wh, ww = (int(v) for v in rng.integers(1, 120, 2))
        ys, xs = source_indices(Window(y0, x0, wh, ww), h, w)
        want = block[:, ys[:, None], xs[None, :]]
        got = gather(block, ys, xs)
        assert got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(gather(block[0], ys, xs), want[0])


def test_batches_and_bad_grid():
    assert batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        ChunkGrid(0, 10, 4)
    with pytest.raises(IndexError):
        ChunkGrid(10, 10, 4).chunk(3, 0)


def test_strip_order():
    g = ChunkGrid(3 * 10, 5 * 10, 10)  # 3 rows × 5 cols
    assert list(strip_order(g, 2)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1),
                                 (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3),
                                 (0, 4), (1, 4), (2, 4)]
    assert sorted(strip_order(g, 3)) == sorted(c.key for c in g)


@pytest.mark.parametrize(("h", "w"), [(-1, 4), (4, -1), (-3, -3)])
def test_window_refuses_negative_sizes(h, w):
    with pytest.raises(ValueError, match="negative size"):
        Window(0, 0, h, w)
    assert Window(-5, -5, 0, 0).h == 0  # empty and off-image windows are fine
