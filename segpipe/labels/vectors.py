"""Reading label files: features (geometry, class, name) from any vector format, into image pixels.

Formats (:func:`read_vector_file`):

* everything pyogrio reads — GeoPackage (a layer by name: ``layer=``), GeoJSON, Shapefile,
  FlatGeobuf, … — and GeoParquet (read with pyarrow: the GeoParquet ``geo`` metadata);
* QuPath GeoJSON (0.4: a bare list of features with ``properties.classification``; 0.5 and
  0.6: a FeatureCollection with ``properties.objectType``; annotations, detections and cells),
  in level-0 pixels;
* COCO JSON (polygons and RLE, decoded through pycocotools), in pixels; a COCO file must describe
  the image it is read for (by ``file_name``).

QuPath and COCO JSON are streamed (ijson): memory follows the features, not the file's text. A
remote file is copied once into a temporary folder (:func:`local_copy`), a Shapefile with its
sidecars; a Shapefile without its ``.shx`` or ``.dbf`` is refused.

``.json`` and ``.geojson`` files are told apart by content: an object with ``annotations`` and
``categories`` is COCO; a list of features, or features carrying QuPath's ``objectType`` or
``classification``, is QuPath; any other GeoJSON goes through pyogrio (map coordinates).

The class of a feature (:data:`CLASS_FIELDS`): the ``class`` property (a name or an integer id);
else ``class_name`` / ``class_id`` (what ``segpipe export`` writes, so segpipe's own output is a
label file as it is; a feature's ``class_id`` is kept beside it, to be checked against its name);
else QuPath's ``classification.name``; else the COCO category name.

Coordinates (:func:`to_pixels`): a georeferenced image maps the file's CRS to its own (pyproj),
then map coordinates to pixels with its affine; files without a CRS are taken to be in the
image's CRS. QuPath and COCO files, and any file over an image without georeference (photos,
slides), are in pixels; on a slide they are level-0 pixels, scaled to the level read.

Why this module is long: it is the one place where the three families of label files (GIS
vectors, QuPath, COCO) become the same features; splitting it would spread the content sniffing
and the class-column rule that must stay identical for all of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import shapely

from segpipe.core.errors import DatasetError
from segpipe.io.readers.base import ImageInfo
from segpipe.io.storage import filesystem, strip_file_scheme

log = logging.getLogger("segpipe.labels.vectors")

#: file extensions read as label files (anything else pyogrio opens works too, by content)
VECTOR_EXTENSIONS = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".geoparquet", ".gml", ".kml",
                     ".sqlite")
#: properties that carry a feature's class, in the order they are looked for
CLASS_FIELDS = ("class", "class_name", "class_id", "classification")
#: a GeoPackage layer of that name holds the labelled regions (the others hold labels)
REGIONS_LAYER = "regions"
#: a GeoPackage layer of that name holds the labels when there are several layers
LABELS_LAYER = "labels"


@dataclass(frozen=True)
class VectorFeatures:
    """The features of one label file, in the file's own coordinates."""

    uri: str
    geoms: np.ndarray  #: shapely geometries (None for a feature without geometry)
    classes: list[Any]  #: each feature's class as written: a name, an integer id, or None
    idents: list[str]  #: how errors name each feature: "feature 3 (id 'a7')"
    crs_wkt: str | None  #: the file's CRS; None = pixels, or no CRS written
    pixel_space: bool  #: QuPath / COCO: pixel coordinates whatever the image is
    kind: str  #: "qupath", "coco" or "ogr"
    #: the ``class_id`` column beside a ``class_name`` one (segpipe's own export writes both): each
    #: feature's id, checked against its name when the classes are resolved; None = no such pair
    class_ids: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.geoms)

    def where(self, i: int) -> str:
        """Where feature ``i`` lies, for errors: its bounding-box centre in the file's coordinates."""
        g = self.geoms[i]
        if g is None or shapely.is_empty(g):
            return "(no geometry)"
        x0, y0, x1, y1 = shapely.bounds(g)
        unit = "pixels" if self.pixel_space or not self.crs_wkt else "file CRS"
        return f"near x={(x0 + x1) / 2:.6g}, y={(y0 + y1) / 2:.6g} ({unit})"


