"""Synthetic scenes: determinism, strip independence, class balance, learnability, GeoTIFF files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from scipy import ndimage as ndi
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import f1_score

from segpipe.core.errors import ConfigError
from segpipe.train.synthetic import PIXEL_SIZE, write_dataset, write_scene
from segpipe.train.synthetic_scene import CLASS_COLORS, CLASSES, generate_scene


def test_same_seed_same_scene_other_seed_other_scene() -> None:
    rgb_a, lab_a = generate_scene(200, 280, seed=7)
    rgb_b, lab_b = generate_scene(200, 280, seed=7)
    assert rgb_a.shape == (3, 200, 280) and rgb_a.dtype == np.uint8
    assert lab_a.shape == (200, 280) and lab_a.dtype == np.uint8
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(lab_a, lab_b)
    rgb_c, lab_c = generate_scene(200, 280, seed=8)
    assert (lab_a != lab_c).mean() > 0.1
    assert (rgb_a != rgb_c).mean() > 0.5


def test_strip_height_does_not_change_pixels() -> None:
    # rendering strip by strip must give exactly the whole-scene result, on uneven strips
    rgb_whole, lab_whole = generate_scene(301, 257, seed=3, strip_rows=1000)
    rgb_strips, lab_strips = generate_scene(301, 257, seed=3, strip_rows=37)
    np.testing.assert_array_equal(lab_strips, lab_whole)
    np.testing.assert_array_equal(rgb_strips, rgb_whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_fractions_are_realistic_and_every_class_present(seed: int) -> None:
    _, labels = generate_scene(1024, 1024, seed)
    assert labels.max() < len(CLASSES)
    fractions = dict(zip(CLASSES, np.bincount(labels.ravel(), minlength=len(CLASSES)) / labels.size))
    assert 0.30 <= fractions["bare_soil"] <= 0.60, fractions
    assert 0.20 <= fractions["vegetation"] <= 0.40, fractions
    assert 0.07 <= fractions["water"] <= 0.18, fractions
    assert 0.04 <= fractions["building"] <= 0.12, fractions
    assert 0.015 <= fractions["road"] <= 0.10, fractions
    # the imbalance is ordered as in real land cover
    assert fractions["bare_soil"] > fractions["vegetation"] > fractions["water"] > fractions["road"]


def test_buildings_never_stand_on_water() -> None:
    _, labels = generate_scene(512, 512, seed=5)
    grown = ndi.binary_dilation(labels == 3, iterations=1)
    assert not (grown & (labels == 1)).any()


def _local_features(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: 7×7 mean colour and 7×7 high-pass energy (a crude texture measure)."""
    x = rgb.astype(np.float32)
    mean = np.stack([ndi.uniform_filter(c, 7) for c in x])
    lum = x.mean(axis=0)
    high = lum - ndi.uniform_filter(lum, 3)
    texture = np.sqrt(ndi.uniform_filter(high * high, 7))
    return np.concatenate([mean, texture[None]]).reshape(4, -1).T


def test_classes_are_locally_distinguishable() -> None:
    # cheap learnability check: per-class mean colours differ, and a linear classifier on 7×7
    # colour/texture features fitted on one scene labels another scene well (no CNN needed)
    # 512 px: the smallest size at which every scene is guaranteed a road
    rgb_a, lab_a = generate_scene(512, 512, seed=11)
    rgb_b, lab_b = generate_scene(512, 512, seed=12)
    assert len(np.unique(lab_a)) == len(np.unique(lab_b)) == len(CLASSES)
    means = np.array([rgb_a[:, lab_a == c].mean(axis=1) for c in range(len(CLASSES))])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(CLASSES), dtype=bool)].min() > 20, means

    fa, fb = _local_features(rgb_a), _local_features(rgb_b)
    pick = np.random.default_rng(0).choice(fa.shape[0], 20_000, replace=False)
    clf = LinearDiscriminantAnalysis().fit(fa[pick], lab_a.ravel()[pick])
    pred = clf.predict(fb)
    assert (pred == lab_b.ravel()).mean() > 0.85
    per_class = f1_score(lab_b.ravel(), pred, labels=list(range(len(CLASSES))), average=None)
    assert per_class.min() > 0.4, dict(zip(CLASSES, per_class.round(2)))


