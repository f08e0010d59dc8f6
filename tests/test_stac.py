"""STAC in and out without services: static catalogues searched like an API, assets and band names,
one line per bad input with nothing written, output items and MLM items valid against the vendored schemas."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segpipe.cli.main import main
from tests.helpers import sample_photo
from tests.services import free_port
from tests.stac_helpers import make_item, schema_errors, write_static

SEG = [sys.executable, "-m", "segpipe.cli.main", "segment"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """tile-0 … tile-4: 1 km apart eastwards from 15°E, one day apart from 2024-05-01, cloud cover 0, 10, …, 40."""
    root = tmp_path_factory.mktemp("stac")
    photo = sample_photo(300, 300)
    items = [make_item(root / "files", photo, i) for i in range(5)]
    return write_static(root / "cat", items)


def ids(listing):
    return [image.item.id for image in listing.images]


@pytest.mark.parametrize(("filters", "expected"), [
    ({}, ["tile-0", "tile-1", "tile-2", "tile-3", "tile-4"]),
    ({"bbox": "15.0,36,15.02,38"}, ["tile-0", "tile-1"]),  # tile-2 starts at 15.022°E
    ({"datetime": "2024-05-02/2024-05-03"}, ["tile-1", "tile-2"]),  # whole days at both ends
    ({"datetime": "2024-05-03T00:00:00Z/.."}, ["tile-2", "tile-3", "tile-4"]),
    ({"bbox": "15.0,36,15.035,38", "datetime": "../2024-05-02T12:00:00Z"}, ["tile-0", "tile-1"]),
    ({"query": ["eo:cloud_cover>=20", "eo:cloud_cover<40"]}, ["tile-2", "tile-3"]),
    ({"query": '{"eo:cloud_cover": {"in": [0, 40]}}'}, ["tile-0", "tile-4"]),
    ({"collections": "other"}, []),
])
def test_static_search_selects_exactly_the_expected_items(catalog, filters, expected):
    from segpipe.io.stac import list_sources, stac_search

    listing = list_sources([str(catalog)], stac_search(**filters))
    assert ids(listing) == expected and not listing.problems
    for image in listing.images:  # outputs named by collection and item id; the item's href for provenance
        assert image.relative == f"tiles/{image.item.id}.tif"
        assert image.item.href == str(catalog.parent / "tiles" / image.item.id / f"{image.item.id}.json")
        assert image.fingerprint == f"stac:{image.item.id}:{image.item.updated}"


def test_intersects_a_geojson_file(catalog, tmp_path):
    from segpipe.io.stac import list_sources, stac_search

    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [15.025, 37.043]}}]}))
    assert ids(list_sources([str(catalog)], stac_search(intersects=str(aoi)))) == ["tile-2"]


def test_asset_and_band_names_are_honoured(catalog):
    from segpipe.io.readers import open_image
    from segpipe.io.stac import list_sources, stac_search

    default = list_sources([str(catalog)], stac_search(), None)  # the one asset with role data
    assert all(i.uri.endswith("-visual.tif") and i.item.asset == "visual" for i in default.images)
    listing = list_sources([str(catalog)], stac_search(asset="analytic"), "red,green,blue")
    assert listing.bands == "3,2,1" and all(i.uri.endswith("-analytic.tif") for i in listing.images)
    by_role = list_sources([str(catalog)], stac_search(asset="analytic", datetime="2024-05-01"), "nir,red,green")
    assert by_role.bands == "4,3,2"
    # the analytic asset read with the resolved bands is the visual asset, pixel for pixel
    from segpipe.core.geometry import Window

    with open_image(listing.images[1].uri, (3, 2, 1)) as a, open_image(default.images[1].uri) as v:
        w = Window(0, 0, a.info.height, a.info.width)
        assert np.array_equal(a.read(w), v.read(w))


def test_missing_asset_or_band_is_one_line_naming_the_item(catalog, tmp_path, model_dir):
    from segpipe.io.stac import list_sources, stac_search

    listing = list_sources([str(catalog)], stac_search(asset="B12", datetime="2024-05-01"))
    href = str(catalog.parent / "tiles" / "tile-0" / "tile-0.json")
    assert listing.problems == [(href, f"{href}: has no asset 'B12' (assets: analytic, thumbnail, visual)")]
    listing = list_sources([str(catalog)], stac_search(datetime="2024-05-01"), "red,swir")
    assert listing.problems[0][1] == (f"{href}: asset 'visual' has no band named 'swir' "
                                      "(bands: red, green, blue)")
    # through the command: one line per item, exit 1, nothing written
    r = CliRunner().invoke(main, ["segment", str(catalog), "--asset", "B12", "--model", model_dir, "--out",
                                  str(tmp_path / "out"), "--no-progress"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 5 and all("has no asset 'B12'" in e for e in errors), r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_broken_link_unreachable_api_and_max_items_are_one_line_with_nothing_written(catalog, tmp_path, model_dir):
    # a catalogue whose collection links to an item that is not there
    broken = tmp_path / "broken"
    broken.mkdir()
    coll = json.loads((catalog.parent / "tiles" / "collection.json").read_text())
    coll["links"] = [{"rel": "item", "href": str(catalog.parent / "tiles" / "tile-0" / "tile-0.json")},
                     {"rel": "item", "href": "./gone/gone.json"}]
    (broken / "collection.json").write_text(json.dumps(coll))
    # a collection of a thousand items, searched with --max-items 10
    big = tmp_path / "big"
    big.mkdir()
    item = json.loads((catalog.parent / "tiles" / "tile-0" / "tile-0.json").read_text())
    coll["links"] = []
    for i in range(1000):
        (big / f"i{i}.json").write_text(json.dumps({**item, "id": f"i{i}", "links": []}))
        coll["links"].append({"rel": "item", "href": f"./i{i}.json"})
    (big / "collection.json").write_text(json.dumps(coll))
    port = free_port()  # nothing listens there
    cases = [
        ([str(broken / "collection.json")],
         f"error: {broken}/collection.json: links to {broken}/gone/gone.json, which does not exist"),
        ([str(big / "collection.json"), "--max-items", "10"],
         f"error: {big}/collection.json: the search matches more than 10 items (--max-items 10); narrow it with "
         "--bbox/--datetime/--collections or raise --max-items (nothing was segmented)"),
        ([f"http://127.0.0.1:{port}/", "--collections", "tiles"],
         f"error: http://127.0.0.1:{port}/: the STAC API cannot be reached (connection refused)"),
        ([str(catalog), "--bbox", "15,38,16"], "error: --bbox: takes 4 numbers (west,south,east,north); got 3"),
        ([str(catalog), "--datetime", "2024-13-01"],
         "error: --datetime: takes RFC 3339 times like 2024-05-01T00:00:00Z or start/end; got '2024-13-01'"),
        ([str(catalog), "--datetime", "2024-06-01/2024-05-01"],
         "error: --datetime: interval ends before it starts: '2024-06-01/2024-05-01'"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        r = CliRunner().invoke(main, ["segment", *args, "--model", model_dir, "--out", str(out), "--no-progress"])
        assert r.exit_code == 2 and r.stderr.strip() == expected, r.output
        assert not out.exists()


@pytest.mark.slow
def test_segment_a_static_catalogue_writes_valid_stac_items(catalog, tmp_path, model_dir):
    import pystac
    import zarr

    out = tmp_path / "out"
    p = subprocess.run([*SEG, str(catalog), "--datetime", "2024-05-01/2024-05-02", "--model", model_dir, "--out",
                        str(out), "--chunk-size", "64", "--halo", "16", "--precision", "fp32", "--no-progress",
                        "--cog", "--preview"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    folder = out / "tiles"
    assert sorted(x.name for x in folder.glob("*.zarr")) == ["tile-0.zarr", "tile-1.zarr"]
    seg = zarr.open_group(str(folder / "tile-1.zarr"), mode="r").attrs["segpipe"]
    assert seg["source_item"]["href"] == str(catalog.parent / "tiles" / "tile-1" / "tile-1.json")
    assert seg["source_item"]["asset"] == "visual" and seg["source_fingerprint"].startswith("stac:tile-1:")
    # (hidden files are segpipe's records of the exports it wrote, not STAC documents)
    docs = {f.name: json.loads(f.read_text()) for f in folder.glob("*.json") if not f.name.startswith(".")}
    mlm = [n for n in docs if n.endswith(".mlm.json")]
    assert sorted(docs) == sorted(["collection.json", "tile-0.item.json", "tile-1.item.json", *mlm]) and len(mlm) == 1
    for name, doc in docs.items():
        assert schema_errors(doc) == [], name
    item = docs["tile-1.item.json"]
    assert item["properties"]["label:type"] == "raster" and item["properties"]["proj:code"] == "EPSG:32633"
    assert item["properties"]["datetime"] == "2024-05-02T10:00:00Z"
    assert set(item["assets"]) == {"labels", "cog", "cog-style", "cog-aux", "preview"}
    assert [c["name"] for c in item["assets"]["labels"]["classification:classes"]] == ["a", "b", "c", "d"]
    # every link and asset resolves
    for href in [a["href"] for a in item["assets"].values()] + [link["href"] for link in item["links"]]:
        assert (folder / href).exists() if href.startswith("./") else Path(href).exists(), href
    links = {link["rel"]: link["href"] for link in item["links"]}
    assert links["derived_from"] == f"./{mlm[0]}" and links["source"] == seg["source_item"]["href"]
    # a STAC client reads the collection and its items
    coll = pystac.Collection.from_file(str(folder / "collection.json"))
    found = {i.id: i for i in coll.get_items()}
    assert sorted(found) == ["tile-0", "tile-1"]
    assert coll.extent.temporal.intervals[0][0].isoformat() == "2024-05-01T10:00:00+00:00"
    assert found["tile-0"].assets["labels"].get_absolute_href() == str(folder / "tile-0.zarr")


def test_models_as_mlm_items(tmp_path, model_dir):
    from stac_model.schema import MLModelProperties

    from segpipe.models.registry import register

    r = CliRunner().invoke(main, ["model", "info", model_dir, "--stac"])
    assert r.exit_code == 0, r.output
    item = json.loads(r.output)
    assert schema_errors(item) == []
    props = item["properties"]
    MLModelProperties(**{k[4:]: v for k, v in props.items() if k.startswith("mlm:")})  # stac-model accepts it
    spec = json.loads((Path(model_dir) / "model.json").read_text())
    assert props["mlm:architecture"] == "Unet" and props["mlm:tasks"] == ["semantic-segmentation"]
    scaling = props["mlm:input"][0]["value_scaling"]
    assert [s["mean"] for s in scaling] == pytest.approx([m * 255 for m in spec["mean"]])
    assert [c["name"] for c in props["mlm:output"][0]["classification:classes"]] == spec["classes"]
    import hashlib

    sha = hashlib.sha256((Path(model_dir) / "weights.safetensors").read_bytes()).hexdigest()
    assert item["assets"]["weights"]["file:checksum"] == "1220" + sha
    # a registry version stores its MLM item; models show --stac prints it
    reg = tmp_path / "reg"
    assert register(str(reg), model_dir) == "v1"
    stored = json.loads((reg / "v1" / "mlm.json").read_text())
    assert stored["id"] == "reg-v1" and schema_errors(stored) == []
    r = CliRunner().invoke(main, ["models", "show", f"{reg}@v1", "--stac"])
    assert r.exit_code == 0 and json.loads(r.output) == stored


def test_collection_updates_are_incremental_and_serialised(tmp_path):
    """Threads finishing outputs of one folder at once: every item is listed once, the extent covers them all,
    and a collection.json that is not segpipe's is never replaced."""
    from concurrent.futures import ThreadPoolExecutor

    from segpipe.core.errors import OutputError
    from segpipe.export.stac import add_to_collection

    def item(i: int) -> dict:
        return {"id": f"o{i}", "bbox": [10.0 + i, 40.0, 10.5 + i, 40.5],
                "properties": {"datetime": f"2024-05-{i + 1:02d}T00:00:00Z"}}

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: add_to_collection(str(tmp_path), item(i), str(tmp_path / f"o{i}.item.json")), range(16)))
    add_to_collection(str(tmp_path), item(3), str(tmp_path / "o3.item.json"))  # again: still listed once
    coll = json.loads((tmp_path / "collection.json").read_text())
    hrefs = [link["href"] for link in coll["links"] if link["rel"] == "item"]
    assert sorted(hrefs) == sorted(f"./o{i}.item.json" for i in range(16))
    assert coll["extent"]["spatial"]["bbox"] == [[10.0, 40.0, 25.5, 40.5]]
    assert coll["extent"]["temporal"]["interval"] == [["2024-05-01T00:00:00Z", "2024-05-16T00:00:00Z"]]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "collection.json").write_text('{"type": "Collection", "id": "mine"}')
    with pytest.raises(OutputError, match="exists and is not a segpipe output collection; it was left untouched"):
        add_to_collection(str(foreign), item(0), str(foreign / "o0.item.json"))
    assert json.loads((foreign / "collection.json").read_text()) == {"type": "Collection", "id": "mine"}
