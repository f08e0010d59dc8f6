"""Nothing lost, nothing silent: odd folders, foreign outputs, full disks, huge declared sizes.

Each case checks what a user sees (exit code, exactly one ``error:`` line naming the file, no
traceback) and what is left on disk (nothing the user owns touched, good images complete).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from segpipe.cli.main import main
from tests.helpers import write_geotiff, write_jpeg, write_png

FAST = ["--chunk-size", "64", "--halo", "16", "--precision", "fp32", "--no-progress"]


@pytest.fixture(autouse=True)
def _log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPIPE_LOG_DIR", str(tmp_path / "logs"))


def segment(*args: str):
    return CliRunner().invoke(main, ["segment", *args, *FAST])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def status(out: Path) -> str | None:
    return zarr.open_group(str(out), mode="r").attrs["segpipe"].get("status")


# ----------------------------------------------------------------------------- names and ownership

def test_colliding_stems_each_get_their_own_output(tmp_path, photo, model_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_jpeg(src / "hopper.jpg", photo[:, :96, :80])
    write_png(src / "hopper.png", photo[:, 100:190, :100])
    write_geotiff(src / "hopper.tif", photo[:, 200:280, 50:170], crs=None)
    write_png(src / "Boxes.png", photo[:, :70, :70])
    write_png(src / "boxes.PNG", photo[:, 70:140, :70])  # same name on a case-insensitive disk
    r = segment(str(src), "--model", model_dir, "--out", str(out))
    assert r.exit_code == 0, r.output
    expected = {"hopper.jpg.zarr": (96, 80), "hopper.png.zarr": (90, 100), "hopper.tif.zarr": (80, 120),
                "Boxes.png.zarr": (70, 70), "boxes.PNG.zarr": (70, 70)}
    assert sorted(p.name for p in out.glob("*.zarr")) == sorted(expected)
    for name, shape in expected.items():
        g = zarr.open_group(str(out / name), mode="r")
        assert g.attrs["segpipe"]["status"] == "complete" and g["0"].shape == shape
        assert g.attrs["segpipe"]["source"] == str(src / name.removesuffix(".zarr"))
    # a rerun finds every output complete
    again = segment(str(src), "--model", model_dir, "--out", str(out), "--report-json", str(tmp_path / "r.json"))
    assert again.exit_code == 0
    assert {row["status"] for row in json.loads((tmp_path / "r.json").read_text())} == {"skipped"}


def test_the_image_that_owns_a_plain_name_keeps_it(tmp_path, photo, model_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_png(src / "hopper.png", photo[:, :80, :80])
    assert segment(str(src), "--model", model_dir, "--out", str(out)).exit_code == 0
    before = zarr.open_array(str(out / "hopper.zarr" / "0"), mode="r")[:]
    write_jpeg(src / "hopper.jpg", photo[:, 100:180, :80])  # a newcomer with the same stem
    r = segment(str(src), "--model", model_dir, "--out", str(out), "--report-json", str(tmp_path / "r.json"))
    assert r.exit_code == 0, r.output
    rows = {Path(row["image"]).name: row for row in json.loads((tmp_path / "r.json").read_text())}
    assert rows["hopper.png"]["status"] == "skipped" and rows["hopper.png"]["output"].endswith("/hopper.zarr")
    assert rows["hopper.jpg"]["status"] == "done" and rows["hopper.jpg"]["output"].endswith("/hopper.jpg.zarr")
    np.testing.assert_array_equal(zarr.open_array(str(out / "hopper.zarr" / "0"), mode="r")[:], before)


def test_foreign_paths_are_never_touched(tmp_path, photo, model_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ("x", "y", "z", "ok"):
        write_png(src / f"{name}.png", photo[:, :64, :64])
    (out / "x.zarr").mkdir(parents=True)
    (out / "x.zarr" / "precious.txt").write_text("mine")
    (out / "y.zarr").write_text("a file")
    zarr.open_group(str(out / "z.zarr"), mode="w").attrs["owner"] = "another tool"
    r = segment(str(src), "--model", model_dir, "--out", str(out))
    assert r.exit_code == 1
    errors = error_lines(r.stderr)
    assert len(errors) == 3 and "Traceback" not in r.output
    for name in ("x", "y", "z"):
        assert any(f"{out}/{name}.zarr: exists and is not a segpipe output" in e for e in errors), errors
    assert (out / "x.zarr" / "precious.txt").read_text() == "mine"
    assert (out / "y.zarr").read_text() == "a file"
    assert dict(zarr.open_group(str(out / "z.zarr"), mode="r").attrs) == {"owner": "another tool"}
    assert status(out / "ok.zarr") == "complete"


def test_the_output_of_another_image_is_never_replaced(tmp_path, photo, model_dir):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    write_png(a / "scene.png", photo[:, :64, :64])
    write_png(b / "scene.png", photo[:, 64:128, :64])
    assert segment(str(a), "--model", model_dir, "--out", str(out)).exit_code == 0
    before = zarr.open_array(str(out / "scene.zarr" / "0"), mode="r")[:]
    r = segment(str(b), "--model", model_dir, "--out", str(out), "--overwrite")
    assert r.exit_code == 1
    assert error_lines(r.stderr) == [f"error: {out}/scene.zarr: holds the output of another image "
                                     f"({a}/scene.png); it was left untouched: choose another --out"]
    np.testing.assert_array_equal(zarr.open_array(str(out / "scene.zarr" / "0"), mode="r")[:], before)


def test_changed_settings_rerun_says_what_changed(tmp_path, photo, model_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_png(src / "s.png", photo[:, :100, :100])
    assert segment(str(src), "--model", model_dir, "--out", str(out), "--precision", "fp32").exit_code == 0
    r = CliRunner().invoke(main, ["segment", str(src), "--model", model_dir, "--out", str(out), "--chunk-size", "32",
                                  "--halo", "16", "--precision", "fp32", "--no-progress"])
    assert r.exit_code == 1
    assert error_lines(r.stderr) == [f"error: {out}/s.zarr: is complete with other settings (chunk_size 64 → 32; tile_size 128 → 64); "
                                     "it was kept: pass --overwrite (flow parameter overwrite=True) to replace it"]
    r = CliRunner().invoke(main, ["segment", str(src), "--model", model_dir, "--out", str(out), "--chunk-size", "32",
                                  "--halo", "16", "--precision", "fp32", "--no-progress", "--overwrite"])
    assert r.exit_code == 0
    assert f"note: {out}/s.zarr: replacing the complete output (chunk_size 64 → 32; tile_size 128 → 64)" in r.stderr
    assert zarr.open_array(str(out / "s.zarr" / "0"), mode="r").chunks == (32, 32)


def test_precision_is_part_of_the_output_identity(tmp_path, photo, model_dir):
    """A bf16 output is neither skipped by an explicit fp32 run nor resumed in fp32; auto is recorded resolved."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_png(src / "s.png", photo[:, :100, :100])

    def run(precision: str, to: Path, *extra: str):
        return CliRunner().invoke(main, ["segment", str(src), "--model", model_dir, "--out", str(to),
                                         "--chunk-size", "64", "--halo", "16", "--precision", precision,
                                         "--no-progress", *extra])

    assert run("bf16", out).exit_code == 0
    seg = zarr.open_group(str(out / "s.zarr"), mode="r").attrs["segpipe"]
    assert seg["settings"]["precision"] == seg["inference"]["precision"] == "bf16"
    r = run("fp32", out)  # an explicit precision that differs is a settings change like any other
    assert r.exit_code == 1
    assert error_lines(r.stderr) == [f"error: {out}/s.zarr: is complete with other settings (precision bf16 → fp32); "
                                     "it was kept: pass --overwrite (flow parameter overwrite=True) to replace it"]
    # an unfinished bf16 output is recomputed in fp32, never completed with fp32 chunks
    g = zarr.open_group(str(out / "s.zarr"), mode="r+")
    g.attrs["segpipe"] = {**g.attrs["segpipe"], "status": "running"}
    r = run("fp32", out)
    assert r.exit_code == 0, r.stderr
    assert f"note: {out}/s.zarr: replacing an unfinished output (precision bf16 → fp32)" in r.stderr
    seg = zarr.open_group(str(out / "s.zarr"), mode="r").attrs["segpipe"]
    assert seg["inference"]["precision"] == "fp32" and seg["chunks_resumed"] == 0
    # auto is recorded as what it resolved to on the workers, never as "auto"
    r = run("auto", tmp_path / "auto")
    assert r.exit_code == 0
    seg = zarr.open_group(str(tmp_path / "auto" / "s.zarr"), mode="r").attrs["segpipe"]
    assert seg["settings"]["precision"] in ("bf16", "fp32")


