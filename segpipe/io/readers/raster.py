"""The rasterio/GDAL reader: GeoTIFF/COG, TIFF, PNG, JPEG, JPEG 2000, VRT, … window by window.

Also what GDAL leaves to us: palette expansion, alpha as the nodata mask, EXIF orientation
(the geometry is in :mod:`segpipe.io.readers.orientation`), multi-page TIFFs. Opened through
:func:`segpipe.io.readers.open_image`.

A failed read of a remote file is a :class:`~segpipe.core.errors.TransientIOError` (retried)
only when GDAL says, by the class of its error, that the request failed
(:func:`transient_gdal_error`); anything else is the file's fault (:class:`InputError`).

Why this module is long: each of GDAL's gaps (palette, alpha, orientation, multi-page files, the
error cause of a truncated file) needs a few lines in the read path of the one reader that fills it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import InputError, TransientIOError
from segpipe.core.geometry import Window, gather, source_indices
from segpipe.io.readers.base import ImageInfo
from segpipe.io.readers.blocks import assemble
from segpipe.io.readers.orientation import exif_orientation, orient_block, oriented_size, stored_window
from segpipe.io.storage import has_scheme, strip_file_scheme


def gdal_options(uri: str | None = None) -> dict[str, str | int]:
    """GDAL settings for reading ``uri``; for S3-compatible endpoints, derived from the standard AWS variables.

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
    # GDAL 3.10's whole-image PNG fast path returns zeros *without an error* for a truncated PNG
    # (a window covering the whole image takes that path); the row-by-row path reports the damage.
    # A reader turns the fast path back on for a PNG that is whole (:func:`png_is_whole`)
    opts["GDAL_PNG_WHOLE_IMAGE_OPTIM"] = "NO"
    # decode the blocks of one window read in parallel (GTiff) — local files only: with threads on, GDAL
    # 3.10 fetches a remote window's tiles in one multi-range request it never retries (OSGeo/gdal#12933,
    # retried from #13898 on), so one 5xx or reset from the bucket reads as a corrupt image and fails it for
    # good (the chaos run, docs/benchmarks.md); one thread takes GDAL's retried single-range path
    remote = uri is not None and has_scheme(strip_file_scheme(uri))
    opts["GDAL_NUM_THREADS"] = os.environ.get("GDAL_NUM_THREADS", "1" if remote else "ALL_CPUS")
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


#: the last 12 bytes of every whole PNG: the IEND chunk (length 0, type, CRC)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_is_whole(uri: str) -> bool:
    """True when ``uri`` is a local PNG that ends with its IEND chunk (one 12-byte read): not truncated.

    GDAL's whole-image PNG path decodes a 256² chip with ~2.5× less CPU than the row-by-row one, and
    only misses damage when the file is cut short (a corrupt stream still fails there: measured,
    docs/benchmarks.md "Design measurements"); a file without the trailer (cut, or with bytes after
    IEND) keeps the row-by-row path, which reports what is wrong.
    """
    if has_scheme(uri):
        return False
    try:
        with open(strip_file_scheme(uri), "rb") as f:
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


def check_local_file(uri: str) -> None:
    if has_scheme(uri):
        return
    path = strip_file_scheme(uri)
    if not os.path.exists(path):
        raise InputError(uri, "does not exist")
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zattrs")):
        raise InputError(uri, "is a folder, not an image")  # a Zarr store is one (OME-Zarr: readers.omezarr)
    if os.path.getsize(path) == 0:
        raise InputError(uri, "is empty (0 bytes)")


def _gdal_reason(exc: BaseException) -> str:
    """One line saying why a GDAL call failed: the first error of GDAL's error stack.

    rasterio ≥ 1.4 raises its own exception (``RasterioIOError('Read failed. See previous exception for
    details.')`` for a failed block read) with the GDAL errors of the call chained as ``__cause__``, the
    one GDAL raised first (e.g. ``Cannot read 196608 bytes at offset 524`` for a truncated TIFF) deepest.
    """
    from rasterio import _err  # noqa: PLC2701 - GDAL's error classes are public only there

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    gdal = [c for c in chain if isinstance(c, _err.CPLE_BaseError) and str(c).strip()]
    cause = gdal[-1] if gdal else exc
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if "not recognized as" in msg or "not recognised as" in msg:
        return "not an image that GDAL can read"
    return msg


