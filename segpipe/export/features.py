"""A small set of polygons with attributes, written at once in the format its extension names.

:func:`segpipe.export.vectors.export_vectors` streams millions of class polygons; this writes a few
hundred features held in memory (suggested regions to label), with any attribute columns, in the same
formats by extension (:func:`segpipe.export.vectors.vector_driver`): GeoPackage, GeoJSON, Shapefile,
FlatGeobuf, and GeoParquet written with pyarrow (this GDAL has no Parquet driver).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError
from segpipe.export.origin import GPKG_VERSION
from segpipe.export.targets import local_target, output_stem, remove_quietly
from segpipe.export.vectors import vector_driver


def write_features(path: str, geoms: Sequence[Any], fields: Mapping[str, Sequence[Any]], crs_wkt: str | None,
                   *, layer: str = "features", json_fields: Sequence[str] = ()) -> None:
    """Write shapely polygons ``geoms`` with attribute columns ``fields`` (name → one value per polygon).

    ``crs_wkt`` None means pixel coordinates (no CRS). Columns named in ``json_fields`` hold JSON
    objects as strings; GeoJSON writes them as objects (QuPath's ``classification``). GeoPackage and
    FlatGeobuf get the layer ``layer``; an existing file at ``path`` is replaced.
    """
    import shapely

    driver = vector_driver(path)
    wkb = np.array(shapely.to_wkb(np.array(geoms, dtype=object)) if len(geoms) else [], dtype=object)
    columns = {name: np.asarray(values, dtype=_column_dtype(values)) for name, values in fields.items()}
    with local_target(path, os.path.splitext(path)[1]) as local:
        remove_quietly(local, *(output_stem(local) + e for e in (".shx", ".dbf", ".prj", ".cpg"))
                        if driver == "ESRI Shapefile" else ())
        if driver == "Parquet":
            _write_geoparquet(local, wkb, columns, crs_wkt)
            return
        from pyogrio.raw import write

        options: dict[str, Any] = {}
        if driver in ("GPKG", "FlatGeobuf"):
            options["layer"] = layer
        if driver == "GPKG":
            options["dataset_options"] = {"VERSION": GPKG_VERSION}
        if driver == "GeoJSON" and json_fields:
            options["layer_options"] = {"AUTODETECT_JSON_STRINGS": "YES"}
        if driver == "ESRI Shapefile":
            options["encoding"] = "UTF-8"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
            write(local, wkb, field_data=list(columns.values()), fields=list(columns), crs=crs_wkt,
                  geometry_type="Polygon", driver=driver, **options)


def _column_dtype(values: Sequence[Any]) -> Any:
    if len(values) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.int64
    if len(values) and all(isinstance(v, (float, int, np.floating, np.integer)) for v in values):
        return np.float64
    return object


def _write_geoparquet(path: str, wkb: np.ndarray, columns: Mapping[str, np.ndarray], crs_wkt: str | None) -> None:
    """GeoParquet 1.1 with pyarrow: WKB ``geometry`` plus the columns; ``crs`` null = pixel coordinates."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(path, "GeoParquet needs pyarrow (pip install pyarrow)") from None
    crs: Any = None  # null = no/unknown CRS; an absent crs would mean WGS 84
    if crs_wkt:
        from rasterio.crs import CRS

        crs = CRS.from_wkt(crs_wkt).to_dict(projjson=True)
    data = {name: pa.array(list(values)) for name, values in columns.items()}
    data["geometry"] = pa.array(list(wkb), pa.binary())
    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
    table = pa.table(data).replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path, compression="zstd")