def test_a_complete_output_made_in_another_precision_survives_auto(tmp_path, photo, model_dir):
    """New hardware resolves --precision auto differently: every finished output is kept (skipped, with a
    note naming both precisions), not failed; --overwrite recomputes it in the new precision."""
    import torch

    from segpipe.engine.predictor import resolve_precision

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_png(src / "a.png", photo[:, :100, :100])
    write_png(src / "b.png", photo[:, 100:200, :100])
    here = resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if here == "bf16" else "bf16"  # what auto resolved to on yesterday's hardware

    def run(precision: str, *extra: str):
        return CliRunner().invoke(main, ["segment", str(src), "--model", model_dir, "--out", str(out),
                                         "--chunk-size", "64", "--halo", "16", "--precision", precision,
                                         "--no-progress", "--report-json", str(tmp_path / "report.json"), *extra])

    assert run(other).exit_code == 0
    before = {n: (out / n / "zarr.json").read_bytes() for n in ("a.zarr", "b.zarr")}
    r = run("auto")
    assert r.exit_code == 0, r.stderr
    assert not error_lines(r.stderr)
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [row["status"] for row in rows] == ["skipped", "skipped"]
    for name in ("a.zarr", "b.zarr"):
        assert (f"note: {out}/{name}: kept: complete in {other}, while --precision auto resolves to {here} on these "
                "workers; pass --overwrite (flow parameter overwrite=True) to recompute it") in r.stderr
        assert (out / name / "zarr.json").read_bytes() == before[name]  # untouched
    r = run("auto", "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert [row["status"] for row in json.loads((tmp_path / "report.json").read_text())] == ["done", "done"]
    seg = zarr.open_group(str(out / "a.zarr"), mode="r").attrs["segpipe"]
    assert seg["inference"]["precision"] == here and seg["status"] == "complete"


# ----------------------------------------------------------------------------- locks

def test_an_output_locked_by_a_live_run_is_left_to_it(tmp_path, photo, model_dir):
    from segpipe.io.locks import acquire, read_lock

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_png(src / "s.png", photo[:, :64, :64])
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out).mkdir()
        (out / "s.zarr.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "run_id": "x",
                                                     "started": time.time(), "heartbeat": time.time()}))
        r = segment(str(src), "--model", model_dir, "--out", str(out))
        assert r.exit_code == 0 and not error_lines(r.stderr)
        assert f"note: {out}/s.zarr: being written by another run (host {os.uname().nodename}, pid {holder.pid}" in r.stderr
        assert not (out / "s.zarr").exists()
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock is stale, taken over, and released after the run
    r = segment(str(src), "--model", model_dir, "--out", str(out))
    assert r.exit_code == 0 and status(out / "s.zarr") == "complete"
    assert read_lock(str(out / "s.zarr")) is None
    lock = acquire(str(out / "s.zarr"))
    assert read_lock(str(out / "s.zarr")).run_id == lock.info.run_id
    assert acquire(str(out / "s.zarr")).pid == os.getpid()  # a second taker gets the holder, not the lock
    lock.release()


