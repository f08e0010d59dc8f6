"""Storage helpers over fsspec: list images under a source, fingerprint them, name outputs.

A *source* is a local file, a local folder (searched recursively), a glob, or any fsspec
URL (``s3://bucket/prefix/``, ``gs://…``, ``memory://…``). S3-compatible endpoints are
configured the standard way: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) plus the
usual AWS credential variables or profiles.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from segpipe.core.errors import InputError, OutputError, TransientIOError

#: extensions searched for when a source is a folder or prefix
IMAGE_EXTENSIONS = (
    ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".vrt", ".img",
    ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide",
)

_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME_RE.match(uri)) and not uri.startswith("file://")


def strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def absolute_uri(uri: str) -> str:
    """``uri`` independent of the working directory: a local path made absolute, a URL as it is.

    What a record that outlives the process keeps (a GeoPackage export's origin), so a reader started
    from another folder (cron, a Prefect deployment) finds the same file.
    """
    if has_scheme(uri):
        return uri
    return os.path.normpath(os.path.abspath(strip_file_scheme(uri)))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path within it."""
    if "://" not in uri and "::" not in uri:
        # a plain local path: what url_to_fs answers, without its parsing (called a dozen times per image,
        # it was a tenth of a small chip's per-image work: docs/benchmarks.md, issue 22)
        return LocalFileSystem(), LocalFileSystem._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', keeping a URL scheme intact."""
    base = base.rstrip("/") if base not in ("/",) else base
    return "/".join([base, *[p.strip("/") for p in parts if p]])


@dataclass(frozen=True)
class ItemRef:
    """The STAC item an image came from (:mod:`segpipe.io.stac`): recorded in the output's provenance and
    linked from the output's own STAC item."""

    href: str  #: the item's own URL or path
    id: str
    collection: str | None
    asset: str  #: the asset key that was segmented
    updated: str | None = None  #: the item's ``updated`` (else ``created``) time: the only-new-work key
    datetime: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"href": self.href, "id": self.id, "collection": self.collection, "asset": self.asset,
                "updated": self.updated, "datetime": self.datetime}


@dataclass(frozen=True)
class SourceImage:
    """One image found under a source: its URI, its path relative to the source root, and a fingerprint."""

    uri: str
    relative: str
    fingerprint: str
    size: int
    #: the STAC item it is an asset of, when it was found through STAC
    item: ItemRef | None = None


