"""Dataset layout, its errors, windowed class statistics and lazy patch sampling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from segpipe.core.errors import DatasetError
from segpipe.labels.dataset import IGNORE_INDEX, load_dataset, seeded_split, split_dataset
from segpipe.train.augment import NO_AUGMENT, AugmentSettings, resize_pair
from segpipe.train.index import class_pixel_counts, index_masks
from segpipe.train.normalization import band_statistics
from segpipe.train.sampler import PatchSampler
from tests.helpers import write_png

CLASSES = {"classes": [{"name": "background", "color": "#000000"}, {"name": "water"}, {"name": "road",
                                                                                        "color": "#808080"}]}


def _write(path: Path, array: np.ndarray) -> Path:
    """(bands, H, W) as a GeoTIFF, or as a PNG (grey or RGB) when the name says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        if array.shape[0] == 3:
            return write_png(path, array)
        from PIL import Image

        Image.fromarray(array[0]).save(path)
        return path
    import rasterio
    from affine import Affine

    tiled = array.shape[1] >= 256 and array.shape[2] >= 256
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=array.dtype.name, crs="EPSG:32633", transform=Affine(0.5, 0, 5e5, 0, -0.5, 41e5),
                       tiled=tiled, compress="deflate") as ds:
        ds.write(array)
    return path


def make_dataset(root: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], *, classes=CLASSES,
                 split: dict | None = None, mask_ext: str = ".tif") -> Path:
    """Write images/<name>.tif and masks/<name><mask_ext> for each (image, mask) pair."""
    for name, (image, mask) in pairs.items():
        _write(root / "images" / f"{name}.tif", image)
        _write(root / "masks" / f"{name}{mask_ext}", mask[None] if mask.ndim == 2 else mask)
    (root / "classes.json").write_text(json.dumps(classes))
    if split is not None:
        (root / "split.json").write_text(json.dumps(split))
    return root