#: HTTP statuses that a retry may cure: timeout, throttling, and an object store's 403 (credentials being
#: refreshed, a policy propagating: the same rule as io.storage's for outputs); any other 4xx is final (404, …).
#: A 403 that does not clear fails the image after the run's retries, with one line naming it.
_RETRYABLE_4XX = (403, 408, 429)
_HTTP_STATUS = re.compile(r"HTTP (?:response|error) code\s*:\s*(\d{3})")


def _transient_class(exc: BaseException) -> bool:
    from rasterio import _err  # noqa: PLC2701 - GDAL's error classes are public only there

    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, _err.CPLE_HttpResponseError):  # GDAL's HTTP error (after its own retries)
        m = _HTTP_STATUS.search(str(exc))
        code = int(m.group(1)) if m else None  # no status: curl failed (timeout, reset): transient
        return code is None or code >= 500 or code in _RETRYABLE_4XX
    # CPLE_AWSError is S3's generic error (SlowDown, InternalError, …), AccessDenied a 403 (above); the other
    # siblings (BucketNotFound, ObjectNotFound, InvalidCredentials, SignatureDoesNotMatch) are final
    return type(exc) in (_err.CPLE_AWSError, _err.CPLE_AWSAccessDeniedError, _err.CPLE_FileIOError)


def transient_gdal_error(exc: BaseException) -> bool:
    """True when a failed GDAL call on a remote file is worth retrying, decided by error class.

    Walks the exception and its causes (rasterio ≥ 1.4 chains GDAL's error stack as
    ``__cause__``): :class:`rasterio._err.CPLE_HttpResponseError` (5xx, 403, 408, 429, or no status),
    the generic :class:`rasterio._err.CPLE_AWSError` and its AccessDenied, :class:`rasterio._err.CPLE_FileIOError`,
    ``ConnectionError`` and ``TimeoutError`` are transient. Messages are never searched for words,
    so a format error that quotes a ``/vsicurl/https://…`` path is the file's fault. (GDAL 3.10
    reports an HTTP failure *during* a tile read only through libtiff's ``CPLE_AppDefined``
    "Read error"; GDAL itself retries those first: ``GDAL_HTTP_MAX_RETRY`` in :func:`gdal_options`.)
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _transient_class(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _gdal_error(uri: str, exc: Exception, what: str) -> InputError | TransientIOError:
    """The error to raise for a failed GDAL call: transient (remote, by class) or the input's fault."""
    reason = _gdal_reason(exc)
    if has_scheme(uri) and transient_gdal_error(exc):
        return TransientIOError(uri, f"read failed ({reason})")
    return InputError(uri, f"{what} ({reason})" if what else reason)


def select_bands(available: int, bands: Sequence[int] | None, uri: str, note: str = "") -> list[int]:
    """1-based band indexes to read; checks ``bands`` against the ``available`` count.

    A band may be named more than once (``--bands 1,1,1`` feeds a grayscale image to an RGB model).
    """
    if bands is None:
        return list(range(1, available + 1))
    bad = [b for b in bands if b > available or b < 1]
    if bad:
        raise InputError(uri, f"has {available} band(s){note}; --bands asks for band {bad[0]}")
    return list(bands)


#: TIFF pages opened to tell previews (smaller) from further full images
_MAX_PAGES_CHECKED = 64



