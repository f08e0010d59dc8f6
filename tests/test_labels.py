"""Labels: classes.json rules and burning (pure), with pixels counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window
from segpipe.labels.burn import BurnStats, burn_window, cover_window, prepare_shapes
from segpipe.labels.classes import IGNORE_INDEX, parse_label_classes

CLASSES = {
    "classes": [{"name": "background"}, {"name": "building", "aliases": ["house", "Gebäude"]},
                {"name": "water", "aliases": ["lake"]}],
    "ignore": ["unsure"],
    "unlabelled": "background",
}


def _burn(geoms, values, ranks=None, *, size=(10, 10), fill=0, **kw):
    h, w = size
    shapes = prepare_shapes(geoms, values, ranks if ranks is not None else [0] * len(geoms), height=h, width=w, **kw)
    return burn_window(shapes, Window(0, 0, h, w), fill=fill), shapes.stats


# --------------------------------------------------------------------------- classes.json


def test_class_names_resolve_exactly_then_by_alias_then_ignoring_case():
    lc = parse_label_classes(CLASSES, "DATA/classes.json")
    r = lambda v: lc.resolve(v, uri="l.gpkg", feature="feature 0", where="near x=1, y=2")  # noqa: E731
    assert [r("building"), r("house"), r("Gebäude"), r(" HOUSE "), r("Lake"), r(2), r("unsure"), r("UNSURE")] == \
        [1, 1, 1, 1, 2, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert r(2.0) == 2 and r(IGNORE_INDEX) == IGNORE_INDEX
    assert lc.unlabelled == 0
    with pytest.raises(DatasetError) as e:
        r("tree")
    msg = str(e.value)
    assert msg.startswith("l.gpkg: feature 0 near x=1, y=2: unknown class 'tree'") and "aliases" in msg
    with pytest.raises(DatasetError, match="class id 3 is out of range"):
        r(3)
    with pytest.raises(DatasetError, match="'Unclassified'"):
        r(None)  # a feature without a class is "Unclassified": an error until ignore or an alias says otherwise
    lc2 = parse_label_classes({**CLASSES, "ignore": ["Unclassified"]}, "c.json")
    assert lc2.resolve(None, uri="u", feature="f", where="") == IGNORE_INDEX


@pytest.mark.parametrize("data, problem", [
    ({"classes": [{"name": "a", "aliases": ["x"]}, {"name": "b", "aliases": ["X"]}]}, "alias of 'b' 'X' also names 'a'"),
    ({"classes": [{"name": "a"}], "ignore": ["A"]}, "ignore name 'A' also names 'a'"),
    ({"classes": [{"name": "a"}], "unlabelled": "b"}, "unlabelled: 'b' is neither"),
    ({"classes": [{"name": "a"}], "priority": ["b"]}, "priority: 'b' is not a class"),
    ({"classes": [{"name": "a"}], "region_classes": ["A"]}, "region_classes: 'A' is also a class"),
    ({"classes": [{"name": "a"}], "burn": {"buffer": -1}}, "burn.buffer"),
    ({"classes": [{"name": "a"}], "burn": {"alltouched": True}}, "burn.alltouched"),
])
def test_classes_json_errors_name_the_file_and_the_key(data, problem):
    with pytest.raises(DatasetError) as e:
        parse_label_classes(data, "DATA/classes.json")
    assert str(e.value).startswith("DATA/classes.json: ") and problem in str(e.value)


def test_unlabelled_and_priority():
    assert parse_label_classes({**CLASSES, "unlabelled": "ignore"}, "c").unlabelled == IGNORE_INDEX
    assert parse_label_classes({"classes": [{"name": "a"}]}, "c").unlabelled is None  # not declared
    lc = parse_label_classes(CLASSES, "c")
    # default: ignore on top, then the last class down to the first
    assert lc.rank(IGNORE_INDEX) > lc.rank(2) > lc.rank(1) > lc.rank(0)
    lc = parse_label_classes({**CLASSES, "priority": ["house", "background"]}, "c")
    assert lc.rank(1) > lc.rank(0) > lc.rank(IGNORE_INDEX) > lc.rank(2)
    assert lc.is_region("region*") and not lc.is_region("building")


# --------------------------------------------------------------------------- burning


def test_pixel_centres_and_all_touched():
    # box x 1.2..3.6, y 0.6..2.4: centres x ∈ {1.5, 2.5, 3.5}, y ∈ {1.5} → 3 pixels
    box = shapely.box(1.2, 0.6, 3.6, 2.4)
    a, _ = _burn([box], [1])
    assert a.sum() == 3 and a[1, 1:4].tolist() == [1, 1, 1]
    # all touched: columns 1..3, rows 0..2 → 9
    t = burn_window(prepare_shapes([box], [1], [0], height=10, width=10), Window(0, 0, 10, 10), fill=0,
                    all_touched=True)
    assert t.sum() == 9 and t[0:3, 1:4].all()


def test_holes_are_holes():
    # 8×8 shell at (1,1) with a 4×4 hole at (3,3): 64 − 16 = 48 pixels
    poly = shapely.Polygon([(1, 1), (9, 1), (9, 9), (1, 9)], [[(3, 3), (7, 3), (7, 7), (3, 7)]])
    a, stats = _burn([poly], [2])
    assert (a == 2).sum() == 48 and not a[3:7, 3:7].any() and stats == BurnStats(1, 0, 0, 0)
    # a hole drawn with the wrong winding, as some editors write it, is still a hole
    rev = shapely.Polygon(poly.exterior.coords[::-1], [poly.interiors[0].coords[::-1]])
    assert (_burn([rev], [2])[0] == a).all()


def test_overlaps_follow_the_priority_then_the_smaller_feature():
    lc = parse_label_classes(CLASSES, "c")
    big = shapely.box(0, 0, 6, 6)      # building, 36 px
    small = shapely.box(4, 4, 8, 8)    # water, 16 px, overlaps big on 2×2 = 4 px
    a, _ = _burn([big, small], [1, 2], [lc.rank(1), lc.rank(2)])
    # default rank: water (later in classes.json) on top → building 36 − 4 = 32, water 16
    assert ((a == 1).sum(), (a == 2).sum()) == (32, 16)
    # an explicit priority puts building on top: building 36, water 16 − 4 = 12; file order does not matter
    lc = parse_label_classes({**CLASSES, "priority": ["building"]}, "c")
    for order in ([0, 1], [1, 0]):
        g, v = [[big, small][i] for i in order], [[1, 2][i] for i in order]
        a, _ = _burn(g, v, [lc.rank(x) for x in v])
        assert ((a == 1).sum(), (a == 2).sum()) == (36, 12)
    # same class rank: the smaller feature is on top, wherever it is in the file
    inner = shapely.box(2, 2, 4, 4)  # 4 px island of water inside a 36 px building, same rank
    for g, v in (([big, inner], [1, 2]), ([inner, big], [2, 1])):
        a, _ = _burn(g, v, [0, 0])
        assert ((a == 1).sum(), (a == 2).sum()) == (32, 4)
    # ignore names are on top by default: an "unsure" box inside a building burns 255
    lc = parse_label_classes(CLASSES, "c")
    a, _ = _burn([inner, big], [IGNORE_INDEX, 1], [lc.rank(IGNORE_INDEX), lc.rank(1)])
    assert ((a == 1).sum(), (a == IGNORE_INDEX).sum()) == (32, 4)


@pytest.mark.parametrize("vertical", [False, True])
def test_shared_edges_give_each_pixel_to_exactly_one_polygon(vertical):
    # the shared edge x = 5.5 runs through a column of pixel centres: each of them goes to exactly one side
    left, right = shapely.box(0, 0, 5.5, 10), shapely.box(5.5, 0, 10, 10)
    if vertical:
        left, right = (shapely.transform(g, lambda xy: xy[:, ::-1]) for g in (left, right))
    a, _ = _burn([left, right], [1, 2], size=(10, 10))
    la, _ = _burn([left], [1])
    ra, _ = _burn([right], [2])
    assert (a > 0).all()  # no gap
    assert ((la > 0) & (ra > 0)).sum() == 0  # no pixel in both
    assert (la > 0).sum() + (ra > 0).sum() == 100
    # GDAL's scanline rule: a centre on a vertical edge goes to the polygon on its left (columns
    # 0..5 = 60 px), one on a horizontal edge to the polygon below it (rows 5..9 = 50 px)
    assert ((la > 0).sum(), (ra > 0).sum()) == ((50, 50) if vertical else (60, 40))
    # integer edges (between centres) need no rule: 5 + 5 columns
    a, _ = _burn([shapely.box(0, 0, 5, 10), shapely.box(5, 0, 10, 10)], [1, 2])
    assert ((a == 1).sum(), (a == 2).sum()) == (50, 50)


def test_bow_tie_is_repaired_into_two_triangles():
    # edges y = 1.25·x and y = 10 − 1.25·x cross at (4, 5); no pixel centre lies on either
    # (4j + 2 = 5i + 2.5 has no integer solution). Left triangle: i + ½ < min(y, 10 − y) / 1.25
    # row by row (y = j + ½): 0,1,2,3,4,4,3,2,1,0 = 20; right triangle (i + ½ > max(y, 10 − y) / 1.25,
    # i < 8): 0,1,2,3,4,4,3,2,1,0 = 20.
    bow = shapely.Polygon([(0, 0), (8, 10), (8, 0), (0, 10)])
    assert not bow.is_valid
    a, stats = _burn([bow], [1])
    assert stats.repaired == 1
    assert a[:, :4].sum() == 20 and a[:, 4:].sum() == 20
    assert a.sum(axis=1).tolist() == [0, 2, 4, 6, 8, 8, 6, 4, 2, 0]


def test_geometry_collection_keeps_its_polygons_and_z_is_dropped():
    gc = shapely.GeometryCollection([shapely.box(0, 0, 2, 2), shapely.box(5, 5, 8, 7)])
    a, _ = _burn([gc], [1])
    assert a.sum() == 4 + 6
    z = shapely.Polygon([(0, 0, 5.0), (3, 0, 5.0), (3, 3, 7.0), (0, 3, 1.0)])
    a, _ = _burn([z], [1])
    assert a.sum() == 9


def test_lines_and_points_are_refused_without_a_buffer():
    line = shapely.LineString([(1, 5), (9, 5)])
    with pytest.raises(DatasetError) as e:
        prepare_shapes([shapely.box(0, 0, 1, 1), line], [1, 1], [0, 0], height=10, width=10, source="l.geojson",
                       idents=["feature 0", "feature 1 (id 'x')"])
    assert str(e.value).startswith("l.geojson: feature 1 (id 'x') near x=5.0, y=5.0 (pixels) is a LineString")
    with pytest.raises(DatasetError, match="GeometryCollection with lines or points"):
        prepare_shapes([shapely.GeometryCollection([shapely.box(0, 0, 1, 1), shapely.Point(3, 3)])], [1], [0],
                       height=10, width=10)
    # a 1-px buffer: the line becomes a 2-px-high band y 4..6 over x 0..10 (round caps): centres
    # y ∈ {4.5, 5.5}, x from 0.5 (inside the cap: (0.5−1)² + 0.5² < 1) to 9.5 → 2 × 10 = 20
    a, _ = _burn([line], [1], buffer=1.0)
    assert a.sum() == 20 and a[4:6].all()
    p, _ = _burn([shapely.Point(5, 5)], [1], buffer=1.0)
    assert p.sum() == 4  # centres (4.5|5.5, 4.5|5.5) lie 0.71 px from the point


def test_counts_of_repaired_dropped_and_outside():
    feats = [shapely.box(0, 0, 2, 2), None, shapely.Polygon(), shapely.box(20, 20, 30, 30),
             shapely.Polygon([(0, 0), (4, 4), (4, 0), (0, 4)]),       # bow-tie: repaired
             shapely.Polygon([(1, 1), (2, 2), (3, 3), (1, 1)])]        # no area: dropped
    shapes = prepare_shapes(feats, [1] * 6, [0] * 6, height=10, width=10)
    assert shapes.stats == BurnStats(features=6, repaired=1, dropped=3, outside=1)
    assert len(shapes) == 2


def test_windows_equal_the_whole_burn_and_reach_past_the_image():
    rng = np.random.default_rng(3)
    geoms, vals = [], []
    for _ in range(60):
        x, y, s = rng.uniform(-5, 45), rng.uniform(-5, 35), rng.uniform(1, 9)
        geoms.append(shapely.Point(x, y).buffer(s, quad_segs=int(rng.integers(1, 90))))  # some > CLIP_VERTICES
        vals.append(int(rng.integers(0, 4)))
    shapes = prepare_shapes(geoms, vals, vals, height=30, width=40)
    whole = burn_window(shapes, Window(0, 0, 30, 40), fill=9)
    tiled = np.zeros_like(whole)
    for y0 in range(0, 30, 7):
        for x0 in range(0, 40, 11):
            w = Window(y0, x0, min(7, 30 - y0), min(11, 40 - x0))
            tiled[y0:w.y1, x0:w.x1] = burn_window(shapes, w, fill=9)
    assert (tiled == whole).all() and len(np.unique(whole)) == 5
    # a window past the image burns what lies there (reflection is the reader's business)
    outside = burn_window(shapes, Window(-10, -10, 10, 10), fill=9)
    assert outside.shape == (10, 10)
    cover = cover_window(shapes, Window(0, 0, 30, 40))
    assert (cover == (whole != 9)).all()


# --------------------------------------------------------------------------- datasets: regions, sampling, metrics


def _write_gpkg(path, geoms, classes, crs=None):
    from pyogrio.raw import write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(str(path), shapely.to_wkb(np.asarray(geoms, dtype=object)), field_data=[np.asarray(classes, dtype=object)],
          fields=["class"], crs=crs, geometry_type="Polygon", driver="GPKG")
    return path


def _to_map(g, transform):
    a, _, c, _, e, f = transform[:6]
    return shapely.transform(g, lambda xy: np.column_stack([c + a * xy[:, 0], f + e * xy[:, 1]]))


def _sparse_dataset(root, *, regions=True, unlabelled="background", mask=False):
    """One 40×48 UTM image; a building (64 px) and a lake (100 px) drawn in map coordinates,
    two labelled regions: rows 0..20 × cols 0..24 (480 px) and rows 18..34 × cols 28..44 (256 px)."""
    import json

    from tests.helpers import write_geotiff

    (root / "images").mkdir(parents=True)
    write_geotiff(root / "images" / "a.tif", np.full((3, 40, 48), 100, np.uint8))
    t = (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
    _write_gpkg(root / "labels" / "a.gpkg", [_to_map(shapely.box(4, 4, 12, 12), t), _to_map(shapely.box(30, 20, 40, 30), t)],
                ["house", "water"], "EPSG:32633")
    if regions:
        _write_gpkg(root / "regions" / "a.gpkg", [_to_map(shapely.box(0, 0, 24, 20), t),
                                                  _to_map(shapely.box(28, 18, 44, 34), t)], ["r", "r"], "EPSG:32633")
    if mask:
        (root / "masks").mkdir()
        write_geotiff(root / "masks" / "a.tif", np.full((1, 40, 48), 1, np.uint8))
    doc = {"classes": [{"name": "background"}, {"name": "building", "aliases": ["house"]}, {"name": "water"}]}
    if unlabelled is not None:
        doc["unlabelled"] = unlabelled
    (root / "classes.json").write_text(json.dumps(doc))
    return root


def test_regions_decide_what_is_labelled_in_the_index(tmp_path):
    from segpipe.labels.dataset import load_dataset
    from segpipe.labels.truth import open_truth
    from segpipe.train.index import index_masks

    ds = load_dataset(str(_sparse_dataset(tmp_path / "d")))
    item = ds.items[0]
    assert item.mask_uri is None and item.labels_uri.endswith("labels/a.gpkg") and item.regions_uri.endswith("regions/a.gpkg")
    index = index_masks(ds, cell=8, window=16)
    # region 1: 64 building + 416 background; region 2: 100 water + 156 background; 1920 − 736 ignored
    assert index.counts[0].tolist() == [416 + 156, 64, 100] and index.ignored[0] == 1184
    with open_truth(ds, item) as r:
        assert r.info.count == 1 and (r.info.height, r.info.width) == (40, 48) and r.info.transform == ds_transform()
        m = r.read(Window(0, 0, 40, 48))[0]
        assert (m[4:12, 4:12] == 1).all() and (m[20:30, 30:40] == 2).all() and (m[35:, :] == IGNORE_INDEX).all()
        # windows past the image reflect, as every reader does
        past = r.read(Window(-3, -2, 10, 10))[0]
        assert (past == np.pad(m, ((3, 0), (2, 0)), mode="reflect")[:10, :10]).all()


def ds_transform():
    return (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)


def test_without_regions_unlabelled_decides_and_must_be_declared(tmp_path):
    from segpipe.labels.dataset import load_dataset
    from segpipe.train.index import index_masks

    ds = load_dataset(str(_sparse_dataset(tmp_path / "ign", regions=False, unlabelled="ignore")))
    index = index_masks(ds)
    assert index.counts[0].tolist() == [0, 64, 100] and index.ignored[0] == 1920 - 164
    ds = load_dataset(str(_sparse_dataset(tmp_path / "bg", regions=False, unlabelled="background")))
    assert index_masks(ds).counts[0].tolist() == [1920 - 164, 64, 100]
    ds = load_dataset(str(_sparse_dataset(tmp_path / "none", regions=False, unlabelled=None)))
    with pytest.raises(DatasetError, match=r"labels/a\.gpkg: .*classes\.json does not say what the pixels no label "
                                           r"covers are \(it has no labelled regions\)"):
        index_masks(ds)


def test_a_mask_wins_over_labels_and_regions_apply_to_masks(tmp_path, caplog):
    import logging

    from segpipe.labels.dataset import load_dataset
    from segpipe.train.index import index_masks

    with caplog.at_level(logging.INFO, logger="segpipe.labels.dataset"):
        ds = load_dataset(str(_sparse_dataset(tmp_path / "d", mask=True)))
    assert "have both a mask and vector labels; the mask is used" in caplog.text
    item = ds.items[0]
    assert item.mask_uri.endswith("masks/a.tif") and item.labels_uri is None
    # the mask (all building) read inside the two regions only: 480 + 256 px
    index = index_masks(ds)
    assert index.counts[0].tolist() == [0, 736, 0] and index.ignored[0] == 1184


def test_plain_sampling_draws_patches_only_where_there_are_labels(tmp_path):
    import json

    from segpipe.labels.dataset import load_dataset
    from segpipe.train.index import index_masks
    from segpipe.train.sampler import PatchSampler
    from tests.helpers import write_geotiff

    # a 200×240 image labelled only in a 30×30 region in its lower right part
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    write_geotiff(root / "images" / "a.tif", np.full((3, 200, 240), 50, np.uint8), crs=None)
    _write_gpkg(root / "labels" / "a.gpkg", [shapely.box(200, 150, 215, 165)], ["b"])
    _write_gpkg(root / "regions" / "a.gpkg", [shapely.box(195, 145, 225, 175)], ["r"])
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": "a"}, {"name": "b"}], "unlabelled": "a"}))
    ds = load_dataset(str(root))
    index = index_masks(ds, cell=16)
    kw = dict(patch_size=32, patches_per_epoch=40, mean=[0, 0, 0], std=[1, 1, 1], input_scale=255.0, seed=1)
    restricted = PatchSampler(ds, index=index, **kw)
    masks = [restricted[i][1] for i in range(40)]
    assert all((m != IGNORE_INDEX).any() for m in masks)
    # the region is 900 of 48,000 px: uniform windows (no index) almost never reach it
    uniform = PatchSampler(ds, **kw)
    hits = sum(int((uniform[i][1] != IGNORE_INDEX).any()) for i in range(40))
    assert hits < 10
    # class-balanced sampling finds both classes inside the region
    balanced = PatchSampler(ds, index=index, class_balanced=True, **kw)
    seen = {int(v) for i in range(20) for v in np.unique(balanced[i][1])}
    assert {0, 1} <= seen


def _zarr_prediction(path, pred):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("0", shape=pred.shape, chunks=(16, 16), dtype="uint8", fill_value=255)[:] = pred
    return str(path)


def test_metrics_score_only_labelled_pixels(tmp_path):
    from segpipe.core.metrics import scores
    from segpipe.evaluate.evaluation import score_output
    from segpipe.labels.dataset import load_dataset
    from segpipe.labels.truth import open_truth

    # prediction: building over the whole first region (rows 0..20, cols 0..24), water everywhere else
    pred = np.full((40, 48), 2, np.uint8)
    pred[0:20, 0:24] = 1
    out = _zarr_prediction(tmp_path / "p.zarr", pred)
    ds = load_dataset(str(_sparse_dataset(tmp_path / "d")))
    cm = score_output(out, open_truth(ds, ds.items[0]), 3)
    # region 1: building 64 → 1, background 416 → 1; region 2: water 100 → 2, background 156 → 2;
    # the 1184 px outside both regions (predicted water) are not counted: no false positives there
    assert cm.matrix.tolist() == [[0, 416, 156],
                                  [0, 64, 0],
                                  [0, 0, 100]]
    m = scores(cm.matrix, ds.classes)
    assert m["per_class"]["water"]["iou"] == pytest.approx(100 / 256)
    # the report's thumbnails read the same truth (vector labels, regions) strip by strip
    from segpipe.evaluate.evaluation import _sample

    item = ds.items[0]
    with open_truth(ds, item) as r:
        whole = r.read(Window(0, 0, 40, 48))[0]
    assert (_sample("a", item.image_uri, item.grid, open_truth(ds, item), pred).truth == whole).all()
    # no regions, unlabelled = ignore: only the drawn features count
    ds = load_dataset(str(_sparse_dataset(tmp_path / "i", regions=False, unlabelled="ignore")))
    cm = score_output(out, open_truth(ds, ds.items[0]), 3)
    assert cm.matrix.tolist() == [[0, 0, 0], [0, 64, 0], [0, 0, 100]]


# --------------------------------------------------------------------------- vector datasets end to end


def _vectorise_masks(root):
    """Replace each mask of a synthetic dataset by a GeoPackage of its class polygons (map CRS)."""
    import json

    import rasterio
    from rasterio.features import shapes

    for mask in sorted((root / "masks").glob("*.tif")):
        with rasterio.open(mask) as ds:
            m, t, crs = ds.read(1), ds.transform, ds.crs.to_wkt()
        geoms, names = [], []
        classes = json.loads((root / "classes.json").read_text())["classes"]
        for g, v in shapes(m, transform=t):
            geoms.append(shapely.geometry.shape(g))
            names.append(classes[int(v)]["name"].upper())  # case differs from classes.json on purpose
        _write_gpkg(root / "labels" / f"{mask.stem}.gpkg", geoms, names, crs)
    return root


def test_vector_labels_read_back_as_the_masks_they_were_drawn_from(tmp_path):
    import json
    import shutil

    from segpipe.labels.dataset import load_dataset, open_mask
    from segpipe.labels.truth import open_truth
    from segpipe.train.synthetic import write_dataset

    root = _vectorise_masks(write_dataset(tmp_path / "d", 2, (70, 90), seed=3))
    masks = {}
    for p in (root / "masks").glob("*.tif"):
        with open_mask(str(p)) as r:
            masks[p.stem] = r.read(Window(0, 0, 70, 90))[0]
    shutil.rmtree(root / "masks")
    doc = json.loads((root / "classes.json").read_text())
    (root / "classes.json").write_text(json.dumps({**doc, "unlabelled": "ignore"}))
    ds = load_dataset(str(root))
    for item in ds.items:
        with open_truth(ds, item) as r:
            # pixel-edge polygons burned at pixel centres give every pixel back, in any window
            assert (r.read(Window(0, 0, 70, 90))[0] == masks[item.name]).all()
            assert (r.read(Window(13, 29, 31, 17))[0] == masks[item.name][13:44, 29:46]).all()


@pytest.mark.slow
def test_training_and_validation_on_a_vector_dataset(tmp_path):
    import json
    import shutil

    from segpipe.train.loop import train
    from segpipe.train.settings import TrainSettings
    from segpipe.train.synthetic import write_dataset

    root = _vectorise_masks(write_dataset(tmp_path / "d", 3, 96, seed=0))
    shutil.rmtree(root / "masks")
    doc = json.loads((root / "classes.json").read_text())
    (root / "classes.json").write_text(json.dumps({**doc, "unlabelled": "ignore"}))
    s = TrainSettings(encoder="resnet18", epochs=1, batch_size=4, patch_size=64, patches_per_epoch=16, lr=3e-3,
                      class_balanced=True, seed=7, device="cpu")
    result = train(str(root), str(tmp_path / "run"), s, progress=False)
    assert result.epochs_run == 1 and result.history[0]["train_loss"] > 0
    assert result.history[0]["val_mean_iou"] is not None


# --------------------------------------------------------------------------- any size, flat memory

_MEMORY_PROBE = r"""
import json, sys
import numpy as np
from segpipe.core.geometry import Window
from segpipe.labels.dataset import load_dataset
from segpipe.labels.truth import open_truth