def _objects(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)  # filled one by one: numpy never unpacks a geometry
    out[:] = items
    return out


def _ident(i: int, fid: Any) -> str:
    return f"feature {i}" + (f" (id {fid!r})" if fid not in (None, "") and fid != i else "")


#: the parts of a Shapefile GDAL needs beside the .shp (geometry index, attributes = the classes)
SHAPEFILE_REQUIRED = (".shx", ".dbf")
#: the parts brought along when present (the CRS, the attributes' encoding)
SHAPEFILE_OPTIONAL = (".prj", ".cpg")


def _sidecars(uri: str, listing: list[str]) -> list[str]:
    """The files of a Shapefile beside ``uri`` (found in ``listing``, case-insensitively); a missing
    required part is a :class:`DatasetError` naming it (a .shp alone has no classes and no index)."""
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    by_name = {posixpath.basename(p).lower(): p for p in listing}
    found, missing = [], []
    for ext in SHAPEFILE_REQUIRED + SHAPEFILE_OPTIONAL:
        p = by_name.get((stem + ext).lower())
        if p is not None:
            found.append(p)
        elif ext in SHAPEFILE_REQUIRED:
            missing.append(stem + ext)
    if missing:
        raise DatasetError(uri, f"is a Shapefile without its {' and '.join(missing)} beside it; copy every part of "
                                f"the Shapefile ({stem}.shp, .shx, .dbf, .prj) to the same folder")
    return found


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path of the label file ``uri``: the file itself, or a copy of a remote one in a temporary
    folder (removed on exit) — streamed to disk once, with a Shapefile's sidecars beside it, so GDAL and
    the JSON parsers read a file, never the whole file's bytes in memory."""
    uri = strip_file_scheme(uri)
    is_shp = posixpath.splitext(uri.lower())[1] == ".shp"
    if "://" not in uri:
        if not os.path.exists(uri):
            raise DatasetError(uri, "does not exist")
        if is_shp:
            folder = os.path.dirname(uri) or "."
            _sidecars(uri, os.listdir(folder))
        yield uri
        return
    fs, path = filesystem(uri)
    try:
        parts = [path] + (_sidecars(uri, list(fs.ls(posixpath.dirname(path), detail=False))) if is_shp else [])
        with tempfile.TemporaryDirectory(prefix="segpipe-labels-") as tmp:
            for p in parts:
                fs.get_file(p, os.path.join(tmp, posixpath.basename(p)))
            yield os.path.join(tmp, posixpath.basename(path))
    except FileNotFoundError:
        raise DatasetError(uri, "does not exist") from None


def read_vector_file(uri: str, *, layer: str | None = None, image_name: str | None = None) -> VectorFeatures:
    """Features of a label file (see the module docstring for formats and class properties).

    ``layer`` picks a layer of a multi-layer file (default: the only layer, else ``labels``);
    ``image_name`` (the image's name in the dataset) picks the image a COCO file describes, by its
    ``file_name``: a COCO file that does not describe it is refused. Unreadable files raise
    :class:`DatasetError` naming them.
    """
    return read_label_file(uri, layer=layer, image_name=image_name, with_regions=False)[0]


def read_label_file(uri: str, *, layer: str | None = None, image_name: str | None = None,
                    with_regions: bool = True) -> tuple[VectorFeatures, VectorFeatures | None]:
    """The label features of ``uri`` (:func:`read_vector_file`) and, with ``with_regions``, its
    ``regions`` layer (None when it has none) — from one local copy of a remote file."""
    with local_copy(uri) as src:
        ext = posixpath.splitext(uri.lower())[1]
        if ext in (".json", ".geojson"):
            kind = _sniff_file(uri, src)
            if kind == "coco":
                return _read_coco(uri, src, image_name), None
            if kind == "qupath":
                return _read_qupath(uri, src), None
        if ext in (".parquet", ".geoparquet"):
            return _read_geoparquet(uri, src), None
        labels = _read_ogr(uri, src, layer)
        regions = _regions_layer(uri, src) if with_regions and layer is None else None
        return labels, regions