class RasterioReader:
    """GeoTIFF/COG, TIFF, PNG, JPEG and anything else GDAL reads, via rasterio windows.

    Layouts are turned into what a model reads (the ``layout`` entry of ``info.extra`` says which):

    * palette (colour-mapped) PNG/TIFF → RGB through the colour table; transparent entries are nodata;
    * RGBA, gray+alpha (LA) → the alpha band is not a band: it is the nodata mask (alpha 0 = no data);
    * CMYK JPEG/TIFF → RGB (GDAL converts; ``source_color_space: CMYK``);
    * EXIF orientation (JPEG, local PNG/TIFF; not georeferenced images) → applied: the reader
      serves the upright image and maps every window through the rotation;
    * multi-page TIFF → page 1 when the other pages are smaller previews (noted in ``extra``);
      refused when another page is a full image (segmenting page 1 alone would lose it).
    """

    #: windows are assembled from the process's shared decoded blocks where the file allows it
    #: (:meth:`_block_layout`): turned on for the per-thread handles of an image
    #: (:func:`segpipe.io.readers.cache.thread_reader`), whose overlapping windows each handle's own GDAL
    #: cache decoded again; one shared handle's GDAL cache already decodes each block once (and decodes a
    #: window's blocks in parallel), and a resampling reader's reads span many blocks once
    cache_blocks = False

    def __init__(self, uri: str, bands: Sequence[int] | None = None, level: int | None = None) -> None:
        import rasterio
        from rasterio.enums import ColorInterp
        from rasterio.errors import RasterioIOError

        check_local_file(uri)
        # GDAL settings apply per call (rasterio.Env is a per-thread stack: holding one open for the
        # reader's lifetime breaks when readers are closed in another order than they were opened)
        self._gdal = gdal_options(uri)
        # level N of a GeoTIFF/COG is its overview N (level 0 = full resolution)
        opts = {"overview_level": level - 1} if level else {}
        try:
            with warnings.catch_warnings(), rasterio.Env(**self._gdal):
                # plain photos have no georeference, and that is fine
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._ds = rasterio.open(gdal_path(uri), **opts)
        except RasterioIOError as e:
            raise _gdal_error(uri, e, "") from e
        try:
            self._setup(uri, bands, level, ColorInterp)
        except BaseException:
            self.close()
            raise

    def _setup(self, uri: str, bands: Sequence[int] | None, level: int | None, ColorInterp: Any) -> None:
        ds = self._ds
        if ds.driver == "PNG" and png_is_whole(uri):
            self._gdal = {**self._gdal, "GDAL_PNG_WHOLE_IMAGE_OPTIM": "YES"}
        extra: dict[str, Any] = {"level": level or 0}
        interp = list(ds.colorinterp)
        self._lut: np.ndarray | None = None  # palette: (entries, 4) RGBA by index
        if ds.count == 1 and interp[0] == ColorInterp.palette:
            self._lut = self._palette_lut(uri)
            colour = [1, 2, 3]  # positions in the expanded RGB(A)
            extra["layout"] = "palette"
            note = " (a palette image, expanded to RGB)"
        else:
            alpha = [i + 1 for i, ci in enumerate(interp) if ci == ColorInterp.alpha]
            colour = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha] if alpha else \
                list(range(1, ds.count + 1))
            if not colour:  # an alpha-only raster: read it as a band
                colour, alpha = list(range(1, ds.count + 1)), []
            note = " plus alpha (the nodata mask)" if alpha else ""
            if alpha:
                extra["alpha"] = True
                extra["layout"] = "gray+alpha" if len(colour) == 1 else "rgba" if len(colour) == 3 else "bands+alpha"
        space = ds.tags(ns="IMAGE_STRUCTURE").get("SOURCE_COLOR_SPACE")
        if space and space not in ("YCbCr", "RGB"):
            extra["source_color_space"] = space  # e.g. CMYK: GDAL already converted it to RGB
        extra["bands_in_file"] = len(colour)
        self._indexes = [colour[b - 1] for b in select_bands(len(colour), bands, uri, note)]
        pages = self._pages(uri)
        if pages > 1:
            extra["pages"] = pages
            extra["note"] = f"multi-page TIFF: page 1 of {pages} read (the other pages are smaller previews)"
        crs = ds.crs.to_wkt() if ds.crs else None
        t = ds.transform
        georeferenced = crs is not None or not t.is_identity or bool(ds.gcps[0])
        self._orientation = 1 if georeferenced or level else exif_orientation(uri, ds.driver, ds.tags())
        if self._orientation != 1:
            extra["exif_orientation"] = self._orientation
        self._blocks = self._block_layout(uri, level)
        height, width = oriented_size(self._orientation, ds.height, ds.width)
        # the source pixel type of the bands served (a palette's colours are 8-bit)
        dtype = str(self._lut.dtype) if self._lut is not None else str(np.dtype(ds.dtypes[self._indexes[0] - 1]))
        self.info = ImageInfo(
            uri=uri, height=height, width=width, count=len(self._indexes), dtype=dtype,
            crs_wkt=crs,
            transform=(t.a, t.b, t.c, t.d, t.e, t.f) if georeferenced else None,
            nodata=ds.nodata, driver=ds.driver, extra=extra,
            level_shapes=self._overview_shapes() if not level and self._orientation == 1 else (),
        )

    def _block_layout(self, uri: str, level: int | None) -> tuple[Any, tuple[int, int]] | None:
        """(the file's identity, block shape) when windows are assembled from shared decoded blocks
        (:mod:`segpipe.io.readers.blocks`): a local tiled GeoTIFF read as stored (no palette, no rotation)."""
        ds = self._ds
        if ds.driver != "GTiff" or self._lut is not None or self._orientation != 1 or has_scheme(uri):
            return None
        shapes = {tuple(ds.block_shapes[i - 1]) for i in self._indexes}
        if len(shapes) != 1:
            return None
        bh, bw = shapes.pop()
        if bh < 16 or bw < 16:  # scanlines or thin strips: GDAL's own path
            return None
        try:
            st = os.stat(strip_file_scheme(uri))
        except OSError:
            return None
        # a file rewritten in place is another key: its blocks are never served from the old one's
        ident = (os.path.realpath(strip_file_scheme(uri)), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                 level or 0, tuple(self._indexes))
        return ident, (bh, bw)

    def _overview_shapes(self) -> tuple[tuple[int, int], ...]:
        """Level 0 and each overview's (height, width): GDAL sizes overview N as ``ceil(size / factor)``."""
        ds = self._ds
        factors = ds.overviews(self._indexes[0] if self._lut is None else 1)
        if not factors:
            return ()
        return ((ds.height, ds.width), *((-(-ds.height // f), -(-ds.width // f)) for f in factors))

    def _palette_lut(self, uri: str) -> np.ndarray:
        cmap = self._ds.colormap(1)
        size = 256 if self._ds.dtypes[0] == "uint8" else max(cmap) + 1
        lut = np.zeros((size, 4), np.uint8)
        lut[:, 3] = 255
        for k, rgba in cmap.items():
            if 0 <= k < size:
                lut[k] = rgba
        return lut

    def _pages(self, uri: str) -> int:
        """Pages of a multi-page TIFF (1 otherwise); refuses one whose further pages are full images."""
        import rasterio

        ds = self._ds
        subs = [s for s in ds.subdatasets if s.startswith("GTIFF_DIR:")] if ds.driver == "GTiff" else []
        if len(subs) < 2:
            return 1
        for i, sub in enumerate(subs[1:_MAX_PAGES_CHECKED], start=2):
            try:
                with warnings.catch_warnings(), rasterio.Env(**self._gdal):
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    with rasterio.open(sub) as page:
                        size = (page.height, page.width)
            except rasterio.errors.RasterioIOError:
                continue
            if size[0] >= ds.height and size[1] >= ds.width:
                raise InputError(uri, f"is a multi-page TIFF with {len(subs)} pages and page {i} is a full "
                                 f"{size[1]}×{size[0]} image: segpipe segments one image per file; split the "
                                 f"pages first (e.g. gdal_translate GTIFF_DIR:{i}:<file> page{i}.tif)")
        return len(subs)

    # ---- reading: stored pixels → model bands (palette expanded) → displayed orientation

    def _read_stored(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        from rasterio.windows import Window as RWindow

        if self._blocks is not None and self.cache_blocks:  # whole blocks, each decoded once per process
            ident, shape = self._blocks
            ds = self._ds
            return assemble(ident, y0, x0, h, w, shape, (ds.height, ds.width),
                            lambda by, bx, bh, bw: ds.read(self._indexes, window=RWindow(bx, by, bw, bh)))
        win = RWindow(x0, y0, w, h)
        if self._lut is None:
            return self._ds.read(self._indexes, window=win)
        idx = self._ds.read(1, window=win)
        rgba = self._lut[np.minimum(idx, len(self._lut) - 1)]  # (h, w, 4)
        return np.ascontiguousarray(np.moveaxis(rgba, -1, 0)[[i - 1 for i in self._indexes]])

    def _read_inside(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        ds, o = self._ds, self._orientation
        sy, sx, sh, sw = stored_window(o, ds.height, ds.width, y0, x0, h, w)
        return np.ascontiguousarray(orient_block(o, self._read_stored(sy, sx, sh, sw)))

    def read(self, window: Window) -> np.ndarray:
        import rasterio
        from rasterio.errors import RasterioError

        info = self.info
        try:
            with rasterio.Env(**self._gdal):
                if window.inside(info.height, info.width):
                    return self._read_inside(window.y0, window.x0, window.h, window.w)
                ys, xs = source_indices(window, info.height, info.width)
                y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                block = self._read_inside(y0, x0, y1 - y0, x1 - x0)
        except RasterioError as e:
            raise _gdal_error(info.uri, e, "corrupt or truncated image") from e
        # slice copies of the block's runs, not a per-pixel gather (docs/benchmarks.md, "Design measurements")
        return gather(block, ys - y0, xs - x0)

    @property
    def has_mask(self) -> bool:
        """True when the raster declares invalid pixels (a nodata value, a mask band, alpha, a transparent
        palette entry)."""
        from rasterio.enums import MaskFlags

        if self._lut is not None:
            return bool((self._lut[:, 3] == 0).any()) or self._ds.mask_flag_enums[0] != [MaskFlags.all_valid]
        return any(f != [MaskFlags.all_valid] for f in (self._ds.mask_flag_enums[i - 1] for i in self._indexes))

    def _valid_stored(self, y0: int, x0: int, h: int, w: int, out_shape: tuple[int, int] | None = None
                      ) -> np.ndarray:
        from rasterio.windows import Window as RWindow

        win = RWindow(x0, y0, w, h)
        if self._lut is not None:
            idx = self._ds.read(1, window=win, out_shape=out_shape)
            valid = self._lut[np.minimum(idx, len(self._lut) - 1), 3] > 0
            return valid & (self._ds.read_masks(1, window=win, out_shape=out_shape) > 0)
        indexes = sorted(set(self._indexes))
        shape = None if out_shape is None else (len(indexes), *out_shape)
        return (self._ds.read_masks(indexes, window=win, out_shape=shape) > 0).any(axis=0)

    def read_valid(self, window: Window) -> np.ndarray | None:
        """Valid-data mask (True = data) of an in-image window, or None when every pixel is valid.

        A pixel is valid when any selected band is valid (GDAL's dataset mask semantics); alpha 0
        and transparent palette entries are no data.
        """
        import rasterio
        from rasterio.errors import RasterioError

        if not self.has_mask:
            return None
        ds, o = self._ds, self._orientation
        sy, sx, sh, sw = stored_window(o, ds.height, ds.width, window.y0, window.x0, window.h, window.w)
        try:
            with rasterio.Env(**self._gdal):
                return np.ascontiguousarray(orient_block(o, self._valid_stored(sy, sx, sh, sw)))
        except RasterioError as e:  # a mask is read from the file like the pixels: the same errors
            raise _gdal_error(self.info.uri, e, "corrupt or truncated image") from e

    def overview(self, max_side: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
        """(bands, h, w) pixels of the whole image at most ``max_side`` a side (GDAL overviews when the
        file has them, else nearest-neighbour decimation) and its valid mask (None: all valid)."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError
        from rasterio.windows import Window as RWindow

        ds, o = self._ds, self._orientation
        f = max(1.0, max(ds.height, ds.width) / max_side)
        shape = (max(1, round(ds.height / f)), max(1, round(ds.width / f)))
        win = RWindow(0, 0, ds.width, ds.height)
        try:
            with rasterio.Env(**self._gdal):
                if self._lut is None:
                    px = ds.read(self._indexes, window=win, out_shape=(len(self._indexes), *shape),
                                 resampling=Resampling.nearest)
                else:
                    idx = ds.read(1, window=win, out_shape=shape, resampling=Resampling.nearest)
                    px = np.moveaxis(self._lut[np.minimum(idx, len(self._lut) - 1)], -1, 0)
                    px = px[[i - 1 for i in self._indexes]]
                valid = self._valid_stored(0, 0, ds.height, ds.width, shape) if self.has_mask else None
        except RasterioError as e:
            raise _gdal_error(self.info.uri, e, "corrupt or truncated image") from e
        return orient_block(o, px), None if valid is None else orient_block(o, valid)

    def close(self) -> None:
        if getattr(self, "_ds", None) is not None:
            self._ds.close()
            self._ds = None

    def __enter__(self) -> RasterioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