def test_lock_heartbeats_are_refreshed_by_one_thread_and_stop_at_release(tmp_path, monkeypatch):
    """Held locks get fresh heartbeats from the process's one heartbeat thread (so a run on another
    host does not take them over as stale); a released lock is gone and never written again."""
    import threading

    from segpipe.io import locks

    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.3)
    monkeypatch.setattr(locks, "_heartbeats", locks._Heartbeats())
    held = [locks.acquire(str(tmp_path / f"o{i}.zarr")) for i in range(3)]
    first = [locks.read_lock(str(tmp_path / f"o{i}.zarr")).heartbeat for i in range(3)]
    time.sleep(1.2)
    assert [locks.read_lock(str(tmp_path / f"o{i}.zarr")).heartbeat > first[i] for i in range(3)] == [True] * 3
    assert sum(t.name == "segpipe-lock-heartbeat" and t.is_alive() for t in threading.enumerate()) >= 1
    assert sum(t is locks._heartbeats._thread for t in threading.enumerate()) == 1
    for lock in held:
        lock.release()
    time.sleep(0.8)
    assert not any((tmp_path / f"o{i}.zarr.lock").exists() for i in range(3))


@pytest.mark.slow
def test_two_runs_at_once_both_end_well(tmp_path, photo, model_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        write_geotiff(src / f"s{i}.tif", photo[:, :200, i * 60:i * 60 + 180])
    cmd = [sys.executable, "-m", "segpipe.cli.main", "segment", str(src), "--model", model_dir, "--out", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert not error_lines(err) and "Traceback" not in err
    for i in range(3):
        assert status(out / f"s{i}.zarr") == "complete"
        assert not (out / f"s{i}.zarr.lock").exists()
    # the result equals a run on its own
    assert segment(str(src), "--model", model_dir, "--out", str(tmp_path / "ref")).exit_code == 0
    for i in range(3):
        np.testing.assert_array_equal(zarr.open_array(str(out / f"s{i}.zarr" / "0"), mode="r")[:],
                                      zarr.open_array(str(tmp_path / "ref" / f"s{i}.zarr" / "0"), mode="r")[:])


# ----------------------------------------------------------------------------- bad sources and storage

def test_symlink_loop_source_is_one_line(tmp_path, model_dir):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    r = segment(str(tmp_path / "a"), "--model", model_dir, "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert error_lines(r.stderr) == [f"error: {tmp_path}/a: cannot be listed (a symbolic link loop)"]


def test_absurd_declared_size_is_refused(tmp_path, model_dir):
    path = sparse_tiff(tmp_path / "huge.tif", 200_000)
    r = segment(str(path), "--model", model_dir, "--out", str(tmp_path / "out"), "--max-pixels", "1e9")
    assert r.exit_code == 1
    assert error_lines(r.stderr) == [f"error: {path}: declares 200,000 × 200,000 pixels, more than --max-pixels "
                                     "1,000,000,000; raise --max-pixels if the size is real"]
    assert not (tmp_path / "out" / "huge.zarr").exists()


def test_nan_normalisation_is_refused(tmp_path, scene_tif, model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    spec = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**spec, "std": [float("nan")] * 3}).replace("NaN", "NaN"))
    r = segment(scene_tif, "--model", str(bad), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and len(error_lines(r.stderr)) == 1 and "std" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "out" / "scene.zarr").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs (root only): a disk that fills up mid-run."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_line_and_never_complete(tmp_path, photo, model_dir, tiny_disk):
    src = tmp_path / "src"
    src.mkdir()
    noisy = np.random.default_rng(0).integers(0, 256, (3, 640, 640), dtype=np.uint8)
    write_geotiff(src / "big.tif", noisy)
    r = segment(str(src), "--model", model_dir, "--out", str(tiny_disk), "--probabilities")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert error_lines(r.stderr) == [f"error: {tiny_disk}/big.zarr: cannot be written: no space left on the device"]
    assert status(tiny_disk / "big.zarr") != "complete"
    assert not (tiny_disk / "big.zarr.lock").exists()


# ----------------------------------------------------------------------------- errors through real Dask workers

def _raise_chained(uri: str) -> None:
    import rasterio

    from segpipe.core.errors import InputError

    try:
        rasterio.open(uri)
    except Exception as exc:  # a GDAL error (unpicklable CPLE_* class) becomes the context
        raise InputError(uri, "is truncated") from exc


@pytest.mark.e2e
def test_segpipe_errors_cross_a_real_dask_worker_as_themselves(tmp_path, photo, model_dir, monkeypatch):
    from distributed import Client

    from segpipe.core.errors import InputError
    from tests.services import dask_processes

    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    good = write_geotiff(tmp_path / "good.tif", photo[:, :150, :150])
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # valid header, data cut
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))  # the workers import this module's functions
    with dask_processes(1, tmp_path / "logs") as (address, _), Client(address) as client:
        # the exception itself: tblib would carry the GDAL error along and fail to unpickle it
        plain = client.submit(_raise_chained, str(tmp_path / "junk.tif"), pure=False).exception()
        assert type(plain) is Exception  # what distributed delivers for a chained error: why we detach
        err = client.submit(run_chunks_raising, str(tmp_path / "junk.tif"), pure=False).exception()
        assert type(err) is InputError and err.subject.endswith("junk.tif") and err.problem == "is truncated"
        # the whole path: a truncated GeoTIFF segmented on the real worker is one line, not "unexpected"
        from segpipe.core.settings import segment_settings
        from segpipe.engine.job import check_model
        from segpipe.engine.segment import segment_image
        from segpipe.io.storage import list_images

        ref, _ = check_model(model_dir)
        settings = segment_settings(chunk_size=64, halo=16, precision="fp32", device="cpu")
        result = segment_image(list_images(str(cut))[0], ref, str(tmp_path / "out"), settings, client)
        assert result.status == "failed" and "unexpected" not in result.error, result.error
        assert result.error.startswith(f"{cut}: ") and "\n" not in result.error
        assert status(tmp_path / "out" / "cut.zarr") != "complete"
    # an input error is one line from the driver, not a "Compute Failed" traceback in the worker's log
    # (the two deliberate raises above do log one each)
    log = (tmp_path / "logs" / "worker0.log").read_text()
    assert log.count("Compute Failed") == 2 and "Key:       segpipe-tiles" not in log, log


