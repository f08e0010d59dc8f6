"""Storage faults are reported, never mistaken for something else, and retried where they may pass: a real
S3 endpoint (moto behind :class:`tests.services.FaultProxy`) answers chosen requests with a server error.

Each case is a defect whose test failed before its fix. Issue 16: a bucket's 5xx made an owned output look
foreign (4), switched the chunk writer to another code path (12), or escaped a reader as a bug (9). Issue 24
(6): a lock that could not be read was "another run's" (the image skipped), a chunk PUT's 500 was not
retried, the uncertainty read was not retried, pyramid tasks wrote on after their image failed. The tests
assert the *kind* of error: :class:`TransientIOError` where a retry may help, :class:`OutputError` where not.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from segpipe.core.errors import InputError, OutputError, TransientIOError
from segpipe.core.geometry import ChunkGrid
from segpipe.core.retry import RetryPolicy
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
    # an object store's 403 may clear (credentials being refreshed): retried like a 5xx, and named as such
    proxy.fail("GET", f"^/{key}", status=403, code="AccessDenied", times=1)
    with pytest.raises(TransientIOError, match=r"cannot be read \(access denied by the store: "):
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
        with pytest.raises((TransientIOError, InputError)) as err:
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


# ----------------------------------------------------------------------------- issue 24: retried, not decided

#: the tests' retry policy: the default's shape, without its seconds of backoff
FAST = RetryPolicy(attempts=4, backoff=0.02)


def fast_settings(**kw):
    from segpipe.core.settings import segment_settings

    return segment_settings(chunk_size=64, halo=16, device="cpu", precision="fp32", **kw).model_copy(
        update={"retry": FAST})


def one_image(tmp_path, photo, name="x", size=(160, 150)):
    from segpipe.io.storage import list_images
    from tests.helpers import write_geotiff

    src = write_geotiff(tmp_path / f"{name}.tif", photo[:, :size[0], :size[1]])
    return list_images(str(src))[0]


def labels_of(uri: str) -> np.ndarray:
    import zarr

    return zarr.open_array(f"{uri}/0", mode="r")[:]


def test_storage_errors_are_sorted_by_kind_not_by_words():
    import errno

    from segpipe.io.storage import storage_error

    kinds = {
        "a bucket's 500 (s3fs: EREMOTEIO)": (OSError(errno.EREMOTEIO, "We encountered an internal error"),
                                             TransientIOError),
        "a bucket's 503 after the client's retries": (OSError(errno.EBUSY, "Slow Down"), TransientIOError),
        "an object store's 403 (no errno)": (PermissionError("Access Denied"), TransientIOError),
        "a dropped connection": (ConnectionResetError(errno.ECONNRESET, "reset by peer"), TransientIOError),
        "a time-out": (TimeoutError("read timed out"), TransientIOError),
        "a local permission": (PermissionError(errno.EACCES, "Permission denied"), OutputError),
        "a full disk": (OSError(errno.ENOSPC, "No space left on device"), OutputError),
    }
    for what, (exc, kind) in kinds.items():
        err = storage_error("s3://b/x.zarr", exc, "written")
        assert type(err) is kind, what
        assert str(err).startswith("s3://b/x.zarr: cannot be written") and "\n" not in str(err), what


def test_a_lock_that_cannot_be_read_is_retried_never_another_runs(proxy, tmp_path, photo, model_dir, client):
    """A lock GET answered 500 (or 403) read as 'held by another run': the image was skipped. Now it is a
    TransientIOError, retried; after the retries the image fails naming the lock file, never 'skipped'."""
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.locks import OutputLock, acquire, read_lock

    uri = f"s3://faults/lock-{uuid.uuid4().hex[:6]}.zarr"
    key = rf"^/{uri.removeprefix('s3://')}\.lock"
    proxy.fail("*", key, times=1)
    with pytest.raises(TransientIOError, match=r"\.zarr\.lock: cannot be read \("):
        read_lock(uri)
    proxy.fail("*", key, status=403, code="AccessDenied", times=1)
    with pytest.raises(TransientIOError, match="access denied by the store"):
        read_lock(uri)
    proxy.fail("*", key, times=2)
    retried: list[BaseException] = []
    lock = acquire(uri, retry=FAST, retried=retried.append)
    assert isinstance(lock, OutputLock) and [type(e) for e in retried] == [TransientIOError] * 2
    assert lock.release() is None and read_lock(uri) is None

    ref, _ = check_model(model_dir)
    image = one_image(tmp_path, photo)
    out = f"s3://faults/lockrun-{uuid.uuid4().hex[:6]}"
    proxy.fail("*", r"/x\.zarr\.lock", times=3)
    result = segment_image(image, ref, out, fast_settings(), client)
    assert result.status == "done" and result.storage_retries >= 3, result
    assert any(n.startswith(f"{out}/x.zarr: ") and "storage fault(s) tried again" in n for n in result.notes)
    assert read_lock(f"{out}/x.zarr") is None

    out = f"s3://faults/lockdown-{uuid.uuid4().hex[:6]}"
    proxy.fail("*", r"/x\.zarr\.lock")  # until cleared: outlasts every retry
    result = segment_image(image, ref, out, fast_settings(), client)
    proxy.clear()
    assert result.status == "failed" and result.transient
    assert result.error.startswith(f"{out}/x.zarr.lock: cannot be read (") and "\n" not in result.error
    assert not any("another run" in n for n in result.notes)
    assert result.storage_retries == FAST.attempts**2 - 1  # each try's lock retries, and the image's own


def test_a_chunk_put_5xx_is_transient_and_the_tile_task_retries_it(proxy, tmp_path, photo, model_dir, client):
    """s3fs reports a bucket's 500 on a PUT as OSError(EREMOTEIO): it escaped the tile task as a bug
    ("unexpected OSError"), never retried. Now it is a TransientIOError; the task retries it and the output
    equals a clean run's."""
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image

    t = new_output("put")
    proxy.fail("PUT", f"^/{t.uri.removeprefix('s3://')}/0/c/0/0", times=1)
    with pytest.raises(TransientIOError, match=r"cannot be written \("):
        write_chunk(t, ChunkGrid(40, 40, 16).chunk(0, 0), np.ones((16, 16), np.uint8))
    assert ("PUT", 500) in {(m, s) for m, p, s in proxy.log}

    ref, _ = check_model(model_dir)
    image = one_image(tmp_path, photo)
    clean = segment_image(image, ref, f"s3://faults/clean-{uuid.uuid4().hex[:6]}", fast_settings(), client)
    assert clean.status == "done" and clean.storage_retries == 0
    out = f"s3://faults/put-{uuid.uuid4().hex[:6]}"
    proxy.fail("PUT", r"/x\.zarr/0/c/", times=3)
    result = segment_image(image, ref, out, fast_settings(), client)
    assert result.status == "done" and result.storage_retries == 3, result
    np.testing.assert_array_equal(labels_of(result.output), labels_of(clean.output))


