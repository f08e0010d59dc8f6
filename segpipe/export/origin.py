"""What a GeoPackage export carries about the model output its polygons were made from.

Annotators correct segpipe's polygons and the corrected file comes back as training labels; a
retrain then compares it with the model's labels it started from (:mod:`segpipe.evaluate.corrections`).
For that comparison to stay true, a GeoPackage export (``.gpkg``) carries two things:

* **Layer metadata** (GDAL's ``gpkg_metadata``; QGIS shows it under the layer's properties): the
  output's fully qualified URI (:data:`ORIGIN_KEY`; an absolute path for local outputs, so a retrain
  started from any folder finds it), the model's URI and weights sha256, the source image and its
  fingerprint, the output's settings key and run id (:func:`origin_metadata`).
* **The model's labels themselves** (:func:`embed_baseline`): the output's root ``zarr.json`` and its
  full-resolution class-id array ``0``, compressed chunks copied byte for byte, one row per Zarr key
  in the table :data:`BASELINE_TABLE`. :func:`extract_baseline` turns them back into a Zarr output
  that reads exactly as the output did when the polygons were made.

Why the file carries the labels rather than pointing at the output: the nightly run recomputes an
output in place when the champion or the image changes, annotators take days or weeks, and the
corrected file is copied (to ``DATA/labels/``, to a laptop, to a bucket). A pointer alone would then
name an output that now holds another model's labels; the copy in the file does not change. It
costs the output's level 0 compressed (class ids compress well: see docs/labels.md for figures).

The table is kept out of GIS layer lists: it is not registered in ``gpkg_contents`` and the file
declares GDAL's ``gdal_aspatial`` extension, with which GDAL (and so QGIS, which reads GeoPackages
through GDAL) lists only registered tables — annotators see the ``segments`` layer alone. Editing the
layer in place (QGIS: Toggle Editing, then Save Layer Edits) keeps the table and the metadata; "Save
Features As…" writes a new file with neither — still recognisable by segpipe's columns
(:data:`OUTPUT_FIELDS`, :attr:`RecordedOrigin.has_output_schema`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from segpipe.core.errors import InputError
from segpipe.io.output import read_attrs
from segpipe.io.storage import absolute_uri, filesystem, has_scheme, join, strip_file_scheme

#: GeoPackage layer metadata: the fully qualified URI of the output the polygons were exported from
ORIGIN_KEY = "segpipe_output"
#: the rest of the record (see :func:`origin_metadata`)
MODEL_KEY, WEIGHTS_KEY = "segpipe_model", "segpipe_weights_sha256"
SOURCE_KEY, SOURCE_FINGERPRINT_KEY = "segpipe_source", "segpipe_source_fingerprint"
SETTINGS_KEY, RUN_KEY = "segpipe_settings_key", "segpipe_run_id"
#: the attribute columns every vector export writes (segpipe's output schema)
OUTPUT_FIELDS = ("class_id", "class_name", "area")
#: where a GeoPackage export keeps the model's labels (one row per Zarr key of the output's root and level 0)
BASELINE_TABLE = "segpipe_baseline"
#: GeoPackage version written: GDAL 3.6 / QGIS 3.22 LTR warn that 1.4 "may only be partially supported"
GPKG_VERSION = "1.2"

_ASPATIAL = ("gdal_aspatial", "http://gdal.org/geopackage_aspatial.html")


def origin_metadata(zarr_uri: str) -> dict[str, str]:
    """The layer metadata a GeoPackage export of ``zarr_uri`` records (its provenance: output, model, source)."""
    seg = (read_attrs(zarr_uri) or {}).get("segpipe") or {}
    model = seg.get("model") or {}
    record = {ORIGIN_KEY: absolute_uri(zarr_uri), "segpipe_origin": "model output",
              SOURCE_KEY: seg.get("source") or "", SOURCE_FINGERPRINT_KEY: seg.get("source_fingerprint") or "",
              MODEL_KEY: model.get("uri") or "", WEIGHTS_KEY: model.get("weights_sha256") or "",
              SETTINGS_KEY: seg.get("settings_key") or "", RUN_KEY: seg.get("run_id") or ""}
    return {k: str(v) for k, v in record.items()}


def embed_baseline(gpkg_path: str, zarr_uri: str) -> int:
    """Copy ``zarr_uri``'s root metadata and class-id array ``0`` into the local GeoPackage ``gpkg_path``.

    Chunks are copied as stored (compressed bytes, one at a time: never the whole array in memory).
    The root ``zarr.json`` loses its consolidated metadata, which lists arrays the copy does not hold.
    Returns the bytes stored.
    """
    fs, root = filesystem(strip_file_scheme(zarr_uri).rstrip("/"))
    meta = json.loads(fs.cat_file(join(root, "zarr.json")))
    meta.pop("consolidated_metadata", None)
    keys = sorted(p[len(root) + 1:] for p in fs.find(join(root, "0")))
    stored = 0
    with contextlib.closing(sqlite3.connect(gpkg_path)) as db, db:
        db.execute(f"DROP TABLE IF EXISTS {BASELINE_TABLE}")
        db.execute(f"CREATE TABLE {BASELINE_TABLE} (key TEXT PRIMARY KEY NOT NULL, data BLOB NOT NULL)")
        rows = [("zarr.json", json.dumps(meta).encode())]
        for key in keys:
            rows.append((key, fs.cat_file(join(root, key))))
            if len(rows) >= 256:  # a few MB per insert batch
                stored += _insert(db, rows)
                rows = []
        stored += _insert(db, rows)
        if db.execute("SELECT 1 FROM gpkg_extensions WHERE extension_name = ?", (_ASPATIAL[0],)).fetchone() is None:
            # GDAL then lists only tables registered in gpkg_contents: the copy is no layer in QGIS
            db.execute("INSERT INTO gpkg_extensions (table_name, column_name, extension_name, definition, scope) "
                       "VALUES (NULL, NULL, ?, ?, 'read-write')", _ASPATIAL)
    return stored


def _insert(db: sqlite3.Connection, rows: list[tuple[str, bytes]]) -> int:
    db.executemany(f"INSERT INTO {BASELINE_TABLE} (key, data) VALUES (?, ?)", rows)
    return sum(len(d) for _, d in rows)


@dataclass(frozen=True)
class RecordedOrigin:
    """What a labels file says about where it came from."""

    uri: str
    #: segpipe's layer metadata (empty: none, e.g. after QGIS "Save Features As…")
    metadata: dict[str, str] = field(default_factory=dict)
    #: the attribute columns of its layers (all layers but ``regions``)
    fields: tuple[str, ...] = ()
    #: the file holds the model's labels (:data:`BASELINE_TABLE`)
    carries_baseline: bool = False

    @property
    def output(self) -> str | None:
        """The output URI the export recorded (None: no record)."""
        return self.metadata.get(ORIGIN_KEY) or None

    @property
    def has_output_schema(self) -> bool:
        """Its columns are those segpipe's vector exports write: a model export, edited or not."""
        return set(OUTPUT_FIELDS) <= {f.lower() for f in self.fields}


