"""End to end with real parts: a Prefect server and served deployments, Dask processes, an S3 endpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers import sample_photo, write_geotiff
from tests.services import BIN, dask_processes, prefect_server, s3_server, start, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
SEG = [sys.executable, "-m", "segpipe.cli.main", "segment"]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def labels(path) -> np.ndarray:
    return zarr.open_array(str(path) + "/0", mode="r")[:]


def chunks_written(out_zarr: Path) -> int:
    c = out_zarr / "0" / "c"
    return sum(len(files) for _, _, files in os.walk(c)) if c.exists() else 0


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    return write_geotiff(d / "big.tif", sample_photo(768, 832))


def segment_cli(src, model, out, *extra, env=None, check=True):
    cmd = [*SEG, str(src), "--model", model, "--out", str(out), "--chunk-size", "64", "--halo", "16",
           "--precision", "fp32", "--batch-size", "2", "--no-progress", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_deployment_run_against_served_deployments(tmp_path, photo, model_dir):
    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "a.tif", photo[:, :160, :150])
    write_geotiff(src / "b.tif", photo[:, 100:300, :200])
    out = tmp_path / "out"
    with prefect_server(tmp_path / "prefect") as env:
        serve = start([sys.executable, str(ROOT / "deployments" / "serve.py")], env, tmp_path / "serve.log")
        try:
            def registered() -> bool:
                p = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True)
                return "nightly" in p.stdout

            wait_for(registered, 120, "served deployments", serve)
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "segment-images/nightly", "-p", f"source={src}",
                 "-p", f"model={model_dir}", "-p", f"out={out}", "-p", "chunk_size=64", "-p", "halo=16",
                 "-p", "precision=fp32", "--watch", "--watch-timeout", "300"],
                env=env, capture_output=True, text=True, timeout=360)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
            assert "Completed" in run.stdout
            # the weekly retrain deployment, tiny sizes: trains, evaluates, registers, promotes v1
            from segpipe.train.synthetic import write_dataset

            data = write_dataset(tmp_path / "data", 3, 96, seed=3)
            reg = tmp_path / "registry"
            weekly = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "retrain/weekly", "-p", f"data={data}",
                 "-p", f"registry={reg}", "-p", "epochs=1", "-p", "patches_per_epoch=8", "-p", "patch_size=64",
                 "-p", "batch_size=4", "-p", "chunk_size=64", "-p", "halo=16", "-p", "precision=fp32",
                 "-p", "device=cpu", "--watch", "--watch-timeout", "300"],
                env=env, capture_output=True, text=True, timeout=360)
            assert weekly.returncode == 0, weekly.stdout[-2000:] + weekly.stderr[-2000:]
            assert "Completed" in weekly.stdout
            # a nightly run with a truncated image ends Failed, and says so in one line: no engine
            # traceback in the flow-run logs, no Dask "Compute Failed" block on the serve terminal
            bad = tmp_path / "bad"
            bad.mkdir()
            good = write_geotiff(bad / "ok.tif", photo[:, :100, :100])
            (bad / "cut.tif").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
            failed = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "segment-images/nightly", "-p", f"source={bad}",
                 "-p", f"model={model_dir}", "-p", f"out={tmp_path / 'out-bad'}", "-p", "chunk_size=64",
                 "-p", "halo=16", "-p", "precision=fp32", "--watch", "--watch-timeout", "300"],
                env=env, capture_output=True, text=True, timeout=360)
            assert "Failed" in failed.stdout, failed.stdout[-2000:]
        finally:
            stop(serve)
    log = (tmp_path / "serve.log").read_text()
    assert "flow run failed: " in log and "cut.tif" in log, log[-3000:]
    assert "Engine execution exited with unexpected exception" not in log, log[-3000:]
    assert "Compute Failed" not in log and "ImagesFailed" not in log, log[-3000:]
    from segpipe.models.registry import champion

    assert champion(str(reg)) == "v1"
    for name, shape in (("a", (160, 150)), ("b", (200, 200))):
        g = zarr.open_group(str(out / f"{name}.zarr"), mode="r")
        assert g.attrs["segpipe"]["status"] == "complete" and g["0"].shape == shape


def test_dask_processes_survive_a_killed_worker(tmp_path, big_scene, model_dir):
    local = tmp_path / "local"
    segment_cli(big_scene, model_dir, local)
    with dask_processes(2, tmp_path) as (address, workers):
        out = tmp_path / "dist"
        report = tmp_path / "report.json"
        cmd = [*SEG, str(big_scene), "--model", model_dir, "--out", str(out), "--chunk-size", "64", "--halo", "16",
               "--precision", "fp32", "--batch-size", "2", "--no-progress", "--dask-address", address,
               "--report-json", str(report)]
        run = start(cmd, dict(os.environ), tmp_path / "run.log")
        try:
            wait_for(lambda: chunks_written(out / "big.zarr") >= 20, 300, "first chunks", run)
            workers[0].send_signal(signal.SIGKILL)  # a worker dies with chunks in flight
            assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
        finally:
            stop(run)
        assert workers[0].poll() is not None and workers[1].poll() is None
    rows = json.loads(report.read_text())
    assert rows[0]["status"] == "done" and rows[0]["computed"] == rows[0]["chunks"] == 13 * 12
    assert rows[0]["recomputed"] >= 1  # the tasks the dead worker had in hand, counted (issue 24, item 5)
    np.testing.assert_array_equal(labels(out / "big.zarr"), labels(local / "big.zarr"))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, big_scene, model_dir):
    clean = tmp_path / "clean"
    segment_cli(big_scene, model_dir, clean)
    out = tmp_path / "out"
    cmd = [*SEG, str(big_scene), "--model", model_dir, "--out", str(out), "--chunk-size", "64", "--halo", "16",
           "--precision", "fp32", "--batch-size", "2", "--no-progress"]
    run = start(cmd, dict(os.environ), tmp_path / "run.log")
    try:
        wait_for(lambda: chunks_written(out / "big.zarr") >= 30, 300, "first chunks", run)
        run.send_signal(signal.SIGKILL)
        run.wait(30)
    finally:
        stop(run)
    written = chunks_written(out / "big.zarr")
    assert 30 <= written < 13 * 12
    assert zarr.open_group(str(out / "big.zarr"), mode="r").attrs["segpipe"]["status"] == "running"
    report = tmp_path / "r.json"
    segment_cli(big_scene, model_dir, out, "--report-json", str(report))
    row = json.loads(report.read_text())[0]
    assert row["resumed"] >= written - 2 and row["computed"] == row["chunks"] - row["resumed"]
    np.testing.assert_array_equal(labels(out / "big.zarr"), labels(clean / "big.zarr"))
    # and a rerun of the finished output computes nothing
    segment_cli(big_scene, model_dir, out, "--report-json", str(report))
    row = json.loads(report.read_text())[0]
    assert row["status"] == "skipped" and row["computed"] == 0


def test_s3_bucket_in_and_out(tmp_path, photo, model_dir):
    with s3_server(tmp_path) as aws:
        env = {**os.environ, **aws}
        os.environ.update(aws)
        try:
            import s3fs

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": aws["AWS_ENDPOINT_URL"]})
            fs.mkdir("imagery")
            local = tmp_path / "src"
            (local / "tiles").mkdir(parents=True)
            write_geotiff(local / "tiles" / "x.tif", photo[:, :150, :170])
            write_geotiff(local / "y.tif", photo[:, 50:200, 30:230])
            fs.put(str(local / "tiles" / "x.tif"), "imagery/in/tiles/x.tif")
            fs.put(str(local / "y.tif"), "imagery/in/y.tif")
            segment_cli("s3://imagery/in/", model_dir, "s3://imagery/out", env=env)
            segment_cli(local, model_dir, tmp_path / "localout")
            for rel in ("tiles/x", "y"):
                g = zarr.open_group(f"s3://imagery/out/{rel}.zarr", mode="r",
                                    storage_options={"endpoint_url": aws["AWS_ENDPOINT_URL"]})
                assert g.attrs["segpipe"]["status"] == "complete"
                assert g.attrs["segpipe"]["source"] == f"s3://imagery/in/{rel}.tif"
                np.testing.assert_array_equal(g["0"][:], labels(tmp_path / "localout" / f"{rel}.zarr"))
                # the pyramid (level 1 written by the tile tasks, the rest by the pyramid pass) as on a local disk
                here = zarr.open_group(str(tmp_path / "localout" / f"{rel}.zarr"), mode="r")
                levels = [d["path"] for d in here.attrs["ome"]["multiscales"][0]["datasets"]]
                assert len(levels) >= 3
                assert [d["path"] for d in g.attrs["ome"]["multiscales"][0]["datasets"]] == levels
                for level in levels[1:]:
                    np.testing.assert_array_equal(g[level][:], here[level][:])
            # rerun: everything skipped
            report = tmp_path / "r.json"
            segment_cli("s3://imagery/in/", model_dir, "s3://imagery/out", "--report-json", str(report), env=env)
            assert {r["status"] for r in json.loads(report.read_text())} == {"skipped"}
        finally:
            for k in aws:
                os.environ.pop(k, None)
