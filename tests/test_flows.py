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
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in state.result(raise_on_failure=False)}
    assert rows["one.tif"]["status"] == "done" and rows["two.tif"]["status"] == "done"
    assert rows["broken.tif"]["status"] == "failed"
    a = zarr.open_group(str(out / "a" / "one.zarr"), mode="r")
    assert a.attrs["segpipe"]["status"] == "complete" and a["0"].shape == (200, 180)
    # the summary table artifact is published
    import asyncio

    async def artifact():
        async with get_client() as c:
            return await c.read_latest_artifacts()

    keys = {x.key for x in asyncio.run(artifact())}
    assert "segment-images-summary" in keys

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
