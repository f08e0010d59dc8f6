"""Real outputs checked by the validators users run on them: rio-cogeo's COG validator (API and
``rio cogeo validate``), ome-zarr-models' OME-NGFF 0.5 models, and the ``segpipe segment`` CLI's
exports read back with rasterio and pyogrio.

The source has a zero border declared as NoData, so the nodata label is exercised end to end.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
import shapely
import zarr
from click.testing import CliRunner

from segpipe.core.classes import parse_color
from segpipe.core.settings import segment_settings
from segpipe.engine.job import check_model
from segpipe.engine.segment import segment_image
from segpipe.export import export_cog
from segpipe.io.storage import list_images
from tests.helpers import sample_photo, write_geotiff

# every test here needs a real pipeline run (the module's output alone takes ~6 s on 2 cores)
pytestmark = pytest.mark.slow

rio_cogeo = pytest.importorskip("rio_cogeo", reason="needs rio-cogeo (pip install rio-cogeo)")
ome_v05 = pytest.importorskip("ome_zarr_models.v05", reason="needs ome-zarr-models (pip install ome-zarr-models)")

from rio_cogeo.cogeo import cog_validate
from rio_cogeo.scripts.cli import cogeo as cogeo_cli

#: zero border (pixels) declared NoData in the sources
BORDER = 24
#: write_geotiff's pixel size (m) ⇒ area of one pixel (m²)
PIXEL = 0.5
PIXEL_AREA = PIXEL * PIXEL


def bordered_source(path, height: int, width: int) -> str:
    """The real photo with a zero border, written as a georeferenced GeoTIFF with nodata=0."""
    img = sample_photo(height, width).copy()
    img[:, :BORDER] = 0
    img[:, -BORDER:] = 0
    img[:, :, :BORDER] = 0
    img[:, :, -BORDER:] = 0
    return str(write_geotiff(path, img, nodata=0))


@pytest.fixture(scope="module")
def output(tmp_path_factory, model_dir, client) -> str:
    """A segpipe output (with its pyramid) of a 600×560 bordered source: > 512 px so the COG gets an overview."""
    src = bordered_source(tmp_path_factory.mktemp("valsrc") / "scene.tif", 600, 560)
    ref_model, _ = check_model(model_dir)
    image = list_images(src)[0]
    settings = segment_settings(chunk_size=128, halo=16, precision="fp32", device="cpu")
    result = segment_image(image, ref_model, str(tmp_path_factory.mktemp("valout")), settings, client)
    assert result.status == "done", result.error
    return result.output


@pytest.fixture(scope="module")
def attrs(output) -> dict:
    return dict(zarr.open_group(output, mode="r").attrs)


def test_output_has_nodata_border_and_classes(output, attrs):
    """Guard: the fixture exercises what the validators are asked about (nodata and several classes)."""
    nodata = attrs["segpipe"]["nodata_label"]
    labels = zarr.open_array(output + "/0", mode="r")[:]
    assert nodata == 255
    assert (labels[:BORDER] == nodata).all() and (labels[:, -BORDER:] == nodata).all()
    inner = labels[BORDER:-BORDER, BORDER:-BORDER]
    assert len(np.unique(inner[inner != nodata])) >= 2


# --------------------------------------------------------------------------- rio-cogeo


@pytest.fixture(scope="module")
def cog(output, tmp_path_factory) -> str:
    return export_cog(output, str(tmp_path_factory.mktemp("cog") / "scene.tif"))


def test_cog_validate_api(cog):
    valid, errors, warnings = cog_validate(cog, quiet=True)
    assert errors == []
    assert valid
    # rio-cogeo's warnings (e.g. a missing overview on a > 512 px image) are best-practice misses
    assert warnings == []


def test_rio_cogeo_validate_cli_strict(cog):
    """``rio cogeo validate --strict`` (warnings count as errors) as a user runs it."""
    r = CliRunner().invoke(cogeo_cli, ["validate", cog, "--strict"])
    assert r.exit_code == 0, r.output
    assert "is a valid cloud optimized GeoTIFF" in r.output


def test_cog_nodata_colors_and_pixels(cog, output, attrs):
    seg = attrs["segpipe"]
    nodata = seg["nodata_label"]
    with rasterio.open(cog) as ds:
        assert ds.driver == "GTiff" and ds.count == 1 and ds.dtypes[0] == "uint8"
        assert ds.nodata == nodata
        assert ds.overviews(1) == [2]  # 600 px → one overview that fits a 512 block
        assert ds.crs is not None and ds.crs.to_epsg() == 32633
        assert list(ds.transform)[:6] == seg["transform"]
        cmap = ds.colormap(1)
        for i, color in enumerate(seg["class_colors"]):
            assert cmap[i] == parse_color(color), (i, color)
        assert cmap[nodata][3] == 0  # nodata transparent
        np.testing.assert_array_equal(ds.read(1), zarr.open_array(output + "/0", mode="r")[:])
        assert json.loads(ds.tags()["CLASSES"]) == seg["classes"]
    # the overview (mode resampling) keeps class ids and nodata: no invented value, border still nodata
    with rasterio.open(cog, overview_level=0) as ov:
        o = ov.read(1)
        assert o.shape == (300, 280) and ov.nodata == nodata
        assert set(np.unique(o).tolist()) <= {*range(len(seg["classes"])), nodata}
        half = BORDER // 2
        assert (o[:half] == nodata).all() and (o[-half:] == nodata).all()
        assert (o[:, :half] == nodata).all() and (o[:, -half:] == nodata).all()


# --------------------------------------------------------------------------- ome-zarr-models


def level_paths(output: str) -> list[str]:
    """The pyramid levels actually in the store: arrays named 0, 1, 2, …"""
    g = zarr.open_group(output, mode="r")
    return sorted((k for k in g.array_keys() if k.isdigit()), key=int)


def test_pipeline_built_a_pyramid(output):
    # 600 px with 128 px chunks: 600 → 300 → 150 → 75
    assert level_paths(output) == ["0", "1", "2", "3"]


def test_ngff_image_label_validates(output, attrs):
    group = zarr.open_group(output, mode="r")
    model = ome_v05.ImageLabel.from_zarr(group)
    ome = model.ome_attributes
    assert ome.version == "0.5"
    (ms,) = ome.multiscales
    # every level the pipeline wrote is a dataset of the multiscales, validated as an array
    assert [d.path for d in ms.datasets] == level_paths(output)
    assert [a.name for a in ms.axes] == ["y", "x"]
    scales = [next(t for t in d.coordinateTransformations if t.type == "scale").scale for d in ms.datasets]
    assert scales == [[2.0**i, 2.0**i] for i in range(len(scales))]
    for path in level_paths(output):
        assert group[path].metadata.dimension_names == ("y", "x")
        assert np.dtype(group[path].dtype) in ome_v05.labels.VALID_DTYPES
    # image-label: a colour and a property per class, plus the nodata label transparent
    label = ome.image_label
    assert label is not None
    nodata = attrs["segpipe"]["nodata_label"]
    n = len(attrs["segpipe"]["classes"])
    colors = {c.label_value: tuple(c.rgba) for c in label.colors}
    assert set(colors) == {*range(n), nodata}
    assert colors[nodata] == (0, 0, 0, 0)
    for i, hexcolor in enumerate(attrs["segpipe"]["class_colors"]):
        assert colors[i] == parse_color(hexcolor)
    props = {p.label_value: p for p in label.properties}
    assert set(props) == set(colors)
    assert [props[i].model_extra["class"] for i in range(n)] == attrs["segpipe"]["classes"]


def test_ngff_validator_is_not_vacuous(output, tmp_path):
    """Control: the same output with the nodata label's property removed is rejected by ome-zarr-models."""
    import shutil

    from pydantic import ValidationError

    bad = tmp_path / "bad.zarr"
    shutil.copytree(output, bad)
    g = zarr.open_group(str(bad), mode="r+")
    ome = dict(g.attrs["ome"])
    label = dict(ome["image-label"])
    label["properties"] = label["properties"][:-1]
    g.attrs["ome"] = {**ome, "image-label": label}
    with pytest.raises(ValidationError, match="Inconsistent `label_value`"):
        ome_v05.ImageLabel.from_zarr(zarr.open_group(str(bad), mode="r"))


