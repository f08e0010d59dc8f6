"""Exports in GIS and slide tools: nodata stays nodata, one class table (COG colours, GDAL PAM, QGIS style,
preview legend), every vector format, slide vectors in level-0 pixels for QuPath."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import logging
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
import shapely
import zarr
from affine import Affine
from PIL import Image

from segpipe.core.classes import parse_color
from segpipe.core.errors import ConfigError
from segpipe.export import (
    Exports,
    export_cog,
    export_preview,
    export_vectors,
    read_output_meta,
)
from segpipe.export.meta import level0_mapping
from segpipe.export.vectors import vector_driver
from tests.test_export import CLASSES, COLORS, make_output, scene

NODATA = 255


@pytest.fixture(scope="module")
def nodata_labels() -> np.ndarray:
    """The export test scene with no data on a left strip, a hole inside the ring and a 1-pixel speck."""
    labels = scene()
    labels[:, :100] = NODATA  # 100 px: part of chunk column 0 (chunks are 256)
    labels[380:420, 500:540] = NODATA  # inside the ring's hole
    labels[600, 700] = NODATA
    return labels


@pytest.fixture(scope="module")
def nodata_output(tmp_path_factory, nodata_labels) -> str:
    # written directly (attributes by hand, segpipe.nodata_label = 255 as the pipeline records it)
    return make_output(tmp_path_factory.mktemp("nd") / "scene.zarr", nodata_labels, nodata=NODATA)


class GdalLogs(logging.Handler):
    """GDAL's warnings/errors as rasterio logs them (logger ``rasterio._env``, ``CPLE_*`` messages)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # rasterio logs GDAL warnings at WARNING and some GDAL errors it recovers from at INFO
        # ("GDAL signalled an error: …"), e.g. libtiff refusing the palette photometric tag
        message = record.getMessage()
        if record.levelno >= logging.WARNING or "signalled an error" in message:
            self.messages.append(message)

    def __enter__(self) -> GdalLogs:  # noqa: PYI034
        logger = logging.getLogger("rasterio._env")
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("rasterio._env")
        logger.removeHandler(self)
        logger.setLevel(self._level)


# ----------------------------------------------------------------------------- COG: nodata


def test_cog_nodata_stays_nodata_without_palette_warnings(nodata_output, nodata_labels, tmp_path) -> None:
    # the capture works: GDAL's warning for an unknown creation option arrives
    with GdalLogs() as control, rasterio.open(tmp_path / "c.tif", "w", driver="GTiff", height=8, width=8, count=1,
                                               dtype="uint8", crs="EPSG:32633", transform=Affine(1, 0, 0, 0, -1, 8),
                                               FOO="BAR") as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    assert any("FOO" in m for m in control.messages)

    with GdalLogs() as logs:
        path = export_cog(nodata_output, str(tmp_path / "nd.tif"))
    assert not [m for m in logs.messages if "palette" in m.lower()], logs.messages
    assert logs.messages == []
    with rasterio.open(path) as ds:
        assert ds.nodata == NODATA
        assert ds.colormap(1)[NODATA] == (0, 0, 0, 0)
        for i, c in enumerate(COLORS):
            assert ds.colormap(1)[i] == parse_color(c)
        assert ds.tags()["NODATA_LABEL"] == "255"
        np.testing.assert_array_equal(ds.read(1), nodata_labels)
        # the mask GDAL derives from NoData is exactly the nodata pixels
        np.testing.assert_array_equal(ds.read_masks(1) == 0, nodata_labels == NODATA)
        # overviews (mode, NoData-aware): the strip stays nodata, no class is made of nodata
        assert ds.overviews(1) == [2, 4]
        ov = ds.read(1, out_shape=(500, 650))
        assert (ov[:, :49] == NODATA).all()
        assert set(np.unique(ov)) <= {0, 1, 2, 3, NODATA}
        # one nodata pixel among class pixels does not survive the mode of its 2×2 block
        assert ov[300, 350] != NODATA


def test_old_output_without_nodata_label_has_no_nodata(tmp_path, nodata_labels) -> None:
    uri = make_output(tmp_path / "old.zarr", nodata_labels, nodata=None)  # written before nodata_label
    assert read_output_meta(uri).nodata is None
    path = export_cog(uri, str(tmp_path / "old.tif"), style=False)
    with rasterio.open(path) as ds:
        assert ds.nodata is None
        assert ds.colormap(1)[NODATA][3] == 255  # an ordinary (unknown) value, drawn opaque
    assert not os.path.exists(path + ".aux.xml") and not os.path.exists(str(tmp_path / "old.qml"))
    n = export_vectors(uri, str(tmp_path / "old.gpkg"), classes=[NODATA])
    assert n > 0  # no nodata label: 255 is just a value