# --------------------------------------------------------------------------- JSON, streamed


#: bytes read at a time from a JSON label file: ijson turns each read into events before it builds
#: objects, about 10× the bytes read, so the read is small and peak memory a constant (~0.6 MB)
JSON_CHUNK = 1 << 16
#: what telling COCO, QuPath and plain GeoJSON apart reads at a time (it needs only the first keys)
_SNIFF_CHUNK = 1 << 12


@contextlib.contextmanager
def _json_stream(uri: str, src: str) -> Iterator[IO[bytes]]:
    """``src`` opened for ijson, past a UTF-8 byte-order mark; malformed JSON becomes a one-line error."""
    import ijson

    with open(src, "rb") as f:
        _rewind(f)
        try:
            yield f
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise DatasetError(uri, f"is not valid JSON ({e})") from None


def _rewind(f: IO[bytes]) -> None:
    """Back to the start of the JSON text, past a UTF-8 byte-order mark (ijson refuses one; json.loads took it)."""
    f.seek(0)
    if f.read(3) != b"\xef\xbb\xbf":
        f.seek(0)


def _is_qupath_feature(f: Any) -> bool:
    props = (f or {}).get("properties") or {} if isinstance(f, dict) else {}
    return "objectType" in props or isinstance(props.get("classification"), dict)


def sniff_json(data: Any) -> str:
    """``"coco"``, ``"qupath"`` or ``"geojson"`` for a parsed ``.json``/``.geojson`` document."""
    if isinstance(data, dict) and "annotations" in data and "categories" in data:
        return "coco"
    if isinstance(data, list):
        return "qupath"  # QuPath 0.4 writes a bare list of features
    feats = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else (
        [data] if isinstance(data, dict) and data.get("type") == "Feature" else None)
    if feats is None:
        return "geojson"
    return "qupath" if any(_is_qupath_feature(f) for f in feats[:50]) else "geojson"


#: top-level keys that only a COCO file has, and those of a GeoJSON object
_COCO_KEYS = frozenset({"annotations", "categories", "images"})
_GEOJSON_KEYS = frozenset({"type", "features", "geometry", "properties"})


def _sniff_file(uri: str, src: str) -> str:
    """:func:`sniff_json` of a file without parsing it whole: the first top-level key that only COCO
    or only GeoJSON has decides the family; QuPath is told from plain GeoJSON by its first 50 features."""
    import itertools

    import ijson

    with _json_stream(uri, src) as f:
        for prefix, event, value in ijson.parse(f, use_float=True, buf_size=_SNIFF_CHUNK):
            if prefix == "" and event == "start_array":
                return "qupath"  # QuPath 0.4 writes a bare list of features
            if prefix == "" and event == "map_key":
                if value in _COCO_KEYS:
                    return "coco"
                if value in _GEOJSON_KEYS:
                    break
            if prefix == "" and event in ("end_map", "string", "number", "boolean", "null"):
                return "geojson"  # a scalar or an object without any of those keys: let GDAL say what it is
        _rewind(f)
        head = list(itertools.islice(ijson.items(f, "features.item", use_float=True, buf_size=_SNIFF_CHUNK), 50))
        if not head:
            _rewind(f)
            head = [{"properties": p}
                    for p in itertools.islice(ijson.items(f, "properties", use_float=True, buf_size=_SNIFF_CHUNK), 1)]
        return "qupath" if any(_is_qupath_feature(x) for x in head) else "geojson"


# --------------------------------------------------------------------------- OGR (pyogrio)


def list_layers(uri: str, src: str | None = None) -> list[str]:
    """Layer names of a vector file (one for single-layer formats); ``src``: its local copy, if made."""
    import pyogrio

    if src is None:
        with local_copy(uri) as local:
            return list_layers(uri, local)
    try:
        return [str(n) for n in pyogrio.list_layers(src)[:, 0]]
    except Exception as e:  # pyogrio raises DataSourceError and friends, all with a readable message
        raise DatasetError(uri, f"is not a vector file GDAL can read ({e})") from None


