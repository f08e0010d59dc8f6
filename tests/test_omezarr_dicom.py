"""OME-Zarr (NGFF 0.4 and 0.5, local and on a bucket) and DICOM whole-slide series as inputs: each equals the
same image read from a TIFF or from its source arrays, pixel for pixel, at each level."""

import json

import numpy as np
import pytest
import zarr

from segpipe.core.geometry import Window
from segpipe.io.readers import open_image
from segpipe.io.storage import list_images
from tests.helpers import sample_photo


def write_ome_zarr(path, image: np.ndarray, version: str, bioformats2raw: bool = False) -> list[np.ndarray]:
    """(C, H, W) as an OME-Zarr pyramid written by ome-zarr-py (3 levels, 0.25 µm per pixel); returns the levels
    as stored."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt, zarr_format = (FormatV04(), 2) if version == "0.4" else (FormatV05(), 3)
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group = root.create_group("0") if bioformats2raw else root
    if bioformats2raw:
        root.attrs.update({"bioformats2raw.layout": 3} if version == "0.4" else
                          {"ome": {"version": "0.5", "bioformats2raw.layout": 3}})
    write_image(image, group, scale_factors=(2, 4), fmt=fmt, axes="cyx", scale={"y": 0.25, "x": 0.25},
                axes_units={"y": "micrometer", "x": "micrometer"}, storage_options={"chunks": (3, 64, 64)})
    attrs = dict(group.attrs)
    datasets = (attrs.get("ome") or attrs)["multiscales"][0]["datasets"]
    return [group[d["path"]][:] for d in datasets]


def write_ome_tiff(path, levels: list[np.ndarray]) -> None:
    """The same pyramid as an OME-TIFF (sub-IFD levels, tiled), 0.25 µm per pixel."""
    import tifffile

    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=(64, 64), photometric="minisblack",
                 metadata={"axes": "CYX", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm",
                           "PhysicalSizeY": 0.25, "PhysicalSizeYUnit": "µm"})
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(64, 64), photometric="minisblack")


def whole(reader) -> np.ndarray:
    return reader.read(Window(0, 0, reader.info.height, reader.info.width))


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    d = tmp_path_factory.mktemp("omezarr")
    image = sample_photo(150, 170)
    out = {}
    for version in ("0.4", "0.5"):
        levels = write_ome_zarr(d / f"v{version}.ome.zarr", image, version)
        write_ome_tiff(d / f"v{version}.ome.tif", levels)
        out[version] = (d / f"v{version}.ome.zarr", d / f"v{version}.ome.tif", levels)
    return out


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_equals_the_same_image_as_tiff_at_each_level(pyramids, version):
    store, tiff, levels = pyramids[version]
    assert [(i.uri, i.relative) for i in list_images(str(store))] == [(str(store), store.name)]
    for level in range(len(levels)):
        with open_image(str(store), level=level) as z, open_image(str(tiff), level=level) as t:
            assert z.info.driver == "ome-zarr" and (z.info.height, z.info.width) == levels[level].shape[1:]
            assert z.info.mpp == pytest.approx(t.info.mpp) and z.info.extra["level_count"] == 3
            assert np.array_equal(whole(z), levels[level]) and np.array_equal(whole(z), whole(t))
            past = Window(-20, z.info.width - 30, 70, 60)  # reflected past the edges, as every reader
            assert np.array_equal(z.read(past), t.read(past))
    # a resolution between levels: the same level and area resampling as the slide readers
    with open_image(str(store), mpp=0.7) as z, open_image(str(tiff), mpp=0.7) as t:
        assert z.info.mpp == pytest.approx(0.7) and np.array_equal(whole(z), whole(t))
    with open_image(str(store), bands=(3, 2, 1)) as z:  # the channel axis is the bands
        assert np.array_equal(whole(z), levels[0][::-1])


def test_bioformats2raw_layout_and_bad_stores(tmp_path):
    image = sample_photo(96, 80)
    levels = write_ome_zarr(tmp_path / "b2r.ome.zarr", image, "0.5", bioformats2raw=True)
    with open_image(str(tmp_path / "b2r.ome.zarr")) as r:
        assert np.array_equal(whole(r), levels[0])
    from segpipe.core.errors import InputError

    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("x", shape=(4, 4), dtype="uint8")
    with pytest.raises(InputError, match="plain.zarr: is a Zarr store without OME-NGFF multiscales metadata"):
        open_image(str(tmp_path / "plain.zarr"))
    store = tmp_path / "broken.ome.zarr"
    write_ome_zarr(store, image, "0.5")
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["ome"]["multiscales"][0]["datasets"][1]["path"] = "gone"
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="multiscales lists dataset 'gone', which is missing"):
        open_image(str(store))


@pytest.mark.slow
def test_segment_an_ome_zarr_and_a_dicom_series(tmp_path, pyramids, client):
    """Both run through the engine as they are; the outputs record the reader and the slide's geometry."""
    from tests.dicom_helpers import write_dicom_wsi
    from tests.helpers import competing_classes_model, segment_to_zarr

    photo = sample_photo(150, 170)
    model = competing_classes_model(tmp_path / "model", photo)
    out = segment_to_zarr(str(pyramids["0.5"][0]), str(model), tmp_path / "out", client, chunk=64)
    seg = zarr.open_group(out, mode="r").attrs["segpipe"]
    assert out.endswith("v0.5.ome.zarr") and seg["reader"]["driver"] == "ome-zarr" and seg["mpp"] == 0.25
    # its STAC item (--stac): a valid label item without a footprint (not georeferenced), linked to its source
    from segpipe.export.stac import write_stac
    from tests.stac_helpers import schema_errors

    written = write_stac(out, {})
    item = json.loads(open(written["stac_item"]).read())
    assert schema_errors(item) == [] and item["geometry"] is None and "proj:code" not in item["properties"]
    assert item["properties"]["segpipe:mpp"] == 0.25
    assert {link["rel"]: link["href"] for link in item["links"]}["source"] == str(pyramids["0.5"][0])
    rgb = photo.transpose(1, 2, 0)
    write_dicom_wsi(tmp_path / "slides" / "case-1", [rgb, np.ascontiguousarray(rgb[::2, ::2])], mpp=0.5)
    out = segment_to_zarr(str(tmp_path / "slides"), str(model), tmp_path / "out", client, chunk=64)
    seg = zarr.open_group(out, mode="r").attrs["segpipe"]
    assert out.endswith("/case-1.zarr") and seg["reader"]["vendor"] == "dicom" and seg["mpp"] == 0.5