# ----------------------------------------------------------------------------- COG: class table sidecars


def _bundled_gdal() -> ctypes.CDLL | None:
    """The GDAL library rasterio runs on (its wheel bundles one), through ctypes."""
    here = os.path.dirname(rasterio.__file__)
    candidates = sorted(glob.glob(os.path.join(here, os.pardir, "rasterio.libs", "libgdal*.so*")))
    candidates += sorted(glob.glob(os.path.join(here, ".dylibs", "libgdal*.dylib")))
    if not candidates:
        found = ctypes.util.find_library("gdal")
        candidates = [found] if found else []
    return ctypes.CDLL(candidates[0]) if candidates else None


def gdal_class_table(path: str) -> dict:
    """Category names, raster attribute table and NoData of band 1, as GDAL's C API reads them."""
    lib = _bundled_gdal()
    if lib is None:
        pytest.skip("no GDAL library to load through ctypes")
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.GDALOpen.restype, lib.GDALOpen.argtypes = vp, [cp, ctypes.c_int]
    lib.GDALGetRasterBand.restype, lib.GDALGetRasterBand.argtypes = vp, [vp, ctypes.c_int]
    lib.GDALGetRasterCategoryNames.restype, lib.GDALGetRasterCategoryNames.argtypes = ctypes.POINTER(cp), [vp]
    lib.GDALGetDefaultRAT.restype, lib.GDALGetDefaultRAT.argtypes = vp, [vp]
    lib.GDALRATGetRowCount.restype, lib.GDALRATGetRowCount.argtypes = ctypes.c_int, [vp]
    lib.GDALRATGetColumnCount.restype, lib.GDALRATGetColumnCount.argtypes = ctypes.c_int, [vp]
    lib.GDALRATGetNameOfCol.restype, lib.GDALRATGetNameOfCol.argtypes = cp, [vp, ctypes.c_int]
    lib.GDALRATGetUsageOfCol.restype, lib.GDALRATGetUsageOfCol.argtypes = ctypes.c_int, [vp, ctypes.c_int]
    lib.GDALRATGetTypeOfCol.restype, lib.GDALRATGetTypeOfCol.argtypes = ctypes.c_int, [vp, ctypes.c_int]
    lib.GDALRATGetValueAsString.restype = cp
    lib.GDALRATGetValueAsString.argtypes = [vp, ctypes.c_int, ctypes.c_int]
    lib.GDALGetRasterNoDataValue.restype = ctypes.c_double
    lib.GDALGetRasterNoDataValue.argtypes = [vp, ctypes.POINTER(ctypes.c_int)]
    lib.GDALClose.argtypes = [vp]
    lib.GDALAllRegister()
    ds = lib.GDALOpen(path.encode(), 0)
    assert ds, f"GDAL cannot open {path}"
    try:
        band = lib.GDALGetRasterBand(ds, 1)
        ok = ctypes.c_int(0)
        nodata = lib.GDALGetRasterNoDataValue(band, ctypes.byref(ok))
        # in gdalinfo's order: GDAL's GTiff driver loads the PAM sidecar lazily, on the first
        # call that needs it (GetDefaultRAT does; GetCategoryNames alone does not in GDAL 3.10)
        rat = lib.GDALGetDefaultRAT(band)
        names = lib.GDALGetRasterCategoryNames(band)
        categories = []
        i = 0
        while names and names[i] is not None:
            categories.append(names[i].decode())
            i += 1
        table = None
        if rat:
            cols = lib.GDALRATGetColumnCount(rat)
            table = {
                "columns": [(lib.GDALRATGetNameOfCol(rat, c).decode(), lib.GDALRATGetTypeOfCol(rat, c),
                             lib.GDALRATGetUsageOfCol(rat, c)) for c in range(cols)],
                "rows": [[lib.GDALRATGetValueAsString(rat, r, c).decode() for c in range(cols)]
                         for r in range(lib.GDALRATGetRowCount(rat))],
            }
        return {"categories": categories, "rat": table, "nodata": nodata if ok.value else None}
    finally:
        lib.GDALClose(ds)


