"""Vector exports: one polygon per 4-connected class region (:func:`export_vectors`).

Blocks are polygonised one by one in pixel coordinates (exact integers); polygons that
touch an internal block seam are merged across it with a row sweep (see
:func:`export_vectors`), so no polygon is cut at a chunk border and only the pieces still
open at the current block row are held. Optionally regions under a size are sieved away
first (:func:`sieve_block`).

This module owns the formats by extension (:func:`vector_driver`: GeoPackage, GeoJSON,
Shapefile, FlatGeobuf, GeoParquet written with pyarrow) and the feature attributes: class
id and name from the output's class table, area, and QuPath's classification in pixel-space
GeoJSON. Whole-slide outputs are written in the slide's level-0 pixel coordinates
(:func:`segpipe.export.meta.level0_mapping`). The nodata label never becomes a polygon.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.geometry import ChunkGrid
from segpipe.export.meta import (
    OutputMeta,
    level0_mapping,
    level_factor,
    level_georef,
    open_group,
    read_output_meta,
)
from segpipe.export.origin import GPKG_VERSION, OUTPUT_FIELDS, embed_baseline, origin_metadata
from segpipe.export.targets import local_target, output_stem, remove_quietly

#: polygons buffered before they are appended to the vector file
_FEATURES_PER_WRITE = 2_000

#: vector formats by extension → OGR driver ("Parquet": GeoParquet written with pyarrow)
_VECTOR_DRIVERS = {
    ".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile",
    ".fgb": "FlatGeobuf", ".parquet": "Parquet",
}
VECTOR_EXTENSIONS = tuple(_VECTOR_DRIVERS)


def vector_driver(path: str) -> str:
    """OGR driver for ``path`` by extension: .gpkg, .geojson/.json, .shp, .fgb, .parquet (GeoParquet)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _VECTOR_DRIVERS:
        raise ConfigError(path, f"unknown vector format {ext!r}; use one of {', '.join(VECTOR_EXTENSIONS)}")
    return _VECTOR_DRIVERS[ext]


def sieve_block(read: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                y0: int, x0: int, h: int, w: int, size: int, nodata: int | None = None) -> np.ndarray:
    """Core ``(y0, x0, h, w)`` of ``rasterio.features.sieve(size)`` applied to core + a margin of ``size + 1``.

    Which pixels are removed is the same as a whole-image sieve: a 4-connected region with
    fewer than ``size`` pixels that touches the core lies within ``size`` pixels of it, and a
    larger region reaching past the margin has ≥ ``size`` pixels inside it. The class a
    removed region takes (GDAL: its largest neighbour) can differ from a whole-image sieve
    when competing neighbours are cut by the margin — a documented approximation.
    Pixels with the ``nodata`` label are masked: they are never removed nor given to a region.
    """
    from rasterio.features import sieve

    m = size + 1
    ya, xa = max(0, y0 - m), max(0, x0 - m)
    yb, xb = min(height, y0 + h + m), min(width, x0 + w + m)
    block = np.ascontiguousarray(read(ya, xa, yb - ya, xb - xa))
    # nodata pixels are neither sieved away nor grown into
    valid = None if nodata is None else block != nodata
    sieved = sieve(block, size=size, connectivity=4, mask=valid)
    return sieved[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]


