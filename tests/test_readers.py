import numpy as np
import pytest

from segpipe.core.errors import InputError
from segpipe.core.geometry import Window
from segpipe.io.readers import open_image, shared_reader, thread_reader
from segpipe.io.storage import list_images, output_uri, safe_relative
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


def test_a_reader_evicted_from_the_shared_cache_still_reads(tmp_path, monkeypatch):
    """More images in flight than the cache keeps: the evicted reader is closed, and a task still
    holding it gets it reopened on its next read (not a closed handle)."""
    from segpipe.io.readers import cache

    monkeypatch.setattr(cache, "_MAX_SHARED", 1)
    monkeypatch.setattr(cache, "_shared", type(cache._shared)())
    a_img, b_img = sample_photo(200, 180), sample_photo(150, 170)[:, ::-1].copy()
    a = shared_reader(str(write_geotiff(tmp_path / "a.tif", a_img)))
    b = shared_reader(str(write_geotiff(tmp_path / "b.tif", b_img)))  # evicts and closes a
    assert a._reader is None
    np.testing.assert_array_equal(a.read(Window(10, 20, 30, 40)), a_img[:, 10:40, 20:60])
    assert a.has_mask is False and b.info.height == 150
    np.testing.assert_array_equal(b.read(Window(0, 0, 5, 5)), b_img[:, :5, :5])


def test_pinned_readers_stay_open_however_many_images_are_in_flight(tmp_path, monkeypatch):
    """An image in progress pins its reader: the LRU evicts only unpinned ones, so its tile tasks do not
    open it a second time; once unpinned it is evicted like any other."""
    from segpipe.io.readers import cache, unpin_reader

    monkeypatch.setattr(cache, "_MAX_SHARED", 1)
    monkeypatch.setattr(cache, "_shared", type(cache._shared)())
    paths = [str(write_geotiff(tmp_path / f"{i}.tif", sample_photo(40, 50))) for i in range(3)]
    pinned = [shared_reader(p, pin=True) for p in paths]
    assert all(r._reader is not None for r in pinned) and len(cache._shared) == 3  # none evicted
    assert shared_reader(paths[0]) is pinned[0]  # the tasks' lookup finds the same handle
    for r in pinned:
        unpin_reader(r)
    assert [r._reader is None for r in pinned] == [True, True, False]  # back to the LRU's bound


def test_intact_pngs_take_the_whole_image_path_and_cut_ones_do_not(tmp_path):
    """GDAL's whole-image PNG decode (~2.5× less CPU) is used only for a PNG that ends with its IEND chunk:
    a cut file keeps the row-by-row path, which reports the damage; bytes after IEND read as before."""
    from segpipe.io.readers.raster import png_is_whole

    img = sample_photo(90, 70)
    good = write_png(tmp_path / "good.png", img)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-100])
    tail = tmp_path / "tail.png"
    tail.write_bytes(good.read_bytes() + b"trailing bytes")
    assert png_is_whole(str(good)) and not png_is_whole(str(cut)) and not png_is_whole(str(tail))
    assert not png_is_whole("s3://bucket/x.png") and not png_is_whole(str(tmp_path / "missing.png"))
    for path, fast in ((good, "YES"), (tail, "NO")):
        with open_image(str(path)) as r:
            assert r._gdal["GDAL_PNG_WHOLE_IMAGE_OPTIM"] == fast
            np.testing.assert_array_equal(r.read(Window(0, 0, 90, 70)), img)
            np.testing.assert_array_equal(r.read(Window(-5, -7, 100, 84))[:, 5:95, 7:77], img)
    with pytest.raises(InputError, match="corrupt or truncated"):
        with open_image(str(cut)) as r:
            assert r._gdal["GDAL_PNG_WHOLE_IMAGE_OPTIM"] == "NO"
            r.read(Window(0, 0, 90, 70))


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


# --------------------------------------------------------------------------- remote errors: transient by class


