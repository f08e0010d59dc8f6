"""The two deployments on one machine: they share its devices through a Prefect global concurrency limit,
and ``deployments/serve.py`` stops on SIGINT/SIGTERM even when the Prefect server is gone."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import write_geotiff

ROOT = Path(__file__).resolve().parent.parent


def _serve_module():
    spec = importlib.util.spec_from_file_location("segpipe_serve", ROOT / "deployments" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_nightly_and_weekly_triggered_together_take_turns_on_the_devices(harness, tmp_path, photo, model_dir,
                                                                        monkeypatch):
    """Both flows started at once: the nightly's embedded cluster and the weekly's training and evaluation
    clusters never live at the same time (one slot of segpipe-devices, created as serve.py creates it).
    Before, each started its own cluster sized to the whole machine, at the same time."""
    import flows.segment
    import segpipe.evaluate.retrain as lib
    from flows.retrain import retrain
    from flows.segment import segment_images
    from segpipe.train.synthetic import write_dataset

    serve = _serve_module()
    serve.ensure_device_limit("segpipe-devices", 1)
    serve.ensure_device_limit("segpipe-devices", 3)  # an existing limit is kept as it is
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("segpipe-devices").limit == 1

    busy: list[tuple[str, float, float]] = []  # (who, start, end) of each use of the machine's devices

    def recorded(who: str, cm):
        @contextlib.contextmanager
        def wrapper(*a, **k):
            with cm(*a, **k) as value:
                t0 = time.monotonic()
                try:
                    yield value
                finally:
                    busy.append((who, t0, time.monotonic()))
        return wrapper

    train = lib.train

    def recorded_train(*a, **k):
        t0 = time.monotonic()
        try:
            return train(*a, **k)
        finally:
            busy.append(("weekly", t0, time.monotonic()))

    monkeypatch.setattr(flows.segment, "dask_client", recorded("nightly", flows.segment.dask_client))
    monkeypatch.setattr(lib, "dask_client", recorded("weekly", lib.dask_client))
    monkeypatch.setattr(lib, "train", recorded_train)

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_geotiff(src / f"s{i}.tif", photo[:, 40 * i:40 * i + 200, :200])
    data = write_dataset(tmp_path / "data", 3, 96, seed=3)
    outcome: dict[str, object] = {}

    def run(name, fn, **params):
        try:
            outcome[name] = fn(**params)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome[name] = e

    threads = [
        threading.Thread(target=run, args=("nightly", segment_images), kwargs=dict(
            source=str(src), model=model_dir, out=str(tmp_path / "out"), chunk_size=64, halo=16, precision="fp32",
            suggestions=0, device_limit="segpipe-devices")),
        threading.Thread(target=run, args=("weekly", retrain), kwargs=dict(
            data=str(data), registry=str(tmp_path / "registry"), epochs=1, patches_per_epoch=8, patch_size=64,
            batch_size=4, chunk_size=64, halo=16, precision="fp32", device="cpu", device_limit="segpipe-devices")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert isinstance(outcome["nightly"], list) and len(outcome["nightly"]) == 3, outcome["nightly"]
    assert isinstance(outcome["weekly"], dict) and outcome["weekly"]["version"] == "v1", outcome["weekly"]
    nightly = [(a, b) for who, a, b in busy if who == "nightly"]
    weekly = [(a, b) for who, a, b in busy if who == "weekly"]
    assert len(nightly) == 1 and len(weekly) == 2  # the nightly's cluster; the weekly's training and evaluation
    overlaps = [(n, w) for n in nightly for w in weekly if n[0] < w[1] and w[0] < n[1]]
    assert not overlaps, (nightly, weekly)


@pytest.mark.e2e
@pytest.mark.slow
def test_serve_stops_on_sigterm_when_the_prefect_server_is_gone(tmp_path):
    """The Prefect server went away; SIGTERM stops serve.py within SEGPIPE_STOP_TIMEOUT, with one line (before,
    it ignored two SIGINTs and a SIGTERM while its client retried pausing the schedules)."""
    from tests.services import BIN, prefect_server, start, stop, wait_for

    with prefect_server(tmp_path / "prefect") as env:
        env = {**env, "SEGPIPE_STOP_TIMEOUT": "3"}
        serve = start([sys.executable, str(ROOT / "deployments" / "serve.py")], env, tmp_path / "serve.log")
        try:
            def registered() -> bool:
                p = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True)
                return "nightly" in p.stdout and "weekly" in p.stdout

            wait_for(registered, 120, "served deployments", serve)
            limit = subprocess.run([str(BIN / "prefect"), "gcl", "inspect", "segpipe-devices"], env=env,
                                   capture_output=True, text=True)
            assert limit.returncode == 0, limit.stdout + limit.stderr  # created by serve.py
        except BaseException:
            stop(serve)
            raise
    # the server is gone now
    t0 = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    try:
        rc = serve.wait(30)
    except subprocess.TimeoutExpired:
        stop(serve, signal.SIGKILL)
        pytest.fail("serve.py still ran 30 s after SIGTERM:\n" + (tmp_path / "serve.log").read_text()[-3000:])
    log = (tmp_path / "serve.log").read_text()
    assert rc == 0, log[-3000:]
    assert time.monotonic() - t0 < 20
    assert "serve.py: the Prefect server did not answer within 3 s; exiting without pausing the schedules" in log


def test_the_flow_run_logs_say_which_cluster_it_used(harness, tmp_path, photo, model_dir):
    """segpipe's own lines (the cluster: embedded, workers, threads, GPUs, dashboard) are in the flow run's logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.segment import segment_images

    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "a.tif", photo[:, :64, :64])
    state = segment_images(source=str(src), model=model_dir, out=str(tmp_path / "out"), chunk_size=64, halo=16,
                           precision="fp32", suggestions=0, device_limit=None, return_state=True)
    assert state.is_completed()
    APILogHandler().flush()  # the records still queued for the API
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    lines = [log.message for log in logs]
    assert any(m.startswith("Dask cluster embedded: 1 worker(s), 3 thread(s), no GPU; dashboard ") for m in lines), lines