def _pick_layer(uri: str, src: str, layer: str | None) -> str | None:
    names = list_layers(uri, src)
    if layer is not None:
        if layer not in names:
            raise DatasetError(uri, f"has no layer {layer!r} (layers: {', '.join(names)})")
        return layer
    label_layers = [n for n in names if n != REGIONS_LAYER]
    if len(label_layers) == 1:
        return label_layers[0]
    if LABELS_LAYER in names:
        return LABELS_LAYER
    if not label_layers:
        return None
    raise DatasetError(uri, f"has {len(label_layers)} layers ({', '.join(label_layers)}); name the labels layer "
                            f"{LABELS_LAYER!r} (and the regions layer {REGIONS_LAYER!r})")


def _class_column(names: list[str], columns: list[np.ndarray]) -> tuple[list[Any], list[Any] | None]:
    """(each feature's class, the ``class_id`` column when the class comes from ``class_name``, else None)."""
    lower = {n.lower(): i for i, n in enumerate(names)}
    for field in CLASS_FIELDS:
        if field in lower:
            col = columns[lower[field]]
            if field == "classification":
                return [_qupath_class_name(v) for v in col], None
            values = [_plain(v) for v in col]
            if field != "class_name" or "class_id" not in lower:
                return values, None
            # segpipe's own export: a feature drawn in QGIS may have only one of the two filled in;
            # where both are, the classes check them against each other (LabelClasses, truth._resolve)
            ids = [_plain(v) for v in columns[lower["class_id"]]]
            return [n if n is not None else i for n, i in zip(values, ids, strict=True)], ids
    return [None] * (len(columns[0]) if columns else 0), None


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _read_ogr(uri: str, src: str, layer: str | None, *, want_layer: str | None = None) -> VectorFeatures:
    from pyogrio.raw import read

    chosen = want_layer if want_layer is not None else _pick_layer(uri, src, layer)
    if chosen is None:
        return VectorFeatures(uri, np.zeros(0, dtype=object), [], [], None, False, "ogr")
    try:
        meta, fids, wkb, fields = read(src, layer=chosen, return_fids=True)
    except Exception as e:
        raise DatasetError(uri, f"is not a vector file GDAL can read ({e})") from None
    geoms = shapely.from_wkb(wkb) if wkb is not None else np.full(len(fids), None, dtype=object)
    names = [str(n) for n in meta["fields"]]
    classes, class_ids = _class_column(names, list(fields))
    crs = meta.get("crs")
    crs_wkt = _crs_wkt(crs) if crs else None
    if crs_wkt is not None and meta.get("driver") == "GeoJSON" and _is_wgs84(crs_wkt) and len(geoms):
        # RFC 7946: a GeoJSON without "crs" is WGS 84, and GDAL says so; coordinates far outside
        # ±180/±90 were plainly written in another CRS (or pixels) without saying which
        b = shapely.total_bounds(geoms)
        if np.isfinite(b).all() and (min(b[0], b[1]) < -180 or max(b[2], b[3]) > 180 or b[1] < -90 or b[3] > 90):
            log.warning("%s: a GeoJSON without a crs member holds coordinates outside longitude/latitude "
                        "ranges; read as the image's own coordinates", uri)
            crs_wkt = None
    idents = [_ident(i, _plain(f)) for i, f in enumerate(fids)]
    return VectorFeatures(uri, geoms, classes, idents, crs_wkt, False, "ogr", class_ids)


def read_regions_layer(uri: str) -> VectorFeatures | None:
    """The ``regions`` layer of a multi-layer label file (GeoPackage), or None when it has none."""
    if posixpath.splitext(uri.lower())[1] not in (".gpkg", ".sqlite"):
        return None
    with local_copy(uri) as src:
        return _regions_layer(uri, src)


def _regions_layer(uri: str, src: str) -> VectorFeatures | None:
    if posixpath.splitext(uri.lower())[1] not in (".gpkg", ".sqlite") or REGIONS_LAYER not in list_layers(uri, src):
        return None
    return _read_ogr(uri, src, None, want_layer=REGIONS_LAYER)


def _crs_wkt(crs: Any) -> str:
    from pyproj import CRS

    return CRS.from_user_input(crs).to_wkt()


