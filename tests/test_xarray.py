"""segpipe.io.xarray.open_output: any pyramid level as a lazy, georeferenced xarray.DataArray."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

xr = pytest.importorskip("xarray", reason="open_output needs xarray (pip install xarray)")

from segpipe.core.errors import OutputError  # noqa: E402
from segpipe.io.xarray import open_output  # noqa: E402


def _centres(transform, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """rasterio's xy() of every pixel centre along the first row and column."""
    from rasterio.transform import xy

    xs, _ = xy(transform, np.zeros(width, int), np.arange(width), offset="center")
    _, ys = xy(transform, np.arange(height), np.zeros(height, int), offset="center")
    return np.asarray(xs, float), np.asarray(ys, float)


@pytest.fixture(scope="module")
def output(tmp_path_factory, scene_tif, model_dir, client) -> str:
    """A real output of the pipeline (with its pyramid) for the 433×389 georeferenced scene."""
    from tests.helpers import segment_to_zarr

    return segment_to_zarr(scene_tif, model_dir, tmp_path_factory.mktemp("xr"), client)


@pytest.mark.slow
@pytest.mark.parametrize("level", [0, 1, 2])
def test_levels_are_georeferenced_like_the_source(output, scene_tif, level):
    import dask.array
    import rasterio
    import zarr
    from affine import Affine
    from rasterio.crs import CRS

    da = open_output(output, level)
    assert isinstance(da.data, dask.array.Array)  # lazy: nothing read yet
    assert da.dims == ("y", "x")
    group = zarr.open_group(output, mode="r")
    level_array = group[str(level)]
    assert da.shape == level_array.shape == (-(-433 // 2**level), -(-389 // 2**level))
    assert da.data.chunksize == tuple(min(c, s) for c, s in zip(level_array.chunks, level_array.shape))
    np.testing.assert_array_equal(da.values, level_array[:])

    with rasterio.open(scene_tif) as src:
        transform = src.transform @ Affine.scale(2**level)
        crs = src.crs
    xs, ys = _centres(transform, *da.shape)
    np.testing.assert_allclose(da.x.values, xs, rtol=0, atol=1e-9)
    np.testing.assert_allclose(da.y.values, ys, rtol=0, atol=1e-9)
    assert da.x.attrs["units"] == "metre" and da.y.attrs["units"] == "metre"
    # the CRS the way rioxarray and GDAL read it
    assert da.encoding["grid_mapping"] == "spatial_ref"
    sr = da.coords["spatial_ref"].attrs
    assert sr["crs_wkt"] == sr["spatial_ref"] == group.attrs["segpipe"]["crs_wkt"]
    assert CRS.from_wkt(sr["crs_wkt"]) == crs
    assert [float(v) for v in sr["GeoTransform"].split()] == list(transform.to_gdal())

    seg = group.attrs["segpipe"]
    assert da.attrs["classes"] == ["a", "b", "c", "d"] == seg["classes"]
    assert len(da.attrs["class_colors"]) == 4 and all(c.startswith("#") for c in da.attrs["class_colors"])
    assert da.attrs["nodata"] == da.attrs["_FillValue"] == 255
    assert da.attrs["level"] == level and da.attrs["downsample"] == [2.0**level] * 2
    assert da.attrs["flag_values"] == [0, 1, 2, 3] and da.attrs["flag_meanings"] == "a b c d"


@pytest.mark.slow
def test_rioxarray_reads_crs_transform_and_nodata(output, scene_tif):
    pytest.importorskip("rioxarray", reason="rioxarray is optional")
    import rasterio
    from affine import Affine

    da = open_output(output, 1)
    with rasterio.open(scene_tif) as src:
        assert da.rio.crs == src.crs
        assert da.rio.transform() == src.transform @ Affine.scale(2)
    assert da.rio.nodata == 255
    assert da.rio.bounds()[0] == 500000.0 and da.rio.bounds()[3] == 4100000.0


@pytest.mark.slow
def test_plain_xarray_on_the_root_fails_and_the_documented_ways_work(output):
    """What docs/viewers.md says about xr.open_zarr, checked against the installed versions."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="conflicting sizes for dimension"):
            xr.open_zarr(output)
        others = [k for k in zarr.open_group(output, mode="r").array_keys() if k != "1"]
        ds = xr.open_zarr(output, drop_variables=others)
    assert ds["1"].dims == ("y", "x") and ds["1"].shape == open_output(output, 1).shape
    np.testing.assert_array_equal(ds["1"].values, open_output(output, 1).values)


# ------------------------------------------------------------------ outputs made here (no model run)


def _fake_output(path, shape0=(50, 70), levels=2, *, mpp=None, transform=None, crs_wkt=None, ngff=True):
    """A Zarr group with the attributes the pipeline writes, for the non-georeferenced cases."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    shapes = [shape0]
    for _ in range(levels - 1):
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    rng = np.random.default_rng(0)
    for i, s in enumerate(shapes):
        a = g.create_array(str(i), shape=s, chunks=(32, 32), dtype="uint8", fill_value=255,
                           dimension_names=["y", "x"])
        a[:] = rng.integers(0, 3, s, dtype=np.uint8)
    s0 = [mpp, mpp] if mpp else [1.0, 1.0]
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [v * 2**i for v in s0]}]}
                for i in range(levels)]
    attrs = {"segpipe": {"classes": ["bg", "tumour", "stroma"], "class_colors": ["#000000", None, "#00ff00"],
                         "nodata_label": 255, "mpp": mpp, "transform": transform, "crs_wkt": crs_wkt,
                         "source": "slides/s1.svs", "status": "complete"}}
    if ngff:
        attrs["ome"] = {"version": "0.5", "multiscales": [{"name": "s1", "axes": [], "datasets": datasets}]}
    g.attrs.update(attrs)
    return str(path)