class _FeatureSink:
    """Buffers (class id, pixel-space polygon) and appends them, transformed, to the vector file.

    GPKG, GeoJSON and Shapefile are appended to in place; FlatGeobuf (whose appends rewrite
    the file) is collected in a temporary GeoPackage and streamed into the .fgb at the end;
    GeoParquet is written row group by row group with pyarrow.
    """

    def __init__(self, path: str, driver: str, meta: OutputMeta, transform: tuple[float, ...], min_area: float,
                 *, qupath: bool = False, clip: tuple[float, float, float, float] | None = None,
                 layer_metadata: dict[str, str] | None = None) -> None:
        self.path, self.driver, self.meta, self.min_area = path, driver, meta, min_area
        self.layer_metadata = layer_metadata
        self.matrix = np.array([[transform[0], transform[1]], [transform[3], transform[4]]])
        self.offset = np.array([transform[2], transform[5]])
        self.qupath = qupath and driver == "GeoJSON"
        self.clip = clip
        self.ids: list[int] = []
        self.geoms: list[Any] = []
        self.written = 0
        self.started = False
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._parquet: Any = None
        self.target = path
        if driver == "FlatGeobuf":
            self._tmpdir = tempfile.TemporaryDirectory(prefix="segpipe-fgb-")
            self.target = os.path.join(self._tmpdir.name, "features.gpkg")
        colors = meta.colors
        self._qupath_class = [
            json.dumps({"name": n, "color": [int(v) for v in colors[i][:3]]}) if i < len(colors) else
            json.dumps({"name": n}) for i, n in enumerate(meta.classes)
        ]

    def add(self, class_id: int, polygon: Any) -> None:
        self.ids.append(class_id)
        self.geoms.append(polygon)
        if len(self.geoms) >= _FEATURES_PER_WRITE:
            self.flush()

    def _clip(self, geoms: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut polygons at the slide's level-0 edge (the last resampled pixels may reach past it)."""
        import shapely

        x0, y0, x1, y1 = self.clip
        b = shapely.bounds(geoms)
        out = (b[:, 2] > x1) | (b[:, 3] > y1) | (b[:, 0] < x0) | (b[:, 1] < y0)
        if not out.any():
            return geoms, ids
        cut = shapely.intersection(geoms[out], shapely.box(x0, y0, x1, y1))
        parts, index = shapely.get_parts(cut, return_index=True)
        keep = (shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)  # 3: Polygon
        return (np.concatenate([geoms[~out], parts[keep]]),
                np.concatenate([ids[~out], ids[out][index[keep]]]))

    def flush(self, final: bool = False) -> None:
        import shapely

        if not self.geoms and (self.started or not final):
            return
        geoms = np.array(self.geoms, dtype=object)
        ids = np.array(self.ids, dtype=np.int32)
        self.geoms, self.ids = [], []
        if len(geoms):
            geoms = shapely.transform(geoms, lambda xy: xy @ self.matrix.T + self.offset)
            if self.clip is not None:
                geoms, ids = self._clip(geoms, ids)
        areas = shapely.area(geoms).astype(np.float64) if len(geoms) else np.zeros(0)
        keep = areas >= self.min_area
        geoms, ids, areas = geoms[keep], ids[keep], areas[keep]
        names = np.array([self.meta.classes[i] if i < len(self.meta.classes) else str(i) for i in ids], dtype=object)
        fields: list[tuple[str, np.ndarray]] = list(zip(OUTPUT_FIELDS, (ids, names, areas), strict=True))
        if self.qupath:
            # QuPath's GeoJSON: objectType + classification {name, color [r, g, b]} (a JSON object:
            # GDAL writes a string field holding a JSON object as that object)
            fields.append(("objectType", np.full(len(ids), "annotation", dtype=object)))
            fields.append(("classification", np.array(
                [self._qupath_class[i] if i < len(self._qupath_class) else json.dumps({"name": str(i)}) for i in ids],
                dtype=object)))
        if self.driver == "Parquet":
            self._write_parquet(geoms, fields)
        else:
            self._write_ogr(geoms, fields)
        self.started = True
        self.written += len(geoms)

    def _write_ogr(self, geoms: np.ndarray, fields: list[tuple[str, np.ndarray]]) -> None:
        import shapely
        from pyogrio.raw import write

        driver = "GPKG" if self.driver == "FlatGeobuf" else self.driver
        options: dict[str, Any] = {}
        if driver == "GPKG":
            options["layer"] = "segments"
            if not self.started:
                options["dataset_options"] = {"VERSION": GPKG_VERSION}
            if self.driver == "GPKG" and not self.started and self.layer_metadata:
                # provenance: polygons made by a model, from this output (segpipe.export.origin); QGIS keeps
                # layer metadata when the layer is edited in place
                options["layer_metadata"] = self.layer_metadata
        if driver == "GeoJSON" and self.qupath:
            options["layer_options"] = {"AUTODETECT_JSON_STRINGS": "YES"}
        if driver == "ESRI Shapefile":
            options["encoding"] = "UTF-8"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
            write(
                self.target, shapely.to_wkb(geoms) if len(geoms) else np.array([], dtype=object),
                field_data=[f for _, f in fields], fields=[n for n, _ in fields],
                crs=self.meta.crs_wkt, geometry_type="Polygon", driver=driver, append=self.started, **options,
            )

    def _write_parquet(self, geoms: np.ndarray, fields: list[tuple[str, np.ndarray]]) -> None:
        import shapely

        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(self.path, "GeoParquet needs pyarrow (pip install pyarrow)") from None
        schema = pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area", pa.float64()),
                            ("geometry", pa.binary())])
        if self._parquet is None:
            crs: Any = None  # GeoParquet: null = no/unknown CRS (pixel coordinates); absent would mean WGS 84
            if self.meta.crs_wkt:
                from rasterio.crs import CRS

                crs = CRS.from_wkt(self.meta.crs_wkt).to_dict(projjson=True)
            geo = {"version": "1.1.0", "primary_column": "geometry",
                   "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
            schema = schema.with_metadata({b"geo": json.dumps(geo).encode()})
            self._parquet = pq.ParquetWriter(self.target, schema, compression="zstd")
        data = dict(fields)
        table = pa.table({
            "class_id": pa.array(data["class_id"], pa.int32()), "class_name": pa.array(data["class_name"], pa.string()),
            "area": pa.array(data["area"], pa.float64()),
            "geometry": pa.array(list(shapely.to_wkb(geoms)) if len(geoms) else [], pa.binary()),
        }, schema=self._parquet.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        """Write what is buffered and finish the file (GeoParquet footer, FlatGeobuf conversion)."""
        self.flush(final=True)
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._tmpdir is not None:
            from pyogrio.raw import open_arrow, write_arrow

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
                with open_arrow(self.target, layer="segments", use_pyarrow=False) as (info, stream):
                    write_arrow(stream, self.path, driver="FlatGeobuf", geometry_type="Polygon",
                                geometry_name=info["geometry_name"] or "geom", crs=self.meta.crs_wkt,
                                layer=output_stem(os.path.basename(self.path)))
            self._tmpdir.cleanup()
            self._tmpdir = None

    def abort(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def export_vectors(
    zarr_uri: str, path: str, *, min_area: float = 0.0, sieve: int = 0, level: str = "0",
    classes: Sequence[int] | None = None, block_size: int | None = None,
) -> int:
    """Polygonise the class ids into one polygon per 4-connected region; returns the feature count.

    The format follows the extension (:func:`vector_driver`): GeoPackage (.gpkg, layer
    ``segments``), GeoJSON (.geojson/.json), Shapefile (.shp), FlatGeobuf (.fgb) or
    GeoParquet (.parquet, needs pyarrow). Attributes ``class_id``, ``class_name``, ``area``
    (in the coordinates' units²). Coordinates:

    * georeferenced output → its CRS;
    * whole-slide output → **level-0 pixels** of the slide, whatever level or mpp was
      segmented (see :func:`level0_mapping`), clipped to the slide's level-0 size;
    * anything else → pixel coordinates (x = column, y = row) of the output.

    In pixel coordinates GeoJSON features also carry QuPath's ``objectType: "annotation"`` and
    ``classification: {name, color: [r, g, b]}``, so the file imports into QuPath as classified
    annotations (GeoJSON has no "no CRS": GIS readers assume WGS 84; prefer .gpkg for GIS).
    The nodata label is never polygonised. A GeoPackage (GPKG 1.2, which GDAL 3.6 / QGIS 3.22 open without a
    warning) records where it came from and carries the model's labels, so a corrected copy can be compared
    with them later (:mod:`segpipe.export.origin`).

    Blocks of ``block_size`` (default: the chunk side) are polygonised in pixel
    coordinates. A polygon that does not touch an internal block seam is complete and
    written at once. The others are merged row by row: after each block row, the open
    pieces of each class are unioned (exact: integer coordinates, and pieces of one class
    share an edge exactly where their pixels are 4-adjacent); merged polygons that do not
    reach the next block row are complete. Only pieces open along one block row are held.

    ``min_area`` drops polygons smaller than it (CRS units²); ``sieve`` > 0 first removes
    regions of fewer than ``sieve`` pixels per block with a margin (see :func:`sieve_block`);
    ``classes`` limits the export to those class ids (None = all classes, background included;
    never the nodata label).
    """
    if min_area < 0 or sieve < 0:
        raise ConfigError("export", f"min_area and sieve must be ≥ 0, got {min_area} and {sieve}")
    driver = vector_driver(path)
    meta = read_output_meta(zarr_uri)
    group = open_group(zarr_uri)
    if level not in group:
        raise InputError(zarr_uri, f"has no level {level!r} (levels: {', '.join(meta.levels)})")
    arr = group[level]
    height, width = arr.shape
    side = block_size or arr.chunks[-1]
    nodata = meta.nodata
    wanted = None if classes is None else np.array(sorted({int(c) for c in classes} - {nodata}))

    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return arr[y0 : y0 + h, x0 : x0 + w]

    factor = level_factor(group, level)
    transform = level_georef(meta, factor)
    clip = None
    if transform is None:
        l0 = level0_mapping(meta)
        scale = factor * (l0.scale if l0 else 1.0)
        transform = (scale, 0.0, 0.0, 0.0, scale, 0.0)
        if l0 is not None and l0.height and l0.width:
            clip = (0.0, 0.0, float(l0.width), float(l0.height))
    qupath = meta.crs_wkt is None and meta.transform is None
    origin = None
    if driver == "GPKG":
        origin = {**origin_metadata(zarr_uri), "segpipe_level": level, "segpipe_min_area": f"{min_area:g}",
                  "segpipe_sieve": str(sieve)}

    with local_target(path, os.path.splitext(path)[1]) as local:
        stem = output_stem(local)
        remove_quietly(local, *(stem + e for e in (".shx", ".dbf", ".prj", ".cpg", ".qix"))
                        if driver == "ESRI Shapefile" else ())
        sink = _FeatureSink(local, driver, meta, transform, float(min_area), qupath=qupath, clip=clip,
                            layer_metadata=origin)
        try:
            _polygonize(sink, read, height, width, side, sieve, wanted, nodata)
            sink.close()
            if driver == "GPKG" and level == "0":
                # the model's labels travel with the polygons: a corrected copy is compared with them, whatever
                # happens to the output later (segpipe.export.origin)
                embed_baseline(local, zarr_uri)
        except BaseException:
            sink.abort()
            raise
    return sink.written


def _polygonize(sink: _FeatureSink, read: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                side: int, sieve: int, wanted: np.ndarray | None, nodata: int | None) -> None:
    """Blocks → polygons in pixel coordinates, merged across block seams row by row (see :func:`export_vectors`)."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    grid = ChunkGrid(height, width, side)
    pending: dict[int, list[Any]] = {}
    for iy in range(grid.rows):
        row_pieces: dict[int, list[Any]] = defaultdict(list)
        row_y0 = iy * side
        row_y1 = min(height, row_y0 + side)
        for ix in range(grid.cols):
            c = grid.chunk(iy, ix)
            if sieve > 0:
                block = sieve_block(read, height, width, c.y0, c.x0, c.h, c.w, sieve, nodata)
            else:
                block = read(c.y0, c.x0, c.h, c.w)
            block = np.ascontiguousarray(block)
            if block.dtype not in (np.uint8, np.uint16, np.int16, np.int32):
                block = block.astype(np.int32)
            mask = None if wanted is None else np.isin(block, wanted)
            if nodata is not None and wanted is None:
                mask = block != nodata
            if mask is not None and not mask.any():
                continue
            y1, x1 = c.y0 + c.h, c.x0 + c.w
            for geom, value in shapes(block, mask=mask, connectivity=4, transform=Affine.translation(c.x0, c.y0)):
                poly = shapely.geometry.shape(geom)
                minx, miny, maxx, maxy = poly.bounds
                open_piece = ((minx == c.x0 and c.x0 > 0) or (maxx == x1 and x1 < width)
                              or (miny == c.y0 and c.y0 > 0) or (maxy == y1 and y1 < height))
                if open_piece:
                    row_pieces[int(value)].append(poly)
                else:
                    sink.add(int(value), poly)
        next_pending: dict[int, list[Any]] = {}
        for cls in sorted(set(pending) | set(row_pieces)):
            merged = shapely.unary_union(pending.get(cls, []) + row_pieces.get(cls, []))
            still_open = []
            for part in shapely.get_parts(merged):
                if row_y1 < height and part.bounds[3] == row_y1:
                    still_open.append(part)
                else:
                    sink.add(cls, part)
            if still_open:
                next_pending[cls] = still_open
        pending = next_pending
