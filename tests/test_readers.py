import numpy as np
import pytest

from segpipe.core.errors import InputError
from segpipe.io.readers import open_image, shared_reader
from segpipe.io.storage import list_images, output_uri, safe_relative
from segpipe.core.geometry import Window
from tests.helpers import sample_photo, write_geotiff, write_jpeg, write_png


@pytest.fixture(scope="module")
def img():
    return sample_photo(150, 97)


@pytest.mark.parametrize("kind", ["tif", "png", "jpg"])
def test_windows_match_full_array(tmp_path, img, kind):
    path = tmp_path / f"a.{kind}"
    {"tif": write_geotiff, "png": write_png, "jpg": write_jpeg}[kind](path, img)
    with open_image(str(path)) as r:
        assert (r.info.height, r.info.width, r.info.count, r.info.dtype) == (150, 97, 3, "uint8")
        full = r.read(Window(0, 0, 150, 97))
        if kind != "jpg":  # JPEG is lossy
            np.testing.assert_array_equal(full, img)
        np.testing.assert_array_equal(r.read(Window(10, 20, 30, 40)), full[:, 10:40, 20:60])
        # windows past the edges are filled by reflection, like np.pad(mode="reflect")
        p = 100
        padded = np.pad(full, ((0, 0), (p, p), (p, p)), mode="reflect")
        np.testing.assert_array_equal(r.read(Window(-30, -50, 100, 200)), padded[:, p - 30:p + 70, p - 50:p + 150])
        np.testing.assert_array_equal(r.read(Window(120, 80, 70, 60)), padded[:, p + 120:p + 190, p + 80:p + 140])


def test_georeference_and_bands(tmp_path, img):
    path = write_geotiff(tmp_path / "g.tif", img, pixel=2.0)
    with open_image(str(path), bands=(3, 1)) as r:
        assert r.info.count == 2
        assert "32633" in r.info.crs_wkt or "UTM zone 33N" in r.info.crs_wkt
        assert r.info.transform == (2.0, 0.0, 500000.0, 0.0, -2.0, 4100000.0)
        np.testing.assert_array_equal(r.read(Window(0, 0, 5, 5)), img[[2, 0], :5, :5])
    with open_image(str(write_png(tmp_path / "p.png", img))) as r:
        assert r.info.crs_wkt is None and r.info.transform is None


def test_shared_reader_is_one_handle_safe_across_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    big = sample_photo(1024, 1024)
    path = str(write_geotiff(tmp_path / "g.tif", big))
    r = shared_reader(path)
    assert shared_reader(path) is r and shared_reader(path, bands=(1,)) is not r
    wins = [Window(y, x, 160, 160) for y in range(-32, 1000, 96) for x in range(-32, 1000, 96)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(r.read, wins))
    padded = np.pad(big, ((0, 0), (200, 200), (200, 200)), mode="reflect")
    for w, g in zip(wins, got):
        np.testing.assert_array_equal(g, padded[:, w.y0 + 200:w.y1 + 200, w.x0 + 200:w.x1 + 200])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
        (lambda p: p.write_text("hello, I am a text file\n" * 20), "not an image that GDAL can read"),
    ],
)
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(InputError, match=message) as e:
        open_image(str(path))
    assert str(path) in str(e.value)


def test_truncated_image(tmp_path, img):
    good = write_geotiff(tmp_path / "g.tif", sample_photo(600, 600), tiled=True, compress="deflate")
    data = good.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.tif") as e:
        with open_image(str(bad)) as r:
            r.read(Window(0, 0, 600, 600))
    assert "corrupt or truncated" in str(e.value) or "not an image" in str(e.value)


def test_band_out_of_range(tmp_path, img):
    path = write_geotiff(tmp_path / "g.tif", img)
    with pytest.raises(InputError, match="has 3 band"):
        open_image(str(path), bands=(1, 4))


def test_list_images_folder_glob_file(tmp_path, img):
    (tmp_path / "sub").mkdir()
    write_geotiff(tmp_path / "a.tif", img)
    write_png(tmp_path / "sub" / "b.png", img)
    (tmp_path / "notes.txt").write_text("x")
    found = list_images(str(tmp_path))
    assert [f.relative for f in found] == ["a.tif", "sub/b.png"]
    assert all(f.fingerprint and f.size > 0 for f in found)
    assert [f.relative for f in list_images(str(tmp_path / "*.tif"))] == ["a.tif"]
    assert [f.relative for f in list_images(str(tmp_path / "sub" / "b.png"))] == ["b.png"]
    with pytest.raises(InputError, match="does not exist"):
        list_images(str(tmp_path / "nope"))


def test_output_names_are_sanitised():
    assert output_uri("s3://b/out", "x/y.tif") == "s3://b/out/x/y.zarr"
    assert output_uri("/o", "../../etc/passwd.tif") == "/o/etc/passwd.zarr"
    assert safe_relative("/abs/p.png") == "abs/p.png"


def test_readers_close_in_any_order(tmp_path, img):
    a = open_image(str(write_geotiff(tmp_path / "a.tif", img)))
    b = open_image(str(write_png(tmp_path / "b.png", img)))
    a.close()  # not the reverse of the opening order
    assert b.read(Window(0, 0, 4, 4)).shape == (3, 4, 4)
    b.close()