def run_chunks_raising(uri: str) -> None:
    """What ``run_chunks`` does with a SegpipeError: raise it detached from its GDAL context."""
    from segpipe.core.errors import SegpipeError

    error = None
    try:
        _raise_chained(uri)
    except SegpipeError as e:
        error = e.detached()
    raise error


def slow_writes_and_a_failing_tile(dask_worker) -> None:
    """Installed in a worker process (client.run): the first tile task writes slowly (0.4 s a chunk);
    every later one fails with an InputError once the first has written a chunk (so it is mid-write)."""
    import itertools
    import threading

    from segpipe.core.errors import InputError
    from segpipe.engine import tasks

    write, run, calls, writing = tasks.write_chunk, tasks._run_tiles, itertools.count(), threading.Event()

    def slow_write(*args, **kwargs):
        write(*args, **kwargs)
        writing.set()
        time.sleep(0.4)

    def failing_run(job, work, fill):
        if next(calls) == 0:
            return run(job, work, fill)
        writing.wait(120)
        raise InputError(job.source, "injected failure of one tile")

    tasks.write_chunk, tasks._run_tiles = slow_write, failing_run


def chunk_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("c/**/*") if p.is_file()}


@pytest.mark.e2e
def test_no_tile_task_writes_after_its_image_failed_and_released_the_lock(tmp_path, photo, model_dir, monkeypatch):
    """Defect 6: cancel() stops only tile tasks that have not started; a started one wrote on after
    segment_image had failed and released the lock, beside whoever took the output next. Now the driver
    waits for the started tasks, which stop at their next chunk (the fence), before releasing."""
    from distributed import Client

    from segpipe.core.settings import segment_settings
    from segpipe.engine.job import check_model
    from segpipe.engine.segment import segment_image
    from segpipe.io.storage import list_images
    from tests.services import dask_processes

    src = write_geotiff(tmp_path / "x.tif", photo[:, :256, :256])
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))  # the worker imports this module
    with dask_processes(1, tmp_path / "logs", nthreads=2) as (address, _), Client(address) as client:
        client.run(slow_writes_and_a_failing_tile)
        ref, _ = check_model(model_dir)
        settings = segment_settings(chunk_size=64, halo=16, precision="fp32", device="cpu")
        result = segment_image(list_images(str(src))[0], ref, str(tmp_path / "out"), settings, client)
        assert result.status == "failed" and "injected failure of one tile" in result.error
        assert not (tmp_path / "out" / "x.zarr.lock").exists()  # released: another run may start now
        written = chunk_files(tmp_path / "out" / "x.zarr")
        time.sleep(3)  # longer than the slow task's remaining writes (3 × 0.4 s)
        assert chunk_files(tmp_path / "out" / "x.zarr") == written