@contextlib.contextmanager
def _local_file(uri: str) -> Iterator[str]:
    """A local path of ``uri``: the file itself, or a temporary download of a remote one."""
    if not has_scheme(uri):
        yield strip_file_scheme(uri)
        return
    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="segpipe-labels-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        fs.get_file(path, local)
        yield local


def read_origin(labels_uri: str) -> RecordedOrigin:
    """The origin record of a vector labels file; a file GDAL cannot read records nothing."""
    import warnings

    import pyogrio

    ext = os.path.splitext(labels_uri.lower())[1]
    if ext in (".parquet", ".geoparquet"):
        return RecordedOrigin(labels_uri, fields=_parquet_fields(labels_uri))
    with _local_file(labels_uri) as local:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layers = [str(n) for n in pyogrio.list_layers(local)[:, 0] if str(n) != "regions"]
                infos = [pyogrio.read_info(local, layer=n) for n in layers]
        except Exception:  # noqa: BLE001 - QuPath lists, COCO, broken files: read (and refused) as labels elsewhere
            return RecordedOrigin(labels_uri)
        metadata: dict[str, str] = {}
        names: list[str] = []
        for info in infos:
            names += [str(f) for f in info.get("fields", [])]
            layer_meta = info.get("layer_metadata") or {}
            if ORIGIN_KEY in layer_meta and not metadata:
                metadata = {str(k): str(v) for k, v in layer_meta.items()}
        carries = ext == ".gpkg" and _has_baseline(local)
    return RecordedOrigin(labels_uri, metadata, tuple(names), carries)


def _parquet_fields(uri: str) -> tuple[str, ...]:
    try:
        import pyarrow.parquet as pq

        fs, path = filesystem(strip_file_scheme(uri))
        with fs.open(path, "rb") as f:
            return tuple(pq.read_schema(f).names)
    except Exception:  # noqa: BLE001 - unreadable: refused as labels elsewhere
        return ()


def _has_baseline(local: str) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{local}?mode=ro", uri=True)) as db:
            return db.execute(f"SELECT 1 FROM {BASELINE_TABLE} WHERE key = 'zarr.json'").fetchone() is not None
    except sqlite3.Error:
        return False


def extract_baseline(labels_uri: str, folder: str) -> str:
    """Write the model's labels that ``labels_uri`` carries as a Zarr output under ``folder``; returns its path.

    The output reads as the exported one did: same root attributes (provenance, grid, classes), same
    chunks. Streamed row by row. :class:`InputError` when the file carries none.
    """
    out = os.path.join(folder, "baseline.zarr")
    with _local_file(labels_uri) as local:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{local}?mode=ro", uri=True)) as db:
                found = 0
                for key, data in db.execute(f"SELECT key, data FROM {BASELINE_TABLE}"):
                    path = os.path.normpath(os.path.join(out, key))
                    if not path.startswith(out + os.sep):  # a key is a Zarr key, never a way out of the folder
                        raise InputError(labels_uri, f"holds a bad baseline key {key!r}")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
                    found += 1
        except sqlite3.Error as e:
            raise InputError(labels_uri, f"carries no readable model labels ({e})") from None
    if not found:
        raise InputError(labels_uri, "carries no model labels")
    return out


def describe_model(seg: dict[str, Any]) -> str:
    """``REG/v2 (weights 1a2b3c4d5e6f)`` from an output's ``segpipe`` attributes."""
    model = seg.get("model") or {}
    return f"{model.get('uri') or '?'} (weights {str(model.get('weights_sha256') or '?')[:12]})"