def cache_root() -> str:
    """segpipe's local cache folder (compiled labels, exported ONNX graphs): ``$SEGPIPE_CACHE``, else
    ``$XDG_CACHE_HOME/segpipe`` (default ``~/.cache/segpipe``). Everything in it can be deleted at any time."""
    return os.environ.get("SEGPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "segpipe")


def file_version(uri: str) -> str | None:
    """A file's version — size and ETag / modification time, as listings fingerprint images — or None when
    there is no such file. The one definition of "this file changed" (label cache keys, edited exports)."""
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        return _fingerprint(fs.info(path))
    except FileNotFoundError:
        return None


def _fingerprint(info: dict) -> str:
    size = info.get("size")
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return f"{size}:{str(info[key]).strip(chr(34))}"
    return f"{size}"


def tree_fingerprint(uri: str) -> str:
    """sha256 of every file under ``uri`` (relative path, size, mtime/ETag); ``""`` when nothing is there.

    Cheap (one listing, no file read): a retrain compares it with the last run's to know whether its
    data changed. A file rewritten in place changes its mtime/ETag, so it counts as changed.
    """
    import hashlib

    fs, path = filesystem(strip_file_scheme(uri))
    try:
        if not fs.exists(path):
            return ""
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except FileNotFoundError:
        return ""
    h = hashlib.sha256()
    for p in sorted(found):
        h.update(f"{p[len(path):]}\0{_fingerprint(found[p])}\n".encode())
    return h.hexdigest()


def _protocol_prefix(fs: fsspec.AbstractFileSystem, uri: str) -> str:
    if not has_scheme(uri):
        return ""
    return uri.split("://", 1)[0] + "://"


def list_images(source: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[SourceImage]:
    """List the images under ``source`` (file, folder, glob or fsspec URL), sorted by relative path.

    A single file gives ``relative`` = its file name; a folder gives paths relative to it;
    a glob gives paths relative to the part before the first wildcard.
    """
    source = strip_file_scheme(source)
    fs, path = filesystem(source)
    prefix = _protocol_prefix(fs, source)
    found: list[SourceImage] = []
    if any(c in path for c in "*?["):
        root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        infos = fs.glob(path, detail=True)
        for p, info in sorted(infos.items()):
            if info.get("type") == "directory":
                continue
            rel = posixpath.relpath(p, root) if root else p
            found.append(SourceImage(prefix + p, rel, _fingerprint(info), int(info.get("size") or 0)))
        if not found:
            raise InputError(source, "the glob matches no file")
        return found
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(source, "does not exist") from None
    except OSError as e:
        raise _listing_error(source, e) from None
    if info.get("type") == "directory":
        store = _zarr_metadata(fs, path)
        if store is not None:  # a Zarr store given itself (an OME-Zarr image: readers.omezarr) is one image
            uri = source if prefix else os.path.normpath(os.path.abspath(path))
            return [SourceImage(uri, posixpath.basename(path.rstrip("/")), _fingerprint(store), 0)]
        try:
            entries = fs.find(path, detail=True)
        except OSError as e:
            raise _listing_error(source, e) from None
        series: dict[str, list[tuple[str, dict]]] = {}
        for p, finfo in sorted(entries.items()):
            if finfo.get("type") == "directory":
                continue
            if "/." in p[len(path):] or ".zarr/" in p:  # hidden files and Zarr stores are never inputs
                continue
            if p.lower().endswith(DICOM_EXTENSIONS):
                series.setdefault(posixpath.dirname(p), []).append((p, finfo))
                continue
            if not p.lower().endswith(extensions):
                continue
            rel = posixpath.relpath(p, path.rstrip("/"))
            found.append(SourceImage(prefix + p, rel, _fingerprint(finfo), int(finfo.get("size") or 0)))
        found += [_dicom_series(prefix, path, folder, files) for folder, files in series.items()]
        return sorted(found, key=lambda i: i.relative)
    uri = source if prefix else os.path.normpath(os.path.abspath(path))  # one spelling per local file
    return [SourceImage(uri, posixpath.basename(path), _fingerprint(info), int(info.get("size") or 0))]


#: DICOM instances: a folder of them is one whole-slide image (its pyramid levels are the instances)
DICOM_EXTENSIONS = (".dcm",)


def _zarr_metadata(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The file info of a Zarr group's metadata (``zarr.json``, ``.zattrs``, ``.zgroup``) when ``path`` is a
    Zarr store, else None: the store is then one image, fingerprinted by its metadata file."""
    for name in ("zarr.json", ".zattrs", ".zgroup"):
        try:
            return fs.info(join(path, name))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
    return None


def _dicom_series(prefix: str, root: str, folder: str, files: list[tuple[str, dict]]) -> SourceImage:
    """One image of a folder of DICOM instances (a DICOM WSI series: OpenSlide 4 opens it from any of its
    files and finds the others in the folder). Named after the folder; fingerprinted by every instance."""
    import hashlib

    h = hashlib.sha256()
    for p, finfo in files:
        h.update(f"{posixpath.basename(p)}\0{_fingerprint(finfo)}\n".encode())
    rel = posixpath.relpath(folder, root.rstrip("/"))
    name = posixpath.basename(root.rstrip("/")) if rel == "." else rel
    return SourceImage(prefix + files[0][0], name + ".dcm", f"dicom:{h.hexdigest()[:32]}",
                       sum(int(f.get("size") or 0) for _, f in files))


def _reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symbolic link loop"
    if _denied_by_store(e):
        return f"access denied by the store: {str(e).strip() or 'AccessDenied'}"
    return e.strerror or str(e) or type(e).__name__


def _denied_by_store(e: BaseException) -> bool:
    """A 403 from an object store (s3fs raises ``PermissionError`` without an errno), not a local EACCES."""
    return isinstance(e, PermissionError) and e.errno is None


def _listing_error(source: str, e: OSError) -> InputError | TransientIOError:
    """A failed listing of a source: the input's fault (a local permission, a loop) or a fault that may pass."""
    if isinstance(e, PermissionError) and not _denied_by_store(e):
        return InputError(source, "cannot be read (permission denied)")
    if _permanent(e) or not has_scheme(source):
        return InputError(source, f"cannot be listed ({_reason(e)})")
    return TransientIOError(source, f"cannot be listed ({_reason(e)})")


def safe_relative(relative: str) -> str:
    """Sanitise a relative name from a bucket key or path: no absolute paths, no '..', no empty parts."""
    parts = [p for p in PurePosixPath(relative.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    if not parts:
        raise InputError(relative, "cannot derive an output name from this path")
    return "/".join(parts)


def output_uri(out: str, relative: str, suffix: str = ".zarr", keep_extension: bool = False) -> str:
    """``OUT/<relative path with its extension replaced by .zarr>`` (sanitised).

    ``keep_extension`` gives ``OUT/<relative path>.zarr`` (``hopper.png.zarr``): the name
    used when several images of a run would otherwise share one output (see
    :func:`segpipe.engine.ownership.assign_outputs`).
    """
    rel = safe_relative(relative)
    stem = rel if keep_extension else posixpath.splitext(rel)[0]
    return join(strip_file_scheme(out), stem + suffix)


#: storage errors that retrying cannot fix: they become one line naming the output
_PERMANENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder where a file was expected",
    errno.EFBIG: "file too large for the file system",
}


def _permanent(exc: BaseException) -> str | None:
    """Why retrying ``exc`` cannot help (:data:`_PERMANENT_ERRNOS`, by ``errno`` or class), or None.

    Never by words in the message. Connection errors and time-outs are ``OSError`` too but may pass; so
    may an object store's 403 (``PermissionError`` without an errno: credentials being refreshed, a policy
    still propagating), which is retried and, if it stays, reported as denied access after the retries.
    """
    if isinstance(exc, (ConnectionError, TimeoutError)) or not isinstance(exc, OSError) or _denied_by_store(exc):
        return None
    return _PERMANENT_ERRNOS.get(exc.errno or -1)


@contextlib.contextmanager
def output_errors(uri: str, doing: str = "written") -> Iterator[None]:
    """Every storage error inside the block leaves as :func:`storage_error`'s one line, without a chained
    cause: an :class:`OutputError` when retrying cannot help, else a :class:`TransientIOError` to retry
    (a chunk PUT's ``OSError(EREMOTEIO)``, s3fs's word for a bucket's 500, is one)."""
    try:
        yield
    except OSError as e:
        raise storage_error(uri, e, doing) from None


def storage_error(uri: str, exc: OSError, doing: str = "read") -> OutputError | TransientIOError:
    """The one-line error for a failed storage call on an output (``doing``: "read", "written", …).

    A permanent error (:func:`_permanent`, by ``errno``) is an :class:`OutputError`; anything else (a
    bucket's 5xx or 403, a dropped connection, a time-out, a local I/O error) is a
    :class:`TransientIOError`, retried with the run's :class:`~segpipe.core.retry.RetryPolicy`. Never
    None: callers use it where a storage fault must be *reported*, not mistaken for "nothing there" or
    "another run holds it", nor handled by another code path.
    """
    reason = _permanent(exc)
    if reason is not None:
        return OutputError(uri, f"cannot be {doing}: {reason}")
    lines = _reason(exc).strip().splitlines()
    return TransientIOError(uri, f"cannot be {doing} ({lines[0] if lines else type(exc).__name__})")


def ensure_writable(out: str) -> None:
    """Create ``out`` if needed and prove it can be written (fails early with one clear line: an
    :class:`OutputError`, or a :class:`TransientIOError` for a bucket's fault that may pass)."""
    out = strip_file_scheme(out)
    fs, path = filesystem(out)
    probe = join(path, f".segpipe-write-test-{os.getpid()}")
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        if not has_scheme(out) or _permanent(e):
            raise OutputError(out, f"cannot be written ({_reason(e)})") from None
        raise TransientIOError(out, f"cannot be written ({_reason(e)})") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local file system (where rename is atomic and files can be made read-only)."""
    return isinstance(fs, LocalFileSystem)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    Local: a hidden temporary file in the same folder, flushed and ``os.replace`` d over the
    target. Other filesystems: one ``pipe_file`` call — a single-object PUT, atomic on
    object stores.
    """
    if is_local(fs):
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:  # on disk before it is visible (a completion record); else visible atomically only
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
    else:
        fs.pipe_file(path, data)
