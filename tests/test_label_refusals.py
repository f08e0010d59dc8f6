"""Label files that would train something silently wrong are refused in one line, and the notes that matter
are warnings: a layer in the wrong CRS, an empty layer, a COCO file for another image, class_id and
class_name that disagree, counts of repaired/dropped/outside features, large JSON streamed, remote
Shapefiles with their sidecars, split.json names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import shapely

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window
from tests.helpers import write_geotiff

# the images of tests.helpers.write_geotiff: UTM 33N, 0.5 m pixels, top-left corner at (500000, 4100000)
T = (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
CLASSES = {"classes": [{"name": "background"}, {"name": "building", "aliases": ["house"]}, {"name": "water"}],
           "unlabelled": "background"}


def _to_map(g, transform=T):
    a, _, c, _, e, f = transform[:6]
    return shapely.transform(g, lambda xy: np.column_stack([c + a * xy[:, 0], f + e * xy[:, 1]]))


def _write(path: Path, geoms, fields: dict[str, list[str]], crs: str | None = "EPSG:32633") -> Path:
    from pyogrio.raw import write

    path.parent.mkdir(parents=True, exist_ok=True)
    driver = {".gpkg": "GPKG", ".shp": "ESRI Shapefile", ".geojson": "GeoJSON"}[path.suffix]
    write(str(path), shapely.to_wkb(np.asarray(geoms, dtype=object)) if geoms else np.array([], dtype=object),
          field_data=[np.asarray(v, dtype=object) for v in fields.values()], fields=list(fields), crs=crs,
          geometry_type="Polygon", driver=driver)
    return path


def _dataset(root: Path, *, image: str = "a.tif", classes: dict | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    write_geotiff(root / "images" / image, np.full((3, 40, 48), 100, np.uint8))
    (root / "classes.json").write_text(json.dumps(classes or CLASSES))
    return root


def _index(root: Path):
    from segpipe.labels.dataset import load_dataset
    from segpipe.train.index import index_masks

    return index_masks(load_dataset(str(root)))


# --------------------------------------------------------------------------- labels that say nothing


def test_a_layer_in_the_wrong_crs_is_refused_naming_both_extents(tmp_path):
    """UTM coordinates tagged EPSG:3857 land ~4,000 km away: before, the image trained as all background."""
    root = _dataset(tmp_path / "d")
    geoms = [_to_map(shapely.box(4, 4, 12, 12)), _to_map(shapely.box(30, 20, 40, 30))]
    _write(root / "labels" / "a.gpkg", geoms, {"class": ["house", "water"]}, crs="EPSG:3857")
    with pytest.raises(DatasetError) as e:
        _index(root)
    msg = str(e.value)
    assert msg.startswith(f"{root}/labels/a.gpkg: all 2 feature(s) lie outside the image (file EPSG:3857, "
                          "x 500002..500020, y 4099985..4099998; image ")
    assert msg.endswith("images/a.tif: EPSG:32633, x 500000..500024, y 4099980..4100000); check the file's CRS "
                        "and that it is this image's file")
    assert "\n" not in msg
    # labelled regions (in the right CRS) do not make the misplaced labels mean "all unlabelled"
    _write(root / "regions" / "a.gpkg", [_to_map(shapely.box(0, 0, 24, 20))], {"class": ["r"]})
    with pytest.raises(DatasetError, match=r"labels/a\.gpkg: all 2 feature\(s\) lie outside the image"):
        _index(root)


def test_an_empty_layer_is_refused_unless_regions_say_the_image_is_labelled(tmp_path):
    root = _dataset(tmp_path / "d")
    _write(root / "labels" / "a.gpkg", [], {"class": []})
    with pytest.raises(DatasetError) as e:
        _index(root)
    assert str(e.value) == (f"{root}/labels/a.gpkg: holds no features (file EPSG:32633, empty; image {root}/images/"
                            "a.tif: EPSG:32633, x 500000..500024, y 4099980..4100000); an unsaved layer? To say "
                            "that the image holds nothing to label, draw where it was looked at as regions "
                            "(regions/a.<ext>, a 'regions' layer or a region class)")
    # regions and no labels: "nothing there" said explicitly — all unlabelled (background) inside the region
    _write(root / "regions" / "a.gpkg", [_to_map(shapely.box(0, 0, 24, 20))], {"class": ["r"]})
    index = _index(root)
    assert index.counts[0].tolist() == [480, 0, 0] and index.ignored[0] == 40 * 48 - 480


def test_regions_that_all_miss_the_image_are_refused(tmp_path):
    root = _dataset(tmp_path / "d")
    _write(root / "labels" / "a.gpkg", [_to_map(shapely.box(4, 4, 12, 12))], {"class": ["house"]})
    _write(root / "regions" / "a.gpkg", [_to_map(shapely.box(100, 100, 120, 120))], {"class": ["r"]})
    with pytest.raises(DatasetError, match=r"regions/a\.gpkg: the labelled regions of this image all lie outside "
                                           r"the image \(file EPSG:32633, x 500050\.\.500060, .*: nothing on it "
                                           r"would be labelled"):
        _index(root)
    # the same for a raster mask read inside its regions
    (root / "labels" / "a.gpkg").unlink()
    (root / "masks").mkdir()
    write_geotiff(root / "masks" / "a.tif", np.ones((1, 40, 48), np.uint8))
    with pytest.raises(DatasetError, match=r"regions/a\.gpkg: the labelled regions of this image all lie outside"):
        _index(root)


def test_pixel_files_name_pixel_extents(tmp_path):
    """QuPath / COCO coordinates are pixels: the message says so, and gives the image's size in pixels."""
    root = _dataset(tmp_path / "d", image="a.png")
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(1000, 2000, 1010, 2010)),
         "properties": {"objectType": "annotation", "classification": {"name": "building"}}}]}
    (root / "labels").mkdir()
    (root / "labels" / "a.geojson").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"a\.geojson: all 1 feature\(s\) lie outside the image \(file pixels, "
                                           r"x 1000\.\.1010, y 2000\.\.2010; image .*a\.png: pixels x 0\.\.48, "
                                           r"y 0\.\.40\)"):
        _index(root)


