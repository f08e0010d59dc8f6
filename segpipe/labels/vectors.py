"""Reading label files: features (geometry, class, name) from any vector format, into image pixels.

Formats (:func:`read_vector_file`):

* everything pyogrio reads — GeoPackage (a layer by name: ``layer=``), GeoJSON, Shapefile,
  FlatGeobuf, … — and GeoParquet (read with pyarrow: the GeoParquet ``geo`` metadata);
* QuPath GeoJSON (0.4: a bare list of features with ``properties.classification``; 0.5 and
  0.6: a FeatureCollection with ``properties.objectType``; annotations, detections and cells),
  in level-0 pixels;
* COCO JSON (polygons and RLE, decoded through pycocotools), in pixels.

``.json`` and ``.geojson`` files are told apart by content: an object with ``annotations`` and
``categories`` is COCO; a list of features, or features carrying QuPath's ``objectType`` or
``classification``, is QuPath; any other GeoJSON goes through pyogrio (map coordinates).

The class of a feature (:data:`CLASS_FIELDS`): the ``class`` property (a name or an integer id);
else ``class_name`` / ``class_id`` (what ``segpipe export`` writes, so segpipe's own output is a
label file as it is); else QuPath's ``classification.name``; else the COCO category name.

Coordinates (:func:`to_pixels`): a georeferenced image maps the file's CRS to its own (pyproj),
then map coordinates to pixels with its affine; files without a CRS are taken to be in the
image's CRS. QuPath and COCO files, and any file over an image without georeference (photos,
slides), are in pixels; on a slide they are level-0 pixels, scaled to the level read.

Why this module is long: it is the one place where the three families of label files (GIS
vectors, QuPath, COCO) become the same features; splitting it would spread the content sniffing
and the class-column rule that must stay identical for all of them.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

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


def _local_or_bytes(uri: str) -> str | bytes:
    uri = strip_file_scheme(uri)
    if "://" not in uri:
        if not os.path.exists(uri):
            raise DatasetError(uri, "does not exist")
        return uri
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetError(uri, "does not exist") from None


def _read_bytes(src: str | bytes) -> bytes:
    if isinstance(src, bytes):
        return src
    with open(src, "rb") as f:
        return f.read()


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
    for f in feats[:50]:
        props = (f or {}).get("properties") or {}
        if "objectType" in props or isinstance(props.get("classification"), dict):
            return "qupath"
    return "geojson"


def read_vector_file(uri: str, *, layer: str | None = None, image_name: str | None = None) -> VectorFeatures:
    """Features of a label file (see the module docstring for formats and class properties).

    ``layer`` picks a layer of a multi-layer file (default: the only layer, else ``labels``);
    ``image_name`` picks the image of a COCO file that describes several (by ``file_name`` stem).
    Unreadable files raise :class:`DatasetError` naming them.
    """
    src = _local_or_bytes(uri)
    ext = posixpath.splitext(uri.lower())[1]
    if ext in (".json", ".geojson"):
        try:
            data = json.loads(_read_bytes(src))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(uri, f"is not valid JSON ({e})") from None
        kind = sniff_json(data)
        if kind == "coco":
            return _read_coco(uri, data, image_name)
        if kind == "qupath":
            return _read_qupath(uri, data)
    if ext in (".parquet", ".geoparquet"):
        return _read_geoparquet(uri, src)
    return _read_ogr(uri, src, layer)


# --------------------------------------------------------------------------- OGR (pyogrio)


def list_layers(uri: str) -> list[str]:
    """Layer names of a vector file (one for single-layer formats)."""
    import pyogrio

    try:
        return [str(n) for n in pyogrio.list_layers(_local_or_bytes(uri))[:, 0]]
    except Exception as e:  # pyogrio raises DataSourceError and friends, all with a readable message
        raise DatasetError(uri, f"is not a vector file GDAL can read ({e})") from None


def _pick_layer(uri: str, layer: str | None) -> str | None:
    names = list_layers(uri)
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


def _class_column(names: list[str], columns: list[np.ndarray]) -> list[Any]:
    lower = {n.lower(): i for i, n in enumerate(names)}
    for field in CLASS_FIELDS:
        if field in lower:
            col = columns[lower[field]]
            if field == "classification":
                return [_qupath_class_name(v) for v in col]
            return [_plain(v) for v in col]
    return [None] * (len(columns[0]) if columns else 0)


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _read_ogr(uri: str, src: str | bytes, layer: str | None, *, want_layer: str | None = None) -> VectorFeatures:
    from pyogrio.raw import read

    chosen = want_layer if want_layer is not None else _pick_layer(uri, layer)
    if chosen is None:
        return VectorFeatures(uri, np.zeros(0, dtype=object), [], [], None, False, "ogr")
    try:
        meta, fids, wkb, fields = read(src, layer=chosen, return_fids=True)
    except Exception as e:
        raise DatasetError(uri, f"is not a vector file GDAL can read ({e})") from None
    geoms = shapely.from_wkb(wkb) if wkb is not None else np.full(len(fids), None, dtype=object)
    names = [str(n) for n in meta["fields"]]
    classes = _class_column(names, list(fields))
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
    return VectorFeatures(uri, geoms, classes, idents, crs_wkt, False, "ogr")


def read_regions_layer(uri: str) -> VectorFeatures | None:
    """The ``regions`` layer of a multi-layer label file (GeoPackage), or None when it has none."""
    if posixpath.splitext(uri.lower())[1] not in (".gpkg", ".sqlite"):
        return None
    if REGIONS_LAYER not in list_layers(uri):
        return None
    return _read_ogr(uri, _local_or_bytes(uri), None, want_layer=REGIONS_LAYER)


def _crs_wkt(crs: Any) -> str:
    from pyproj import CRS

    return CRS.from_user_input(crs).to_wkt()


def _is_wgs84(wkt: str) -> bool:
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    return crs.is_geographic and crs.equals(CRS.from_epsg(4326), ignore_axis_order=True)


# --------------------------------------------------------------------------- GeoParquet


def _read_geoparquet(uri: str, src: str | bytes) -> VectorFeatures:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(src) if isinstance(src, bytes) else src)
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
    classes = _class_column(names, [np.asarray(table.column(n).to_pylist(), dtype=object) for n in names]) \
        if names else [None] * len(geoms)
    return VectorFeatures(uri, geoms, classes, [_ident(i, None) for i in range(len(geoms))], crs_wkt, False, "ogr")


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


def _read_qupath(uri: str, data: Any) -> VectorFeatures:
    if isinstance(data, dict):
        feats = data.get("features", []) if data.get("type") == "FeatureCollection" else [data]
    else:
        feats = data
    geoms, classes, idents = [], [], []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise DatasetError(uri, f"feature {i} is not a GeoJSON object")
        props = f.get("properties") or {}
        g = f.get("geometry")
        try:
            geoms.append(shapely.geometry.shape(g) if g else None)
        except (shapely.errors.GEOSException, ValueError, TypeError, AttributeError, KeyError) as e:
            raise DatasetError(uri, f"{_ident(i, f.get('id'))}: unreadable geometry ({e})") from None
        cls = props.get("classification")
        classes.append(_qupath_class_name(cls) if cls is not None else _plain_class(props))
        # QuPath 0.4 writes the object type as id ("PathAnnotationObject"); 0.5+ a UUID
        idents.append(_ident(i, f.get("id")))
    return VectorFeatures(uri, _objects(geoms), classes, idents, None, True, "qupath")


def _plain_class(props: dict[str, Any]) -> Any:
    for field in CLASS_FIELDS[:3]:
        if props.get(field) is not None:
            return props[field]
    return None


# --------------------------------------------------------------------------- COCO


def _read_coco(uri: str, data: dict[str, Any], image_name: str | None) -> VectorFeatures:
    from pycocotools import mask as mask_utils

    images = data.get("images") or []
    cats = {c["id"]: c.get("name") for c in data.get("categories") or []}
    anns = data.get("annotations") or []
    if len(images) > 1:
        stem = posixpath.basename(image_name) if image_name else None
        match = [im for im in images if stem is not None
                 and posixpath.splitext(posixpath.basename(str(im.get("file_name", ""))))[0] == stem]
        if len(match) != 1:
            raise DatasetError(uri, f"describes {len(images)} images and none (or several) has the file name "
                                    f"{stem!r}: keep one COCO file per image, or name the image by file_name")
        anns = [a for a in anns if a.get("image_id") == match[0].get("id")]
    image = images[0] if len(images) == 1 else None
    geoms, classes, idents = [], [], []
    for i, a in enumerate(anns):
        ident = _ident(i, a.get("id"))
        seg = a.get("segmentation")
        cat = a.get("category_id")
        if cat not in cats:
            raise DatasetError(uri, f"annotation {ident}: category_id {cat!r} is not in categories")
        classes.append(cats[cat])
        idents.append(ident)
        if isinstance(seg, list):  # polygons: [[x, y, x, y, …], …], one list per part, no holes
            parts = [shapely.Polygon(np.asarray(p, dtype=np.float64).reshape(-1, 2))
                     for p in seg if len(p) >= 6]
            geoms.append(shapely.MultiPolygon(parts) if len(parts) > 1 else parts[0] if parts else None)
        elif isinstance(seg, dict):
            h, w = seg.get("size", [image.get("height"), image.get("width")] if image else [None, None])
            if isinstance(seg.get("counts"), list):  # uncompressed RLE
                seg = mask_utils.frPyObjects(seg, h, w)
            geoms.append(_rle_polygons(mask_utils, seg))
        else:
            raise DatasetError(uri, f"annotation {ident}: segmentation is neither polygons nor RLE")
    return VectorFeatures(uri, _objects(geoms), classes, idents, None, True, "coco")


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
