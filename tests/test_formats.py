"""Formats through the engine: nodata skipping, whole slides with --mpp and tissue masks, exports."""

import numpy as np
import pytest
import zarr

from segpipe.core.settings import InferenceSettings, ReadSettings, SegmentSettings, TilingSettings
from segpipe.engine.job import check_model
from segpipe.engine.segment import segment_image
from segpipe.io.storage import list_images
from tests.helpers import write_geotiff


def settings(chunk=64, halo=16, **read) -> SegmentSettings:
    return SegmentSettings(tiling=TilingSettings(chunk_size=chunk, halo=halo), read=ReadSettings(**read),
                           inference=InferenceSettings(device="cpu", precision="fp32"))


def test_nodata_chunks_are_skipped_and_filled(tmp_path, photo, model_dir, client):
    img = photo[:, :256, :256].copy()
    img[img == 0] = 1  # genuine black pixels are not nodata here
    img[:, :, :128] = 0  # left half: no data (two columns of 64-px chunks)
    img[:, 200:210, 150:170] = 0  # a nodata hole inside a data chunk
    path = write_geotiff(tmp_path / "nd.tif", img, nodata=0)
    ref, _ = check_model(model_dir)
    res = segment_image(list_images(str(path))[0], ref, str(tmp_path / "out"), settings(), client)
    assert res.status == "done" and res.chunks == 16
    assert res.chunks_skipped == 8 and res.chunks_computed == 8
    labels = zarr.open_array(res.output + "/0", mode="r")[:]
    # no data stays no data: the reserved label, never a class (not class 0)
    nodata = zarr.open_group(res.output, mode="r").attrs["segpipe"]["nodata_label"]
    assert nodata == 255
    assert (labels[:, :128] == nodata).all() and (labels[200:210, 150:170] == nodata).all()
    data = np.ones(labels.shape, bool)
    data[:, :128] = False
    data[200:210, 150:170] = False
    assert (labels[data] < 4).all() and len(np.unique(labels[data])) > 1
    g = zarr.open_group(res.output, mode="r")
    assert g.attrs["segpipe"]["chunks_skipped"] == 8
    # without skipping, the model runs everywhere
    res2 = segment_image(list_images(str(path))[0], ref, str(tmp_path / "out2"), settings(skip_empty=False), client)
    assert res2.chunks_skipped == 0 and res2.chunks_computed == 16


def test_slide_at_mpp_with_tissue_mask(tmp_path, model_dir, client):
    from tests.test_slide import synthetic_slide, write_aperio

    levels = synthetic_slide(0)
    svs = write_aperio(tmp_path / "slide.svs", levels, mpp=0.25)
    ref, _ = check_model(model_dir)
    res = segment_image(list_images(svs)[0], ref, str(tmp_path / "out"), settings(chunk=128, mpp=0.5), client)
    assert res.status == "done", res.error
    h0, w0 = levels[0].shape[:2]
    assert (res.height, res.width) == (round(h0 / 2), round(w0 / 2))
    g = zarr.open_group(res.output, mode="r")
    seg = g.attrs["segpipe"]
    assert seg["mpp"] == pytest.approx(0.5) and seg["reader"]["vendor"] == "aperio"
    assert seg["reader"]["objective_power"] in (40, 40.0, "40")
    assert res.chunks_skipped > 0 and res.chunks_computed > 0  # background chunks never reach the model
    assert g.attrs["ome"]["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    assert "1" in g  # pyramid level


def test_export_from_segmented_geotiff(tmp_path, photo, model_dir, client):
    import rasterio

    from segpipe.export import export_cog, export_vectors

    path = write_geotiff(tmp_path / "g.tif", photo[:, :300, :260])
    ref, _ = check_model(model_dir)
    res = segment_image(list_images(str(path))[0], ref, str(tmp_path / "out"), settings(), client)
    cog = export_cog(res.output, str(tmp_path / "g-classes.tif"))
    with rasterio.open(path) as src, rasterio.open(cog) as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        np.testing.assert_array_equal(out.read(1), zarr.open_array(res.output + "/0", mode="r")[:])
    n = export_vectors(res.output, str(tmp_path / "g.gpkg"))
    assert n > 0