@pytest.fixture()
def http_images(tmp_path, img):
    """A loopback HTTP server: /ok.tif is a GeoTIFF, /503… and /404… answer that status, anything else
    is served as bytes that are not an image (under a path full of words the old substring guess retried)."""
    import http.server
    import threading

    tif = write_geotiff(tmp_path / "ok.tif", img).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, send_body: bool) -> None:
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            status = int(name[:3]) if name[:3] in ("503", "404") else None
            body = tif if name == "ok.tif" else b"<html>not an image</html>" * 40
            if status:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, stop = 0, len(body)
            rng = self.headers.get("Range")
            if rng:
                a, b = rng.split("=")[1].split("-")
                start, stop = int(a), min(int(b) + 1, len(body))
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(body)}")
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if send_body:
                self.wfile.write(body[start:stop])

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_remote_errors_are_transient_by_class_not_by_words(http_images, img, monkeypatch):
    import uuid

    from segpipe.core.errors import TransientIOError

    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # GDAL's own retries would only slow the test
    tag = uuid.uuid4().hex  # GDAL caches what it learnt about a URL for the process
    # a server error (CPLE_HttpResponseError, 503) is worth retrying
    with pytest.raises(TransientIOError, match="503"):
        open_image(f"{http_images}/503.tif?{tag}")
    # a missing file (the same class, 404) is not
    with pytest.raises(InputError, match="404") as e:
        open_image(f"{http_images}/404.tif?{tag}")
    assert not isinstance(e.value, TransientIOError)
    # GDAL's message quotes '/vsicurl/http://…/500/https-curl-timeout.tif' (CPLE_OpenFailedError): not retried
    with pytest.raises(InputError, match="not an image") as e:
        open_image(f"{http_images}/500/https-curl-timeout.tif?{tag}")
    assert not isinstance(e.value, TransientIOError)
    with open_image(f"{http_images}/ok.tif?{tag}") as r:
        np.testing.assert_array_equal(r.read(Window(0, 0, 20, 30)), img[:, :20, :30])


def test_read_errors_are_classified_by_gdal_error_class(http_images, monkeypatch):
    from rasterio._err import CPLE_AppDefinedError, CPLE_AWSAccessDeniedError, CPLE_AWSError, CPLE_HttpResponseError
    from rasterio.errors import RasterioIOError

    from segpipe.core.errors import TransientIOError
    from segpipe.io.readers.raster import transient_gdal_error

    def chained(cause: Exception) -> RasterioIOError:  # what rasterio raises: GDAL's error stack as causes
        try:
            raise RasterioIOError(str(cause)) from cause
        except RasterioIOError as e:
            return e

    quoting = "/vsicurl/https://example.com/http/500/timeout.tif, band 1: IReadBlock failed: connection"
    assert not transient_gdal_error(chained(CPLE_AppDefinedError(1, 1, quoting)))
    # an object store's 403 may clear (credentials refreshed): retried as for outputs (io.storage), then final
    assert transient_gdal_error(chained(CPLE_AWSAccessDeniedError(1, 14, "Access Denied")))
    assert transient_gdal_error(chained(CPLE_AWSError(1, 17, "Please reduce your request rate")))
    assert transient_gdal_error(chained(CPLE_HttpResponseError(1, 11, "HTTP response code: 503")))
    assert transient_gdal_error(chained(CPLE_HttpResponseError(1, 11, "Connection timed out")))
    assert transient_gdal_error(chained(CPLE_HttpResponseError(1, 11, "HTTP response code: 403")))
    assert not transient_gdal_error(chained(CPLE_HttpResponseError(1, 11, "HTTP response code: 404")))
    assert transient_gdal_error(chained(ConnectionResetError("reset by peer")))

    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    with open_image(f"{http_images}/ok.tif?read") as r:
        def fail_with(cause):
            def read(*args):
                raise chained(cause)
            return read

        monkeypatch.setattr(r, "_read_inside", fail_with(CPLE_AppDefinedError(1, 1, quoting)))
        with pytest.raises(InputError, match="corrupt or truncated") as e:
            r.read(Window(0, 0, 8, 8))
        assert not isinstance(e.value, TransientIOError)
        monkeypatch.setattr(r, "_read_inside", fail_with(CPLE_HttpResponseError(1, 11, "HTTP response code: 502")))
        with pytest.raises(TransientIOError):
            r.read(Window(0, 0, 8, 8))