def _is_wgs84(wkt: str) -> bool:
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    return crs.is_geographic and crs.equals(CRS.from_epsg(4326), ignore_axis_order=True)


# --------------------------------------------------------------------------- GeoParquet


def _read_geoparquet(uri: str, src: str) -> VectorFeatures:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(src)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(uri, f"is not a Parquet file ({e})") from None
    meta = json.loads((table.schema.metadata or {}).get(b"geo", b"null") or b"null")
    if not isinstance(meta, dict) or "primary_column" not in meta:
        raise DatasetError(uri, "is a Parquet file without GeoParquet 'geo' metadata")
    column = meta["primary_column"]
    cmeta = meta.get("columns", {}).get(column, {})
    if cmeta.get("encoding", "WKB").upper() != "WKB":
        raise DatasetError(uri, f"geometry encoding {cmeta.get('encoding')!r} is not supported (write WKB)")
    geoms = shapely.from_wkb(np.asarray(table.column(column).to_pylist(), dtype=object))
    # GeoParquet: "crs" absent = OGC:CRS84; null = unknown (pixels)
    crs = cmeta["crs"] if "crs" in cmeta else "OGC:CRS84"
    if crs is None:
        crs_wkt = None
    else:
        from pyproj import CRS

        crs_wkt = (CRS.from_json_dict(crs) if isinstance(crs, dict) else CRS.from_user_input(crs)).to_wkt()
    names = [n for n in table.column_names if n != column]
    classes, class_ids = _class_column(names, [np.asarray(table.column(n).to_pylist(), dtype=object) for n in names]) \
        if names else ([None] * len(geoms), None)
    return VectorFeatures(uri, geoms, classes, [_ident(i, None) for i in range(len(geoms))], crs_wkt, False, "ogr",
                          class_ids)


# --------------------------------------------------------------------------- QuPath


def _qupath_class_name(c: Any) -> Any:
    if isinstance(c, str):
        text = c.strip()
        if text.startswith("{"):
            try:
                c = json.loads(text)
            except json.JSONDecodeError:
                return c
        else:
            return c or None
    if isinstance(c, dict):
        if c.get("name") is not None:
            return c["name"]
        names = c.get("names")  # derived classes: ["Tumor", "Positive"] → "Tumor: Positive"
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return None


def _read_qupath(uri: str, src: str) -> VectorFeatures:
    """QuPath's GeoJSON, streamed: each feature becomes a geometry as it is parsed, so memory follows
    the features (a GB-sized detection export is never held as text or as Python dicts)."""
    import ijson

    geoms, classes, idents = [], [], []
    with _json_stream(uri, src) as f:
        first = next(ijson.parse(f, use_float=True, buf_size=_SNIFF_CHUNK), ("", "", None))
        _rewind(f)
        if first[1] == "start_array":  # QuPath 0.4: a bare list of features
            prefix = "item"
        else:  # a FeatureCollection, or one Feature
            prefix = "features.item" if _has_features(f) else ""
            _rewind(f)
        for i, feat in enumerate(ijson.items(f, prefix, use_float=True, buf_size=JSON_CHUNK)):
            if not isinstance(feat, dict):
                raise DatasetError(uri, f"feature {i} is not a GeoJSON object")
            props = feat.get("properties") or {}
            g = feat.get("geometry")
            try:
                geoms.append(shapely.geometry.shape(g) if g else None)
            except (shapely.errors.GEOSException, ValueError, TypeError, AttributeError, KeyError) as e:
                raise DatasetError(uri, f"{_ident(i, feat.get('id'))}: unreadable geometry ({e})") from None
            cls = props.get("classification")
            classes.append(_qupath_class_name(cls) if cls is not None else _plain_class(props))
            # QuPath 0.4 writes the object type as id ("PathAnnotationObject"); 0.5+ a UUID
            idents.append(_ident(i, feat.get("id")))
    return VectorFeatures(uri, _objects(geoms), classes, idents, None, True, "qupath")


def _has_features(f: IO[bytes]) -> bool:
    """Whether the top-level object has a ``features`` member (a FeatureCollection) — read up to that key."""
    import ijson

    return any(prefix == "" and event == "map_key" and value == "features"
               for prefix, event, value in ijson.parse(f, use_float=True, buf_size=_SNIFF_CHUNK))