def random_pair(rng: np.random.Generator, h: int, w: int, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    mask = rng.integers(0, k, (h, w), dtype=np.uint8)
    return image, mask


@pytest.fixture
def five(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    pairs = {n: random_pair(rng, 40, 48) for n in ("a", "b", "c", "d", "sub/e")}
    return make_dataset(tmp_path / "data", pairs)


# --------------------------------------------------------------------------- layout


def test_layout(five):
    ds = load_dataset(str(five))
    assert ds.names == ["a", "b", "c", "d", "sub/e"]
    assert ds.classes == ["background", "water", "road"]
    assert ds.colors[0] == "#000000" and ds.colors[2] == "#808080" and ds.colors[1].startswith("#")
    assert (ds.in_channels, ds.dtype, ds.num_classes) == (3, "uint8", 3)
    it = ds.items[4]
    assert (it.name, it.height, it.width) == ("sub/e", 40, 48)
    assert it.image_uri.endswith("images/sub/e.tif") and it.mask_uri.endswith("masks/sub/e.tif")
    # items start with (name, image_uri, mask_uri, height, width), then labels_uri and regions_uri
    name, image_uri, mask_uri, h, w = it[:5]
    assert (name, h, w) == ("sub/e", 40, 48)


def test_seeded_split(five):
    train = load_dataset(str(five), "train", seed=3)
    val = load_dataset(str(five), "val", seed=3)
    assert len(val.items) == 1 and len(train.items) == 4
    assert sorted(train.names + val.names) == ["a", "b", "c", "d", "sub/e"]
    assert load_dataset(str(five), "val", seed=3).names == val.names  # seeded
    assert split_dataset(load_dataset(str(five)), "val", 3).names == val.names
    assert seeded_split(["x"], 0) == {"train": ["x"], "val": []}
    assert len(seeded_split([f"n{i}" for i in range(2)], 0)["val"]) == 1
    assert len(seeded_split([f"n{i}" for i in range(10)], 0)["val"]) == 2


def test_split_file(five):
    (five / "split.json").write_text(json.dumps({"train": ["a", "b.tif", "sub/e"], "val": ["c"]}))
    assert load_dataset(str(five), "train").names == ["a", "b", "sub/e"]
    assert load_dataset(str(five), "val").names == ["c"]
    assert len(load_dataset(str(five)).items) == 5


def test_mask_extension_may_differ(tmp_path):
    rng = np.random.default_rng(1)
    root = make_dataset(tmp_path / "d", {"x": random_pair(rng, 33, 35)}, mask_ext=".png")
    ds = load_dataset(str(root))
    assert ds.items[0].mask_uri.endswith("masks/x.png")
    assert load_dataset(str(root), "val").items == []  # one image: nothing to validate on


# --------------------------------------------------------------------------- bad datasets


def _expect(root: Path, match: str, split: str | None = None, *, counts: bool = False) -> None:
    with pytest.raises(DatasetError, match=match) as ei:
        ds = load_dataset(str(root), split)
        if counts:
            class_pixel_counts(ds)
    assert "\n" not in str(ei.value)  # one line for the user


def test_mask_size_differs(five):
    _write(five / "masks" / "b.tif", np.zeros((1, 40, 47), np.uint8))
    _expect(five, r"masks/b\.tif: is 40×47 pixels but its image .*images/b\.tif is 40×48")


def test_image_without_mask(five):
    (five / "masks" / "c.tif").unlink()
    _expect(five, r"images/c\.tif: has no mask \(expected .*masks/c\.<ext>\)")


def test_empty_dataset(tmp_path):
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    _expect(root, r"images: holds no images: the dataset is empty")
    (root / "images").rmdir()
    _expect(root, r"images: does not exist")


@pytest.mark.parametrize("content, match", [
    ("{nope", r"classes\.json: is not valid JSON"),
    ("[]", r"classes\.json: top level: Input should be a valid dictionary"),
    ('{"names": ["a"]}', r"classes\.json: classes: Field required"),
    ('{"classes": []}', r"classes\.json: classes: List should have at least 1 item"),
    ('{"classes": [{"name": "a"}, {"name": "a"}]}', r"classes\.json: classes: .*'a' appears twice"),
    ('{"classes": [{"name": "a", "color": "red"}]}', r"classes\.json: classes\.0\.color: .*'red' is not a colour"),
    ('{"classes": [{"color": "#000000"}]}', r"classes\.json: classes\.0\.name: Field required"),
])
def test_malformed_classes(five, content, match):
    (five / "classes.json").write_text(content)
    _expect(five, match)


def test_class_colours_come_from_the_class_table(five):
    from segpipe.core.classes import DEFAULT_COLORS, class_colors

    (five / "classes.json").write_text(json.dumps({"classes": [
        {"name": "a", "color": "#ABC"}, {"name": "b"}, {"name": "c", "color": "#11223344"}, {"name": "d"}]}))
    ds = load_dataset(str(five))
    # explicit colours normalised by the one parser; missing ones = the outputs' default palette
    assert ds.colors == ["#aabbcc", DEFAULT_COLORS[1], "#11223344", DEFAULT_COLORS[3]]
    assert ds.colors == class_colors(4, ["#abc", None, "#11223344"])


def test_missing_classes(five):
    (five / "classes.json").unlink()
    _expect(five, r"classes\.json: missing")


@pytest.mark.parametrize("content, match", [
    ("{", r"split\.json: is not valid JSON"),
    ('["a"]', r"split\.json: must hold a JSON object"),
    ('{"train": "a"}', r"split\.json: 'train' must be a list of image names"),
    ('{"val": ["a"]}', r'split\.json: has no "train" list'),
    ('{"train": ["a", "zz", "yy"], "val": ["b"]}', r"split\.json: 'train' names image\(s\) not found under "
                                                   r"images/: zz, yy"),
    ('{"train": ["a"], "val": ["a"]}', r"split\.json: image 'a' is in both train and val"),
])
def test_malformed_split(five, content, match):
    (five / "split.json").write_text(content)
    _expect(five, match)


def test_unknown_split(five):
    _expect(five, r"unknown split 'test'; known: train, val", split="test")
    (five / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    assert load_dataset(str(five), "test").names == ["c"]


def test_class_id_out_of_range(five):
    mask = np.zeros((40, 48), np.uint8)
    mask[7, 9] = IGNORE_INDEX  # allowed
    mask[30, 20] = 5
    _write(five / "masks" / "d.tif", mask[None])
    ds = load_dataset(str(five))  # headers only: lazy
    with pytest.raises(DatasetError, match=r"masks/d\.tif: holds class id 5 \(row 30, column 20\) but "
                                           r"classes\.json lists 3 classes \(valid ids 0\.\.2, 255 = ignore\)"):
        class_pixel_counts(ds)


def test_bad_masks(five):
    _write(five / "masks" / "a.tif", np.zeros((2, 40, 48), np.uint8))
    _expect(five, r"masks/a\.tif: has 2 bands; a mask must be one band of class ids")
    _write(five / "masks" / "a.tif", np.zeros((1, 40, 48), np.float32))
    _expect(five, r"masks/a\.tif: holds float32 values; a mask must hold integer class ids")


def test_bands_must_agree(five):
    _write(five / "images" / "b.tif", np.zeros((5, 40, 48), np.uint8))
    _expect(five, r"images/b\.tif: has 5 band\(s\) but .*images/a\.tif has 3")


def test_corrupt_file(five):
    (five / "images" / "a.tif").write_bytes(b"not a tiff at all")
    _expect(five, r"images/a\.tif: not an image that GDAL can read")


# --------------------------------------------------------------------------- class statistics


def test_counts_and_cells_windowed(tmp_path):
    """Windowed counts (small windows, uneven edges) equal a whole-array bincount; cells are exact."""
    rng = np.random.default_rng(2)
    image, mask = random_pair(rng, 150, 130)
    mask[rng.random(mask.shape) < 0.1] = IGNORE_INDEX
    mask[:40, :] = 0
    root = make_dataset(tmp_path / "d", {"m": (image, mask)})
    ds = load_dataset(str(root))
    index = index_masks(ds, cell=16, window=64)
    expected = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=3)
    np.testing.assert_array_equal(index.counts[0], expected)
    np.testing.assert_array_equal(class_pixel_counts(ds), expected)
    assert index.ignored[0] == (mask == IGNORE_INDEX).sum()
    ncx = -(-130 // 16)
    for c in range(3):
        ids, cnt = index.cells[0][c]
        brute = {}
        for cy in range(-(-150 // 16)):
            for cx in range(ncx):
                n = int((mask[cy * 16:(cy + 1) * 16, cx * 16:(cx + 1) * 16] == c).sum())
                if n:
                    brute[cy * ncx + cx] = n
        assert dict(zip(ids.tolist(), cnt.tolist(), strict=True)) == brute


def test_band_statistics(tmp_path):
    rng = np.random.default_rng(3)
    pairs = {"a": random_pair(rng, 50, 70), "b": random_pair(rng, 30, 20)}
    pairs["a"][0][1] = 7  # constant band in one image only
    root = make_dataset(tmp_path / "d", pairs)
    mean, std = band_statistics(load_dataset(str(root)), 255.0, window=32, windows_per_image=100, stride=1)
    px = np.concatenate([p[0].reshape(3, -1) for p in pairs.values()], axis=1) / 255.0
    np.testing.assert_allclose(mean, px.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(std, px.std(axis=1), rtol=1e-9)


# --------------------------------------------------------------------------- patches


def _truth(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return ((ys // 4 + 2 * (xs // 4)) % 3).astype(np.uint8)


@pytest.fixture
def coords(tmp_path) -> Path:
    """Images whose two bands are their own row and column; masks a known function of them."""
    pairs = {}
    for name, (h, w) in {"big": (150, 200), "small": (40, 37)}.items():
        ys, xs = np.mgrid[0:h, 0:w]
        image = np.stack([ys, xs]).astype(np.uint16)
        pairs[name] = (image, _truth(ys, xs))
    return make_dataset(tmp_path / "coords", pairs)


def _sampler(root: Path, **kw) -> PatchSampler:
    ds = load_dataset(str(root))
    kw.setdefault("augment", NO_AUGMENT)
    return PatchSampler(ds, patch_size=32, patches_per_epoch=64, mean=[0, 0], std=[1, 1], input_scale=1.0, **kw)


@pytest.mark.parametrize("balanced", [False, True])
def test_patches_read_the_right_window(coords, balanced):
    sampler = _sampler(coords, class_balanced=balanced)
    for i in range(len(sampler)):
        plan = sampler.plan(i)
        image, mask = sampler[i]
        assert image.shape == (2, 32, 32) and image.dtype == np.float32
        assert mask.shape == (32, 32) and mask.dtype == np.int64
        it = sampler.dataset.items[plan.item]
        ys, xs = image[0].astype(np.int64), image[1].astype(np.int64)
        w = plan.window
        if w.inside(it.height, it.width):
            np.testing.assert_array_equal(ys[:, 0], np.arange(w.y0, w.y1))
            np.testing.assert_array_equal(xs[0], np.arange(w.x0, w.x1))
        # alignment holds inside and in the reflected margins alike
        np.testing.assert_array_equal(mask, _truth(ys, xs))
        if balanced:
            assert plan.target_class is not None


def test_augmentations_keep_alignment(coords):
    aug = AugmentSettings(flips=True, rotate90=True, brightness=0, contrast=0, scale=0)
    sampler = _sampler(coords, augment=aug)
    seen = set()
    for i in range(len(sampler)):
        plan = sampler.plan(i)
        seen.add((plan.flip_y, plan.flip_x, plan.rot90))
        image, mask = sampler[i]
        np.testing.assert_array_equal(mask, _truth(image[0].astype(np.int64), image[1].astype(np.int64)))
    assert len(seen) >= 8  # the flips and rotations were exercised


def test_scale_jitter_keeps_alignment(coords):
    aug = AugmentSettings(flips=True, rotate90=True, brightness=0, contrast=0, scale=0.5)
    sampler = _sampler(coords, augment=aug)
    sides, agree = set(), []
    for i in range(len(sampler)):
        sides.add(sampler.plan(i).window.h)
        image, mask = sampler[i]
        assert image.shape == (2, 32, 32) and mask.shape == (32, 32)
        # bilinear image coordinates round to the pixel the nearest-neighbour mask took
        ys, xs = np.rint(image[0]).astype(np.int64), np.rint(image[1]).astype(np.int64)
        agree.append((mask == _truth(ys, xs)).mean())
    assert len(sides) > 5 and min(sides) < 28 and max(sides) > 36
    assert np.mean(agree) > 0.97


def test_brightness_contrast(coords):
    aug = AugmentSettings(flips=False, rotate90=False, brightness=0.5, contrast=0.5, scale=0)
    plain, jittered = _sampler(coords), _sampler(coords, augment=aug)
    for i in range(8):
        p = jittered.plan(i)
        a, ma = plain[i]
        b, mb = jittered[i]
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_allclose(b, a * p.contrast + p.brightness, rtol=1e-6, atol=1e-3)


def test_resize_pair_nearest_and_identity():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    mask = np.arange(16).reshape(4, 4)
    same_img, same_mask = resize_pair(img, mask, 4)
    assert same_img is img and same_mask is mask
    up_img, up_mask = resize_pair(img, mask, 8)
    np.testing.assert_array_equal(up_mask, np.repeat(np.repeat(mask, 2, 0), 2, 1))
    assert up_img.shape == (1, 8, 8) and up_img.min() == 0 and up_img.max() == 15


def test_sampling_is_seeded_per_epoch(coords):
    a, b = _sampler(coords, seed=5), _sampler(coords, seed=5)
    assert [a.plan(i) for i in range(16)] == [b.plan(i) for i in range(16)]
    # order does not matter: patch i is a pure function of (seed, epoch, i)
    assert a.plan(9) == b.plan(9)
    before = [a.plan(i).window for i in range(16)]
    a.set_epoch(1)
    assert [a.plan(i).window for i in range(16)] != before
    c = pickle.loads(pickle.dumps(b))  # DataLoader workers get a pickled copy
    np.testing.assert_array_equal(c[3][0], b[3][0])


def test_class_balanced_sampling_raises_rare_share(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (3, 256, 256), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[200:212, 40:52] = 1  # 144 px: 0.2 % of the image
    mask[:, 128:] = 2
    root = make_dataset(tmp_path / "rare", {"r": (image, mask)})
    ds = load_dataset(str(root))

    def share(balanced: bool, power: float = 0.0) -> float:
        s = PatchSampler(ds, patch_size=32, patches_per_epoch=300, mean=[0.5] * 3, std=[0.25] * 3,
                         input_scale=255.0, class_balanced=balanced, balance_power=power, seed=0)
        return float(np.mean([(s[i][1] == 1).mean() for i in range(len(s))]))

    plain, balanced = share(False), share(True)
    assert plain < 0.01
    # a third of the patches are centred on class 1 and hold its whole square: 144/1024 px each
    assert 0.035 < balanced < 0.05 and balanced > 10 * plain
    assert share(True, power=1.0) > balanced  # favouring rare classes more
    s = PatchSampler(ds, patch_size=32, patches_per_epoch=300, mean=[0] * 3, std=[1] * 3, input_scale=1.0,
                     class_balanced=True, seed=0)
    np.testing.assert_allclose(s.class_probabilities(), [1 / 3] * 3)
    targets = [s.plan(i).target_class for i in range(300)]
    assert 70 < targets.count(1) < 130


def test_palette_masks_are_read_as_class_ids(five):
    """A colour-mapped mask (the usual PNG label format): its indices are the class ids, not RGB."""
    import rasterio

    from segpipe.core.geometry import Window
    from segpipe.labels.dataset import open_mask

    ids = np.zeros((40, 48), np.uint8)
    ids[:, 20:] = 2
    ids[:5, :5] = 255  # ignore
    for name in ("a", "b", "c", "d", "sub/e"):
        path = five / "masks" / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", height=40, width=48, count=1, dtype="uint8",
                           photometric="palette") as ds:
            ds.write(ids, 1)
            ds.write_colormap(1, {0: (0, 0, 0, 255), 1: (0, 0, 255, 255), 2: (128, 128, 128, 255)})
    with open_mask(str(five / "masks" / "a.tif")) as r:
        assert (r.info.count, r.info.dtype) == (1, "uint8")
        np.testing.assert_array_equal(r.read(Window(0, 0, 40, 48))[0], ids)
    ds = load_dataset(str(five))
    counts = index_masks(ds).class_counts()
    assert counts.tolist() == [5 * (20 * 40 - 25), 0, 5 * 28 * 40]
