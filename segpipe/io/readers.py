"""Image readers behind one interface.

A reader knows an image's size, bands, dtype and georeference, and reads any window
of it — including windows that extend past the image, filled by reflection
(:func:`segpipe.tiling.source_indices`). It never reads the whole image.

Readers are opened by :func:`open_image`, which tries the registered openers in order
(content sniffing, not only the extension). Dataset handles are not thread-safe, so
workers use :func:`thread_reader`, which keeps one handle per thread.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from segpipe.errors import InputError, TransientIOError
from segpipe.io.storage import has_scheme, strip_file_scheme
from segpipe.tiling import Window, source_indices


@dataclass(frozen=True)
class ImageInfo:
    """What the pipeline needs to know about a source image."""

    uri: str
    height: int
    width: int
    count: int  #: bands the reader returns (after band selection)
    dtype: str
    crs_wkt: str | None = None
    #: affine transform as (a, b, c, d, e, f): x = a·col + b·row + c, y = d·col + e·row + f
    transform: tuple[float, ...] | None = None
    nodata: float | None = None
    mpp: float | None = None  #: microns per pixel (slides)
    driver: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6


class ImageReader(Protocol):
    info: ImageInfo

    def read(self, window: Window) -> np.ndarray:
        """Pixels of ``window`` as (bands, h, w) in the source dtype; reflected outside the image."""

    def close(self) -> None: ...


def gdal_options() -> dict[str, str | int]:
    """GDAL settings for S3-compatible endpoints, derived from the standard AWS variables.

    s3fs/boto read ``AWS_ENDPOINT_URL``; GDAL's /vsis3/ needs ``AWS_S3_ENDPOINT`` (host:port),
    ``AWS_HTTPS`` and ``AWS_VIRTUAL_HOSTING`` instead, so translate once here.
    """
    opts: dict[str, str | int] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    # remote reads (/vsis3/, /vsicurl/): GDAL retries throttling and 5xx answers with backoff
    opts["GDAL_HTTP_MAX_RETRY"] = os.environ.get("GDAL_HTTP_MAX_RETRY", "5")
    opts["GDAL_HTTP_RETRY_DELAY"] = os.environ.get("GDAL_HTTP_RETRY_DELAY", "1")
    # GDAL's block cache defaults to 5 % of RAM and would fill as a large image streams through.
    # Windows overlap their neighbours' blocks (the halo), and chunks are visited in narrow
    # column strips (see tiling.strip_order), so a bounded cache that holds a few block rows
    # of one strip decodes each block about once while memory stays flat whatever the image size.
    # (rasterio passes an integer GDAL_CACHEMAX as bytes; a user's own setting is left alone)
    if "GDAL_CACHEMAX" not in os.environ:
        opts["GDAL_CACHEMAX"] = 32 * 2**20
    # decode the blocks of one window read in parallel (GTiff)
    opts["GDAL_NUM_THREADS"] = os.environ.get("GDAL_NUM_THREADS", "ALL_CPUS")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "AWS_S3_ENDPOINT" not in os.environ:
        scheme, _, hostport = endpoint.partition("://")
        opts["AWS_S3_ENDPOINT"] = hostport.rstrip("/")
        opts["AWS_HTTPS"] = "NO" if scheme == "http" else "YES"
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return opts


def gdal_path(uri: str) -> str:
    """The GDAL path of a URI (/vsis3/, /vsigs/, /vsicurl/ for remote ones)."""
    uri = strip_file_scheme(uri)
    if uri.startswith("s3://"):
        return "/vsis3/" + uri[len("s3://"):]
    if uri.startswith("gs://"):
        return "/vsigs/" + uri[len("gs://"):]
    if uri.startswith(("http://", "https://")):
        return "/vsicurl/" + uri
    return uri


def _check_local_file(uri: str) -> None:
    if has_scheme(uri):
        return
    path = strip_file_scheme(uri)
    if not os.path.exists(path):
        raise InputError(uri, "does not exist")
    if os.path.isdir(path):
        raise InputError(uri, "is a folder, not an image")
    if os.path.getsize(path) == 0:
        raise InputError(uri, "is empty (0 bytes)")


def _gdal_reason(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "not recognized as" in msg or "not recognised as" in msg:
        return "not an image that GDAL can read"
    return msg


_TRANSIENT_WORDS = ("http", "curl", "timeout", "timed out", "connection", "throttl", "slow down", "503", "500")


def _looks_transient(reason: str) -> bool:
    """A remote read that failed for network reasons (worth retrying), not for the file's content."""
    low = reason.lower()
    return any(w in low for w in _TRANSIENT_WORDS)