def test_cog_class_table_sidecars_are_read_by_gdal(nodata_output, tmp_path) -> None:
    path = export_cog(nodata_output, str(tmp_path / "classes.tif"))
    assert os.path.exists(path + ".aux.xml") and os.path.exists(str(tmp_path / "classes.qml"))
    got = gdal_class_table(path)
    assert got["categories"] == CLASSES
    assert got["nodata"] == NODATA
    assert got["rat"]["columns"] == [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7),
                                     ("Blue", 0, 8), ("Alpha", 0, 9)]
    assert got["rat"]["rows"] == [[str(i), name, *(str(v) for v in parse_color(COLORS[i]))]
                                  for i, name in enumerate(CLASSES)]
    if shutil.which("gdalinfo"):  # the CLI too, where installed
        info = json.loads(subprocess.run(["gdalinfo", "-json", path], capture_output=True, text=True,
                                         check=True).stdout)
        assert info["bands"][0]["categories"] == CLASSES


def test_qgis_style_is_a_paletted_renderer_of_the_classes(nodata_output, tmp_path) -> None:
    export_cog(nodata_output, str(tmp_path / "styled.tif"))
    text = (tmp_path / "styled.qml").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE qgis")
    root = ET.fromstring(text)
    assert root.tag == "qgis"
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    assert renderer.get("nodataColor") == ""  # QGIS: nodata not drawn
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("color"), e.get("alpha"), e.get("label")) for e in entries] == [
        (str(i), COLORS[i], "255", name) for i, name in enumerate(CLASSES)
    ]
    assert str(NODATA) not in [e.get("value") for e in entries]
    assert root.find("pipe/provider/resampling").get("zoomedOutResamplingMethod") == "nearestNeighbour"


def test_class_names_are_escaped_in_sidecars(tmp_path) -> None:
    labels = np.zeros((64, 64), np.uint8)
    uri = make_output(tmp_path / "esc.zarr", labels)
    group = zarr.open_group(uri)
    names = ['a & b', '<tumour>', 'quote "x"', "ünïcode"]
    group.attrs["segpipe"] = {**group.attrs["segpipe"], "classes": names}
    path = export_cog(uri, str(tmp_path / "esc.tif"))
    labels_qml = [e.get("label") for e in ET.parse(tmp_path / "esc.qml").getroot().iter("paletteEntry")]
    assert labels_qml == names
    assert gdal_class_table(path)["categories"] == names


# ----------------------------------------------------------------------------- preview


def test_preview_nodata_transparent_and_legend_has_every_class(nodata_output, nodata_labels, tmp_path) -> None:
    path = export_preview(nodata_output, str(tmp_path / "p.png"), max_size=400)
    full = np.asarray(Image.open(path))
    assert full.ndim == 3 and full.shape[2] == 4 and full.shape[1] == 400
    h, w = 308, 400
    # nearest-neighbour sampling of level 0, as the preview does: alpha 0 exactly at sampled nodata pixels
    rows = ((np.arange(h) + 0.5) * 1000 / h).astype(int)
    cols = ((np.arange(w) + 0.5) * 1300 / w).astype(int)
    sampled = nodata_labels[rows[:, None], cols[None, :]]
    np.testing.assert_array_equal(full[:h, :, 3] == 0, sampled == NODATA)
    assert (sampled == NODATA).sum() > 30 * h  # the strip and the hole are in it
    legend = full[h:]
    assert legend.shape[0] >= 20 and (legend[..., 3] == 255).all()
    pixels = {tuple(p) for p in legend[..., :3].reshape(-1, 3)}
    for c in COLORS:
        assert parse_color(c)[:3] in pixels, c
    # the swatches are in the legend, not leaked from the map: red/green/blue only appear there in full
    assert legend.shape[1] == 400


def test_preview_over_source_shows_source_at_nodata(tmp_path, nodata_labels) -> None:
    from tests.test_export import TRANSFORM, UTM33

    src = str(tmp_path / "scene.tif")
    with rasterio.open(src, "w", driver="GTiff", height=1000, width=1300, count=3, dtype="uint8",
                       crs=UTM33, transform=Affine(*TRANSFORM), tiled=True) as ds:
        ds.write(np.full((3, 1000, 1300), 200, np.uint8))
    uri = make_output(tmp_path / "blend.zarr", nodata_labels, source=src)
    full = np.asarray(Image.open(export_preview(uri, str(tmp_path / "b.png"), max_size=300, legend=False)))
    assert full.shape == (231, 300, 4) and (full[..., 3] == 255).all()
    np.testing.assert_array_equal(full[:, :20, :3], 200)  # nodata: the source, unblended


