"""Flow logic with Prefect's test harness (a temporary API in this process)."""

import numpy as np
import pytest
import zarr

from tests.helpers import write_geotiff


@pytest.mark.slow
def test_segment_images_flow(harness, tmp_path, photo, model_dir):
    from prefect.client.orchestration import get_client

    from flows.segment import segment_images

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    write_geotiff(src / "a" / "one.tif", photo[:, :200, :180])
    write_geotiff(src / "two.tif", photo[:, :130, :260])
    (src / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "out"
    kw = dict(source=str(src), model=model_dir, out=str(out), chunk_size=64, halo=16, precision="fp32")
    state = segment_images(**kw, return_state=True)
    # one bad image fails the run, after the others finished
    assert state.is_failed() and "broken.tif" in state.message
    failure = state.result(raise_on_failure=False)  # an exception carrying every image's row
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in failure.rows}
    assert rows["one.tif"]["status"] == "done" and rows["two.tif"]["status"] == "done"
    assert rows["broken.tif"]["status"] == "failed"
    # the bad image's task run is Failed (red in the UI), the others Completed
    import asyncio

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_states():
        async with get_client() as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return {r.name: r.state.type.value for r in runs if r.name.startswith("segment ")}

    assert asyncio.run(task_states()) == {"segment broken.tif": "FAILED", "segment a/one.tif": "COMPLETED",
                                          "segment two.tif": "COMPLETED"}
    a = zarr.open_group(str(out / "a" / "one.zarr"), mode="r")
    assert a.attrs["segpipe"]["status"] == "complete" and a["0"].shape == (200, 180)
    # the summary table artifact is published
    import asyncio

    async def artifact():
        async with get_client() as c:
            return await c.read_latest_artifacts()

    arts = asyncio.run(artifact())
    keys = {x.key for x in arts}
    assert "segment-images-summary" in keys
    # a progress artifact per image reached 100 %

    async def progress():
        async with get_client() as c:
            return [a for a in await c.read_artifacts() if a.type == "progress"]

    assert sum(1 for x in asyncio.run(progress()) if float(x.data) == 100.0) >= 2

    # rerun on the unchanged folder (without the bad file): nothing is computed
    (src / "broken.tif").unlink()
    before = zarr.open_array(str(out / "two.zarr" / "0"), mode="r")[:]
    state = segment_images(**kw, return_state=True)
    assert state.is_completed()
    rows = state.result()
    assert [r["status"] for r in rows] == ["skipped", "skipped"] and sum(r["chunks_computed"] for r in rows) == 0
    # a changed image is recomputed
    write_geotiff(src / "two.tif", np.ascontiguousarray(photo[:, :130, :260][:, ::-1]))
    rows = segment_images(**kw)
    assert {r["source"].rsplit("/", 1)[-1]: r["status"] for r in rows} == {"one.tif": "skipped", "two.tif": "done"}
    assert not np.array_equal(zarr.open_array(str(out / "two.zarr" / "0"), mode="r")[:], before)