def _plain_class(props: dict[str, Any]) -> Any:
    for field in CLASS_FIELDS[:3]:
        if props.get(field) is not None:
            return props[field]
    return None


# --------------------------------------------------------------------------- COCO


def _coco_stem(file_name: Any) -> str:
    """The name a COCO ``file_name`` gives its image: the base name without its (last) extension."""
    return posixpath.splitext(posixpath.basename(str(file_name).replace("\\", "/")))[0]


def _read_coco(uri: str, src: str, image_name: str | None) -> VectorFeatures:
    """COCO JSON in one streamed pass: ``images``, ``categories`` and ``annotations`` are parsed as they
    come (in any order) and each annotation becomes a geometry at once; then the image named
    ``image_name`` is picked (by ``file_name``) and its annotations kept."""
    import ijson
    from pycocotools import mask as mask_utils

    images, cats, anns = ijson.sendable_list(), ijson.sendable_list(), ijson.sendable_list()
    found: list[tuple[Any, Any, Any, str]] = []  # (image_id, category_id, geometry or a deferred RLE, ident)

    def take() -> None:
        for a in anns:
            if not isinstance(a, dict):
                raise DatasetError(uri, f"annotation {len(found)} is not a JSON object")
            ident = _ident(len(found), a.get("id"))
            seg = a.get("segmentation")
            if isinstance(seg, list):  # polygons: [[x, y, x, y, …], …], one list per part, no holes
                parts = [shapely.Polygon(np.asarray(p, dtype=np.float64).reshape(-1, 2)) for p in seg if len(p) >= 6]
                g: Any = shapely.MultiPolygon(parts) if len(parts) > 1 else parts[0] if parts else None
            elif isinstance(seg, dict):  # RLE: decoded now unless its size must come from the image
                g = _rle_polygons(mask_utils, _rle(mask_utils, seg, *seg["size"])) if "size" in seg else seg
            else:
                raise DatasetError(uri, f"annotation {ident}: segmentation is neither polygons nor RLE")
            found.append((a.get("image_id"), a.get("category_id"), g, ident))
        del anns[:]

    with _json_stream(uri, src) as f:
        coros = [ijson.items_coro(images, "images.item", use_float=True),
                 ijson.items_coro(cats, "categories.item", use_float=True),
                 ijson.items_coro(anns, "annotations.item", use_float=True)]
        while chunk := f.read(JSON_CHUNK):
            for c in coros:
                c.send(chunk)
            take()
        for c in coros:
            c.close()
        take()
    image = _coco_image(uri, list(images), image_name)
    categories = {c.get("id"): c.get("name") for c in cats if isinstance(c, dict)}
    if image is not None and len(images) > 1:
        found = [x for x in found if x[0] == image.get("id")]
    geoms, classes, idents = [], [], []
    for _, cat, g, ident in found:
        if cat not in categories:
            raise DatasetError(uri, f"annotation {ident}: category_id {cat!r} is not in categories")
        if isinstance(g, dict):  # an RLE without its size: the image's
            h, w = (image.get("height"), image.get("width")) if image else (None, None)
            if h is None or w is None:
                raise DatasetError(uri, f"annotation {ident}: an RLE without a size, and no image size to take")
            g = _rle_polygons(mask_utils, _rle(mask_utils, g, h, w))
        geoms.append(g)
        classes.append(categories[cat])
        idents.append(ident)
    return VectorFeatures(uri, _objects(geoms), classes, idents, None, True, "coco")