def test_a_5xx_on_the_uncertainty_read_is_retried(proxy, tmp_path, photo, model_dir, client):
    """The uncertainty array's read at the start of an image: a 500 escaped as a bug and failed the image."""
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.uncertainty import read_uncertainty

    ref, _ = check_model(model_dir)
    out = f"s3://faults/unc-{uuid.uuid4().hex[:6]}"
    proxy.fail("*", r"/x\.zarr/uncertainty/zarr\.json", times=2)
    result = segment_image(one_image(tmp_path, photo), ref, out, fast_settings(), client)
    assert result.status == "done" and result.storage_retries == 2, result
    proxy.fail("GET", r"/x\.zarr/uncertainty/", times=1)
    with pytest.raises(TransientIOError, match="cannot be read"):
        read_uncertainty(result.output)
    assert np.isfinite(read_uncertainty(result.output)).any()


def test_a_fault_on_the_outputs_metadata_tries_the_image_again(proxy, tmp_path, photo, model_dir, client):
    """A fault where nothing retries in place (here: creating the output) fails one try of the image; the
    image is tried again and its row counts it."""
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image

    ref, _ = check_model(model_dir)
    out = f"s3://faults/meta-{uuid.uuid4().hex[:6]}"
    proxy.fail("PUT", r"/x\.zarr/zarr\.json$", times=1)
    result = segment_image(one_image(tmp_path, photo), ref, out, fast_settings(), client)
    assert result.status == "done" and result.storage_retries == 1, result
    assert "x.zarr: cannot be written (" in result.retried


def test_pyramid_tasks_stop_at_the_fence(tmp_path, client, monkeypatch):
    """Pyramid tasks were plain client.map tasks: when one failed, build_pyramid raised at once while the
    others wrote on — after the image's lock was let go, beside the next writer. Now the failure cancels
    them, they stop before their next chunk, and build_pyramid returns only once none runs."""
    import threading
    import time

    from segpipe.engine.pyramid import build_pyramid
    from segpipe.io.chunks import RawChunks

    t = OutputTarget(str(tmp_path / "p.zarr"), 512, 512, 16, 3, False, uuid.uuid4().hex, pyramid=False)
    prepare_output(t, {"ome": ome_attrs("p", ["a", "b", "c"], None, None),
                       "segpipe": {"format": FORMAT, "run_id": t.run_id, "status": "running"}})
    for c in ChunkGrid(512, 512, 16):
        write_chunk(t, c, np.full((c.h, c.w), (c.iy + c.ix) % 3, np.uint8))
    writes: list[float] = []
    mutex = threading.Lock()
    real = RawChunks.write

    def slow_or_failing(self, index, block):
        if self.path.endswith("/1") and tuple(index) == (0, 0):
            raise OutputError(t.uri, "injected failure of one pyramid chunk")
        if self.path.endswith(("/1", "/2", "/3", "/4", "/5")):
            time.sleep(0.1)
            with mutex:
                writes.append(time.monotonic())
        return real(self, index, block)

    monkeypatch.setattr(RawChunks, "write", slow_or_failing)
    with pytest.raises(OutputError, match="injected failure"):
        build_pyramid(t.uri, num_classes=3, client=client)
    returned = time.monotonic()
    time.sleep(1.5)  # longer than a started task's remaining writes (8 chunks × 0.1 s)
    with mutex:
        late = [w for w in writes if w > returned]
    assert late == [], f"{len(late)} pyramid chunk(s) written after build_pyramid returned"


