"""Tiny seeded STAC data for the tests (COG items, static catalogues) and offline schema validation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np

SCHEMAS = Path(__file__).parent / "data" / "stac-schemas"
#: schema URL → vendored file (tests/data/stac-schemas/README.md says where each came from)
SCHEMA_FILES = {
    "https://stac-extensions.github.io/label/v1.0.1/schema.json": "label-v1.0.1.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json": "projection-v2.0.0.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json": "raster-v1.1.0.json",
    "https://stac-extensions.github.io/mlm/v1.4.0/schema.json": "mlm-v1.4.0.json",
    "https://stac-extensions.github.io/classification/v1.1.0/schema.json": "classification-v1.1.0.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json": "processing-v1.1.0.json",
    "https://stac-extensions.github.io/file/v2.1.0/schema.json": "file-v2.1.0.json",
    "https://geojson.org/schema/Feature.json": "geojson/Feature.json",
    "https://geojson.org/schema/Geometry.json": "geojson/Geometry.json",
    **{f"https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/{n}.json": f"stac-spec-v1.1.0/{n}.json"
       for n in ("item", "bands", "basics", "common", "data-values", "datetime", "instrument", "licensing", "provider")},
    "https://schemas.stacspec.org/v1.1.0/collection-spec/json-schema/collection.json": "stac-spec-v1.1.0/collection.json",
    "https://schemas.stacspec.org/v1.1.0/catalog-spec/json-schema/catalog.json": "stac-spec-v1.1.0/catalog.json",
}
CORE = {"Feature": "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json",
        "Collection": "https://schemas.stacspec.org/v1.1.0/collection-spec/json-schema/collection.json",
        "Catalog": "https://schemas.stacspec.org/v1.1.0/catalog-spec/json-schema/catalog.json"}


def _registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    resources = []
    for url, name in SCHEMA_FILES.items():
        contents = json.loads((SCHEMAS / name).read_text())
        resources.append((url, Resource.from_contents(contents, default_specification=DRAFT7)))
    return Registry().with_resources(resources)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every error of ``doc`` against the STAC core schema of its type and each of its ``stac_extensions``,
    all read from the vendored files (a schema that is not vendored is an error, never a download)."""
    from jsonschema import Draft7Validator

    registry = _registry()
    urls = [CORE[doc["type"]], *doc.get("stac_extensions", [])]
    errors = []
    for url in urls:
        if url not in SCHEMA_FILES:
            errors.append(f"{url}: schema not vendored")
            continue
        schema = json.loads((SCHEMAS / SCHEMA_FILES[url]).read_text())
        validator = Draft7Validator(schema, registry=registry)
        errors += [f"{url}: {'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(doc)]
    return errors


def write_cog(path: Path, array: np.ndarray, x0: float, y0: float, pixel: float = 10.0, crs: str = "EPSG:32633") -> Path:
    """(bands, H, W) as a COG with its upper-left corner at (x0, y0) in ``crs``."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="COG", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=array.dtype.name, crs=crs, transform=from_origin(x0, y0, pixel, pixel),
                       blocksize=64) as ds:
        ds.write(array)
    return path


def footprint(x0: float, y0: float, w: int, h: int, pixel: float, crs: str = "EPSG:32633"
              ) -> tuple[list[float], dict[str, Any]]:
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(crs, "EPSG:4326", x0, y0 - h * pixel, x0 + w * pixel, y0)
    geom = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                [west, south]]]}
    return [west, south, east, north], geom


RGB = [{"name": "red", "common_name": "red"}, {"name": "green", "common_name": "green"},
       {"name": "blue", "common_name": "blue"}]
ANALYTIC = [{"name": "B02", "common_name": "blue"}, {"name": "B03", "common_name": "green"},
            {"name": "B04", "common_name": "red"}, {"name": "B08", "common_name": "nir"}]


def make_item(folder: Path, photo: np.ndarray, i: int, collection: str = "tiles", size: int = 72,
              start: dt.datetime = dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC), updated: str | None = None,
              analytic: bool = True) -> dict[str, Any]:
    """Item ``tile-i`` (asset hrefs are file:// URIs, as an API serves them): a 3-band ``visual`` COG (role data) and a 4-band ``analytic`` COG, 1 km apart in x per
    i, one day apart from ``start``, eo:cloud_cover = 10·i; files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    x0, y0, pixel = 500000.0 + 1000.0 * i, 4100000.0, 10.0
    crop = np.ascontiguousarray(photo[:, (7 * i) % 200:(7 * i) % 200 + size, (11 * i) % 200:(11 * i) % 200 + size])
    visual = write_cog(folder / f"tile-{i}-visual.tif", crop, x0, y0, pixel)
    bbox, geom = footprint(x0, y0, size, size, pixel)
    when = (start + dt.timedelta(days=i)).isoformat().replace("+00:00", "Z")
    assets: dict[str, Any] = {
        "visual": {"href": visual.as_uri(), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                   "roles": ["data", "visual"], "eo:bands": RGB},
        "thumbnail": {"href": visual.as_uri(), "type": "image/png", "roles": ["thumbnail"]},
    }
    if analytic:
        four = np.concatenate([crop[::-1], crop[:1]], axis=0)  # blue, green, red, "nir"
        assets["analytic"] = {"href": write_cog(folder / f"tile-{i}-analytic.tif", four, x0, y0, pixel).as_uri(),
                              "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                              "roles": ["analytic"], "eo:bands": ANALYTIC}
    return {
        "type": "Feature", "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "id": f"tile-{i}", "collection": collection, "geometry": geom, "bbox": bbox,
        "properties": {"datetime": when, "updated": updated or when, "eo:cloud_cover": 10 * i},
        "links": [], "assets": assets,
    }


def collection_doc(cid: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "Collection", "stac_version": "1.0.0", "id": cid, "description": f"test collection {cid}",
            "license": "proprietary",
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [["2024-01-01T00:00:00Z", None]]}},
            "links": []}


def write_static(root: Path, items: list[dict[str, Any]], cid: str = "tiles") -> Path:
    """A static catalogue: ``root/catalog.json`` → ``root/<cid>/collection.json`` → one folder per item."""
    coll = collection_doc(cid, items)
    (root / cid).mkdir(parents=True, exist_ok=True)
    for item in items:
        d = root / cid / item["id"]
        d.mkdir(exist_ok=True)
        (d / f"{item['id']}.json").write_text(json.dumps({**item, "links": [
            {"rel": "collection", "href": "../collection.json"}, {"rel": "parent", "href": "../collection.json"}]}))
        coll["links"].append({"rel": "item", "href": f"./{item['id']}/{item['id']}.json"})
    (root / cid / "collection.json").write_text(json.dumps(coll))
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "root", "description": "test catalogue",
               "links": [{"rel": "child", "href": f"./{cid}/collection.json"}]}
    (root / "catalog.json").write_text(json.dumps(catalog))
    return root / "catalog.json"
