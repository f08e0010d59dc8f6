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
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.errors import OutputError
from segpipe.io.storage import filesystem, join, strip_file_scheme
from segpipe.tiling import Chunk

LEVEL0 = "0"
PROBABILITIES = "probabilities"
FORMAT = "segpipe-output/1"

DEFAULT_COLORS = [
    "#000000", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def class_colors(n: int, colors: list[str] | None = None) -> list[str]:
    """``n`` hex colours: the given ones, then a default palette, then generated greys."""
    out = list(colors or [])[:n]
    for i in range(len(out), n):
        out.append(DEFAULT_COLORS[i] if i < len(DEFAULT_COLORS) else f"#{(i * 37) % 256:02x}{(i * 91) % 256:02x}{(i * 53) % 256:02x}")
    return out


def _rgba(hex_color: str) -> list[int]:
    h = hex_color.lstrip("#")
    return [int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255]


def ome_attrs(name: str, classes: list[str], colors: list[str] | None, mpp: float | None) -> dict[str, Any]:
    """OME-NGFF 0.5 ``multiscales`` for level 0 plus ``image-label`` colours and class names."""
    axes: list[dict[str, str]] = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    scale = [1.0, 1.0]
    if mpp:
        axes = [{**a, "unit": "micrometer"} for a in axes]
        scale = [mpp, mpp]
    cols = class_colors(len(classes), colors)
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": axes,
            "datasets": [{"path": LEVEL0, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }],
        "image-label": {
            "colors": [{"label-value": i, "rgba": _rgba(c)} for i, c in enumerate(cols)],
            "properties": [{"label-value": i, "class": n} for i, n in enumerate(classes)],
        },
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

    @property
    def label_dtype(self) -> str:
        return "uint8" if self.num_classes <= 256 else "uint16"


def _open_group(uri: str, mode: str):
    import zarr

    return zarr.open_group(strip_file_scheme(uri), mode=mode, zarr_format=3)


def read_attrs(uri: str) -> dict[str, Any] | None:
    """Root attributes of an existing output, or None when there is none (or it is unreadable)."""
    import zarr

    fs, path = filesystem(strip_file_scheme(uri))
    if not fs.exists(join(path, "zarr.json")):
        return None
    try:
        return dict(_open_group(uri, "r").attrs)
    except (zarr.errors.GroupNotFoundError, ValueError, KeyError, OSError):
        return None


def prepare_output(target: OutputTarget, attrs: dict[str, Any]) -> None:
    """Create (or overwrite) the group and its arrays; status is ``"running"`` until finalize."""
    import zarr
    from zarr.codecs import ZstdCodec

    uri = target.uri
    try:
        fs, path = filesystem(strip_file_scheme(uri))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        group = zarr.open_group(strip_file_scheme(uri), mode="w", zarr_format=3)
        c = target.chunk_size
        config = {"write_empty_chunks": True}
        group.create_array(
            LEVEL0, shape=(target.height, target.width), chunks=(c, c), dtype=target.label_dtype,
            compressors=ZstdCodec(level=target.zstd_level), fill_value=0, dimension_names=["y", "x"],
            config=config,
        )
        if target.probabilities:
            group.create_array(
                PROBABILITIES, shape=(target.num_classes, target.height, target.width), chunks=(1, c, c),
                dtype="uint8", compressors=ZstdCodec(level=3), fill_value=0,
                dimension_names=["class", "y", "x"], config=config,
            )
        group.attrs.update(attrs)
    except OSError as e:
        raise OutputError(uri, f"cannot be written ({getattr(e, 'strerror', None) or e})") from None


def done_chunks(uri: str) -> set[tuple[int, int]]:
    """Chunks whose level-0 data is in the store (one listing, not one request per chunk)."""
    fs, path = filesystem(strip_file_scheme(uri))
    prefix = join(path, LEVEL0, "c")
    try:
        keys = fs.find(prefix)
    except FileNotFoundError:
        return set()
    done: set[tuple[int, int]] = set()
    for key in keys:
        parts = key[len(prefix):].strip("/").split("/")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            done.add((int(parts[0]), int(parts[1])))
    return done


_arrays: dict[tuple[str, str], tuple[Any, Any]] = {}
_arrays_lock = threading.Lock()


def _arrays_for(target: OutputTarget) -> tuple[Any, Any]:
    """Array handles opened once per process and run (opening re-reads metadata)."""
    key = (target.uri, target.run_id)
    with _arrays_lock:
        if key not in _arrays:
            if len(_arrays) > 16:
                _arrays.clear()
            group = _open_group(target.uri, "r+")
            probs = group[PROBABILITIES] if target.probabilities else None
            _arrays[key] = (group[LEVEL0], probs)
        return _arrays[key]


def write_chunk(target: OutputTarget, chunk: Chunk, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
    """Write one chunk's core: probabilities first, class ids last (the completion record)."""
    level0, parr = _arrays_for(target)
    ys, xs = slice(chunk.y0, chunk.y0 + chunk.h), slice(chunk.x0, chunk.x0 + chunk.w)
    if parr is not None and probs is not None:
        parr[:, ys, xs] = probs
    level0[ys, xs] = labels


def finalize(uri: str, attrs: dict[str, Any]) -> None:
    """Merge ``attrs`` into the root attributes with ``status: complete``: the last write of a run."""
    group = _open_group(uri, "r+")
    current = dict(group.attrs)
    seg = {**current.get("segpipe", {}), **attrs.get("segpipe", {}), "status": "complete", "finished": now_iso()}
    group.attrs.update({**current, **{k: v for k, v in attrs.items() if k != "segpipe"}, "segpipe": seg})


def open_labels(uri: str, level: str = LEVEL0):
    """The class-id array of an output (read-only)."""
    return _open_group(uri, "r")[level]
