"""Storage faults are reported, never mistaken for something else: a real S3 endpoint (moto behind
:class:`tests.services.FaultProxy`) answers chosen requests with a server error.

Each case is a defect of issue 16 whose test failed before its fix: a bucket's 5xx made an owned output
look foreign (4), switched the chunk writer to another code path (12), or escaped a reader as a bug (9).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from segpipe.core.errors import OutputError, SegpipeError, TransientIOError
from segpipe.core.geometry import ChunkGrid
from segpipe.io.output import FORMAT, OutputTarget, inspect_output, ome_attrs, prepare_output, read_attrs, write_chunk

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The faulty endpoint for this module: the AWS variables set in this process, a bucket, the proxy."""
    import s3fs

    from tests.services import aws_environment, faulty_s3

    with faulty_s3(tmp_path_factory.mktemp("moto")) as (aws, proxy), aws_environment(aws):
        s3fs.S3FileSystem().mkdir("faults")
        yield proxy


@pytest.fixture
def proxy(s3):
    s3.clear()
    yield s3
    s3.clear()


def new_output(name: str, h: int = 40, w: int = 40, chunk: int = 16) -> OutputTarget:
    t = OutputTarget(f"s3://faults/{name}-{uuid.uuid4().hex[:6]}.zarr", h, w, chunk, 3, False, uuid.uuid4().hex)
    prepare_output(t, {"ome": ome_attrs("x", ["a", "b", "c"], None, None),
                       "segpipe": {"format": FORMAT, "run_id": t.run_id, "status": "running"}})
    return t


def test_a_bucket_error_on_an_outputs_metadata_is_reported_not_read_as_foreign(proxy):
    """Defect 4: read_attrs returned None on any OSError, so a 5xx made a run's own output 'foreign'."""
    t = new_output("owned")
    assert inspect_output(t.uri).kind == "segpipe"
    key = t.uri.removeprefix("s3://") + "/zarr.json"
    proxy.fail("GET", f"^/{key}", times=2)
    with pytest.raises(TransientIOError) as err:
        read_attrs(t.uri)
    assert str(err.value).startswith(f"{t.uri}: cannot be read (") and "\n" not in str(err.value)
    with pytest.raises(TransientIOError):
        inspect_output(t.uri)  # never "foreign": that would refuse the run its own output
    assert inspect_output(t.uri).kind == "segpipe"  # the fault passed: the same output, as it is
    proxy.fail("GET", f"^/{key}", status=403, code="AccessDenied", times=1)
    with pytest.raises(OutputError, match="cannot be read: permission denied"):
        read_attrs(t.uri)
    assert read_attrs(t.uri + "-missing") is None  # nothing there is still "no output"


def test_a_bucket_error_on_array_metadata_is_reported_not_a_switch_to_zarr_python(proxy):
    """Defect 12: RawChunks.open returned None on any OSError, so one 5xx silently moved the whole output to
    zarr-python's write path. Now the fault is raised (and retried by the tile task); the next write goes
    through the plain path."""
    from segpipe.io.output import _store_for

    t = new_output("meta")
    key = t.uri.removeprefix("s3://") + "/0/zarr.json"
    proxy.fail("GET", f"^/{key}", times=1)
    chunk = ChunkGrid(40, 40, 16).chunk(0, 0)
    with pytest.raises(TransientIOError, match="cannot be read"):
        write_chunk(t, chunk, np.ones((16, 16), np.uint8))
    write_chunk(t, chunk, np.ones((16, 16), np.uint8))
    assert _store_for(t).fast and _store_for(t).fallback is None
    assert any(m == "PUT" and p.startswith(f"/{t.uri.removeprefix('s3://')}/0/c/0/0") and s == 200
               for m, p, s in proxy.log)


def test_a_bucket_error_while_reading_a_mask_is_an_input_error_not_a_bug(proxy, tmp_path, photo):
    """Defect 9: read_valid let rasterio's RasterioIOError out (exit 3, "unexpected", never retried)."""
    import s3fs

    from segpipe.core.geometry import Window
    from segpipe.io.readers import open_image
    from tests.helpers import write_geotiff

    local = write_geotiff(tmp_path / "masked.tif", photo[:, :400, :400], compress=None, nodata=0)
    uri = f"s3://faults/masked-{uuid.uuid4().hex[:6]}.tif"
    s3fs.S3FileSystem().put(str(local), uri)
    with open_image(uri) as reader:
        assert reader.has_mask
        proxy.fail("GET", f"^/{uri.removeprefix('s3://')}")
        with pytest.raises(SegpipeError) as err:
            reader.read_valid(Window(256, 256, 144, 144))  # the last tile: not in GDAL's cache yet
    assert err.value.subject == uri and "\n" not in str(err.value)
    assert any(m == "GET" and s == 500 for m, p, s in proxy.log)


def test_a_lock_that_cannot_be_removed_does_not_abort_the_other_images(proxy, tmp_path, photo, model_dir, client):
    """Defect 5: OutputLock.release raised inside segment_image's ``finally``, replacing the image's result and
    aborting segment_many's pool.map (the other images' results were lost). Now the image keeps its result,
    with a note naming the lock, and a lock left behind is taken over once its heartbeat is old."""
    from segpipe.core.settings import segment_settings
    from segpipe.engine.segment import segment_many
    from segpipe.io.locks import STALE_AFTER_S, read_lock
    from tests.helpers import write_geotiff

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        write_geotiff(src / f"{name}.tif", photo[:, :64, :64])
    out = f"s3://faults/locks-{uuid.uuid4().hex[:6]}"
    proxy.fail("DELETE", r"/a\.zarr\.lock")
    settings = segment_settings(chunk_size=64, halo=16, device="cpu", precision="fp32")
    results = segment_many([str(src)], model_dir, out, settings, client, max_concurrent_images=1)
    assert [(r.source.rsplit("/", 1)[-1], r.status) for r in results] == [("a.tif", "done"), ("b.tif", "done")]
    assert any(n.startswith(f"{out}/a.zarr.lock: the lock could not be removed (") for n in results[0].notes)
    assert read_lock(f"{out}/b.zarr") is None
    left = read_lock(f"{out}/a.zarr")
    assert left is not None and not left.is_stale() and left.is_stale(left.heartbeat + STALE_AFTER_S + 1)