def test_legend_of_many_classes_is_capped(tmp_path) -> None:
    from segpipe.export.preview import LEGEND_MAX_CLASSES, render_legend

    labels = np.zeros((40, 300), np.uint8)
    uri = make_output(tmp_path / "many.zarr", labels)
    group = zarr.open_group(uri)
    group.attrs["segpipe"] = {**group.attrs["segpipe"], "classes": [f"class {i}" for i in range(100)],
                              "class_colors": None}
    meta = read_output_meta(uri)
    panel = render_legend(meta, 300)
    assert panel.shape[1] == 300 and panel.shape[0] < 20 * LEGEND_MAX_CLASSES  # several entries per row
    pixels = {tuple(p) for p in panel[..., :3].reshape(-1, 3)}
    listed = [tuple(int(v) for v in c[:3]) for c in meta.colors[:LEGEND_MAX_CLASSES]]
    assert all(c in pixels for c in listed)


# ----------------------------------------------------------------------------- vectors: formats


def read_any(path: str) -> tuple[object, np.ndarray, dict[str, np.ndarray]]:
    """(crs, geometries, fields) of a vector file: pyogrio for OGR formats, pyarrow for GeoParquet."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        geo = json.loads(table.schema.metadata[b"geo"])
        assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
        assert geo["columns"]["geometry"]["geometry_types"] == ["Polygon"]
        crs = geo["columns"]["geometry"]["crs"]
        fields = {n: table.column(n).to_numpy(zero_copy_only=False) for n in ("class_id", "class_name", "area")}
        return crs, shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False)), fields
    from pyogrio.raw import read

    meta, _, wkb, data = read(path)
    return meta["crs"], shapely.from_wkb(wkb), {n: data[i] for i, n in enumerate(meta["fields"])}


@pytest.mark.parametrize("ext", [".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet"])
def test_every_vector_format_has_exact_areas_and_no_nodata(nodata_output, nodata_labels, tmp_path, ext) -> None:
    if ext == ".parquet":
        pytest.importorskip("pyarrow")
    path = str(tmp_path / f"v{ext}")
    n = export_vectors(nodata_output, path)
    crs, geoms, fields = read_any(path)
    assert len(geoms) == n > 0
    ids = fields["class_id"]
    assert NODATA not in set(ids.tolist())
    assert set(ids.tolist()) == {0, 1, 2, 3}
    for k in range(4):  # areas: pixel count × pixel area (0.5 m × 0.5 m), both per feature field and geometry
        expected = (nodata_labels == k).sum() * 0.25
        assert fields["area"][ids == k].sum() == pytest.approx(expected, rel=1e-9)
        assert shapely.area(geoms[ids == k]).sum() == pytest.approx(expected, rel=1e-9)
    assert set(fields["class_name"][ids == 1].tolist()) == {"building"}
    # a polygon's hole where the nodata square is: it is no class's
    nodata_square = shapely.box(500000 + 500 * 0.5, 5000000 - 420 * 0.5, 500000 + 540 * 0.5, 5000000 - 380 * 0.5)
    assert not shapely.intersects(geoms, nodata_square.buffer(-0.1)).any()
    if ext == ".parquet":
        assert crs["id"] == {"authority": "EPSG", "code": 32633}  # PROJJSON, as GeoParquet requires
    else:
        assert rasterio.crs.CRS.from_user_input(crs) == rasterio.crs.CRS.from_epsg(32633)


def test_vectors_sieve_leaves_nodata_alone(tmp_path) -> None:
    labels = np.ones((128, 128), np.uint8)
    labels[:, :40] = NODATA
    labels[60:62, 80:82] = 2  # a 4-pixel speck inside class 1: sieved into class 1
    labels[10:12, 40:42] = 3  # a speck touching only nodata and class 1
    labels[100, 20] = 1  # a 1-pixel class island inside nodata: nothing to merge it into
    uri = make_output(tmp_path / "s.zarr", labels, chunk=64)
    export_vectors(uri, str(tmp_path / "s.gpkg"), sieve=5)
    _, geoms, fields = read_any(str(tmp_path / "s.gpkg"))
    assert NODATA not in set(fields["class_id"].tolist()) and 2 not in set(fields["class_id"].tolist())
    total = shapely.area(geoms).sum() * 4  # pixels (0.25 m² each)
    assert total == pytest.approx((labels != NODATA).sum())  # nodata was neither removed nor grown into


def test_unknown_vector_format_is_one_line_config_error(nodata_output, tmp_path) -> None:
    for bad in ("x.kml", "x.csv", "x"):
        with pytest.raises(ConfigError) as e:
            export_vectors(nodata_output, str(tmp_path / bad))
        assert "\n" not in str(e.value)
        assert all(ext in str(e.value) for ext in (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet"))
    assert vector_driver("A.GPKG") == "GPKG" and vector_driver("b.fgb") == "FlatGeobuf"
    with pytest.raises(ConfigError, match="unknown vector format"):
        Exports(vector="kml")
    assert Exports(vector=".FGB").vector == "fgb"


# ----------------------------------------------------------------------------- slides for QuPath


def test_slide_level0_mapping_from_recorded_reader_or_slide(tmp_path, caplog) -> None:
    labels = np.zeros((150, 200), np.uint8)
    labels[20:40, 30:60] = 1
    reader = {"driver": "openslide", "level": 1, "resample_factor": 2.0, "downsample": 4.0,
              "level0_height": 1200, "level0_width": 1600}
    # written directly: a slide output whose source is gone, so only the recorded reader can tell
    uri = make_output(tmp_path / "rec.zarr", labels, georef=False, source=str(tmp_path / "gone.svs"), reader=reader)
    m = level0_mapping(read_output_meta(uri))
    assert (m.scale, m.height, m.width) == (8.0, 1200, 1600)
    export_vectors(uri, str(tmp_path / "rec.geojson"), classes=[1])
    feats = json.loads((tmp_path / "rec.geojson").read_text())["features"]
    assert len(feats) == 1
    assert shapely.geometry.shape(feats[0]["geometry"]).bounds == (240.0, 160.0, 480.0, 320.0)
    # nothing recorded, source gone: a warning, and the output's own pixels
    old = {"driver": "openslide", "level": 1, "resample_factor": 1.0}
    uri2 = make_output(tmp_path / "old.zarr", labels, georef=False, source=str(tmp_path / "gone.svs"), reader=old)
    with caplog.at_level(logging.WARNING, logger="segpipe.export.meta"):
        assert level0_mapping(read_output_meta(uri2)) is None
    assert "records no downsample" in caplog.text
    # georeferenced outputs are never slides
    assert level0_mapping(read_output_meta(make_output(tmp_path / "geo.zarr", labels, reader=reader))) is None


def test_slide_vectors_are_level0_geojson_for_qupath(tmp_path, model_dir, client) -> None:
    """A slide segmented at mpp 2.0 (level 1, 4× downsample, then 2× area resampling) through the pipeline."""
    pytest.importorskip("openslide")
    from segpipe.core.settings import (
        InferenceSettings,
        ReadSettings,
        SegmentSettings,
        TilingSettings,
    )
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images
    from tests.test_slide import H, W, synthetic_slide, write_aperio

    svs = write_aperio(tmp_path / "slide.svs", synthetic_slide(0), mpp=0.25)
    settings = SegmentSettings(tiling=TilingSettings(chunk_size=64, halo=16), read=ReadSettings(mpp=2.0),
                               inference=InferenceSettings(device="cpu", precision="fp32"))
    ref, _ = check_model(model_dir)
    res = segment_image(list_images(svs)[0], ref, str(tmp_path / "out"), settings, client)
    assert res.status == "done", res.error
    assert (res.height, res.width) == (H // 8, W // 8)  # the segmented resolution, not level 0
    meta = read_output_meta(res.output)
    assert meta.is_slide and level0_mapping(meta).scale == pytest.approx(8.0)

    path = str(tmp_path / "slide.geojson")
    n = export_vectors(res.output, path)
    doc = json.loads((tmp_path / "slide.geojson").read_text())
    feats = doc["features"]
    assert len(feats) == n > 0
    labels = zarr.open_array(res.output + "/0", mode="r")[:]
    geoms = [shapely.geometry.shape(f["geometry"]) for f in feats]
    xmin, ymin, xmax, ymax = shapely.total_bounds(geoms)
    # level-0 extent: inside the slide's level-0 size and far past the segmented level's
    assert xmin >= 0 and ymin >= 0 and xmax <= W and ymax <= H
    assert xmax > W // 8 * 2 and ymax > H // 8 * 2
    colors = {name: [int(v) for v in rgba[:3]] for name, rgba in zip(meta.classes, meta.colors)}
    for f, g in zip(feats, geoms):
        props = f["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert cls["name"] == meta.classes[props["class_id"]] and cls["color"] == colors[cls["name"]]
        assert props["area"] == pytest.approx(g.area)
    # each class's area is its pixel count at the segmented resolution × 8² level-0 pixels
    for k in np.unique(labels):
        if meta.nodata is not None and k == meta.nodata:
            continue
        got = sum(g.area for f, g in zip(feats, geoms) if f["properties"]["class_id"] == k)
        assert got == pytest.approx((labels == k).sum() * 64.0)
    # GDAL reads it too (classification as a JSON object field)
    _, g2, fields = read_any(path)
    assert len(g2) == n and set(fields["objectType"].tolist()) == {"annotation"}


def test_remote_targets_get_their_sidecars(nodata_output) -> None:
    """A COG written to a bucket (fsspec) takes its .aux.xml and .qml along; a shapefile its .shx/.dbf/.prj."""
    import fsspec

    fs = fsspec.filesystem("memory")
    export_cog(nodata_output, "memory://exports/scene.tif")
    assert fs.exists("/exports/scene.tif") and fs.exists("/exports/scene.tif.aux.xml")
    assert fs.exists("/exports/scene.qml")
    assert b"<CategoryNames>" in fs.cat("/exports/scene.tif.aux.xml")
    export_vectors(nodata_output, "memory://exports/scene.shp", classes=[1])
    assert all(fs.exists(f"/exports/scene{e}") for e in (".shp", ".shx", ".dbf", ".prj"))
    assert not [p for p in fs.find("/exports") if "tmp" in p or "export." in p]


def test_pipeline_nodata_reaches_every_export(tmp_path, photo, model_dir, client) -> None:
    """A GeoTIFF with a nodata region, segmented by the pipeline: NoData in the COG, no polygon, transparent preview."""
    from segpipe.core.settings import (
        InferenceSettings,
        ReadSettings,
        SegmentSettings,
        TilingSettings,
    )
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images
    from tests.helpers import write_geotiff

    img = photo[:, :192, :256].copy()
    img[img == 0] = 1
    img[:, :, :64] = 0  # no data: a whole chunk column
    img[:, 100:120, 150:170] = 0  # and a hole inside data chunks
    src = write_geotiff(tmp_path / "nd.tif", img, nodata=0)
    settings = SegmentSettings(tiling=TilingSettings(chunk_size=64, halo=16), read=ReadSettings(),
                               inference=InferenceSettings(device="cpu", precision="fp32"))
    ref, _ = check_model(model_dir)
    res = segment_image(list_images(str(src))[0], ref, str(tmp_path / "out"), settings, client)
    assert res.status == "done", res.error
    seg = zarr.open_group(res.output, mode="r").attrs["segpipe"]
    if "nodata_label" not in seg:
        pytest.xfail("this pipeline does not record segpipe.nodata_label yet")
    nodata = seg["nodata_label"]
    labels = zarr.open_array(res.output + "/0", mode="r")[:]
    assert (labels[:, :64] == nodata).all() and (labels[100:120, 150:170] == nodata).all()

    with GdalLogs() as logs:
        cog = export_cog(res.output, str(tmp_path / "nd-classes.tif"))
    assert logs.messages == []
    with rasterio.open(cog) as ds:
        assert ds.nodata == nodata and ds.colormap(1)[nodata][3] == 0
        np.testing.assert_array_equal(ds.read_masks(1) == 0, labels == nodata)
    assert gdal_class_table(cog)["categories"] == list(seg["classes"])

    n = export_vectors(res.output, str(tmp_path / "nd.gpkg"))
    _, geoms, fields = read_any(str(tmp_path / "nd.gpkg"))
    assert len(geoms) == n > 0 and nodata not in set(fields["class_id"].tolist())
    pixel_area = 0.25  # write_geotiff's 0.5 m pixels
    assert shapely.area(geoms).sum() == pytest.approx((labels != nodata).sum() * pixel_area)

    # 192×256 fits the preview: no resampling. Over the source, nodata shows the source unblended (black here)
    full = np.asarray(Image.open(export_preview(res.output, str(tmp_path / "nd.png"), legend=False)))
    assert full.shape == (192, 256, 4) and (full[..., 3] == 255).all()
    assert (full[labels == nodata][:, :3] == 0).all()
    assert (full[labels != nodata][:, :3].max(axis=1) > 0).mean() > 0.99  # class colours blended in elsewhere