# ----------------------------------------------------------------------------- terminal noise

def test_truncated_images_are_one_line_each_on_a_quiet_terminal(tmp_path, photo, model_dir):
    src = tmp_path / "src"
    src.mkdir()
    good = write_geotiff(src / "good.tif", photo[:, :160, :160])
    (src / "cut.tif").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # uncompressed with a nodata value: its tile tasks read the valid mask first (defects 9 and 13)
    masked = write_geotiff(tmp_path / "m.tif", photo[:, :160, :160], compress=None, nodata=0)
    (src / "cut_masked.tif").write_bytes(masked.read_bytes()[: masked.stat().st_size // 2])
    png = write_png(tmp_path / "p.png", photo[:, :160, :160])
    (src / "cut.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    jpg = write_jpeg(tmp_path / "j.jpg", photo[:, :160, :160])
    (src / "cut.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    env = {**os.environ, "SEGPIPE_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli.main", "segment", str(src), "--model", model_dir,
                           "--out", str(tmp_path / "out"), *FAST], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # nothing but our own lines: no GDAL/libpng/Dask/tifffile noise, no traceback
    assert all(line.startswith(("error:", "note:", "warning:", "details:")) for line in lines), proc.stderr
    errors = error_lines(proc.stderr)
    names = ("cut.jpg", "cut.png", "cut.tif", "cut_masked.tif")
    assert sorted(e.split(": ", 2)[1] for e in errors) == sorted(str(src / n) for n in names)
    assert all("unexpected" not in e for e in errors)
    # the line carries GDAL's own cause, not rasterio's "Read failed. See previous exception for details."
    for name in ("cut.tif", "cut_masked.tif"):
        line = next(e for e in errors if e.startswith(f"error: {src / name}: "))
        assert line.startswith(f"error: {src / name}: corrupt or truncated image (") and "previous exception" not in line
    assert next(e for e in errors if "cut_masked" in e).endswith("expected 196608)")  # one 256² RGB tile
    assert status(tmp_path / "out" / "good.zarr") == "complete"
    for name in names:
        out = tmp_path / "out" / (name + ".zarr")
        assert not out.exists() or status(out) != "complete"


# ----------------------------------------------------------------------------- any size, flat memory

def sparse_tiff(path: Path, side: int, block: int = 512) -> Path:
    """A tiled BigTIFF declaring side² × 3 pixels with no tile written (~2 MB of tile offsets)."""
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate", BIGTIFF="YES", SPARSE_OK="TRUE"):
        pass
    return path


def _segment_for_a_while(path: Path, out: Path, model_dir: str, logs: Path, seconds: float) -> tuple[int, int]:
    """``segpipe segment`` on ``path`` for ``seconds``, then interrupted: (peak RSS of its process tree, chunks)."""
    import psutil

    env = {**os.environ, "SEGPIPE_LOG_DIR": str(logs), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "segpipe.cli.main", "segment", str(path), "--model", model_dir,
                             "--out", str(out), "--chunk-size", "512", "--halo", "32", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    peak, chunks, t0 = 0, 0, time.monotonic()
    level0 = out / (path.stem + ".zarr") / "0" / "c"
    try:
        ps = psutil.Process(proc.pid)
        while time.monotonic() - t0 < seconds and proc.poll() is None:
            # sampled often: each forward's activations come and go within a second
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
            chunks = sum(1 for _ in level0.rglob("*") if _.is_file()) if level0.exists() else 0
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode is not None
    return peak, chunks


@pytest.mark.slow
def test_ctrl_c_stops_a_run_promptly_and_releases_its_lock(tmp_path, model_dir):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during the tile phase of a large image:
    the run ends within seconds, not when every chunk is done (before: still running 60 s later), its lock
    is released and the output is left resumable, never complete."""
    src = sparse_tiff(tmp_path / "big.tif", 20_000)  # 1,521 chunks: minutes of work on this machine
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segpipe.cli.main", "segment", str(src), "--model", model_dir,
                             "--out", str(out), "--chunk-size", "512", "--halo", "32", "--no-progress"],
                            env={**os.environ, "SEGPIPE_LOG_DIR": str(tmp_path / "logs")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    level0 = out / "big.zarr" / "0" / "c"
    try:
        deadline = time.monotonic() + 120
        while not (level0.exists() and any(p.is_file() for p in level0.rglob("*"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no chunk written in 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(45)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    print(f"stopped {stopped_in:.1f} s after SIGINT")
    assert proc.returncode == 130
    err = proc.stderr.read().decode()
    assert "interrupted: nothing unfinished was marked complete" in err and "Traceback" not in err, err[-2000:]
    assert not (out / "big.zarr.lock").exists(), "the interrupted run left its lock"
    assert status(out / "big.zarr") != "complete"
    n = sum(1 for p in level0.rglob("*") if p.is_file())
    assert 0 < n < 1521


@pytest.mark.slow
def test_huge_sparse_image_runs_in_flat_memory(tmp_path, model_dir):
    """A 200,000² image (152,881 chunks) runs in the memory of a 20,000² one (1,521 chunks).

    Compared with the smaller image over the same time, not with a fixed number: the process's peak is
    ~1 GiB before any pixel (torch, smp, the model) plus the tile phase's working set (a forward's
    activations, the Dask threads' windows), which depends on the machine, not on the image
    (docs/benchmarks.md, "Memory flat in chunk count"); what must not grow is the part that scales with
    the chunk count (planning, per-image state). Measured: 0.94–1.02×.
    """
    small = sparse_tiff(tmp_path / "small.tif", 20_000)
    huge = sparse_tiff(tmp_path / "huge.tif", 200_000)
    assert huge.stat().st_size < 8 * 2**20
    out = tmp_path / "out"
    small_peak, small_chunks = _segment_for_a_while(small, out, model_dir, tmp_path / "logs", 35)
    peak, chunks = _segment_for_a_while(huge, out, model_dir, tmp_path / "logs", 35)
    print(f"peak RSS in 35 s: 20,000² {small_peak / 2**20:.0f} MiB ({small_chunks} chunks), "
          f"200,000² {peak / 2**20:.0f} MiB ({chunks} chunks)")
    assert chunks > 0 and small_chunks > 0, "no chunk was written: the driver is stuck planning"
    assert peak <= 1.2 * small_peak, f"{peak / small_peak:.2f}× the 20,000² image's peak"
    assert peak < 3 * 2**30, f"peak RSS {peak / 2**20:.0f} MiB"  # a backstop against anything image-sized
    assert status(out / "huge.zarr") != "complete"