def test_dicom_series_equals_its_source(tmp_path):
    from tests.dicom_helpers import write_dicom_wsi

    rgb = sample_photo(200, 260).transpose(1, 2, 0)
    levels = [np.ascontiguousarray(rgb), np.ascontiguousarray(rgb[::2, ::2])]
    files = write_dicom_wsi(tmp_path / "slides" / "case-1", levels, mpp=0.5)
    assert len(files) == 2
    images = list_images(str(tmp_path / "slides"))  # a folder of instances is one slide, named after the folder
    assert [i.relative for i in images] == ["case-1.dcm"] and images[0].fingerprint.startswith("dicom:")
    for level, expected in enumerate(levels):
        with open_image(images[0].uri, level=level) as r:
            assert r.info.driver == "openslide" and r.info.extra["vendor"] == "dicom"
            assert r.info.level_shapes == ((200, 260), (100, 130))
            assert r.info.mpp == pytest.approx(0.5 * 2 ** level)
            assert np.array_equal(whole(r), expected.transpose(2, 0, 1))


@pytest.mark.e2e
def test_ome_zarr_on_a_bucket(tmp_path, pyramids, monkeypatch):
    import s3fs

    from tests.services import s3_server

    store, _, levels = pyramids["0.4"]
    with s3_server(tmp_path) as aws:
        for k, v in aws.items():
            monkeypatch.setenv(k, v)
        fs = s3fs.S3FileSystem(endpoint_url=aws["AWS_ENDPOINT_URL"])
        fs.mkdir("slides")
        fs.put(str(store), "slides/v04.ome.zarr", recursive=True)
        images = list_images("s3://slides/v04.ome.zarr")
        assert [(i.uri, i.relative) for i in images] == [("s3://slides/v04.ome.zarr", "v04.ome.zarr")]
        for level in (0, 2):
            with open_image("s3://slides/v04.ome.zarr", level=level) as r:
                assert np.array_equal(whole(r), levels[level])
