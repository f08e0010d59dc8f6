"""STAC against a real STAC API (stac-fastapi-pgstac over PostgreSQL + pgstac, on 127.0.0.1): searches,
the item guard, the nightly deployment run twice over a growing collection, and the output items found by a
client search."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from tests.helpers import sample_photo
from tests.services import BIN, prefect_server, stac_api, stac_api_available, stac_post, start, stop, wait_for
from tests.stac_helpers import collection_doc, make_item, schema_errors

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    why = stac_api_available()
    if why:
        pytest.skip(why)
    with stac_api(tmp_path_factory.mktemp("stac-api")) as url:
        yield url


@pytest.fixture(scope="module")
def tiles(api, tmp_path_factory):
    """Collection ``tiles`` with tile-0 … tile-3 (COGs on disk), and ``big`` with a thousand items."""
    root = tmp_path_factory.mktemp("tiles")
    photo = sample_photo(300, 300)
    items = [make_item(root, photo, i, analytic=False) for i in range(4)]
    stac_post(api, "/collections", collection_doc("tiles", items))
    for item in items:
        stac_post(api, "/collections/tiles/items", item)
    stac_post(api, "/collections", collection_doc("big", []))
    one = {**items[0], "collection": "big"}
    stac_post(api, "/collections/big/bulk_items",
              {"items": {f"i{i}": {**one, "id": f"i{i}"} for i in range(1000)}, "method": "insert"})
    return root, photo


def test_api_search_selects_exactly_the_expected_items(api, tiles):
    from segpipe.core.errors import InputError
    from segpipe.io.stac import list_sources, stac_search

    def found(**filters):
        listing = list_sources([api], stac_search(**filters))
        return sorted(image.item.id for image in listing.images)

    assert found(collections="tiles") == ["tile-0", "tile-1", "tile-2", "tile-3"]
    assert found(collections="tiles", bbox="15.0,36,15.02,38") == ["tile-0", "tile-1"]
    assert found(collections="tiles", datetime="2024-05-02T00:00:00Z/2024-05-03T23:59:59Z") == ["tile-1", "tile-2"]
    assert found(collections="tiles", bbox="15.0,36,15.035,38", datetime="../2024-05-02T12:00:00Z") == ["tile-0", "tile-1"]
    assert found(collections="tiles", query=["eo:cloud_cover>=20"]) == ["tile-2", "tile-3"]
    image = list_sources([api], stac_search(collections="tiles", datetime="2024-05-01T10:00:00Z")).images[0]
    assert image.relative == "tiles/tile-0.tif" and image.item.href == f"{api}/collections/tiles/items/tile-0"
    with pytest.raises(InputError) as e:
        list_sources([api], stac_search(collections="big", max_items=50))
    assert str(e.value).startswith(f"{api}: the search matches more than 50 items (--max-items 50)")


def _run_ids(out: Path) -> dict[str, str]:
    return {p.name: zarr.open_group(str(p), mode="r").attrs["segpipe"]["run_id"]
            for p in sorted((out / "tiles").glob("*.zarr"))}


def test_nightly_deployment_twice_segments_only_new_items(api, tiles, tmp_path, model_dir):
    import pystac_client

    root, photo = tiles
    out = tmp_path / "out"
    with prefect_server(tmp_path / "prefect") as env:
        serve = start([sys.executable, str(ROOT / "deployments" / "serve.py")], env, tmp_path / "serve.log")
        try:
            def registered() -> bool:
                p = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True)
                return "nightly" in p.stdout

            wait_for(registered, 120, "served deployments", serve)

            def nightly() -> None:
                run = subprocess.run(
                    [str(BIN / "prefect"), "deployment", "run", "segment-images/nightly", "-p", f"source={api}",
                     "-p", "collections=tiles", "-p", "bbox=14.9,36,15.2,38", "-p", f"model={model_dir}",
                     "-p", f"out={out}", "-p", "chunk_size=64", "-p", "halo=16", "-p", "precision=fp32",
                     "--watch", "--watch-timeout", "300"], env=env, capture_output=True, text=True, timeout=360)
                assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]

            nightly()
            first = _run_ids(out)
            assert sorted(first) == ["tile-0.zarr", "tile-1.zarr", "tile-2.zarr", "tile-3.zarr"]
            # the collection grows by one item, and one item is reprocessed upstream (its `updated` changes)
            stac_post(api, "/collections/tiles/items", make_item(root, photo, 4, analytic=False))
            changed = make_item(root, photo, 1, analytic=False, updated="2024-06-01T00:00:00Z")
            stac_post(api, "/collections/tiles/items/tile-1", changed, method="PUT")
            nightly()
        finally:
            stop(serve)
    second = _run_ids(out)
    assert sorted(second) == [f"tile-{i}.zarr" for i in range(5)]
    redone = sorted(name for name in second if first.get(name) != second[name])
    assert redone == ["tile-1.zarr", "tile-4.zarr"]  # the others were skipped without a chunk computed
    # STAC out: five valid items, each listed once in the folder's collection
    folder = out / "tiles"
    coll = json.loads((folder / "collection.json").read_text())
    assert sorted(link["href"] for link in coll["links"] if link["rel"] == "item") == \
        [f"./tile-{i}.item.json" for i in range(5)]
    items = [json.loads((folder / f"tile-{i}.item.json").read_text()) for i in range(5)]
    for doc in [coll, *items]:
        assert schema_errors(doc) == []
    source = {link["rel"]: link["href"] for link in items[1]["links"]}["source"]
    assert source == f"{api}/collections/tiles/items/tile-1"
    # … and a STAC client finds them once they are loaded into a STAC API
    stac_post(api, "/collections", {**coll, "links": []})
    for item in items:
        stac_post(api, f"/collections/{coll['id']}/items", {**item, "links": []})
    client = pystac_client.Client.open(api)
    hits = client.search(collections=[coll["id"]], bbox=[15.0, 36, 15.02, 38]).item_collection()
    assert sorted(i.id for i in hits) == ["tile-0", "tile-1"]
    assert hits.items[0].properties["label:type"] == "raster"