@pytest.mark.parametrize("level", [0, 1])
def test_slide_coordinates_are_micrometres(tmp_path, level):
    out = _fake_output(tmp_path / "s1.zarr", mpp=0.25)
    da = open_output(out, level)
    f = 2**level
    np.testing.assert_allclose(da.x.values, (np.arange(da.sizes["x"]) + 0.5) * 0.25 * f)
    np.testing.assert_allclose(da.y.values, (np.arange(da.sizes["y"]) + 0.5) * 0.25 * f)
    assert da.x.attrs["units"] == da.y.attrs["units"] == "micrometre"
    assert da.attrs["mpp"] == pytest.approx(0.25 * f)
    assert "spatial_ref" not in da.coords and "grid_mapping" not in da.encoding
    assert da.name == "s1"
    from segpipe.core.classes import DEFAULT_COLORS

    assert da.attrs["class_colors"] == ["#000000", DEFAULT_COLORS[1], "#00ff00"]  # filled like every output
    assert da.attrs["flag_meanings"] == "bg tumour stroma"


def test_photo_coordinates_are_pixel_centres(tmp_path):
    out = _fake_output(tmp_path / "photo.zarr", shape0=(33, 21), levels=2)
    da = open_output(out, 1)
    assert da.shape == (17, 11)
    np.testing.assert_allclose(da.x.values, (np.arange(11) + 0.5) * 2)  # level-0 pixels
    assert da.y.values[0] == 1.0 and da.x.attrs["units"] == "pixel"
    assert da.attrs["transform"] == [2.0, 0.0, 0.0, 0.0, 2.0, 0.0]


def test_level_factor_from_shapes_without_ngff(tmp_path):
    """Without NGFF metadata the factor comes from the shape ratio (433 → 217 is 2, not 1.995)."""
    out = _fake_output(tmp_path / "bare.zarr", shape0=(433, 389), levels=3, ngff=False,
                       transform=[0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0], crs_wkt="EPSG:32633")
    from affine import Affine

    da = open_output(out, 2)
    assert da.attrs["downsample"] == [4.0, 4.0]
    xs, ys = _centres(Affine(0.5, 0, 500000.0, 0, -0.5, 4100000.0) @ Affine.scale(4), *da.shape)
    np.testing.assert_allclose(da.x.values, xs)
    np.testing.assert_allclose(da.y.values, ys)


def test_errors_name_the_output(tmp_path):
    out = _fake_output(tmp_path / "s1.zarr", mpp=0.5)
    with pytest.raises(OutputError, match=r"has no pyramid level 2 \(levels 0\.\.1\)"):
        open_output(out, 2)
    with pytest.raises(OutputError, match="is not a segpipe output"):
        open_output(str(tmp_path / "missing.zarr"))
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(OutputError, match="no 'segpipe' attributes"):
        open_output(str(tmp_path / "plain.zarr"))


def test_exports_and_xarray_read_one_metadata(output, tmp_path):
    """io.meta is the one parser: the xarray view and the exports agree on classes, colours, nodata,
    georeference and every level's scale — also for an output whose colours live only in NGFF."""
    import zarr

    from segpipe.export.meta import level_factor, read_output_meta

    for uri in (output, str(tmp_path / "ngff-colours.zarr")):
        if uri != output:  # a copy whose segpipe.class_colors was dropped: colours from NGFF image-label
            src = zarr.open_group(output, mode="r")
            dst = zarr.open_group(uri, mode="w")
            for name in src.array_keys():
                zarr.create_array(dst.store, name=name, data=src[name][:], chunks=src[name].chunks)
            attrs = dict(src.attrs)
            attrs["segpipe"] = {k: v for k, v in attrs["segpipe"].items() if k != "class_colors"}
            label = dict(attrs["ome"].get("image-label") or {})
            label["colors"] = [{"label-value": i, "rgba": [10 * i, 20, 30, 255]} for i in range(4)]
            attrs["ome"] = {**attrs["ome"], "image-label": label}
            dst.attrs.update(attrs)
        meta = read_output_meta(uri)
        for level, path in enumerate(meta.levels):
            da = open_output(uri, level=level)
            assert list(da.attrs["classes"]) == list(meta.classes)
            assert list(da.attrs["class_colors"]) == list(meta.class_colors)
            assert da.attrs["nodata"] == meta.nodata
            group = zarr.open_group(uri, mode="r")
            step = float(da.x[1] - da.x[0])  # the pixel size of this level, as both read it
            assert step == pytest.approx(meta.transform[0] * level_factor(group, path))
    assert meta.class_colors[:2] == ("#00141e", "#0a141e")  # the NGFF colours, read by both
