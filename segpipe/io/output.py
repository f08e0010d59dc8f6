"""Stitching into Zarr: create an output, write chunks, record completion, finalize.

Each chunk's core *is* one Zarr chunk, so every chunk is written exactly once by exactly
one writer, with no locks and no blending canvas (partial-chunk writes from parallel
writers lose data: measured). This module knows Zarr and never the model.

Completion record: a level-0 chunk exists in the store only once it is completely
written (LocalStore writes a temporary file and renames it; an S3 PUT is atomic), and it
is the last thing written for its chunk (after probabilities). Arrays are created with
``write_empty_chunks=True`` so even an all-background chunk leaves its key. Resuming an
interrupted image therefore lists ``0/c/`` once and computes only the missing chunks.
The root attribute ``segpipe.status`` becomes ``"complete"`` in the last write of a run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.classes import NODATA_NAME, NODATA_RGBA, class_colors, label_dtype, nodata_label, parse_color
from segpipe.core.errors import OutputError
from segpipe.core.geometry import Chunk, ceil_div
from segpipe.io.chunks import MISSING, RawChunks, plain_array_meta
from segpipe.io.storage import (
    filesystem,
    join,
    output_errors,
    storage_error,
    strip_file_scheme,
    write_atomic,
)

log = logging.getLogger("segpipe.io.output")

LEVEL0 = "0"
LEVEL1 = "1"  #: the first pyramid level: created with the output, written by the tile tasks where they can
PROBABILITIES = "probabilities"
FORMAT = "segpipe-output/1"

def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def ome_attrs(name: str, classes: list[str], colors: list[str] | None, mpp: float | None) -> dict[str, Any]:
    """OME-NGFF 0.5 ``multiscales`` for level 0 plus ``image-label`` colours and class names.

    The nodata label (see :mod:`segpipe.core.classes`) is listed with a transparent colour, so
    viewers that read ``image-label`` (napari's OME-Zarr reader) show it as nothing. The
    ``omero`` channel is what napari-ome-zarr 0.10 needs to show a label image visible and
    named after ``name`` (without it: hidden, named ``labels/``; measured, docs/viewers.md);
    it carries no ``window``, which would make napari's Labels layer fail.
    """
    axes: list[dict[str, str]] = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    scale = [1.0, 1.0]
    if mpp:
        axes = [{**a, "unit": "micrometer"} for a in axes]
        scale = [mpp, mpp]
    cols = class_colors(len(classes), colors)
    nodata = nodata_label(len(classes))
    label_colors = [{"label-value": i, "rgba": list(parse_color(c))} for i, c in enumerate(cols)]
    label_colors.append({"label-value": nodata, "rgba": list(NODATA_RGBA)})
    properties = [{"label-value": i, "class": n} for i, n in enumerate(classes)]
    properties.append({"label-value": nodata, "class": NODATA_NAME})
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": axes,
            "datasets": [{"path": LEVEL0, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }],
        "image-label": {
            "version": "0.5",
            "colors": label_colors,
            "properties": properties,
        },
        "omero": {"name": name, "channels": [{"label": "classes", "color": "FFFFFF", "active": True}]},
    }


@dataclass(frozen=True)
class OutputTarget:
    """Where one image's mask goes; small and picklable (it travels with chunk tasks)."""

    uri: str
    height: int
    width: int
    chunk_size: int
    num_classes: int
    probabilities: bool
    run_id: str
    zstd_level: int = 3
    pyramid: bool = True  #: lower-resolution levels are written after level 0

    @property
    def label_dtype(self) -> str:
        return label_dtype(self.num_classes).name

    @property
    def nodata_label(self) -> int:
        return nodata_label(self.num_classes)

    @property
    def has_level1(self) -> bool:
        """Whether the output gets pyramid levels (they stop at about one chunk; see engine.pyramid)."""
        return self.pyramid and max(self.height, self.width) > self.chunk_size


def _open_group(uri: str, mode: str):
    import zarr

    return zarr.open_group(strip_file_scheme(uri), mode=mode, zarr_format=3)


def read_attrs(uri: str) -> dict[str, Any] | None:
    """Root attributes of an existing output, or None when there is none (no group ``zarr.json``, or
    one that is not a Zarr group's JSON).

    A storage fault is raised (:func:`segpipe.io.storage.storage_error`), never read as "no output":
    a bucket's 5xx would otherwise make a run's own output look foreign (refused) or, in
    :func:`finalize`, vanished. Read from the group's ``zarr.json`` directly: one small read, no
    zarr-python group machinery (a large share of a chip's time: docs/benchmarks.md, "Design measurements")."""
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        raw = fs.cat_file(join(path, "zarr.json"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as e:
        raise storage_error(uri, e, "read") from None
    try:
        meta = json.loads(raw)
    except ValueError:  # not JSON: not a segpipe output (whose metadata is replaced atomically)
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    return dict(meta.get("attributes") or {})


def _group_meta(attrs: dict[str, Any]) -> bytes:
    # not indented: json's C encoder only serves compact output, and the provenance is written twice per
    # image (the pure-Python indenting encoder was ~1 ms of a small chip's CPU: docs/benchmarks.md, issue 22)
    return json.dumps({"attributes": attrs, "zarr_format": 3, "consolidated_metadata": None, "node_type": "group"}
                      ).encode()


@dataclass(frozen=True)
class Existing:
    """What is at an output path before a run writes there."""

    kind: str  #: "none" | "file" | "foreign" (not a segpipe output) | "segpipe"
    attrs: dict[str, Any] | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        return dict((self.attrs or {}).get("segpipe") or {})


def inspect_output(uri: str) -> Existing:
    """Classify the path ``uri``: nothing there, a file, something foreign, or a segpipe output."""
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        if not fs.exists(path):
            return Existing("none")
        if not fs.isdir(path):
            return Existing("file")
    except OSError as e:
        raise storage_error(uri, e, "inspected") from None
    attrs = read_attrs(uri)
    if attrs is not None and (attrs.get("segpipe") or {}).get("format") == FORMAT:
        return Existing("segpipe", attrs)
    return Existing("foreign", attrs)


def prepare_output(target: OutputTarget, attrs: dict[str, Any], replace: bool = False) -> None:
    """Create the group and its arrays; status is ``"running"`` until :func:`finalize`.

    ``replace`` removes an existing *segpipe output* first; anything else at the path is
    never touched (checked again here, right before the removal).
    """

    uri = target.uri
    existing = inspect_output(uri)
    if existing.kind in ("file", "foreign"):
        raise OutputError(uri, f"exists and is not a segpipe output ({'a file' if existing.kind == 'file' else 'a folder'}); "
                               "it was left untouched: move it away or choose another --out")
    if existing.kind == "segpipe" and not replace:
        raise OutputError(uri, "was created by another run meanwhile; it was left untouched")
    try:
        fs, path = filesystem(strip_file_scheme(uri))
        if existing.kind == "segpipe":
            fs.rm(path, recursive=True)
        # the metadata is written directly (zarr-python's group/array creation was most of a small chip's
        # time: docs/benchmarks.md); the group's zarr.json comes last: it is what marks the path
        # as a segpipe output
        c = target.chunk_size
        arrays = {LEVEL0: plain_array_meta([target.height, target.width], [c, c], target.label_dtype, target.nodata_label,
                                      target.zstd_level, ["y", "x"])}
        if target.has_level1:  # the tile tasks write level 1 from the labels in memory (engine.tasks)
            arrays[LEVEL1] = plain_array_meta([ceil_div(target.height, 2), ceil_div(target.width, 2)], [c, c],
                                         target.label_dtype, target.nodata_label, target.zstd_level, ["y", "x"])
        if target.probabilities:
            arrays[PROBABILITIES] = plain_array_meta([target.num_classes, target.height, target.width], [1, c, c], "uint8",
                                                0, 3, ["class", "y", "x"])
        # the group's zarr.json first: it marks the path as this run's segpipe output (status "running")
        # before anything else exists, so an interrupted creation is recognised and replaced, never
        # mistaken for a foreign folder (see output_arrays_exist)
        fs.makedirs(path, exist_ok=True)
        write_atomic(fs, join(path, "zarr.json"), _group_meta(attrs), durable=False)
        for name, meta in arrays.items():
            fs.makedirs(join(path, name), exist_ok=True)
            write_atomic(fs, join(path, name, "zarr.json"), json.dumps(meta).encode(), durable=False)
    except OSError as e:
        raise storage_error(uri, e, "written") from None


def output_arrays_exist(uri: str, probabilities: bool) -> bool:
    """True when the output's arrays were created (their metadata is written after the group's)."""
    fs, path = filesystem(strip_file_scheme(uri))
    names = [LEVEL0, PROBABILITIES] if probabilities else [LEVEL0]
    with output_errors(uri, "read"):
        return all(fs.exists(join(path, n, "zarr.json")) for n in names)


def done_chunks(uri: str, array: str = LEVEL0) -> set[tuple[int, int]]:
    """Chunks of a 2-D ``array`` (level 0 by default) that are in the store (one listing, not one
    request per chunk)."""
    fs, path = filesystem(strip_file_scheme(uri))
    prefix = join(path, array, "c")
    try:
        keys = fs.find(prefix)
    except FileNotFoundError:
        return set()
    except OSError as e:  # never "no chunk done": that would recompute (and rewrite) the whole output
        raise storage_error(uri, e, "listed") from None
    done: set[tuple[int, int]] = set()
    for key in keys:
        parts = key[len(prefix):].strip("/").split("/")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            done.add((int(parts[0]), int(parts[1])))
    return done


class _ChunkStore:
    """The arrays of one output, as written by :func:`write_chunk`: whole chunks straight into the
    store (:class:`segpipe.io.chunks.RawChunks`), bypassing zarr-python's per-chunk write path.

    zarr's ``array[ys, xs] = block`` pays for indexing, async sync and the codec pipeline; encoding
    with the same zstd codec and one atomic file write costs about a tenth of it (docs/benchmarks.md,
    "Design measurements"). The layout written is exactly zarr's, checked against the array metadata
    when the store is opened.

    The one fallback: an array whose layout is not plain (:func:`segpipe.io.chunks.layout_problem`:
    another codec, shards, other chunk keys; segpipe never creates one, a user's or an older version's
    output may be one) is written through zarr-python, and :attr:`fallback` says why. A missing array
    or a storage fault while reading the metadata is raised, never a reason to change the path.
    """

    def __init__(self, target: OutputTarget) -> None:
        names = [LEVEL0, *([LEVEL1] if target.has_level1 else []), *([PROBABILITIES] if target.probabilities else [])]
        probed = {name: RawChunks.probe(target.uri, name) for name in names}
        # level 1 may be missing (an output made before the tile tasks wrote it): the pyramid pass builds it
        missing = [name for name, (_, why) in probed.items() if why == MISSING and name != LEVEL1]
        if missing:
            raise OutputError(target.uri, f"has no array {missing[0]!r}: it was removed or never created")
        self.level0 = probed[LEVEL0][0]
        self.level1 = probed[LEVEL1][0] if target.has_level1 else None
        self.probs = probed[PROBABILITIES][0] if target.probabilities else None
        #: why chunks go through zarr-python (an array that is not plain), or None: the fast path
        self.fallback = next((f"array {name!r}: {why}" for name in (LEVEL0, PROBABILITIES)
                              if name in probed and (why := probed[name][1])), None)
        self.fast = self.fallback is None
        self.zarr_arrays: tuple[Any, Any] | None = None
        if not self.fast:
            import zarr

            log.info("%s: %s; its chunks are written through zarr-python", target.uri, self.fallback)

            def open_array(name: str) -> Any:  # every chunk leaves its key: it is the completion record
                array = zarr.open_array(strip_file_scheme(join(target.uri, name)), mode="r+", zarr_format=3)
                return array.with_config({"write_empty_chunks": True})

            self.zarr_arrays = (open_array(LEVEL0), open_array(PROBABILITIES) if target.probabilities else None)


_stores: OrderedDict[tuple[str, str], _ChunkStore] = OrderedDict()
_stores_lock = threading.Lock()
#: chunk stores kept per process (a few bytes of metadata each): more than the images in flight
_MAX_STORES = 256


def _store_for(target: OutputTarget) -> _ChunkStore:
    """One chunk store per process and run (opening reads the arrays' metadata), the most recent kept: with
    many small images in flight, clearing them all at 16 made most chunk writes read the metadata again."""
    key = (target.uri, target.run_id)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = _ChunkStore(target)
            while len(_stores) > _MAX_STORES:
                _stores.popitem(last=False)
        _stores.move_to_end(key)
        return store


def write_chunk(target: OutputTarget, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
    """Write one chunk's core: probabilities first, class ids last (the completion record)."""
    with output_errors(target.uri):
        store = _store_for(target)
        if not store.fast:
            level0, parr = store.zarr_arrays
            ys, xs = slice(chunk.y0, chunk.y0 + chunk.h), slice(chunk.x0, chunk.x0 + chunk.w)
            if parr is not None and probs is not None:
                parr[:, ys, xs] = probs
            level0[ys, xs] = labels
            return
        if store.probs is not None and probs is not None:
            for k in range(probs.shape[0]):
                store.probs.write((k, chunk.iy, chunk.ix), probs[k:k + 1])
        store.level0.write((chunk.iy, chunk.ix), labels)


def write_level1_chunk(target: OutputTarget, index: tuple[int, int], labels: np.ndarray) -> bool:
    """Write one chunk of pyramid level 1 whole (``labels``: its part inside the array); False when
    the output has no plain level-1 array to write into (the pyramid pass then computes it)."""
    store = _store_for(target)
    if store.level1 is None:
        return False
    with output_errors(target.uri):
        store.level1.write(index, labels)
    return True


def finalize(uri: str, attrs: dict[str, Any]) -> None:
    """Merge ``attrs`` into the root attributes with ``status: complete``: the last write of a run
    (one atomic, durable replace of the group's ``zarr.json``)."""
    with output_errors(uri):
        current = read_attrs(uri)
    if current is None:
        raise OutputError(uri, "disappeared while it was being written")
    seg = {**current.get("segpipe", {}), **attrs.get("segpipe", {}), "status": "complete", "finished": now_iso()}
    merged = {**current, **{k: v for k, v in attrs.items() if k != "segpipe"}, "segpipe": seg}
    write_attrs(uri, merged, durable=True)


def write_attrs(uri: str, attrs: dict[str, Any], durable: bool = False) -> None:
    """Replace the root attributes of an output (one atomic replace of the group's ``zarr.json``; the
    pyramid lists its levels this way, without zarr-python's group machinery)."""
    with output_errors(uri):
        fs, path = filesystem(strip_file_scheme(uri))
        write_atomic(fs, join(path, "zarr.json"), _group_meta(attrs), durable=durable)


def open_labels(uri: str, level: str = LEVEL0):
    """The class-id array of an output (read-only)."""
    return _open_group(uri, "r")[level]
