"""STAC out: a STAC Item per complete output, gathered in a static Collection per output folder.

``OUT/dir/name.zarr`` gets ``OUT/dir/name.item.json``, listed in ``OUT/dir/collection.json``:

* the item uses the **label** extension (``label:type`` raster, ``label:tasks`` segmentation,
  ``label:classes`` = the class ids, ``label:description``), **classification** (ids, names and colours
  of the classes, on the label assets), **proj** (EPSG code or WKT2, transform, shape; georeferenced
  outputs only) and **raster** (nodata label and data type) extensions;
* its assets are the Zarr output and the exports written next to it (COG, vectors, preview), with media
  types and roles, as relative hrefs (the folder can be moved or published as it is);
* its links are ``source`` (the input STAC item, or the input file) and ``derived_from`` the model's
  MLM item (:mod:`segpipe.models.mlm`), written once per model into the folder as ``<id>.mlm.json``.

The collection is updated as each output completes: one link added and the extent widened, in one
atomic replace of ``collection.json`` — items already listed are never rewritten. Updates from threads
of one process are serialised by a lock, and on a local folder across processes too (``flock``); on a
bucket two *runs* finishing outputs of one folder at the same moment can lose a link (each item is still
written; the next update of that item restores it). Nothing is written for an unfinished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
from collections.abc import Iterator
from typing import Any

from segpipe.core.errors import OutputError, SegpipeError
from segpipe.io.meta import OutputMeta, open_output_group
from segpipe.io.storage import filesystem, has_scheme, is_local, join, strip_file_scheme, write_atomic

STAC_VERSION = "1.1.0"
LABEL = "https://stac-extensions.github.io/label/v1.0.1/schema.json"
PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
CLASSIFICATION = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
ITEM_SUFFIX = ".item.json"
COLLECTION = "collection.json"
#: marks a collection.json as segpipe's (one that is not is never replaced)
MARKER = "segpipe:outputs"

ZARR_TYPE = "application/vnd+zarr"
_EXPORT_TYPES = {
    ".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
    ".gpkg": "application/geopackage+sqlite3",
    ".geojson": "application/geo+json",
    ".json": "application/geo+json",
    ".fgb": "application/vnd.flatgeobuf",
    ".parquet": "application/vnd.apache.parquet",
    ".shp": "application/vnd.shp",
    ".png": "image/png",
    ".qml": "text/xml",
    ".xml": "application/xml",
}
_EXPORT_ROLES = {"cog": ["data", "labels", "labels-raster"], "vector": ["data", "labels", "labels-vector"],
                 "preview": ["overview", "visual"], "cog_style": ["metadata", "style"],
                 "cog_aux": ["metadata"]}
_SOURCE_TYPES = {".tif": "image/tiff", ".tiff": "image/tiff", ".png": "image/png", ".jpg": "image/jpeg",
                 ".jpeg": "image/jpeg", ".jp2": "image/jp2", ".zarr": ZARR_TYPE}

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def item_path(zarr_uri: str) -> str:
    """Where the STAC item of an output lives: ``OUT/dir/name.zarr`` → ``OUT/dir/name.item.json``."""
    return strip_file_scheme(zarr_uri).rstrip("/").removesuffix(".zarr") + ITEM_SUFFIX


def _rel(path: str, folder: str) -> str:
    return "./" + posixpath.relpath(path, folder) if not has_scheme(path) or path.startswith(folder) else path


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _z(t: str | None) -> str | None:
    return t.replace("+00:00", "Z") if t else t


def _footprint(meta: OutputMeta) -> tuple[list[float] | None, dict[str, Any] | None, dict[str, Any]]:
    """(WGS 84 bbox, geometry, proj fields) of a georeferenced output; (None, None, {}) otherwise."""
    if meta.transform is None or not meta.crs_wkt:
        return None, None, {}
    from pyproj import CRS
    from rasterio.crs import CRS as RioCRS
    from rasterio.warp import transform_bounds

    a, b, c, d, e, f = meta.transform
    xs = [c, c + a * meta.width, c + b * meta.height, c + a * meta.width + b * meta.height]
    ys = [f, f + d * meta.width, f + e * meta.height, f + d * meta.width + e * meta.height]
    west, south, east, north = transform_bounds(RioCRS.from_wkt(meta.crs_wkt), "EPSG:4326", min(xs), min(ys),
                                                max(xs), max(ys), densify_pts=21)
    bbox = [round(v, 9) for v in (west, south, east, north)]
    geometry = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                                                    [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]}
    epsg = CRS.from_wkt(meta.crs_wkt).to_epsg()
    proj: dict[str, Any] = {"proj:code": f"EPSG:{epsg}" if epsg else None, "proj:transform": [a, b, c, d, e, f],
                            "proj:shape": [meta.height, meta.width]}
    if not epsg:
        proj["proj:wkt2"] = meta.crs_wkt
    return bbox, geometry, proj


def output_item(zarr_uri: str, exports: dict[str, str], model_item: str | None = None,
                mlm_name: str | None = None) -> dict[str, Any]:
    """The STAC Item (a JSON-ready dict) of a complete output and its ``exports`` (kind → path).

    ``model_item``: the href of the model's MLM item, linked as ``derived_from``.
    """
    from segpipe.export.meta import read_output_meta

    meta = read_output_meta(zarr_uri)  # refuses an unfinished output
    seg = dict(open_output_group(zarr_uri).attrs.get("segpipe") or {})
    zarr_path = strip_file_scheme(zarr_uri).rstrip("/")
    folder = posixpath.dirname(zarr_path)
    name = posixpath.basename(zarr_path).removesuffix(".zarr")
    bbox, geometry, proj = _footprint(meta)
    model = seg.get("model") or {}
    source_item = seg.get("source_item") or {}
    classes = [{"value": i, "name": c, "description": c, "color_hint": meta.class_colors[i].lstrip("#")[:6]}
               for i, c in enumerate(meta.classes) if i < len(meta.class_colors)]
    raster_band: dict[str, Any] = {"data_type": "uint8" if (meta.nodata or 255) <= 255 else "uint16", "nodata": meta.nodata}
    if proj:
        raster_band["spatial_resolution"] = abs(meta.transform[0]) if meta.transform else None
    finished = _z(seg.get("finished")) or _now()
    properties: dict[str, Any] = {
        "datetime": source_item.get("datetime") or finished,
        "created": _z(seg.get("started")) or finished,
        "updated": finished,
        "label:type": "raster",
        "label:properties": None,
        "label:tasks": ["segmentation"],
        "label:methods": ["automated"],
        "label:classes": [{"name": None, "classes": list(range(len(meta.classes)))}],
        "label:description": f"semantic segmentation of {source_item.get('id') or meta.source} by segpipe with "
                             f"{model.get('architecture')}/{model.get('encoder')} (weights sha256 "
                             f"{str(model.get('weights_sha256'))[:12]}): one class id per pixel, "
                             f"{meta.nodata} = no data",
        "segpipe:source": meta.source,
        "segpipe:weights_sha256": model.get("weights_sha256"),
        **proj,
    }
    if meta.mpp:
        properties["segpipe:mpp"] = meta.mpp
    assets: dict[str, Any] = {
        "labels": {"href": _rel(zarr_path, folder), "type": ZARR_TYPE, "title": "class ids (OME-Zarr, pyramid)",
                   "roles": ["data", "labels", "labels-raster"], "raster:bands": [raster_band],
                   "classification:classes": classes},
    }
    for kind, path in sorted(exports.items()):
        p = strip_file_scheme(path)
        ext = posixpath.splitext(p)[1].lower() if not p.endswith(".aux.xml") else ".xml"
        asset: dict[str, Any] = {"href": _rel(p, folder), "type": _EXPORT_TYPES.get(ext, "application/octet-stream"),
                 "roles": _EXPORT_ROLES.get(kind, ["data"])}
        if kind == "cog":
            asset.update({"raster:bands": [raster_band], "classification:classes": classes})
        if kind in ("cog", "vector"):
            asset["classification:classes"] = classes
        assets[kind.replace("_", "-")] = asset
    links: list[dict[str, Any]] = [
        {"rel": "root", "href": "./" + COLLECTION, "type": "application/json"},
        {"rel": "parent", "href": "./" + COLLECTION, "type": "application/json"},
        {"rel": "collection", "href": "./" + COLLECTION, "type": "application/json"},
    ]
    if source_item.get("href"):
        links.append({"rel": "source", "href": source_item["href"], "type": "application/geo+json",
                      "title": f"STAC item {source_item.get('id')}", "label:assets": [source_item.get("asset")]})
    elif meta.source:
        ext = posixpath.splitext(meta.source)[1].lower()
        links.append({"rel": "source", "href": meta.source, "type": _SOURCE_TYPES.get(ext, "application/octet-stream"),
                      "title": "source image"})
    if model_item:
        link = {"rel": "derived_from", "href": _rel(model_item, folder), "type": "application/geo+json",
                "title": "the model (STAC MLM item)"}
        if mlm_name:
            link["mlm:name"] = mlm_name
        links.append(link)
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [LABEL, CLASSIFICATION, RASTER] + ([PROJ] if proj else []),
        "id": name,
        "geometry": geometry,
        "properties": properties,
        "links": links,
        "assets": assets,
        "collection": collection_id(folder),
    }
    if bbox is not None:
        item["bbox"] = bbox
    return item


def collection_id(folder: str) -> str:
    """The id of the collection of outputs in ``folder``: its name + ``-segmentation``."""
    return f"{posixpath.basename(strip_file_scheme(folder).rstrip('/')) or 'outputs'}-segmentation"


def _model_item(zarr_uri: str, seg: dict[str, Any], folder: str, notes: list[str]) -> tuple[str | None, str | None]:
    """The MLM item of the output's model, written once into ``folder``; (href, mlm:name) or (None, None)."""
    model = seg.get("model") or {}
    uri, sha = model.get("uri"), model.get("weights_sha256")
    if not uri or not sha:
        return None, None
    try:
        item = _mlm_item(uri, sha)
    except SegpipeError as e:
        notes.append(f"{zarr_uri}: no model link in its STAC item: the model cannot be read ({e})")
        return None, None
    checksum = str(((item.get("assets") or {}).get("weights") or {}).get("file:checksum", ""))
    if not checksum.endswith(sha):
        notes.append(f"{zarr_uri}: no model link in its STAC item: the model at {uri} changed since the output was made")
        return None, None
    path = join(folder, f"{item['id']}.mlm.json")
    fs, p = filesystem(path)
    if not fs.exists(p):
        write_atomic(fs, p, (json.dumps(item, indent=2) + "\n").encode(), durable=False)
    return path, str(item["properties"].get("mlm:name") or item["id"])