def test_bad_sizes_raise() -> None:
    with pytest.raises(ConfigError, match="positive"):
        generate_scene(0, 10, seed=1)
    with pytest.raises(ConfigError, match="strip_rows"):
        generate_scene(10, 10, seed=1, strip_rows=0)


def test_write_dataset_layout(tmp_path) -> None:
    root = write_dataset(tmp_path / "data", n_images=5, size=96, seed=4)
    assert root == tmp_path / "data"
    classes = json.loads((root / "classes.json").read_text())
    assert classes == {"classes": [{"name": n, "color": c} for n, c in zip(CLASSES, CLASS_COLORS)]}
    assert all(c["color"].startswith("#") and len(c["color"]) == 7 for c in classes["classes"])

    split = json.loads((root / "split.json").read_text())
    names = sorted(p.stem for p in (root / "images").glob("*.tif"))
    assert len(names) == 5
    assert sorted(split["train"] + split["val"]) == names
    assert len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    assert sorted(p.stem for p in (root / "masks").glob("*.tif")) == names

    transforms = set()
    for name in names:
        with rasterio.open(root / "images" / f"{name}.tif") as img, \
                rasterio.open(root / "masks" / f"{name}.tif") as msk:
            assert img.count == 3 and msk.count == 1
            assert img.dtypes == ("uint8",) * 3 and msk.dtypes == ("uint8",)
            assert img.crs.to_epsg() == 32633 and msk.crs.to_epsg() == 32633
            assert img.transform == msk.transform
            assert (img.transform.a, img.transform.e) == (PIXEL_SIZE, -PIXEL_SIZE)
            assert (img.width, img.height) == (96, 96) == (msk.width, msk.height)
            assert img.profile["tiled"] and img.block_shapes[0] == (256, 256)
            assert img.compression.name == "deflate" and msk.compression.name == "deflate"
            labels = msk.read(1)
            assert labels.max() < len(CLASSES)
            assert img.read().std() > 5
            transforms.add(img.transform.c)
    assert len(transforms) == 5  # every scene has its own footprint

    again = write_dataset(tmp_path / "again", n_images=5, size=96, seed=4)
    assert json.loads((again / "split.json").read_text()) == split
    with rasterio.open(again / "masks" / f"{names[2]}.tif") as a, \
            rasterio.open(root / "masks" / f"{names[2]}.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_write_scene_equals_generate_scene(tmp_path) -> None:
    # 600 rows: two 512-row bands, the second partial; same pixels as the in-memory scene
    path = write_scene(tmp_path / "big" / "scene.tif", 600, 333, seed=9, mask_path=tmp_path / "big" / "mask.tif")
    rgb, labels = generate_scene(600, 333, seed=9)
    with rasterio.open(path) as img, rasterio.open(tmp_path / "big" / "mask.tif") as msk:
        assert img.crs.to_epsg() == 32633
        assert img.transform.a == PIXEL_SIZE and img.transform.e == -PIXEL_SIZE
        assert img.block_shapes[0] == (512, 512) and msk.block_shapes[0] == (512, 512)
        assert img.compression.name == "deflate"
        assert msk.transform == img.transform
        np.testing.assert_array_equal(img.read(), rgb)
        np.testing.assert_array_equal(msk.read(1), labels)
        assert msk.colormap(1)[4][:3] == (0x7F, 0x7F, 0x7F)


def test_write_scene_without_mask(tmp_path) -> None:
    path = write_scene(tmp_path / "s.tif", 64, 80, seed=1)
    assert not (tmp_path / "mask.tif").exists()
    with rasterio.open(path) as img:
        assert (img.count, img.height, img.width) == (3, 64, 80)


def test_large_scene_written_in_bands(tmp_path) -> None:
    # several 512-row bands and tile columns (~2 s)
    path = write_scene(tmp_path / "large.tif", 2100, 2300, seed=21, mask_path=tmp_path / "large_mask.tif")
    rgb, labels = generate_scene(2100, 2300, seed=21)
    with rasterio.open(path) as img, rasterio.open(tmp_path / "large_mask.tif") as msk:
        np.testing.assert_array_equal(img.read(), rgb)
        np.testing.assert_array_equal(msk.read(1), labels)
