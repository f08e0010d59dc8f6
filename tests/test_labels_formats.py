"""Label files: every vector format, QuPath and COCO shapes, reprojection against gdal_rasterize."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import shapely

from segpipe.core.errors import DatasetError
from segpipe.core.geometry import Window
from segpipe.io.readers.base import ImageInfo
from segpipe.labels.classes import IGNORE_INDEX, parse_label_classes
from segpipe.labels.truth import VectorLabelReader, build_labels
from segpipe.labels.vectors import read_vector_file, sniff_json, to_pixels

CLASSES = parse_label_classes({
    "classes": [{"name": "background"}, {"name": "building", "aliases": ["house"]}, {"name": "water"}],
    "ignore": ["unsure"], "unlabelled": "background"}, "classes.json")

# a 60 × 80 image in UTM 33N, 0.5 m pixels, top-left corner at (500000, 4100000)
UTM = "EPSG:32633"
TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
GEO = ImageInfo("img.tif", 60, 80, 3, "uint8", crs_wkt=None, transform=TRANSFORM)
PIX = ImageInfo("photo.png", 60, 80, 3, "uint8")


def _geo_info() -> ImageInfo:
    from pyproj import CRS

    return ImageInfo("img.tif", 60, 80, 3, "uint8", crs_wkt=CRS.from_user_input(UTM).to_wkt(), transform=TRANSFORM)


def _map(col: float, row: float) -> tuple[float, float]:
    return 500000.0 + 0.5 * col, 4100000.0 - 0.5 * row


def _pixel_polys() -> tuple[list[shapely.Geometry], list[str]]:
    """Polygons in pixels with hand-known pixel counts (all edges between pixel centres)."""
    hole = shapely.Polygon([(2, 2), (22, 2), (22, 22), (2, 22)], [[(7, 7), (17, 7), (17, 17), (7, 17)]])  # 400 − 100
    lake = shapely.box(40, 10, 70, 20)  # 300
    unsure = shapely.box(30, 40, 40, 50)  # 100 → 255
    return [hole, lake, unsure], ["building", "water", "unsure"]


def _expected() -> np.ndarray:
    a = np.zeros((60, 80), np.uint8)
    a[2:22, 2:22] = 1
    a[7:17, 7:17] = 0
    a[10:20, 40:70] = 2
    a[40:50, 30:40] = IGNORE_INDEX
    return a


def _burn(uri: str, info: ImageInfo, **kw) -> np.ndarray:
    prepared = build_labels(uri, None, info, CLASSES, **kw)
    return VectorLabelReader(prepared, info, uri).read(Window(0, 0, info.height, info.width))[0]


def _write_ogr(path: Path, geoms, classes, crs: str | None, **kw) -> Path:
    from pyogrio.raw import write

    driver = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".shp": "ESRI Shapefile", ".fgb": "FlatGeobuf"}[path.suffix]
    write(str(path), shapely.to_wkb(np.asarray(geoms, dtype=object)), field_data=[np.asarray(classes, dtype=object)],
          fields=["class"], crs=crs, geometry_type="Polygon" if driver != "GPKG" else "Unknown", driver=driver, **kw)
    return path


@pytest.mark.parametrize("ext", [".gpkg", ".geojson", ".shp", ".fgb", ".parquet"])
def test_every_vector_format_in_map_coordinates(tmp_path, ext):
    polys, classes = _pixel_polys()
    geoms = [shapely.transform(g, lambda xy: np.column_stack(_map(xy[:, 0], xy[:, 1]))) for g in polys]
    path = tmp_path / f"labels{ext}"
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyproj import CRS

        geo = {"version": "1.0.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                        "crs": CRS.from_user_input(UTM).to_json_dict()}}}
        table = pa.table({"class": classes, "geometry": list(shapely.to_wkb(np.asarray(geoms, dtype=object)))})
        pq.write_table(table.replace_schema_metadata({"geo": json.dumps(geo)}), path)
    else:
        _write_ogr(path, geoms, classes, UTM)
    assert (_burn(str(path), _geo_info()) == _expected()).all()


def test_geopackage_layers_and_the_regions_layer(tmp_path):
    polys, classes = _pixel_polys()
    path = tmp_path / "l.gpkg"
    info = ImageInfo("img.png", 60, 80, 3, "uint8")  # no georeference: the file's coordinates are pixels
    _write_ogr(path, polys, classes, None, layer="mine")
    _write_ogr(path, [shapely.box(0, 0, 80, 30)], ["x"], None, layer="regions", append=False)
    # one labels layer + "regions": regions cut the image at row 30 (the "unsure" box lies outside: 255 anyway)
    a = _burn(str(path), info)
    exp = _expected()
    exp[30:] = IGNORE_INDEX
    assert (a == exp).all()
    _write_ogr(path, polys[:1], classes[:1], None, layer="other")
    with pytest.raises(DatasetError, match=r"has 2 layers \(mine, other\); name the labels layer 'labels'"):
        _burn(str(path), info)
    prepared = build_labels(str(path), None, info, CLASSES, layer="other")
    assert len(prepared.labels) == 1 and prepared.regions is None  # an explicit layer: no regions layer implied


def test_reprojection_matches_gdal_rasterize(tmp_path):
    """Polygons drawn in WGS 84 (degrees) over a UTM image: burned pixels equal gdal_rasterize's.

    gdal_rasterize (GDAL's command-line tool, its own build of GDAL and PROJ) reprojects the
    layer to the raster's CRS itself; segpipe reprojects with pyproj and burns with rasterio.
    """
    exe = shutil.which("gdal_rasterize")
    if exe is None:
        pytest.skip("gdal_rasterize is not on PATH (apt-get install gdal-bin)")
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import Affine

    # irregular polygons with holes (vertices off the pixel grid), one per 60-px cell so that
    # none overlap (gdal_rasterize burns in file order, segpipe by priority), then to lon/lat
    rng = np.random.default_rng(5)
    polys = []
    for k in range(12):
        cx, cy, r = 30 + 60 * (k % 4) + rng.uniform(-4, 4), 30 + 60 * (k // 4) + rng.uniform(-4, 4), rng.uniform(12, 25)
        ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
        ring = np.column_stack([cx + r * np.cos(ang), cy + r * np.sin(ang)])
        hole = np.column_stack([cx + 0.35 * r * np.cos(ang[::2]), cy + 0.35 * r * np.sin(ang[::2])])
        polys.append(shapely.Polygon(ring, [hole] if k % 2 else None))
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    ll = [shapely.transform(g, lambda xy: np.column_stack(to_ll.transform(*_map(xy[:, 0], xy[:, 1])))) for g in polys]
    classes = [1 + k % 2 for k in range(len(ll))]
    path = tmp_path / "ll.gpkg"
    from pyogrio.raw import write

    write(str(path), shapely.to_wkb(np.asarray(ll, dtype=object)), field_data=[np.asarray(classes, dtype=np.int32)],
          fields=["class"], crs="EPSG:4326", geometry_type="Polygon", driver="GPKG", layer="labels")
    info = ImageInfo("img.tif", 180, 240, 3, "uint8", crs_wkt=_geo_info().crs_wkt, transform=TRANSFORM)
    for all_touched in (False, True):
        oracle = tmp_path / f"oracle{int(all_touched)}.tif"
        with rasterio.open(oracle, "w", driver="GTiff", height=180, width=240, count=1, dtype="uint8", crs=UTM,
                           transform=Affine(*TRANSFORM), nodata=None) as ds:
            ds.write(np.zeros((1, 180, 240), np.uint8))
        subprocess.run([exe, "-q", "-a", "class", "-l", "labels", *(["-at"] if all_touched else []), str(path),
                        str(oracle)], check=True)
        with rasterio.open(oracle) as ds:
            expected = ds.read(1)
        lc = CLASSES if not all_touched else parse_label_classes(
            {"classes": [{"name": n} for n in CLASSES.names], "unlabelled": "background",
             "burn": {"all_touched": True}}, "c")
        prepared = build_labels(str(path), None, info, lc)
        ours = VectorLabelReader(prepared, info, str(path)).read(Window(0, 0, 180, 240))[0]
        assert expected.astype(bool).sum() > 2000
        assert (ours == expected).all(), f"{int((ours != expected).sum())} pixels differ (all_touched={all_touched})"


# --------------------------------------------------------------------------- QuPath


def _qp_feature(geom, cls, *, version: str, object_type: str = "annotation", fid: str = "a1"):
    props: dict = {"isLocked": False}
    if cls is not None:
        props["classification"] = ({"name": cls, "colorRGB": -3670016} if version == "0.4"
                                   else {"name": cls, "color": [200, 0, 0]})
    if version != "0.4":
        props["objectType"] = object_type
    return {"type": "Feature", "id": "PathAnnotationObject" if version == "0.4" else fid,
            "geometry": shapely.geometry.mapping(geom), "properties": props}


@pytest.mark.parametrize("version", ["0.4", "0.5", "0.6"])
def test_qupath_exports(tmp_path, version):
    polys, classes = _pixel_polys()
    # the holed building as a MultiPolygon, the lake inside a GeometryCollection with a
    # stray point (QuPath writes those for some merged objects... with a buffer only), a detection
    feats = [
        _qp_feature(shapely.MultiPolygon([polys[0]]), "building", version=version),
        _qp_feature(shapely.GeometryCollection([polys[1]]), "Water", version=version, object_type="detection"),
        _qp_feature(polys[2], "unsure", version=version, object_type="cell"),
        _qp_feature(shapely.box(0, 0, 80, 30), "Region*", version=version),
    ]
    doc = feats if version == "0.4" else {"type": "FeatureCollection", "features": feats}
    assert sniff_json(doc) == "qupath"
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(doc))
    got = read_vector_file(str(path))
    assert got.kind == "qupath" and got.pixel_space and got.classes == ["building", "Water", "unsure", "Region*"]
    a = _burn(str(path), PIX)
    exp = _expected()
    exp[30:] = IGNORE_INDEX  # the Region* annotation: labelled only above row 30
    assert (a == exp).all()


def test_qupath_coordinates_are_level0_pixels_even_on_a_georeferenced_image_and_scale_with_the_level():
    from segpipe.labels.vectors import VectorFeatures

    feats = VectorFeatures("s.geojson", np.array([shapely.box(0, 0, 40, 20)], dtype=object), ["building"],
                           ["feature 0"], None, True, "qupath")
    assert shapely.bounds(to_pixels(feats, _geo_info())[0]).tolist() == [0, 0, 40, 20]
    from segpipe.core.grid import PixelGrid

    level2 = ImageInfo("s.svs", 15, 20, 3, "uint8", on_grid=PixelGrid(15, 20, (60, 80), 4.0))
    assert shapely.bounds(to_pixels(feats, level2)[0]).tolist() == [0, 0, 10, 5]


def test_unknown_and_missing_classes_name_the_file_feature_and_place(tmp_path):
    doc = {"type": "FeatureCollection", "features": [
        _qp_feature(shapely.box(0, 0, 4, 4), "building", version="0.5", fid="ok"),
        _qp_feature(shapely.box(10, 20, 14, 24), "Tree", version="0.5", fid="7f3c")]}
    path = tmp_path / "q.geojson"
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as e:
        _burn(str(path), PIX)
    assert str(e.value).startswith(f"{path}: feature 1 (id '7f3c') near x=12, y=22 (pixels): unknown class 'Tree'")
    doc["features"][1] = _qp_feature(shapely.box(10, 20, 14, 24), None, version="0.5", fid="u")
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="unknown class 'Unclassified'.*list 'Unclassified' under ignore"):
        _burn(str(path), PIX)
    # map coordinates: the place is given in the file's CRS
    g = _write_ogr(tmp_path / "m.gpkg", [shapely.box(500001, 4099990, 500003, 4099992)], ["Tree"], UTM)
    with pytest.raises(DatasetError, match=r"m\.gpkg: feature 0 \(id 1\) near x=500002, y=4\.09999e\+06 \(file CRS\): "
                                           r"unknown class 'Tree'"):
        _burn(str(g), _geo_info())


def test_vector_labels_without_regions_need_unlabelled(tmp_path):
    g = _write_ogr(tmp_path / "m.gpkg", [shapely.box(0, 0, 4, 4)], ["building"], None)
    lc = parse_label_classes({"classes": [{"name": "background"}, {"name": "building"}]}, "DATA/classes.json")
    with pytest.raises(DatasetError, match='DATA/classes.json does not say what the pixels no label covers are '
                                           r'\(it has no labelled regions\): add "unlabelled"'):
        build_labels(str(g), None, PIX, lc)
    ign = build_labels(str(g), None, PIX, lc.with_unlabelled(IGNORE_INDEX))
    a = VectorLabelReader(ign, PIX, str(g)).read(Window(0, 0, 60, 80))[0]
    assert (a == 1).sum() == 16 and (a == IGNORE_INDEX).sum() == 60 * 80 - 16


# --------------------------------------------------------------------------- COCO


def _coco_doc() -> tuple[dict, np.ndarray]:
    from pycocotools import mask as mask_utils

    h, w = 60, 80
    blob = np.zeros((h, w), np.uint8, order="F")
    yy, xx = np.mgrid[:h, :w]
    blob[((yy - 40) ** 2 + (xx - 55) ** 2) < 120] = 1  # a disc
    blob[38:42, 53:57] = 0  # with a hole
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode("ascii")
    doc = {
        "images": [{"id": 1, "file_name": "photo.jpg", "height": h, "width": w},
                   {"id": 2, "file_name": "other.jpg", "height": h, "width": w}],
        "categories": [{"id": 7, "name": "building"}, {"id": 9, "name": "water"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
             "segmentation": [[2, 2, 22, 2, 22, 22, 2, 22], [30, 2, 35, 2, 35, 6, 30, 6]]},
            {"id": 2, "image_id": 1, "category_id": 9, "iscrowd": 1, "segmentation": rle},
            {"id": 3, "image_id": 2, "category_id": 9, "iscrowd": 0, "segmentation": [[0, 0, 80, 0, 80, 60, 0, 60]]},
        ],
    }
    return doc, blob


def test_coco_polygons_and_rle(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    doc, blob = _coco_doc()
    path = tmp_path / "photo.json"
    path.write_text(json.dumps(doc))
    coco = COCO(str(path))  # read back through pycocotools: the fixture is valid COCO
    assert sorted(coco.getAnnIds(imgIds=[1])) == [1, 2]
    assert (coco.annToMask(coco.loadAnns([2])[0]) == blob).all()
    a = _burn(str(path), PIX, image_name="photo")
    poly_mask = coco.annToMask(coco.loadAnns([1])[0])
    # pycocotools rasterises polygons its own way (it includes edge pixels); the pixel-centre
    # rule gives the 20×20 and 5×4 boxes: 400 + 20 pixels
    assert (a == 1).sum() == 420 and a[2:22, 2:22].all() and a[2:6, 30:35].all()
    assert poly_mask[2:22, 2:22].all()
    # RLE: exactly its pixels, hole included (pixel-edge polygons burned at centres)
    assert ((a == 2) == (blob == 1)).all() and mask_utils.area(mask_utils.encode(np.asfortranarray(blob))) == (a == 2).sum()
    with pytest.raises(DatasetError, match=r"describes no image named 'nothere'\.\* \(its images: photo\.jpg, "
                                           r"other\.jpg\)"):
        _burn(str(path), PIX, image_name="nothere")
