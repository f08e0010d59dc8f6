"""Exports of a finished output: Cloud-Optimized GeoTIFF, polygons, PNG preview, confidence COG.

Every export streams the Zarr output window by window; none holds the whole raster. One
class table everywhere (:mod:`segpipe.core.classes`): the COG's colour table and style
sidecars, the vectors' class names and QuPath classifications and the preview legend all
come from the output's ``classes``/``class_colors``. The **nodata label**
(``segpipe.nodata_label``) is the COG's NoData, transparent in its colour table and in the
preview, and never becomes a polygon.

Where things are:

* :mod:`~segpipe.export.meta` — reading an output's metadata (:func:`read_output_meta`),
  level factors, the level-0 mapping of whole-slide outputs;
* :mod:`~segpipe.export.cog` — class-id COG (:func:`export_cog`) and confidence COG
  (:func:`export_confidence`): windowed writing, overviews;
* :mod:`~segpipe.export.style` — QGIS ``.qml``, GDAL PAM ``.aux.xml`` class table, the
  label → RGBA lookup table;
* :mod:`~segpipe.export.vectors` — polygons (:func:`export_vectors`), sieve, formats by
  extension, GeoParquet, QuPath properties;
* :mod:`~segpipe.export.preview` — PNG preview and legend (:func:`export_preview`);
* :mod:`~segpipe.export.targets` — writing to a local path or uploading to a remote one;
* this package — :class:`Exports` and :func:`write_exports`, the exports written next to an
  output after segmentation.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from segpipe.export.cog import export_cog, export_confidence
from segpipe.export.meta import read_output_meta
from segpipe.export.preview import export_preview
from segpipe.export.vectors import export_vectors, vector_driver
from segpipe.io.output import now_iso
from segpipe.io.storage import file_version, filesystem, strip_file_scheme, write_atomic

__all__ = [
    "Exports", "export_cog", "export_confidence", "export_is_whole", "export_preview", "export_vectors",
    "read_output_meta", "write_exports",
]


@dataclass(frozen=True)
class Exports:
    """Which exports to write next to an output (``OUT/name.zarr`` → ``OUT/name.tif|.gpkg|.png``)."""

    cog: bool = False
    #: vector format = file extension without the dot: gpkg, geojson, json, shp, fgb or parquet
    vector: str | None = None
    preview: bool = False
    min_area: float = 0.0
    #: a STAC item per output and a collection per output folder (:mod:`segpipe.export.stac`)
    stac: bool = False

    def __post_init__(self) -> None:
        if self.vector:
            object.__setattr__(self, "vector", self.vector.lower().lstrip("."))
            vector_driver("x." + self.vector)  # a one-line ConfigError for an unknown format

    def __bool__(self) -> bool:
        return bool(self.cog or self.vector or self.preview or self.stac)


def export_is_whole(kind: str, path: str, zarr_uri: str) -> bool:
    """Whether an existing export at ``path`` can be kept: it opens and its last bytes are there.

    A crash or a full disk while writing leaves a truncated file under the export's own name (the COG
    copy writes in place); keeping it would hand users a file that GIS tools fail on. Cheap checks that
    truncation cannot pass: a COG has the output's size and its last full-resolution block (the last data
    in a COG) decodes; a PNG passes Pillow's ``verify`` (every chunk's CRC); a vector file opens and
    counts its features.
    """
    import warnings

    try:
        if kind == "cog":
            import rasterio
            from rasterio.windows import Window as RWindow

            from segpipe.io.readers.raster import gdal_options, gdal_path

            meta = read_output_meta(zarr_uri)
            with warnings.catch_warnings(), rasterio.Env(**gdal_options()):
                warnings.simplefilter("ignore")
                with rasterio.open(gdal_path(path)) as ds:
                    if (ds.height, ds.width) != (meta.height, meta.width):
                        return False
                    bh, bw = ds.block_shapes[0]
                    y0, x0 = (ds.height - 1) // bh * bh, (ds.width - 1) // bw * bw
                    ds.read(1, window=RWindow(x0, y0, ds.width - x0, ds.height - y0))
            return True
        if kind == "preview":
            from PIL import Image

            fs, p = filesystem(strip_file_scheme(path))
            with fs.open(p, "rb") as f, Image.open(f) as img:
                img.verify()
            return True
        import pyogrio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pyogrio.read_info(strip_file_scheme(path), force_feature_count=True)
        return True
    except Exception:  # noqa: BLE001 - any failure to read it back means: write it again
        return False


def _written_record(path: str) -> str:
    folder, name = posixpath.split(strip_file_scheme(path))
    return posixpath.join(folder, f".{name}.segpipe.json")


def edited_since_written(path: str) -> bool:
    """True when the export at ``path`` changed after segpipe wrote it (an annotator corrected the polygons
    in place, someone restyled the COG): its version differs from the one recorded when it was written.
    Exports written before the record existed cannot tell, and count as not edited."""
    fs, rec = filesystem(_written_record(path))
    try:
        recorded = json.loads(fs.cat_file(rec)).get("version")
    except (FileNotFoundError, ValueError):
        return False
    return recorded is not None and recorded != file_version(path)


def _record_written(path: str) -> None:
    fs, rec = filesystem(_written_record(path))
    write_atomic(fs, rec, json.dumps({"version": file_version(path), "written": now_iso()}).encode(), durable=False)


def write_exports(zarr_uri: str, source: str | None, exports: Exports, *, recompute: bool = True,
                  notes: list[str] | None = None) -> dict[str, str]:
    """Write the requested exports next to a complete output; existing files are kept unless ``recompute``,
    and only when they read back whole (:func:`export_is_whole`).

    An export that changed after segpipe wrote it (:func:`edited_since_written`: people correct the
    GeoPackage in place) is never replaced: the new one is written as ``<name>.new.<ext>`` beside it, and
    a line in ``notes`` says so.

    Returns the written paths by kind: ``cog`` (plus its sidecars ``cog_style`` = the .qml and
    ``cog_aux`` = the .aux.xml), ``vector``, ``preview``.
    """
    if not exports:
        return {}
    stem = zarr_uri.removesuffix(".zarr")
    done: dict[str, str] = {}
    jobs = []
    if exports.cog:
        jobs.append(("cog", stem + ".tif", lambda p: export_cog(zarr_uri, p)))
    if exports.vector:
        jobs.append(("vector", f"{stem}.{exports.vector}",
                     lambda p: export_vectors(zarr_uri, p, min_area=exports.min_area)))
    if exports.preview:
        jobs.append(("preview", stem + ".png", lambda p: export_preview(zarr_uri, p, source=source)))
    for name, path, fn in jobs:
        fs, p = filesystem(strip_file_scheme(path))
        exists = fs.exists(p)
        # a file that no longer reads back whole was cut short while written (a crash), not edited: rewritten
        if exists and edited_since_written(path) and export_is_whole(name, path, zarr_uri):
            stem_, ext = posixpath.splitext(path)
            kept, path = path, f"{stem_}.new{ext}"
            if notes is not None:
                notes.append(f"{kept}: changed since segpipe wrote it (edited?): kept; the new export is {path}")
            exists = fs.exists(strip_file_scheme(path))
        if recompute or not exists or not export_is_whole(name, path, zarr_uri):
            fn(path)
            _record_written(path)
        done[name] = path
        if name == "cog":
            done["cog_style"], done["cog_aux"] = path.removesuffix(".tif") + ".qml", path + ".aux.xml"
    return done