def test_windows_from_shared_blocks_equal_gdal_and_decode_each_block_once(tmp_path, monkeypatch):
    """A tiled GeoTIFF read through per-thread handles (the GPU path's thread readers): every window equals
    GDAL's own read (inside, across and past the edges), and each block is decoded once however many
    overlapping windows and handles read it; a file rewritten in place is never served from its old blocks."""
    import threading

    import rasterio
    from rasterio.windows import Window as RWindow

    from segpipe.io.readers import blocks, raster

    monkeypatch.setattr(blocks, "_cache", blocks.BlockCache())
    img = sample_photo(700, 900)
    path = write_geotiff(tmp_path / "t.tif", img, tiled=True)  # 256² blocks: 3 × 4
    decoded: list[tuple[int, int]] = []
    real = raster.assemble

    def counting(key, y0, x0, h, w, block, size, decode):
        def count(*box):
            decoded.append(box[:2])
            return decode(*box)
        return real(key, y0, x0, h, w, block, size, count)

    monkeypatch.setattr(raster, "assemble", counting)
    windows = [Window(y, x, 300, 300) for y in range(-50, 700, 150) for x in range(-50, 900, 150)]
    got: dict[int, np.ndarray] = {}
    readers: list = [None] * 3

    def work(k: int) -> None:
        readers[k] = thread_reader(str(path))  # this thread's own handle, as a GPU worker's threads read
        assert readers[k].cache_blocks and readers[k]._blocks is not None
        for i in range(k, len(windows), 3):
            got[i] = readers[k].read(windows[i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    padded = np.pad(img, ((0, 0), (400, 400), (400, 400)), mode="reflect")
    for i, w in enumerate(windows):
        np.testing.assert_array_equal(got[i], padded[:, w.y0 + 400:w.y1 + 400, w.x0 + 400:w.x1 + 400])
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 12  # each of the 3 × 4 blocks once
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(readers[0].read(Window(10, 20, 30, 40)), ds.read(window=RWindow(20, 10, 40, 30)))
    for r in readers:
        r.close()
    write_geotiff(path, img[:, ::-1].copy(), tiled=True)  # the same path, new content
    with open_image(str(path)) as r:
        r.cache_blocks = True
        np.testing.assert_array_equal(r.read(Window(0, 0, 700, 900)), img[:, ::-1])
    with open_image(str(path)) as r:  # one shared handle (the CPU path): GDAL's own cache, not these blocks
        assert not r.cache_blocks


def test_block_cache_decodes_once_and_stays_within_its_bound():
    """Concurrent requests for one block wait for its one decode; a failed decode is retried by the next
    reader; the cache never holds more than its bound."""
    import threading
    import time

    from segpipe.io.readers.blocks import BlockCache

    cache = BlockCache(max_bytes=3 * 1000)
    calls: list[str] = []

    def slow() -> np.ndarray:
        calls.append("k")
        time.sleep(0.2)
        return np.ones((1, 10, 100), np.uint8)

    out: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: out.append(cache.get("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["k"] and len(out) == 4 and all(o is out[0] for o in out) and not out[0].flags.writeable

    def broken() -> np.ndarray:
        raise OSError("read failed")

    with pytest.raises(OSError):
        cache.get("bad", broken)
    assert cache.get("bad", lambda: np.zeros((1, 10, 100), np.uint8)).sum() == 0  # not remembered as failed
    for i in range(10):
        cache.get(i, lambda: np.zeros((1, 10, 100), np.uint8))
    assert cache.bytes <= 3000 and len(cache._blocks) == 3