def peak_mb():
    # VmHWM: this process's own peak (ru_maxrss would carry the forking pytest's peak over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

ds = load_dataset(sys.argv[1])
item = ds.items[0]
reader = open_truth(ds, item)
reader.read(Window(0, 0, 1024, 1024))  # the first window: imports and the prepared features in place
after_open = peak_mb()
rng = np.random.default_rng(0)
labelled = 0
for k in range(150):
    y0, x0 = (int(v) for v in rng.integers(-600, item.height, size=2))
    m = reader.read(Window(y0, x0, 1024, 1024))
    assert m.shape == (1, 1024, 1024)
    labelled += int((m != 255).sum())
print(json.dumps({"after_open_mb": after_open, "after_reads_mb": peak_mb(), "labelled": labelled,
                  "height": item.height, "width": item.width}))
"""


@pytest.mark.slow
def test_labels_over_a_100000_square_image_keep_memory_flat(tmp_path):
    """A 100,000² GeoTIFF (header only: sparse, no tile written) with 20,000 labels and 400 regions:
    150 random 1024² windows (some past the edges) keep the peak RSS where opening left it.

    A whole-image label array would be 10 GB; the reader's peak grows by less than 64 MB
    (measured: peak RSS 264 MB after opening, 264.5 MB after the 150 reads; printed with -s).
    """
    import json
    import os
    import subprocess
    import sys

    import rasterio
    from rasterio.transform import from_origin

    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    n = 100_000
    t = from_origin(500000.0, 4100000.0, 0.5, 0.5)
    with rasterio.open(root / "images" / "s.tif", "w", driver="GTiff", height=n, width=n, count=3, dtype="uint8",
                       tiled=True, blockxsize=512, blockysize=512, sparse_ok=True, crs="EPSG:32633", transform=t):
        pass
    assert (root / "images" / "s.tif").stat().st_size < 5_000_000
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, n, size=(20_000, 2))
    r = rng.uniform(5, 300, size=20_000)
    labels = shapely.buffer(shapely.points(xy), r, quad_segs=4)
    tr = (t.a, t.b, t.c, t.d, t.e, t.f)
    _write_gpkg(root / "labels" / "s.gpkg", list(_to_map(labels, tr)),
                list(rng.choice(["a", "b", "c"], size=20_000)), "EPSG:32633")
    regions = shapely.box(*(np.column_stack([xy[:400] - 2000, xy[:400] + 2000]).T))
    _write_gpkg(root / "regions" / "s.gpkg", list(_to_map(regions, tr)), ["r"] * 400, "EPSG:32633")
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                                                   "unlabelled": "a"}))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(root)], capture_output=True, text=True, env=env,
                         timeout=600, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(figures)
    assert (figures["height"], figures["width"]) == (n, n)
    assert figures["labelled"] > 0
    assert figures["after_reads_mb"] - figures["after_open_mb"] < 64
    assert figures["after_reads_mb"] < 1024


def test_a_window_inside_one_large_polygon_shows_only_what_lies_above_it():
    rng = np.random.default_rng(4)
    small = [shapely.Point(*rng.uniform(0, 40, 2)).buffer(rng.uniform(1, 6)) for _ in range(40)]
    vals = [int(v) for v in rng.integers(0, 4, 40)]  # value = rank
    big = shapely.box(-10, -10, 100, 100)  # value 5 at rank 2: the largest, so below the other rank-2 ones
    shapes = prepare_shapes([big, *small], [5, *vals], [2, *vals], height=30, width=40)
    above = [(g, v) for g, v in zip(small, vals) if v >= 2]
    expected = burn_window(prepare_shapes([g for g, _ in above], [v for _, v in above], [v for _, v in above],
                                          height=30, width=40), Window(0, 0, 30, 40), fill=5)
    assert {2, 3, 5} <= set(np.unique(expected).tolist())
    for w in (Window(0, 0, 30, 40), Window(5, 7, 9, 13)):
        assert (burn_window(shapes, w, fill=9) == expected[w.y0:w.y1, w.x0:w.x1]).all()
    assert cover_window(shapes, Window(3, 3, 5, 5)).all()
