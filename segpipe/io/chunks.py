"""Whole chunks of plain Zarr v3 arrays, read and written straight from the store.

"Plain" is the layout segpipe creates (:mod:`segpipe.io.output`): bytes (little endian) + zstd,
regular grid, default ``c/…`` keys with ``/``, no shards. One chunk is one object: decode or encode
it with the array's zstd and get or put it whole (locally: a temporary file renamed into place, so a
reader sees the old chunk or the new one). zarr-python's read/write machinery costs several times
the codec per chunk (docs/benchmarks.md, "Design measurements"); this costs the codec and one file
operation.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.geometry import ceil_div
from segpipe.io.storage import filesystem, is_local, join, storage_error, strip_file_scheme


class RawChunks:
    """Whole-chunk reads and writes of one plain array (bytes + zstd, default '/' keys, no shards)
    straight from the store: the pyramid's path (zarr-python's read/write machinery was most of a
    level's time). :meth:`open` returns None for any other layout."""

    def __init__(self, fs: Any, path: str, meta: dict[str, Any]) -> None:
        from numcodecs import Zstd

        self.fs, self.path = fs, path
        self.meta = meta  #: the array's zarr.json
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta["fill_value"]
        self.zstd = Zstd(level=meta["codecs"][1].get("configuration", {}).get("level", 3))
        self.local = is_local(fs)

    @classmethod
    def open(cls, group_uri: str, name: str) -> RawChunks | None:
        """The array ``name`` of the group, or None when it is missing or not plain (:meth:`probe`)."""
        return cls.probe(group_uri, name)[0]

    @classmethod
    def probe(cls, group_uri: str, name: str) -> tuple[RawChunks | None, str | None]:
        """``(chunks, None)`` for a plain array, else ``(None, why)``: ``why`` is :data:`MISSING` or the layout
        difference (:func:`layout_problem`). A storage fault while reading the metadata raises
        (:func:`segpipe.io.storage.storage_error`): it must never pick another write path."""
        fs, root = filesystem(strip_file_scheme(group_uri))
        path = join(root, name)
        try:
            raw = fs.cat_file(join(path, "zarr.json"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None, MISSING
        except OSError as e:
            raise storage_error(group_uri, e, "read") from None
        try:
            meta = json.loads(raw)
        except ValueError:
            return None, "its zarr.json is not JSON"
        problem = layout_problem(meta)
        return (None, problem) if problem else (cls(fs, path, meta), None)

    def _key(self, index: Sequence[int]) -> str:
        return join(self.path, "c", *(str(i) for i in index))

    def read(self, selection: Sequence[slice]) -> np.ndarray:
        """The pixels of ``selection`` (one slice per axis, inside the array); missing chunks read as fill."""
        import itertools

        out = np.full([s.stop - s.start for s in selection], self.fill, dtype=self.dtype)
        ranges = [range(s.start // c, ceil_div(s.stop, c)) for s, c in zip(selection, self.chunks)]
        for index in itertools.product(*ranges):
            try:
                data = self.fs.cat_file(self._key(index))
            except FileNotFoundError:
                continue
            chunk = np.frombuffer(self.zstd.decode(data), dtype=self.dtype).reshape(self.chunks)
            src, dst = [], []
            for i, s, c in zip(index, selection, self.chunks):
                lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - s.start, hi - s.start))
            out[tuple(dst)] = chunk[tuple(src)]
        return out

    def write(self, index: Sequence[int], block: np.ndarray) -> None:
        """Write the chunk ``index`` whole (``block`` is its part inside the array; the rest is fill)."""
        data = self.zstd.encode(padded(block.astype(self.dtype, copy=False), self.chunks, self.fill))
        path = self._key(index)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)


def plain_array_meta(shape: list[int], chunks: list[int], dtype: str, fill: Any, level: int, dims: list[str],
                     attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Zarr v3 metadata of a plain array (what :class:`RawChunks` reads and writes): regular chunk grid,
    default '/' keys, bytes (little endian) + zstd ``level``. ``fill`` as Zarr's JSON writes it ("NaN" for floats)."""
    codec_bytes: dict[str, Any] = {"name": "bytes"}
    if np.dtype(dtype).itemsize > 1:
        codec_bytes["configuration"] = {"endian": "little"}
    return {
        "shape": shape, "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [codec_bytes, {"name": "zstd", "configuration": {"level": level, "checksum": False}}],
        "attributes": attributes or {}, "dimension_names": dims, "zarr_format": 3, "node_type": "array",
        "storage_transformers": [],
    }


#: :meth:`RawChunks.probe`'s answer for an array whose metadata is not in the store
MISSING = "missing"


def layout_problem(meta: dict[str, Any]) -> str | None:
    """Why an array's metadata is not the plain layout that :class:`RawChunks` reads and writes, or None
    when it is: bytes (little endian) + zstd, a regular grid, default keys with '/', no shards."""
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return "not a Zarr array"
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    if codecs != ["bytes", "zstd"]:
        return f"codecs {codecs} (plain: ['bytes', 'zstd'])"
    if (meta["codecs"][0].get("configuration") or {}).get("endian", "little") != "little":
        return "big-endian bytes"
    encoding = meta.get("chunk_key_encoding", {})
    if encoding.get("name") != "default" or (encoding.get("configuration") or {}).get("separator", "/") != "/":
        return f"chunk keys {encoding} (plain: default with '/')"
    if meta.get("chunk_grid", {}).get("name") != "regular":
        return f"chunk grid {meta.get('chunk_grid', {}).get('name')!r} (plain: regular)"
    return None


def padded(block: np.ndarray, shape: tuple[int, ...], fill: int) -> np.ndarray:
    """``block`` in a full chunk of ``shape`` (zarr stores edge chunks at the full chunk shape)."""
    if block.shape == shape:
        return np.ascontiguousarray(block)
    full = np.full(shape, fill, dtype=block.dtype)
    full[tuple(slice(0, n) for n in block.shape)] = block
    return full