def select_bands(available: int, bands: Sequence[int] | None, uri: str) -> list[int]:
    """1-based band indexes to read; checks ``bands`` against the ``available`` count."""
    if bands is None:
        return list(range(1, available + 1))
    bad = [b for b in bands if b > available]
    if bad:
        raise InputError(uri, f"has {available} band(s); --bands asks for band {bad[0]}")
    return list(bands)


class RasterioReader:
    """GeoTIFF/COG, TIFF, PNG, JPEG and anything else GDAL reads, via rasterio windows."""

    def __init__(self, uri: str, bands: Sequence[int] | None = None, level: int | None = None) -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        _check_local_file(uri)
        # GDAL settings apply per call (rasterio.Env is a per-thread stack: holding one open for the
        # reader's lifetime breaks when readers are closed in another order than they were opened)
        self._gdal = gdal_options()
        # level N of a GeoTIFF/COG is its overview N (level 0 = full resolution)
        opts = {"overview_level": level - 1} if level else {}
        try:
            with warnings.catch_warnings(), rasterio.Env(**self._gdal):
                # plain photos have no georeference, and that is fine
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._ds = rasterio.open(gdal_path(uri), **opts)
        except RasterioIOError as e:
            raise InputError(uri, _gdal_reason(e)) from e
        ds = self._ds
        self._indexes = select_bands(ds.count, bands, uri)
        crs = ds.crs.to_wkt() if ds.crs else None
        t = ds.transform
        georeferenced = crs is not None or not t.is_identity
        self.info = ImageInfo(
            uri=uri, height=ds.height, width=ds.width, count=len(self._indexes),
            dtype=str(np.dtype(ds.dtypes[self._indexes[0] - 1])),
            crs_wkt=crs,
            transform=(t.a, t.b, t.c, t.d, t.e, t.f) if georeferenced else None,
            nodata=ds.nodata, driver=ds.driver, extra={"level": level or 0},
        )

    def read(self, window: Window) -> np.ndarray:
        import rasterio
        from rasterio.errors import RasterioError
        from rasterio.windows import Window as RWindow

        info = self.info
        try:
            with rasterio.Env(**self._gdal):
                if window.inside(info.height, info.width):
                    return self._ds.read(self._indexes, window=RWindow(window.x0, window.y0, window.w, window.h))
                ys, xs = source_indices(window, info.height, info.width)
                y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                block = self._ds.read(self._indexes, window=RWindow(x0, y0, x1 - x0, y1 - y0))
        except RasterioError as e:
            reason = _gdal_reason(e)
            if has_scheme(info.uri) and _looks_transient(reason):
                raise TransientIOError(info.uri, f"read failed ({reason})") from e
            raise InputError(info.uri, f"corrupt or truncated image ({reason})") from e
        return block[:, (ys - y0)[:, None], (xs - x0)[None, :]]

    @property
    def has_mask(self) -> bool:
        """True when the raster declares invalid pixels (a nodata value, a mask band or alpha)."""
        from rasterio.enums import MaskFlags

        return any(f != [MaskFlags.all_valid] for f in (self._ds.mask_flag_enums[i - 1] for i in self._indexes))

    def read_valid(self, window: Window) -> np.ndarray | None:
        """Valid-data mask (True = data) of an in-image window, or None when every pixel is valid.

        A pixel is valid when any selected band is valid (GDAL's dataset mask semantics).
        """
        from rasterio.windows import Window as RWindow

        import rasterio

        if not self.has_mask:
            return None
        with rasterio.Env(**self._gdal):
            m = self._ds.read_masks(self._indexes, window=RWindow(window.x0, window.y0, window.w, window.h))
        return (m > 0).any(axis=0)

    def close(self) -> None:
        if getattr(self, "_ds", None) is not None:
            self._ds.close()
            self._ds = None

    def __enter__(self) -> RasterioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: openers tried in order by open_image; each returns a reader or None ("not mine").