#: MLM items made in this process, by (model URI, weights sha256): an artifact's item hashes its weights,
#: once per model rather than once per output
_mlm_cache: dict[tuple[str, str], dict[str, Any]] = {}


def _mlm_item(uri: str, sha: str) -> dict[str, Any]:
    from segpipe.models.registry import version_mlm_item

    key = (uri, sha)
    with _locks_guard:
        cached = _mlm_cache.get(key)
    if cached is None:
        cached = version_mlm_item(uri)
        with _locks_guard:
            if len(_mlm_cache) > 64:  # a bound: a long-lived worker sees few models
                _mlm_cache.clear()
            _mlm_cache[key] = cached
    return cached


@contextlib.contextmanager
def _collection_lock(path: str) -> Iterator[None]:
    """One updater of a collection.json at a time: threads of this process, and local processes (flock)."""
    with _locks_guard:
        lock = _locks.setdefault(path, threading.Lock())
    with lock:
        fs, p = filesystem(path)
        if not is_local(fs):
            yield
            return
        import fcntl

        with open(os.path.join(os.path.dirname(p), ".collection.json.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def add_to_collection(folder: str, item: dict[str, Any], item_file: str) -> str:
    """Add ``item`` (written at ``item_file``) to ``folder/collection.json``: its link once, the extent
    widened; the other items' links and files are left as they are. Returns the collection's path."""
    path = join(strip_file_scheme(folder).rstrip("/"), COLLECTION)
    with _collection_lock(path):
        fs, p = filesystem(path)
        try:
            current = json.loads(fs.cat_file(p)) if fs.exists(p) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            current = {}
        if current is not None and not (isinstance(current, dict) and current.get(MARKER)):
            raise OutputError(path, "exists and is not a segpipe output collection; it was left untouched: move it "
                                    "away or choose another --out")
        coll = current or _new_collection(folder)
        href = _rel(strip_file_scheme(item_file), strip_file_scheme(folder).rstrip("/"))
        links = coll.setdefault("links", [])
        if not any(link.get("rel") == "item" and link.get("href") == href for link in links):
            links.append({"rel": "item", "href": href, "type": "application/geo+json", "title": item["id"]})
        _widen(coll, item)
        write_atomic(fs, p, (json.dumps(coll, indent=2) + "\n").encode(), durable=False)
    return path


def _new_collection(folder: str) -> dict[str, Any]:
    cid = collection_id(folder)
    return {
        "type": "Collection", "stac_version": STAC_VERSION, "stac_extensions": [LABEL], "id": cid,
        "title": f"segpipe outputs in {posixpath.basename(strip_file_scheme(folder).rstrip('/'))}",
        "description": "Semantic segmentation outputs written by segpipe: one item per output (label extension, "
                       "raster labels), linked to its source and to the model that made it.",
        "license": "other", MARKER: True,
        "extent": {"spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]}, "temporal": {"interval": [[None, None]]}},
        "summaries": {"label:type": ["raster"], "label:tasks": ["segmentation"]},
        "links": [{"rel": "root", "href": "./" + COLLECTION, "type": "application/json"},
                  {"rel": "self", "href": join(strip_file_scheme(folder).rstrip("/"), COLLECTION)
                   if has_scheme(folder) else os.path.abspath(join(folder, COLLECTION)), "type": "application/json"}],
        "segpipe:georeferenced": None,
    }


def _widen(coll: dict[str, Any], item: dict[str, Any]) -> None:
    """Widen the collection's extent by one item (the first georeferenced item replaces the world)."""
    extent = coll["extent"]
    if item.get("bbox"):
        w, s, e, n = item["bbox"]
        if not coll.get("segpipe:georeferenced"):
            extent["spatial"]["bbox"] = [[w, s, e, n]]
            coll["segpipe:georeferenced"] = True
        else:
            b = extent["spatial"]["bbox"][0]
            extent["spatial"]["bbox"] = [[min(b[0], w), min(b[1], s), max(b[2], e), max(b[3], n)]]
    when = item["properties"]["datetime"]
    lo, hi = extent["temporal"]["interval"][0]
    extent["temporal"]["interval"] = [[min(lo, when) if lo else when, max(hi, when) if hi else when]]


def write_stac(zarr_uri: str, exports: dict[str, str], notes: list[str] | None = None) -> dict[str, str]:
    """Write the output's item (and the model's MLM item, once) and add it to its folder's collection.

    Returns the written paths: ``stac_item``, ``stac_collection`` and ``mlm_item`` (when the model could be
    read). ``notes`` receives one line when the model link cannot be made.
    """
    notes = notes if notes is not None else []
    seg = dict(open_output_group(zarr_uri).attrs.get("segpipe") or {})
    if seg.get("status") != "complete":
        return {}  # another run is writing it (a skipped image): its run writes the item
    folder = posixpath.dirname(strip_file_scheme(zarr_uri).rstrip("/"))
    model_href, mlm_name = _model_item(zarr_uri, seg, folder, notes)
    item = output_item(zarr_uri, exports, model_href, mlm_name)
    path = item_path(zarr_uri)
    fs, p = filesystem(path)
    write_atomic(fs, p, (json.dumps(item, indent=2) + "\n").encode(), durable=False)
    written = {"stac_item": path, "stac_collection": add_to_collection(folder, item, path)}
    if model_href:
        written["mlm_item"] = model_href
    return written