def test_a_coco_file_for_another_image_is_refused(tmp_path):
    """labels/photo_b.json describing only photo_a.png burned photo_a's polygons onto photo_b (exit 0)."""
    root = _dataset(tmp_path / "d", image="photo_b.png")
    doc = {"images": [{"id": 1, "file_name": "photo_a.png", "height": 40, "width": 48}],
           "categories": [{"id": 1, "name": "building"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}]}
    (root / "labels").mkdir()
    (root / "labels" / "photo_b.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as e:
        _index(root)
    assert str(e.value) == (f"{root}/labels/photo_b.json: describes no image named 'photo_b'.* (its images: "
                            "photo_a.png); a COCO file under labels/ must describe the image of the same name")
    # the file for the right image (any folder, any extension in file_name) is read
    doc["images"][0]["file_name"] = "exports\\photo_b.jpg"
    (root / "labels" / "photo_b.json").write_text(json.dumps(doc))
    assert _index(root).counts[0].tolist() == [40 * 48 - 324, 324, 0]


def _export_like(path: Path, rows: list[tuple[int | None, str | None]]) -> Path:
    """A GeoPackage with the fields of segpipe's vector export (segpipe.export.vectors): class_id, class_name, area."""
    geoms = [_to_map(shapely.box(4 + 10 * i, 4, 12 + 10 * i, 12)) for i in range(len(rows))]
    from pyogrio.raw import write

    path.parent.mkdir(parents=True, exist_ok=True)
    nulls = [np.asarray([r[k] is None for r in rows]) for k in (0, 1)]  # drawn in QGIS with one field left empty
    write(str(path), shapely.to_wkb(np.asarray(geoms, dtype=object)),
          field_data=[np.asarray([r[0] or 0 for r in rows], dtype=np.int32),
                      np.asarray([r[1] or "" for r in rows], dtype=object), np.full(len(rows), 16.0)],
          field_mask=[*nulls, None], fields=["class_id", "class_name", "area"], crs="EPSG:32633",
          geometry_type="Polygon", driver="GPKG", layer="segments")
    return path


def test_class_id_and_class_name_that_disagree_are_refused(tmp_path):
    root = _dataset(tmp_path / "d")
    # an annotator reclassified feature 2 by its class_name and left its class_id: which one was meant?
    _export_like(root / "labels" / "a.gpkg", [(1, "building"), (2, "water"), (2, "building")])
    with pytest.raises(DatasetError) as e:
        _index(root)
    assert str(e.value) == (f"{root}/labels/a.gpkg: feature 2 (id 3) near x=500014, y=4.1e+06 (file CRS): "
                            "class_name 'building' and class_id 2 ('water' in "
                            f"{root}/classes.json) disagree; correct the one that is wrong, or delete the class_id "
                            "field to go by class_name")
    # agreeing pairs (an alias is the same class), and a feature drawn with only one of the two filled in
    _export_like(root / "labels" / "a.gpkg", [(1, "house"), (2, "water"), (None, "water"), (1, None)])
    assert _index(root).counts[0].tolist() == [40 * 48 - 4 * 64, 2 * 64, 2 * 64]


# --------------------------------------------------------------------------- notes that matter are warnings


def test_counts_are_a_warning_only_when_something_was_repaired_dropped_or_outside(tmp_path, caplog):
    root = _dataset(tmp_path / "d")
    bow_tie = shapely.Polygon([(4, 4), (12, 12), (12, 4), (4, 12)])
    _write(root / "labels" / "a.gpkg", [_to_map(shapely.box(4, 4, 12, 12)), _to_map(shapely.box(30, 20, 40, 30))],
           {"class": ["house", "water"]})
    with caplog.at_level(logging.INFO, logger="segpipe"):
        _index(root)
    [rec] = [r for r in caplog.records if "feature(s):" in r.getMessage()]
    assert rec.levelno == logging.INFO  # nothing to say: a note in the log file only
    caplog.clear()
    _write(root / "labels" / "a.gpkg", [_to_map(bow_tie), _to_map(shapely.box(30, 20, 40, 30)),
                                        _to_map(shapely.box(500, 500, 510, 510))], {"class": ["house", "water", "water"]})
    with caplog.at_level(logging.INFO, logger="segpipe"):
        _index(root)
    [rec] = [r for r in caplog.records if "feature(s):" in r.getMessage()]
    assert rec.levelno == logging.WARNING
    assert rec.getMessage() == (f"{root}/labels/a.gpkg: 3 feature(s): 1 repaired, 0 dropped (no area), "
                                "1 outside the image")
    # the file prepared again in this process (the cache's bound, another split): said once
    from segpipe.labels.dataset import open_reader, read_label_classes
    from segpipe.labels.truth import build_labels

    caplog.clear()
    with open_reader(str(root / "images" / "a.tif")) as r, caplog.at_level(logging.INFO, logger="segpipe"):
        build_labels(str(root / "labels" / "a.gpkg"), None, r.info, read_label_classes(str(root)))
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "feature(s):" in r.getMessage()]


