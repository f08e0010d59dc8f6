"""Reader handles shared within a process: one per image (:func:`shared_reader`) or one per thread (:func:`thread_reader`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.geometry import Window
from segpipe.core.grid import PixelGrid
from segpipe.io.readers.base import ImageReader
from segpipe.io.readers.registry import open_image


class SharedReader:
    """One reader per image and process, shared by the worker's threads (reads take turns).

    A dataset handle is not thread-safe, and one handle per thread would decode every block
    several times: a chunk's window overlaps eight neighbouring blocks by the halo, GDAL's block
    cache is per handle, and consecutive chunks go to different threads. With one handle the
    cache serves the overlap, so each block is decoded about once (GDAL decodes the blocks of
    one read in parallel). Reading costs a fraction of the forward pass, so taking turns costs
    nothing on a CPU; the header of a remote COG is read once per process, not per chunk.
    """

    def __init__(self, reader: ImageReader, reopen: Any = None) -> None:
        self._reader: ImageReader | None = reader
        self._reopen = reopen  #: opens the same image again (after an eviction from the cache closed it)
        self.info = reader.info
        self._lock = threading.Lock()
        self.pins = 0  #: images in progress that hold it open (:func:`shared_reader` ``pin``); changed under the cache's lock

    def _open(self) -> ImageReader:
        """The handle; an evicted reader that a task still holds reopens itself (called under the lock)."""
        if self._reader is None:
            if self._reopen is None:
                raise ValueError("the reader was closed")
            self._reader = self._reopen()
        return self._reader

    def read(self, window: Window) -> np.ndarray:
        with self._lock:
            return self._open().read(window)

    def __getattr__(self, name: str) -> Any:  # has_mask, read_valid, thumbnail, …
        if name.startswith("__") or name in ("_reader", "_reopen", "_lock"):
            raise AttributeError(name)
        with self._lock:
            attr = getattr(self._open(), name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return getattr(self._open(), name)(*args, **kwargs)

        return locked

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


_shared: OrderedDict = OrderedDict()
_shared_lock = threading.Lock()
_MAX_SHARED = 8


def shared_reader(uri: str, bands: Sequence[int] | None = None, *, grid: PixelGrid | None = None,
                  fingerprint: str = "", pin: bool = False) -> SharedReader:
    """This process's reader for an image on ``grid`` (None: its own pixels), opened once, kept in a small LRU.

    ``fingerprint`` (size + mtime/ETag) is part of the key: an image rewritten in place between
    two runs must not be served from a handle (and block cache) of its old content.
    ``pin``: an image in progress holds it open until :func:`unpin_reader`; the LRU evicts only readers
    nobody pins, so with many small images in flight the tile tasks do not open each image a second time.
    """
    grid = None if grid is None or grid.is_native else grid  # one handle for the image's own pixels
    key = (uri, fingerprint, tuple(bands) if bands else None, grid)
    with _shared_lock:
        reader = _shared.get(key)
        if reader is not None:
            _shared.move_to_end(key)
            reader.pins += pin
            return reader
    # the cache closes the readers it evicts; a task still holding one (more images in flight than the
    # cache keeps) gets it reopened on its next read instead of a closed handle
    opened = SharedReader(open_image(uri, bands, grid=grid), reopen=lambda: open_image(uri, bands, grid=grid))
    with _shared_lock:
        reader = _shared.setdefault(key, opened)
        _shared.move_to_end(key)
        reader.pins += pin
        _evict()
    if reader is not opened:
        opened.close()
    return reader


def unpin_reader(reader: SharedReader) -> None:
    """An image in progress no longer needs ``reader`` (see :func:`shared_reader`'s ``pin``)."""
    with _shared_lock:
        reader.pins = max(0, reader.pins - 1)
        _evict()


def _evict() -> None:
    """Close the least recently used readers nobody pins, down to ``_MAX_SHARED`` (under ``_shared_lock``)."""
    excess = len(_shared) - _MAX_SHARED
    for key in [k for k, r in _shared.items() if not r.pins][:max(0, excess)]:
        _shared.pop(key).close()


_local = threading.local()


def thread_reader(uri: str, bands: Sequence[int] | None = None, *, grid: PixelGrid | None = None,
                  fingerprint: str = "") -> ImageReader:
    """This thread's own reader for an image (a few handles per thread, LRU).

    For large batches (GPU workers): each thread reads its batch of neighbouring windows in
    parallel with the others. The handles of one image share their decoded blocks
    (:mod:`segpipe.io.readers.blocks`): a window's halo reaches into blocks another thread's handle
    decoded moments ago, and GDAL's cache is per handle.
    """
    cache: OrderedDict = getattr(_local, "readers", None) or OrderedDict()
    _local.readers = cache
    grid = None if grid is None or grid.is_native else grid
    key = (uri, fingerprint, tuple(bands) if bands else None, grid)
    reader = cache.get(key)
    if reader is None:
        reader = open_image(uri, bands, grid=grid)
        if grid is None and hasattr(reader, "cache_blocks"):  # its own pixels (a resampled read spans many blocks once)
            reader.cache_blocks = True
        cache[key] = reader
        while len(cache) > 4:
            cache.popitem(last=False)[1].close()
    else:
        cache.move_to_end(key)
    return reader
