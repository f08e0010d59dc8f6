"""A segpipe output as an ``xarray.DataArray`` in one call: :func:`open_output`.

``open_output(uri, level)`` opens any pyramid level of a Zarr output lazily (a dask array
over the Zarr chunks, nothing read until asked) with

* dims ``(y, x)`` and 1-D ``x``/``y`` coordinates of pixel **centres**:
  ``x_j = c + a·f·(j + ½)``, ``y_i = f₀ + e·f·(i + ½)`` for the affine ``(a, b, c, d, e, f₀)``
  of level 0 (``segpipe.transform``, rasterio order) and the level's downsampling factor
  ``f`` (from the NGFF ``multiscales[0].datasets[level]`` scale relative to level 0; the
  array shape ratio when the NGFF metadata is missing). A level-``L`` pixel covers
  ``f × f`` level-0 pixels, so this equals rasterio's ``xy(transform * Affine.scale(f), i, j)``;
* georeferenced outputs: the CRS attached the way rioxarray (and GDAL's netCDF driver) read it,
  a scalar coordinate ``spatial_ref`` with attrs ``crs_wkt``, ``spatial_ref`` (both the WKT)
  and ``GeoTransform`` (GDAL order ``"c a b f d e"``, of this level), and
  ``encoding["grid_mapping"] = "spatial_ref"`` (where rioxarray ≥ 0.15 and xarray's CF
  decoding keep it; writing with ``to_netcdf``/``to_zarr`` turns it into the CF attribute);
* photos (no georeference): the identity transform, coordinates in level-0 pixels
  (pixel ``(0, 0)`` covers ``[0, 1)²``, centre ``0.5``), coordinate attrs ``units: "pixel"``;
* slides with a known resolution: the same in micrometres (``mpp`` per pixel),
  coordinate attrs ``units: "micrometre"``;
* attrs: ``classes``, ``class_colors`` (one ``#rrggbb`` per class, filled by
  :func:`segpipe.core.classes.class_colors` as every other output does), ``nodata`` and
  ``_FillValue`` = the nodata label (255 / 65,535; rioxarray's ``rio.nodata`` reads
  ``_FillValue``), CF ``flag_values``/``flag_meanings``, ``level`` and ``downsample``.

The values stay raw class ids (no masking to NaN): use ``da.where(da != da.attrs["nodata"])``
when a float array with NaN is wanted.

Why not ``xr.open_zarr(output)``: the root group holds every pyramid level as an array with
the same dimension names ``(y, x)`` but other sizes, and xarray puts all arrays of a group in
one Dataset, so it fails with "conflicting sizes for dimension 'y'". ``group="0"`` fails as well
(``0`` is an array, not a group). Plain xarray works with
``xr.open_zarr(output, drop_variables=[every array but one])``, without coordinates or CRS;
see ``docs/viewers.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.core.classes import nodata_label
from segpipe.core.errors import OutputError
from segpipe.io.meta import level_factors, level_path, ngff, open_output_group, output_meta
from segpipe.io.storage import strip_file_scheme

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger("segpipe.io.xarray")

#: name of the scalar coordinate that carries the CRS (rioxarray's default)
GRID_MAPPING = "spatial_ref"


def _linear_units(crs_wkt: str) -> str | None:
    try:
        from rasterio.crs import CRS

        crs = CRS.from_wkt(crs_wkt)
        if crs.is_geographic:
            return "degrees"
        return crs.linear_units or None
    except Exception:  # noqa: BLE001 - units are informative only
        return None


def _centres(offset: float, step: float, n: int) -> np.ndarray:
    return offset + step * (np.arange(n, dtype=np.float64) + 0.5)


def _flag_meanings(classes: Sequence[str]) -> str:
    # CF: blank-separated words; blanks inside a name become underscores
    return " ".join("_".join(str(n).split()) or f"class_{i}" for i, n in enumerate(classes))


def open_output(uri: str, level: int = 0, *, storage_options: dict[str, Any] | None = None) -> xr.DataArray:
    """Pyramid ``level`` of the segpipe output at ``uri`` as a lazy ``(y, x)`` DataArray.

    Coordinates are pixel centres in the output's CRS (georeferenced sources), micrometres
    (slides with a known resolution) or level-0 pixels (other images); see the module
    docstring for the attributes. ``storage_options`` go to fsspec for remote URLs
    (``s3://…``). Raises :class:`~segpipe.core.errors.OutputError` when ``uri`` is no segpipe
    output or has no such level; an output whose run has not completed opens with a warning.
    """
    try:
        import xarray as xr
    except ImportError:
        raise ImportError("segpipe.io.xarray.open_output needs xarray: pip install xarray") from None
    import dask.array as da

    path = strip_file_scheme(uri).rstrip("/")
    group = open_output_group(uri, storage_options)
    attrs = dict(group.attrs)
    seg = dict(attrs.get("segpipe") or {})
    if not seg:
        raise OutputError(uri, "is not a segpipe output (no 'segpipe' attributes)")
    if seg.get("status") != "complete":
        log.warning("%s: the run that writes this output has not completed (status %r); unwritten chunks "
                    "read as the fill value", uri, seg.get("status"))
    if isinstance(level, bool) or not isinstance(level, int):
        raise OutputError(uri, f"level must be an integer, got {level!r}")
    array_path = level_path(group, attrs, level, uri)
    try:
        arr = group[array_path]
    except KeyError:
        raise OutputError(uri, f"lists pyramid level {level} at {array_path!r}, which is missing") from None
    fy, fx = level_factors(group, attrs, array_path)
    height, width = arr.shape[-2:]
    data = da.from_zarr(arr)

    meta = output_meta(uri, group)  # the one parser of classes, colours, nodata and georeference
    classes = [str(c) for c in meta.classes]
    n = len(classes)
    colors = list(meta.class_colors) if n else []
    nodata = meta.nodata if meta.nodata is not None else (nodata_label(n) if n else None)
    crs_wkt = meta.crs_wkt
    transform = meta.transform
    mpp = meta.mpp
    if transform:
        a, b, c, d, e, f = (float(v) for v in transform[:6])
        units = _linear_units(crs_wkt) if crs_wkt else None
    elif mpp:
        a, b, c, d, e, f = float(mpp), 0.0, 0.0, 0.0, float(mpp), 0.0
        units = "micrometre"
    else:
        a, b, c, d, e, f = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0
        units = "pixel"
    # this level's affine: level-0 affine × scale(fx, fy)
    la, lb, ld, le = a * fx, b * fy, d * fx, e * fy

    coords: dict[str, Any] = {}
    if b == 0 and d == 0:
        coord_attrs = {"units": units} if units else {}
        if crs_wkt:
            x_attrs = {**coord_attrs, "axis": "X", "standard_name": "projection_x_coordinate"}
            y_attrs = {**coord_attrs, "axis": "Y", "standard_name": "projection_y_coordinate"}
            if units == "degrees":
                x_attrs.update(standard_name="longitude", units="degrees_east")
                y_attrs.update(standard_name="latitude", units="degrees_north")
        else:
            x_attrs, y_attrs = {**coord_attrs, "axis": "X"}, {**coord_attrs, "axis": "Y"}
        coords["x"] = ("x", _centres(c, la, width), {**x_attrs, "long_name": "x of pixel centre"})
        coords["y"] = ("y", _centres(f, le, height), {**y_attrs, "long_name": "y of pixel centre"})
    else:  # a rotated grid has no 1-D coordinates; GeoTransform carries it
        log.info("%s: rotated transform; no 1-D x/y coordinates (see spatial_ref.GeoTransform)", uri)
    if crs_wkt:
        geotransform = " ".join(repr(float(v)) for v in (c, la, lb, f, ld, le))
        coords[GRID_MAPPING] = ((), np.int64(0), {"crs_wkt": crs_wkt, "spatial_ref": crs_wkt,
                                                  "GeoTransform": geotransform})

    multiscales = ngff(attrs).get("multiscales") or [{}]
    name = multiscales[0].get("name") or str(seg.get("source", "labels")).rstrip("/").rsplit("/", 1)[-1]
    out_attrs: dict[str, Any] = {
        "long_name": "class id",
        "classes": classes,
        "class_colors": colors,
        "flag_values": list(range(n)),
        "flag_meanings": _flag_meanings(classes),
        "level": level,
        "downsample": [fy, fx],
        "source": seg.get("source"),
        "status": seg.get("status"),
    }
    if nodata is not None:
        out_attrs["nodata"] = nodata
        out_attrs["_FillValue"] = nodata
    if mpp and not transform:
        out_attrs["mpp"] = float(mpp) * math.sqrt(fx * fy)
    if not crs_wkt:
        out_attrs["transform"] = [la, lb, c, ld, le, f]  # the affine these coordinates follow
    da_out = xr.DataArray(data, dims=("y", "x"), coords=coords, name=name, attrs=out_attrs)
    if crs_wkt:
        da_out.encoding["grid_mapping"] = GRID_MAPPING
    da_out.encoding["source"] = f"{path}/{array_path}"
    return da_out