def test_the_mask_wins_note_is_a_warning(tmp_path, caplog):
    from segpipe.labels.dataset import load_dataset

    root = _dataset(tmp_path / "d")
    _write(root / "labels" / "a.gpkg", [_to_map(shapely.box(4, 4, 12, 12))], {"class": ["house"]})
    (root / "masks").mkdir()
    write_geotiff(root / "masks" / "a.tif", np.ones((1, 40, 48), np.uint8))
    with caplog.at_level(logging.INFO, logger="segpipe"):
        load_dataset(str(root))
    [rec] = [r for r in caplog.records if "the mask is used" in r.getMessage()]
    assert rec.levelno == logging.WARNING


@pytest.mark.slow
def test_train_shows_label_warnings_on_the_terminal_and_in_the_log_file_and_one_line_per_epoch(tmp_path,
                                                                                            monkeypatch):
    from click.testing import CliRunner

    from segpipe.cli.main import main

    root = _dataset(tmp_path / "d")
    _write(root / "labels" / "a.gpkg", [_to_map(shapely.box(4, 4, 30, 30)), _to_map(shapely.box(900, 900, 910, 910))],
           {"class": ["house", "water"]})
    monkeypatch.setenv("SEGPIPE_LOG_DIR", str(tmp_path / "logs"))
    r = CliRunner().invoke(main, ["train", "--data", str(root), "--out", str(tmp_path / "m"), "--epochs", "2",
                                  "--patches-per-epoch", "2", "--batch-size", "2", "--patch-size", "32",
                                  "--encoder", "resnet18", "--precision", "fp32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    line = f"{root}/labels/a.gpkg: 2 feature(s): 0 repaired, 0 dropped (no area), 1 outside the image"
    assert r.stderr.count(f"warning: {line}") == 1, r.stderr
    [log] = list((tmp_path / "logs").iterdir())
    assert f"WARNING segpipe.labels.truth: {line}" in log.read_text()
    # stdout is not a terminal here: one plain line per epoch instead of a progress bar
    epochs = [x for x in r.stdout.splitlines() if x.startswith("epoch ")]
    assert [x.split(":")[0] for x in epochs] == ["epoch 1/2", "epoch 2/2"] and "patches/s" in epochs[0]


# --------------------------------------------------------------------------- large and remote label files


def _qupath_detections(path: Path, n: int) -> None:
    """A QuPath 0.5 detection export of ``n`` cells (24-vertex rings with measurements), written as text."""
    rng = np.random.default_rng(0)
    unit = np.column_stack([8 * np.cos(np.linspace(0, 6.2, 24)), 8 * np.sin(np.linspace(0, 6.2, 24))])
    with open(path, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for i, (x, y) in enumerate(rng.uniform(0, 40000, (n, 2))):
            ring = unit + (x, y)
            coords = ",".join(f"[{a:.2f},{b:.2f}]" for a, b in (*ring, ring[0]))
            f.write(("," if i else "") + f'{{"type":"Feature","id":"{i:08x}-0000-4000-8000-000000000000",'
                    f'"geometry":{{"type":"Polygon","coordinates":[[{coords}]]}},"properties":{{"objectType":'
                    '"detection","classification":{"name":"building","color":[1,2,3]},"measurements":'
                    '{"Area µm^2":201.0,"Circularity":0.99}}}')
        f.write("]}")


def test_large_qupath_and_coco_json_are_streamed_not_loaded_whole(tmp_path, monkeypatch):
    """Memory follows the features, not the file's text: json.loads of a 1–3 GB detection export took tens of GB."""
    import tracemalloc

    from segpipe.labels import vectors

    path = tmp_path / "slide.geojson"
    _qupath_detections(path, 1500)
    size = path.stat().st_size
    small = tmp_path / "small.geojson"
    _qupath_detections(small, 2)
    vectors.read_vector_file(str(small))  # imports and first-use caches are not the file's memory
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("the whole file was parsed at once"))
    monkeypatch.setattr(vectors, "JSON_CHUNK", 8192)  # the parser's own per-read constant, small beside this file
    tracemalloc.start()
    feats = vectors.read_vector_file(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert feats.kind == "qupath" and len(feats) == 1500 and set(feats.classes) == {"building"}
    # what stays is a geometry (in GEOS), a class and a name per feature; the document parsed whole was 7× the file
    assert peak < 0.6 * size, (peak, size)
    # COCO, its members in any order (categories after annotations, as CVAT writes them), with a UTF-8 BOM
    coco = {"annotations": [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}],
            "images": [{"id": 7, "file_name": "s.png", "height": 10, "width": 10}],
            "categories": [{"id": 3, "name": "water"}]}
    (tmp_path / "s.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(coco).encode())
    got = vectors.read_vector_file(str(tmp_path / "s.json"), image_name="s")
    assert got.kind == "coco" and got.classes == ["water"] and shapely.area(got.geoms[0]) == 16


def test_a_local_shapefile_without_its_dbf_is_refused(tmp_path):
    from segpipe.labels.vectors import read_vector_file

    shp = _write(tmp_path / "a.shp", [_to_map(shapely.box(4, 4, 12, 12))], {"class": ["house"]})
    assert read_vector_file(str(shp)).classes == ["house"]
    (tmp_path / "a.dbf").unlink()
    with pytest.raises(DatasetError, match=r"a\.shp: is a Shapefile without its a\.dbf beside it; copy every part "):
        read_vector_file(str(shp))


@pytest.mark.e2e
def test_labels_on_a_bucket_shapefile_with_its_sidecars_and_qupath(tmp_path):
    """A Shapefile on s3:// arrived without its .dbf and .prj (no classes, no CRS): the sidecars come along."""
    import s3fs
    from pyproj import CRS, Transformer

    from segpipe.io.readers.base import ImageInfo
    from segpipe.labels.classes import parse_label_classes
    from segpipe.labels.truth import VectorLabelReader, build_labels
    from tests.services import aws_environment, s3_server

    # drawn in WGS 84: read without its .prj it would be taken for UTM and miss the image
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform
    box = shapely.transform(_to_map(shapely.box(4, 4, 12, 12)), lambda xy: np.column_stack(to_wgs(xy[:, 0], xy[:, 1])))
    local = _write(tmp_path / "up" / "a.shp", [box], {"class": ["house"]}, crs="EPSG:4326")
    image = ImageInfo("a.tif", 40, 48, 3, "uint8", crs_wkt=CRS.from_epsg(32633).to_wkt(), transform=T)
    classes = parse_label_classes(CLASSES, "classes.json")
    with s3_server(tmp_path) as aws, aws_environment(aws):
        fs = s3fs.S3FileSystem()
        fs.mkdir("data")
        for p in sorted(local.parent.iterdir()):
            fs.put(str(p), f"data/labels/{p.name}")
        fs.put(str(local), "data/other/b.shp")  # another folder: the .shp alone
        prepared = build_labels("s3://data/labels/a.shp", None, image, classes)
        a = VectorLabelReader(prepared, image, "s3://data/labels/a.shp").read(Window(0, 0, 40, 48))[0]
        assert (a == 1).sum() == 64 and (a[4:12, 4:12] == 1).all()
        with pytest.raises(DatasetError, match=r"^s3://data/other/b\.shp: is a Shapefile without its b\.shx and "
                                               r"b\.dbf beside it"):
            build_labels("s3://data/other/b.shp", None, image, classes)
        # QuPath GeoJSON from the bucket: streamed from one local copy
        doc = [{"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(0, 0, 8, 8)),
                "properties": {"classification": {"name": "water"}}}]
        fs.pipe("data/labels/q.geojson", json.dumps(doc).encode())
        pix = ImageInfo("q.png", 40, 48, 3, "uint8")
        q = build_labels("s3://data/labels/q.geojson", None, pix, classes)
        assert (VectorLabelReader(q, pix, "q").read(Window(0, 0, 40, 48))[0] == 2).sum() == 64


# --------------------------------------------------------------------------- split.json


def test_labels_named_by_a_double_extension_stem_belong_to_their_image(tmp_path):
    """``labels/a.gpkg`` labels ``images/a.ome.tif`` (before: "label file(s) without an image are ignored" and
    the image went without its labels); two files for one image are refused, naming both."""
    from segpipe.labels.dataset import load_dataset

    root = _dataset(tmp_path / "d", image="a.ome.tif")
    _write(root / "labels" / "a.gpkg", [_to_map(shapely.box(4, 4, 12, 12))], {"class": ["house"]})
    (item,) = load_dataset(str(root)).items
    assert item.name == "a.ome" and item.labels_uri == f"{root}/labels/a.gpkg"
    _write(root / "labels" / "a.ome.gpkg", [_to_map(shapely.box(4, 4, 12, 12))], {"class": ["house"]})
    with pytest.raises(DatasetError) as e:
        load_dataset(str(root))
    assert str(e.value) == f"{root}/labels/a.gpkg: labels the same image as a.ome.gpkg (a.ome.tif); keep one of them"


def test_split_json_names_the_known_images_and_takes_double_extensions(tmp_path):
    from segpipe.labels.dataset import load_dataset

    root = _dataset(tmp_path / "d", image="a.ome.tif")
    write_geotiff(root / "images" / "b.tif", np.full((3, 40, 48), 100, np.uint8))
    for name in ("a.ome", "b"):
        _write(root / "labels" / f"{name}.gpkg", [_to_map(shapely.box(4, 4, 12, 12))], {"class": ["house"]})
    for spelling in ("a.ome", "a.ome.tif", "a"):
        (root / "split.json").write_text(json.dumps({"train": ["b"], "val": [spelling]}))
        assert load_dataset(str(root), "val").names == ["a.ome"]
    (root / "split.json").write_text(json.dumps({"train": ["b"], "val": ["c"]}))
    with pytest.raises(DatasetError) as e:
        load_dataset(str(root))
    assert str(e.value) == (f"{root}/split.json: 'val' names image(s) not found under images/: c; "
                            "known names: a.ome, b")