def _coco_image(uri: str, images: list[Any], image_name: str | None) -> dict[str, Any] | None:
    """The entry of ``images`` that describes the image ``image_name`` (by ``file_name``), or None when the
    file names no images. Without ``image_name`` a file must describe one image. A file whose images do
    not include it is refused, naming the images it does describe."""
    images = [im for im in images if isinstance(im, dict)]
    if not images:
        return None
    if image_name is None:
        if len(images) > 1:
            raise DatasetError(uri, f"describes {len(images)} images; name the one to read")
        return images[0]
    stem = posixpath.basename(image_name)
    named = [im for im in images if im.get("file_name") is not None]
    if not named and len(images) == 1:
        return images[0]  # a single image without a file_name: nothing to check it against
    match = [im for im in named if _coco_stem(im["file_name"]) == stem or posixpath.basename(
        str(im["file_name"]).replace("\\", "/")) == stem]
    if len(match) == 1:
        return match[0]
    names = [str(im["file_name"]) for im in named]
    listed = ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
    if not match:
        raise DatasetError(uri, f"describes no image named {stem!r}.* (its images: {listed}); a COCO file under "
                                f"labels/ must describe the image of the same name")
    raise DatasetError(uri, f"describes {len(match)} images named {stem!r}.* ({listed}); keep one per name")


def _rle(mask_utils: Any, seg: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    """A COCO RLE as pycocotools decodes it: uncompressed counts (a list) encoded, the size filled in."""
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    return {**seg, "size": [h, w]}


def _rle_polygons(mask_utils: Any, rle: dict[str, Any]) -> shapely.Geometry | None:
    """The pixels of an RLE as pixel-edge polygons: burned at pixel centres they give the RLE back exactly.

    COCO RLE is for photo-sized images: one annotation is decoded at a time, then only its
    bounding box is polygonised.
    """
    from rasterio.features import shapes

    m = mask_utils.decode(rle)
    ys, xs = np.nonzero(m.any(axis=1)), np.nonzero(m.any(axis=0))
    if not ys[0].size:
        return None
    y0, y1, x0, x1 = int(ys[0][0]), int(ys[0][-1]) + 1, int(xs[0][0]), int(xs[0][-1]) + 1
    crop = np.ascontiguousarray(m[y0:y1, x0:x1])
    from affine import Affine

    polys = [shapely.geometry.shape(g) for g, v in shapes(crop, mask=crop > 0, transform=Affine.translation(x0, y0))
             if v]
    return shapely.union_all(polys) if len(polys) > 1 else polys[0]


# --------------------------------------------------------------------------- to image pixels


def to_pixels(features: VectorFeatures, info: ImageInfo) -> np.ndarray:
    """The features' geometries in ``info``'s image pixels (x = column, y = row from the top-left corner).

    Pixel-space files (QuPath, COCO) and files over an image without georeference are in
    level-0 pixels: divided by the grid's scale (level-0 pixels per pixel: :attr:`ImageInfo.grid`).
    Otherwise the file's CRS (none = the image's) is reprojected to the image's CRS, and the
    inverse of the image's affine transform gives pixels.
    """
    geoms = features.geoms
    if not len(geoms):
        return geoms
    if features.pixel_space or info.transform is None:
        scale = info.grid.scale
        return geoms if scale == 1.0 else shapely.transform(geoms, lambda xy: xy / scale)
    from affine import Affine

    inverse = ~Affine(*info.transform[:6])
    m = np.array([[inverse.a, inverse.b], [inverse.d, inverse.e]])
    offset = np.array([inverse.c, inverse.f])
    project = _projector(features, info)

    def to_px(xy: np.ndarray) -> np.ndarray:
        if project is not None:
            xy = np.column_stack(project(xy[:, 0], xy[:, 1]))
        return xy @ m.T + offset

    out = shapely.transform(geoms, to_px)
    bad = ~np.isfinite(shapely.bounds(out)).all(axis=1) & ~shapely.is_empty(out) & (out != None)  # noqa: E711
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(features.uri, f"{features.idents[i]} {features.where(i)} cannot be placed on "
                                         f"{info.uri}: it lies outside the area where its CRS maps to the image's")
    return out


def _projector(features: VectorFeatures, info: ImageInfo):
    from pyproj import CRS, Transformer

    if features.crs_wkt is None or info.crs_wkt is None:
        if features.crs_wkt is None and info.crs_wkt is not None:
            log.info("%s: no CRS written; read in the image's CRS", features.uri)
        return None
    src, dst = CRS.from_wkt(features.crs_wkt), CRS.from_wkt(info.crs_wkt)
    if src.equals(dst, ignore_axis_order=True):
        return None
    return Transformer.from_crs(src, dst, always_xy=True).transform