@pytest.mark.slow
def test_flow_exports(harness, tmp_path, photo, model_dir):
    import rasterio

    from flows.segment import segment_images

    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "g.tif", photo[:, :160, :200])
    rows = segment_images(source=str(src), model=model_dir, out=str(tmp_path / "out"), chunk_size=64, halo=16,
                          precision="fp32", cog=True, vector="gpkg", preview=True)
    assert rows[0]["status"] == "done"
    out = tmp_path / "out"
    with rasterio.open(out / "g.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and ds.crs is not None
    assert (out / "g.gpkg").stat().st_size > 0 and (out / "g.png").stat().st_size > 0
    # where to label next: the run's top regions as a table artifact, those of `segpipe suggest`
    import asyncio
    import json

    from prefect.client.orchestration import get_client

    from segpipe.evaluate.suggest import suggest_regions

    async def suggestions():
        async with get_client() as c:
            return [a for a in await c.read_latest_artifacts() if a.key == "segment-images-suggestions"]

    (art,) = asyncio.run(suggestions())
    rows = json.loads(art.data) if isinstance(art.data, str) else art.data
    expected = [s.as_row() for s in suggest_regions([str(out / "g.zarr")], 20)]
    assert rows == expected and len(rows) >= 2 and rows[0]["rank"] == 1
    assert rows[0]["score"] >= rows[-1]["score"] and rows[0]["image"].endswith("g.tif")


def test_flow_messages_name_flow_parameters():
    from flows.segment import flow_wording

    assert flow_wording("g.tif: has 1 band(s) but the model expects 3; it is grayscale: repeat the band with "
                        "--bands 1,1,1").endswith("repeat the band with bands='1,1,1'")
    assert flow_wording("o/s.zarr: is complete with other settings (halo 16 → 8); it was kept: pass --overwrite "
                        "(flow parameter overwrite=True) to replace it").endswith("set overwrite=True to replace it")
    assert "--" not in flow_wording("choose another --out; raise --max-pixels")


def test_train_and_retrain_have_one_set_of_defaults():
    """segpipe train, segpipe retrain and the retrain flow: same option defaults, from TrainSettings."""
    import inspect

    from flows.retrain import retrain as retrain_flow
    from segpipe.cli.train import retrain as retrain_cli
    from segpipe.cli.train import train as train_cli
    from segpipe.train.settings import TRAIN_DEFAULTS, TrainSettings, train_settings

    names = {"arch": "architecture"}
    for cmd in (train_cli, retrain_cli):
        for p in cmd.params:
            key = names.get(p.name, p.name)
            if key in ("architecture", "encoder", "epochs", "batch_size", "patch_size", "lr", "class_balanced"):
                assert p.default == TRAIN_DEFAULTS[key], (cmd.name, key)
    flow_params = inspect.signature(retrain_flow.fn).parameters
    for key in ("architecture", "encoder", "epochs", "batch_size", "patch_size", "lr", "class_balanced"):
        assert flow_params[key].default == TRAIN_DEFAULTS[key], key
    assert train_settings() == TrainSettings()


def test_a_failed_run_logs_one_line_not_the_engine_traceback(caplog):
    """What a deployment's runner logs when the flow ends Failed on failed images: one line, no traceback."""
    import logging

    from flows.failures import ENGINE_LOGGER, install_one_line_failures
    from flows.segment import ImagesFailed

    install_one_line_failures()
    install_one_line_failures()  # once per process, however many runs
    logger = logging.getLogger(ENGINE_LOGGER)
    assert sum(type(f).__name__ == "OneLineForSegpipeErrors" for f in logger.filters) == 1
    with caplog.at_level(logging.ERROR, logger=ENGINE_LOGGER):
        for exc in (ImagesFailed("src/", "1 of 3 image(s) failed: src/b.tif: is truncated"), ValueError("a bug")):
            try:
                raise exc
            except Exception:  # what prefect.flow_engine.run_flow does with its error_logger
                logger.error("Engine execution exited with unexpected exception", exc_info=True)
    one, bug = caplog.records
    assert one.getMessage() == "flow run failed: src/: 1 of 3 image(s) failed: src/b.tif: is truncated"
    assert one.exc_info is None and caplog.text.count("Traceback") == 1  # the bug's only
    assert bug.exc_info is not None  # a bug keeps its traceback


@pytest.mark.slow
def test_segpipe_warnings_reach_the_flow_run_logs(harness):
    """A label file's "1 outside the image" is read where the weekly retrain's runs are read: the run's logs."""
    import asyncio
    import logging

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.logs import forward_library_logs

    @flow
    def labels_round() -> None:
        forward_library_logs()
        forward_library_logs()  # once per process, however many runs
        logging.getLogger("segpipe.labels.truth").warning("labels/a.gpkg: 2 feature(s): 0 repaired, 0 dropped "
                                                          "(no area), 1 outside the image")
        logging.getLogger("segpipe.labels.truth").info("labels/b.gpkg: 2 feature(s): nothing to say")

    state = labels_round(return_state=True)
    APILogHandler().flush()  # the handler ships logs from a background worker: wait for it
    run_id = state.state_details.flow_run_id

    async def logs():
        async with get_client() as c:
            return await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))

    messages = [(x.name, x.level, x.message) for x in asyncio.run(logs())]
    assert ("segpipe.labels.truth", logging.WARNING, "labels/a.gpkg: 2 feature(s): 0 repaired, 0 dropped (no area), "
            "1 outside the image") in messages
    # INFO lines (which cluster, training and evaluation progress) reach the run's logs too, at their level
    assert ("segpipe.labels.truth", logging.INFO, "labels/b.gpkg: 2 feature(s): nothing to say") in messages
    assert sum(isinstance(h, APILogHandler) for h in logging.getLogger("segpipe").handlers) == 1