def test_ngff_image_validates_each_level(output):
    """The same group as a plain NGFF image (what a generic OME-Zarr reader checks)."""
    model = ome_v05.Image.from_zarr(zarr.open_group(output, mode="r"))
    assert [d.path for d in model.datasets[0]] == level_paths(output)


def test_ngff_as_labels_of_an_image(output, tmp_path):
    """Placed under an image's ``labels/`` group, the output validates as a label image there too."""
    import shutil

    root = tmp_path / "image.zarr"
    g = zarr.open_group(str(root), mode="w", zarr_format=3)
    src = zarr.open_group(output, mode="r")
    levels = level_paths(output)
    ms = dict(src.attrs["ome"]["multiscales"][0])
    for path in levels:
        a = src[path]
        g.create_array(path, shape=a.shape, chunks=a.chunks, dtype="uint8", dimension_names=["y", "x"])
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{**ms, "name": "image"}]}
    labels = g.create_group("labels")
    labels.attrs["ome"] = {"version": "0.5", "labels": ["classes"]}
    shutil.copytree(output, root / "labels" / "classes")
    image = ome_v05.Image.from_zarr(zarr.open_group(str(root), mode="r"))
    assert image.labels is not None and image.labels.label_paths == ["classes"]
    label = image.labels.get_image_labels_group("classes")
    assert [d.path for d in label.ome_attributes.multiscales[0].datasets] == levels


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_segment_with_all_exports(tmp_path, model_dir):
    import pyogrio

    from segpipe.cli.main import main

    src = bordered_source(tmp_path / "field.tif", 300, 280)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [
        "segment", src, "--model", model_dir, "--out", str(out), "--chunk-size", "64", "--halo", "16",
        "--precision", "fp32", "--device", "cpu", "--no-progress", "--cog", "--vector", "gpkg", "--preview",
    ])
    assert r.exit_code == 0, r.output
    for name in ("field.zarr", "field.tif", "field.qml", "field.tif.aux.xml", "field.gpkg", "field.png"):
        assert (out / name).exists(), (name, sorted(os.listdir(out)))

    g = zarr.open_group(str(out / "field.zarr"), mode="r")
    seg = g.attrs["segpipe"]
    nodata = seg["nodata_label"]
    labels = g["0"][:]
    assert (labels[:BORDER] == nodata).all() and (labels[:, :BORDER] == nodata).all()

    # the preview is a real RGBA PNG of the map (plus a legend below it)
    from PIL import Image

    with Image.open(out / "field.png") as png:
        assert png.format == "PNG" and png.mode == "RGBA"
        assert png.width >= 280 and png.height > 300
    ET.parse(out / "field.qml")
    ET.parse(out / "field.tif.aux.xml")

    # the COG the CLI wrote validates too, with the output's nodata
    valid, errors, warnings = cog_validate(str(out / "field.tif"), quiet=True)
    assert valid and errors == [] and warnings == []
    with rasterio.open(out / "field.tif") as ds:
        assert ds.nodata == nodata

    # vectors: no nodata polygon; per class, polygon area = pixel count × pixel area
    meta, _, geoms, fields = pyogrio.raw.read(str(out / "field.gpkg"))
    names = list(meta["fields"])
    class_id = np.asarray(fields[names.index("class_id")])
    area_field = np.asarray(fields[names.index("area")], dtype=float)
    polys = shapely.from_wkb(geoms)
    assert len(polys) > 0
    assert nodata not in set(class_id.tolist())
    assert set(class_id.tolist()) <= set(range(len(seg["classes"])))
    areas = shapely.area(polys)
    np.testing.assert_allclose(area_field, areas, rtol=1e-9)
    counts = np.bincount(labels[labels != nodata].ravel(), minlength=len(seg["classes"]))
    for cls, count in enumerate(counts):
        got = areas[class_id == cls].sum()
        assert got == pytest.approx(count * PIXEL_AREA, rel=1e-9, abs=1e-6), (cls, got, count)
    # the polygons cover no nodata pixel: the union's area is the data pixels' area
    assert shapely.union_all(polys).area == pytest.approx((labels != nodata).sum() * PIXEL_AREA, rel=1e-9)
    # the vectors are in the source's CRS
    assert "32633" in (meta.get("crs") or "")