def test_retries_are_counted_in_the_report(proxy, tmp_path, photo, model_dir):
    """Every image read plain "done" however many faults were retried: the summary, --report-json and the
    flow's table had no count. Now each row counts them, and a note names the last fault."""
    import json
    import subprocess
    import sys

    from tests.helpers import write_geotiff

    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "a.tif", photo[:, :160, :150])
    out = f"s3://faults/report-{uuid.uuid4().hex[:6]}"
    report = tmp_path / "report.json"
    proxy.fail("PUT", r"/a\.zarr/0/c/", times=2)
    p = subprocess.run([sys.executable, "-m", "segpipe.cli.main", "segment", str(src), "--model", model_dir,
                        "--out", out, "--chunk-size", "64", "--halo", "16", "--precision", "fp32", "--device", "cpu",
                        "--no-progress", "--report-json", str(report)],
                       capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(report.read_text())[0]
    assert row["status"] == "done" and row["retries"] == 2 and row["recomputed"] == 0
    assert f"note: {out}/a.zarr: 2 storage fault(s) tried again (last: {out}/a.zarr" in p.stderr


@pytest.mark.slow
def test_a_5xx_on_the_uncertainty_read_leaves_the_flow_run_completed(proxy, harness, tmp_path, photo, model_dir,
                                                                      monkeypatch):
    """The nightly flow's suggestions step caught only SegpipeError: a bucket's 500 on an uncertainty chunk
    (a raw OSError) or any bug there failed a run whose images were all done. Advice never fails a run."""
    import flows.segment as F
    from tests.helpers import write_geotiff

    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "a.tif", photo[:, :160, :150])
    out = f"s3://faults/flow-{uuid.uuid4().hex[:6]}"
    proxy.fail("GET", r"/a\.zarr/uncertainty/c/")  # every read of its values, until cleared
    kw = dict(source=str(src), model=model_dir, out=out, chunk_size=64, halo=16, precision="fp32", device="cpu")
    state = F.segment_images(**kw, return_state=True)
    assert state.is_completed(), state.message
    assert [r["status"] for r in state.result()] == ["done"]
    assert any(m == "GET" and "/uncertainty/c/" in p and s == 500 for m, p, s in proxy.log)
    proxy.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the suggestions")

    monkeypatch.setattr(F, "suggest_regions", broken)
    state = F.segment_images(**kw, return_state=True)
    assert state.is_completed(), state.message
    assert [r["status"] for r in state.result()] == ["skipped"]


def test_a_tried_again_image_loses_no_uncertainty_value(tmp_path, photo, model_dir, client, monkeypatch):
    """A tile task that wrote its chunks and then failed for good (or was cut short at the fence) never
    returned their uncertainty values, and the next try resumed past those chunks: their values stayed NaN.
    Now a later try computes such chunks again."""
    import segpipe.engine.tasks as T
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.uncertainty import read_uncertainty

    ref, _ = check_model(model_dir)
    image = one_image(tmp_path, photo)
    clean = segment_image(image, ref, str(tmp_path / "clean"), fast_settings(), client)
    real, failures = T._run_tiles, []

    def written_then_failed(job, work, fill):
        counters = real(job, work, fill)
        if not fill and (0, 0) in [w[0] for w in work] and len(failures) < FAST.attempts:
            failures.append(1)  # every try of the task within the image's first try
            raise TransientIOError(job.target.uri, "cannot be written (injected after the chunks)")
        return counters

    monkeypatch.setattr(T, "_run_tiles", written_then_failed)
    result = segment_image(image, ref, str(tmp_path / "out"), fast_settings(), client)
    assert result.status == "done" and result.storage_retries == FAST.attempts, result
    a, b = read_uncertainty(clean.output), read_uncertainty(result.output)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(labels_of(result.output), labels_of(clean.output))
