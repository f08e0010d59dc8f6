"""Labels compiled once: each vector label file is read, reprojected, repaired and burned once per file version,
pixel grid and rules, then read from the label cache by the index, the sampler, validation and evaluation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import shapely
from pyogrio.raw import write

from segpipe.core.geometry import Window
from segpipe.labels import truth as truth_mod
from segpipe.labels.dataset import at_resolution, load_dataset
from segpipe.labels.truth import VectorLabelReader, open_truth, prepare_labels
from tests.helpers import write_geotiff

T = (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)


def _dataset(root, images: int, side: int, polygons: int, seed: int = 7):
    """``images`` UTM GeoTIFFs with ``polygons`` random boxes each (two classes, overlapping), in map coordinates."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(images):
        write_geotiff(root / "images" / f"im{i:02d}.tif", rng.integers(0, 255, (3, side, side), dtype=np.uint8))
        x, y = rng.uniform(0, side - 4, polygons), rng.uniform(0, side - 4, polygons)
        s = rng.uniform(1.5, 6, polygons)
        geoms = [shapely.box(T[2] + a * 0.5, T[5] - (b + c) * 0.5, T[2] + (a + c) * 0.5, T[5] - b * 0.5)
                 for a, b, c in zip(x, y, s)]
        names = np.where(rng.random(polygons) < 0.5, "building", "water").astype(object)
        write(str(root / "labels" / f"im{i:02d}.gpkg"), shapely.to_wkb(np.asarray(geoms, dtype=object)),
              field_data=[names], fields=["class"], crs="EPSG:32633", geometry_type="Polygon", driver="GPKG")
    doc = {"classes": [{"name": "background"}, {"name": "building"}, {"name": "water"}], "unlabelled": "background"}
    (root / "classes.json").write_text(json.dumps(doc))
    (root / "split.json").write_text(json.dumps({"train": [f"im{i:02d}" for i in range(images - 1)],
                                                 "val": [f"im{images - 1:02d}"]}))
    return root


@pytest.fixture
def counted(monkeypatch):
    """Counts how often each label file is prepared (read, reprojected, repaired, indexed)."""
    calls: dict[str, int] = {}
    real = truth_mod.build_labels

    def build(labels_uri, *a, **k):
        calls[labels_uri] = calls.get(labels_uri, 0) + 1
        return real(labels_uri, *a, **k)

    monkeypatch.setattr(truth_mod, "build_labels", build)
    truth_mod._cache.clear()
    return calls


def test_compiled_labels_equal_the_burned_ones_on_any_grid_and_window(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    ds = load_dataset(str(_dataset(tmp_path / "d", 1, 150, 300)))
    rng = np.random.default_rng(0)
    for dataset in (ds, at_resolution(ds, gsd=0.8)):  # the image's own pixels, then 1.6× coarser
        item = dataset.items[0]
        info = truth_mod._grid_image(item.image_uri, item.grid)
        direct = VectorLabelReader(prepare_labels(item.labels_uri, None, info, dataset.label_classes,
                                                  image_name=item.name), info, item.truth_uri)
        with open_truth(dataset, item) as compiled:
            assert compiled.info.extra["compiled"].startswith(str(tmp_path / "cache"))
            assert (compiled.info.height, compiled.info.width) == (item.height, item.width)
            assert compiled.info.uri == item.labels_uri and compiled.info.transform == item.grid.transform
            for _ in range(20):  # windows inside, across and past the edges (reflected)
                y0, x0 = (int(v) for v in rng.integers(-40, item.height, 2))
                win = Window(y0, x0, int(rng.integers(1, 90)), int(rng.integers(1, 90)))
                np.testing.assert_array_equal(compiled.read(win), direct.read(win))


@pytest.mark.slow
def test_each_label_file_is_prepared_once_for_index_sampler_validation_and_evaluation(tmp_path, monkeypatch, counted):
    """20 images × 2,000 polygons, 200 class-balanced patches: each file prepared exactly once — and not
    again by another process (the compiled raster is on disk), until the file changes."""
    from segpipe.train.index import index_masks
    from segpipe.train.sampler import PatchSampler

    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    root = _dataset(tmp_path / "d", 20, 160, 2000)
    full = load_dataset(str(root))
    train = load_dataset(str(root), "train")
    index = index_masks(train)
    sampler = PatchSampler(train, patch_size=48, patches_per_epoch=200, mean=[0.5] * 3, std=[0.2] * 3,
                           input_scale=255.0, index=index, class_balanced=True, seed=1)
    for i in range(200):
        image, mask = sampler[(0, i)]
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    for item in full.items:  # validation and evaluation open the same truth
        with open_truth(full, item) as r:
            r.read(Window(0, 0, 32, 32))
    assert len(counted) == 20 and set(counted.values()) == {1}, counted
    truth_mod._cache.clear()  # another process: nothing prepared again
    with open_truth(full, full.items[0]) as r:
        r.read(Window(0, 0, 8, 8))
    assert set(counted.values()) == {1}
    # a file saved again (new size / time) is prepared again, once
    path = full.items[0].labels_uri
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    for _ in range(2):
        with open_truth(full, full.items[0]) as r:
            r.read(Window(0, 0, 8, 8))
    assert counted[path] == 2