#: Whole-slide readers register themselves in front of rasterio (see segpipe.io.slide).
#: called as opener(uri, bands, level=…, mpp=…)
Opener = Callable[..., "ImageReader | None"]
OPENERS: list[Opener] = []
_defaults_registered = False


def rasterio_opener(uri: str, bands: Sequence[int] | None, level: int | None = None,
                    mpp: float | None = None) -> RasterioReader:
    return RasterioReader(uri, bands, level=level)


def _register_default_openers() -> None:
    global _defaults_registered
    if _defaults_registered:
        return
    try:
        from segpipe.io import slide  # noqa: F401  (registers its openers in front)
    except ImportError:  # openslide/tifffile missing: rasterio only
        pass
    if rasterio_opener not in OPENERS:
        OPENERS.append(rasterio_opener)
    _defaults_registered = True


def open_image(uri: str, bands: Sequence[int] | None = None, level: int | None = None,
               mpp: float | None = None) -> ImageReader:
    """Open ``uri`` with the first reader that accepts its content (``level``/``mpp``: which resolution)."""
    _register_default_openers()
    _check_local_file(uri)
    for opener in OPENERS:
        reader = opener(uri, bands, level=level, mpp=mpp)
        if reader is not None:
            return reader
    raise InputError(uri, "no reader accepts this file")


class SharedReader:
    """One reader per image and process, shared by the worker's threads (reads take turns).

    A dataset handle is not thread-safe, and one handle per thread would decode every block
    several times: a chunk's window overlaps eight neighbouring blocks by the halo, GDAL's block
    cache is per handle, and consecutive chunks go to different threads. With one handle the
    cache serves the overlap, so each block is decoded about once (GDAL decodes the blocks of
    one read in parallel). Reading costs a fraction of the forward pass, so taking turns costs
    nothing on a CPU; the header of a remote COG is read once per process, not per chunk.
    """

    def __init__(self, reader: ImageReader) -> None:
        self._reader = reader
        self.info = reader.info
        self._lock = threading.Lock()

    def read(self, window: Window) -> np.ndarray:
        with self._lock:
            return self._reader.read(window)

    def __getattr__(self, name: str) -> Any:  # has_mask, read_valid, thumbnail, …
        attr = getattr(self._reader, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked

    def close(self) -> None:
        with self._lock:
            self._reader.close()


_shared: OrderedDict = OrderedDict()
_shared_lock = threading.Lock()
_MAX_SHARED = 8


def shared_reader(uri: str, bands: Sequence[int] | None = None, level: int | None = None,
                  mpp: float | None = None, fingerprint: str = "") -> SharedReader:
    """This process's reader for an image (opened once, kept in a small LRU).

    ``fingerprint`` (size + mtime/ETag) is part of the key: an image rewritten in place between
    two runs must not be served from a handle (and block cache) of its old content.
    """
    key = (uri, fingerprint, tuple(bands) if bands else None, level, mpp)
    with _shared_lock:
        reader = _shared.get(key)
        if reader is not None:
            _shared.move_to_end(key)
            return reader
    opened = SharedReader(open_image(uri, bands, level=level, mpp=mpp))
    with _shared_lock:
        reader = _shared.setdefault(key, opened)
        _shared.move_to_end(key)
        while len(_shared) > _MAX_SHARED:
            _, old = _shared.popitem(last=False)
            old.close()
    if reader is not opened:
        opened.close()
    return reader


_local = threading.local()


def thread_reader(uri: str, bands: Sequence[int] | None = None, level: int | None = None,
                  mpp: float | None = None, fingerprint: str = "") -> ImageReader:
    """This thread's own reader for an image (a few handles per thread, LRU).

    For large batches (GPU workers): each thread reads its batch of neighbouring windows in
    parallel with the others, and the block cache still serves the overlaps within a batch.
    """
    cache: OrderedDict = getattr(_local, "readers", None) or OrderedDict()
    _local.readers = cache
    key = (uri, fingerprint, tuple(bands) if bands else None, level, mpp)
    reader = cache.get(key)
    if reader is None:
        reader = open_image(uri, bands, level=level, mpp=mpp)
        cache[key] = reader
        while len(cache) > 4:
            cache.popitem(last=False)[1].close()
    else:
        cache.move_to_end(key)
    return reader
