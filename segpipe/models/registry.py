"""A model registry: immutable numbered versions and a champion pointer, in any folder or bucket.

Layout (a local folder or any fsspec URL)::

    REG/registry.json          {"format": "segpipe-registry/1", "created": iso}  (the marker)
    REG/v1/ REG/v2/ …          one artifact each (model.json, weights.safetensors) plus optional
                               metrics.json, report.html, report.md; mlm.json (the version as a STAC
                               MLM item: segpipe.models.mlm); registration.json last
    REG/champion               {"version": "v3", "promoted_at": iso, "reason": "...", "previous": "v2"}
    REG/history.jsonl          one line per promotion (append-only log, informational)
    REG/runs/<stamp>/          retrain rounds (challenger run folder, evaluations, report) when no workdir is given

``prune`` keeps the registry small: all but the newest N versions go, never the champion nor the previous one.

Guarantees and why they hold:

* **Versions are immutable.** ``register`` claims the next number *exclusively* before writing
  (local: ``os.mkdir`` fails when the folder exists; object stores: the claim object
  ``vN/.claim`` is created with ``mode="xb"``, which s3fs sends as a conditional
  ``PutObject`` with ``If-None-Match: *``), so two concurrent registrations never share a
  number and nothing is ever written into an existing version. ``registration.json`` is
  written last: a version without it is an interrupted registration and is skipped.
* **The champion pointer is never seen half-written.** Local: written to a hidden temporary
  file in the same folder, then ``os.replace`` d over the pointer (atomic rename on POSIX);
  a crash leaves at most a stray ``.champion.tmp-*`` file that readers ignore. Remote: one
  single-object PUT, which object stores (S3, GCS, Azure) apply atomically — readers see
  the old or the new object, never a mix.
* On a filesystem whose fsspec driver cannot create exclusively, ``register`` falls back to
  "check, then write": run registrations into such a registry one at a time.

``resolve`` turns what users pass as ``--model`` into an artifact folder: an artifact folder
as is, a registry folder → its champion, ``REGISTRY@vN`` → that version.

Why this module is long: registering, listing, promoting, the history and pruning all read and write
one on-disk layout (versions, ``champion.json``, runs) through the same small private helpers; the
layout stays in one module so no other one depends on its private details.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from segpipe.core.errors import ModelError, OutputError
from segpipe.io.storage import filesystem, is_local, join, strip_file_scheme, write_atomic

FORMAT = "segpipe-registry/1"
MARKER = "registry.json"
CHAMPION = "champion"
HISTORY = "history.jsonl"
REGISTRATION = "registration.json"
#: files copied from an artifact folder into a version (anything else, e.g. checkpoint/, stays behind)
ARTIFACT_FILES = ("model.json", "weights.safetensors")
REPORT_FILES = ("report.html", "report.md")
METRICS = "metrics.json"

_VERSION_RE = re.compile(r"^v(\d+)$")
_SELECTOR_RE = re.compile(r"^(.+)@(v\d+)$")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return filesystem(strip_file_scheme(uri))


def _read_json(fs: fsspec.AbstractFileSystem, path: str, what: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(what, f"is not valid JSON ({e})") from None


def _version_numbers(fs: fsspec.AbstractFileSystem, path: str) -> list[int]:
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        m = _VERSION_RE.match(name)
        if m and e.get("type") == "directory":
            out.append(int(m.group(1)))
    return sorted(out)


def is_registry(uri: str) -> bool:
    """True when ``uri`` holds a ``registry.json`` marker or ``vN`` version folders (and no model.json)."""
    fs, path = _fs(uri)
    try:
        if fs.exists(join(path, MARKER)):
            return True
        if fs.exists(join(path, "model.json")):
            return False
        return bool(_version_numbers(fs, path))
    except (OSError, ValueError):
        return False


def init_registry(uri: str) -> str:
    """Create the registry folder and its marker (idempotent); returns ``uri``."""
    fs, path = _fs(uri)
    if fs.exists(join(path, "model.json")):
        raise ModelError(uri, "is a model artifact folder, not a registry")
    try:
        fs.makedirs(path, exist_ok=True)
        if not fs.exists(join(path, MARKER)):
            marker = {"format": FORMAT, "created": _now()}
            write_atomic(fs, join(path, MARKER), (json.dumps(marker, indent=2) + "\n").encode())
    except PermissionError as e:
        raise OutputError(uri, f"cannot be written ({e})") from None
    return uri


def _require_registry(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if not is_registry(uri):
        raise ModelError(uri, "is not a model registry (no registry.json and no v1, v2, … folders)")
    return _fs(uri)


def _claim(fs: fsspec.AbstractFileSystem, reg: str, n: int) -> bool:
    """Claim version ``n`` exclusively; False when someone else has it."""
    vpath = join(reg, f"v{n}")
    if is_local(fs):
        try:
            os.mkdir(vpath)
            return True
        except FileExistsError:
            return False
    claim = join(vpath, ".claim")
    try:
        with fs.open(claim, "xb") as f:
            f.write(uuid.uuid4().hex.encode())
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # driver without exclusive create: check, then write
        if fs.exists(vpath) and fs.ls(vpath):
            return False
        fs.pipe_file(claim, uuid.uuid4().hex.encode())
        return True


def _copy(src_fs, src: str, dst_fs, dst: str) -> str:
    """Stream a file across filesystems; returns the sha256 of the bytes copied."""
    h = hashlib.sha256()
    with src_fs.open(src, "rb") as r, dst_fs.open(dst, "wb") as w:
        while True:
            block = r.read(8 << 20)
            if not block:
                break
            h.update(block)
            w.write(block)
    return h.hexdigest()


def register(reg_uri: str, artifact_uri: str, *, metrics: dict[str, Any] | str | None = None,
             report_dir: str | None = None) -> str:
    """Copy an artifact into the next free version ``vN`` of the registry; returns ``"vN"``.

    ``metrics``: a metrics.json dict or the URI of one (default: the artifact's own metrics.json,
    if it has one). ``report_dir``: a folder whose report.html / report.md are copied along.
    A missing or empty ``reg_uri`` is initialised first. Never overwrites an existing version.
    """
    from segpipe.models.artifact import read_spec
    from segpipe.models.mlm import MLM_ITEM, mlm_item

    artifact_uri = resolve(artifact_uri)
    spec = read_spec(artifact_uri)  # validates model.json before anything is written
    afs, apath = _fs(artifact_uri)
    if not afs.exists(join(apath, "weights.safetensors")):
        raise ModelError(artifact_uri, "missing weights.safetensors")
    rfs, rpath = _fs(reg_uri)
    if not is_registry(reg_uri):
        if rfs.exists(rpath) and rfs.ls(rpath):
            raise ModelError(reg_uri, "is not a model registry and not empty; use an empty folder or "
                                      "init_registry()")
        init_registry(reg_uri)

    metrics_blob: bytes | None = None
    if isinstance(metrics, dict):
        metrics_blob = (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode()
    elif isinstance(metrics, str):
        mfs, mpath = _fs(metrics)
        try:
            metrics_blob = mfs.cat_file(mpath)
        except FileNotFoundError:
            raise ModelError(metrics, "metrics file does not exist") from None
    elif afs.exists(join(apath, METRICS)):
        metrics_blob = afs.cat_file(join(apath, METRICS))
    reports: list[tuple[Any, str, str]] = []
    if report_dir is not None:
        dfs, dpath = _fs(report_dir)
        reports = [(dfs, join(dpath, n), n) for n in REPORT_FILES if dfs.exists(join(dpath, n))]
        if not reports:
            raise ModelError(report_dir, f"holds none of {', '.join(REPORT_FILES)}")

    n = (_version_numbers(rfs, rpath) or [0])[-1] + 1
    while not _claim(rfs, rpath, n):
        n += 1
    version = f"v{n}"
    vpath = join(rpath, version)
    sha = ""
    for name in ARTIFACT_FILES:
        digest = _copy(afs, join(apath, name), rfs, join(vpath, name))
        if name == "weights.safetensors":
            sha = digest
    if metrics_blob is not None:
        rfs.pipe_file(join(vpath, METRICS), metrics_blob)
    for dfs, src, name in reports:
        _copy(dfs, src, rfs, join(vpath, name))
    record = {"version": version, "created": _now(), "source": artifact_uri, "weights_sha256": sha,
              "architecture": spec.architecture, "encoder": spec.encoder}
    # the version as a STAC MLM item (what outputs made with it link to)
    item = mlm_item(join(strip_file_scheme(reg_uri).rstrip("/"), version), spec, sha,
                    item_id=f"{_registry_name(reg_uri)}-{version}", created=record["created"])
    rfs.pipe_file(join(vpath, MLM_ITEM), (json.dumps(item, indent=2) + "\n").encode())
    # written last: a version folder without it is an interrupted registration
    write_atomic(rfs, join(vpath, REGISTRATION), (json.dumps(record, indent=2) + "\n").encode())
    if is_local(rfs):  # make the immutability visible: the files are read-only
        for name in os.listdir(vpath):
            p = os.path.join(vpath, name)
            if os.path.isfile(p):
                os.chmod(p, 0o444)
    return version


def _registry_name(reg_uri: str) -> str:
    return os.path.basename(strip_file_scheme(reg_uri).rstrip("/")) or "registry"


def version_mlm_item(model: str) -> dict[str, Any]:
    """The STAC MLM item of what ``--model`` names: a registry version's stored ``mlm.json`` (made when it
    was registered), else one made from the artifact (:func:`segpipe.models.mlm.artifact_mlm_item`)."""
    from segpipe.models.mlm import MLM_ITEM, artifact_mlm_item

    uri = resolve(model)
    fs, path = _fs(uri)
    stored = join(path, MLM_ITEM)
    if fs.exists(stored):
        return _read_json(fs, stored, "MLM item")
    parent = os.path.dirname(strip_file_scheme(uri).rstrip("/"))
    name = os.path.basename(strip_file_scheme(uri).rstrip("/"))
    item_id = f"{_registry_name(parent)}-{name}" if _VERSION_RE.match(name) and is_registry(parent) else None
    return artifact_mlm_item(uri, item_id=item_id)


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as ``models list`` shows it."""

    version: str
    uri: str
    created: str | None
    architecture: str
    encoder: str
    classes: list[str]
    weights_sha256: str
    val_mean_iou: float | None
    is_champion: bool


def _complete_versions(fs, path: str) -> list[str]:
    return [f"v{n}" for n in _version_numbers(fs, path) if fs.exists(join(path, f"v{n}", REGISTRATION))]


def _mean_iou(fs, vpath: str, spec_extra: dict) -> float | None:
    m = _read_json(fs, join(vpath, METRICS), join(vpath, METRICS))
    if isinstance(m, dict) and isinstance(m.get("mean_iou"), (int, float)):
        return float(m["mean_iou"])
    ms = spec_extra.get("metrics")
    if isinstance(ms, dict) and isinstance(ms.get("val_mean_iou"), (int, float)):
        return float(ms["val_mean_iou"])
    return None


def list_versions(reg_uri: str) -> list[VersionInfo]:
    """Every complete version, oldest first (interrupted registrations are skipped)."""
    from segpipe.models.artifact import read_spec

    fs, path = _require_registry(reg_uri)
    champ = champion(reg_uri)
    out = []
    for v in _complete_versions(fs, path):
        vpath = join(path, v)
        vuri = join(strip_file_scheme(reg_uri), v)
        spec = read_spec(vuri)
        rec = _read_json(fs, join(vpath, REGISTRATION), join(vuri, REGISTRATION)) or {}
        out.append(VersionInfo(
            version=v, uri=vuri, created=rec.get("created"), architecture=spec.architecture,
            encoder=spec.encoder, classes=list(spec.classes), weights_sha256=rec.get("weights_sha256", ""),
            val_mean_iou=_mean_iou(fs, vpath, spec.model_extra or {}), is_champion=v == champ,
        ))
    return out


def weights_sha256(reg_uri: str, version: str) -> str | None:
    """The sha256 of ``version``'s weights as its registration recorded it (None: no such complete version)."""
    fs, path = _fs(reg_uri)
    rec = _read_json(fs, join(path, version, REGISTRATION), join(strip_file_scheme(reg_uri), version, REGISTRATION))
    return rec.get("weights_sha256") if isinstance(rec, dict) else None


def champion(reg_uri: str) -> str | None:
    """The champion version (``"v3"``), or None when nothing has been promoted yet."""
    fs, path = _fs(reg_uri)
    pointer = join(path, CHAMPION)
    data = _read_json(fs, pointer, join(strip_file_scheme(reg_uri), CHAMPION))
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("version"), str) \
            or not _VERSION_RE.match(data["version"]):
        raise ModelError(join(strip_file_scheme(reg_uri), CHAMPION), 'must hold {"version": "vN", ...}')
    return data["version"]


def promote(reg_uri: str, version: str, reason: str = "") -> dict[str, Any]:
    """Make ``version`` the champion (atomic pointer replace) and log it; returns the pointer."""
    fs, path = _require_registry(reg_uri)
    available = _complete_versions(fs, path)
    if version not in available:
        raise ModelError(f"{reg_uri}@{version}", _missing_version(available))
    pointer = {"version": version, "promoted_at": _now(), "reason": reason, "previous": champion(reg_uri)}
    write_atomic(fs, join(path, CHAMPION), (json.dumps(pointer) + "\n").encode())
    _append_history(fs, join(path, HISTORY), pointer)
    return pointer


def _append_history(fs, path: str, entry: dict) -> None:
    line = (json.dumps(entry) + "\n").encode()
    if is_local(fs):
        # O_APPEND: each small write lands whole at the end, even with concurrent promoters
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    else:  # object stores cannot append: read-modify-write (the log is informational)
        try:
            old = fs.cat_file(path)
        except FileNotFoundError:
            old = b""
        fs.pipe_file(path, old + line)


def history(reg_uri: str) -> list[dict[str, Any]]:
    """Promotions, oldest first (skips a torn last line)."""
    fs, path = _fs(reg_uri)
    try:
        text = fs.cat_file(join(path, HISTORY)).decode()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` removed (or would remove, ``dry_run``) and what it kept, and why."""

    removed: list[tuple[str, int]]  #: (version, bytes), its run folder included
    kept: dict[str, str]  #: version → why it stays ("champion", "previous champion", "newest")
    freed: int  #: bytes
    dry_run: bool


def _run_folder(fs, reg_path: str, vpath: str) -> str | None:
    """The retrain run folder ``REG/runs/<stamp>`` a version's challenger was trained in, if it lies there."""
    rec = _read_json(fs, join(vpath, REGISTRATION), join(vpath, REGISTRATION)) or {}
    # the source was recorded as the retrain named it (perhaps relative to another working directory):
    # ".../runs/<stamp>/challenger" names the run folder by its last parts
    parts = strip_file_scheme(str(rec.get("source") or "")).rstrip("/").split("/")
    if len(parts) < 3 or parts[-3] != "runs" or not parts[-2]:
        return None
    run = join(reg_path, "runs", parts[-2])
    return run if fs.isdir(run) else None


def _size(fs, path: str) -> int:
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def prune(reg_uri: str, keep: int, *, dry_run: bool = False) -> Pruned:
    """Remove all but the ``keep`` newest versions — never the champion nor the previous champion.

    A removed version takes its retrain run folder along (``REG/runs/<stamp>``: its challenger, evaluations
    and report) when the run lies in the registry. ``keep`` ≥ 1: the newest version always stays, so a
    version number is never handed out twice. Interrupted registrations (no ``registration.json``: perhaps
    one in progress) are left alone. The champion pointer is read again before each removal: a version
    promoted meanwhile stays.
    """
    if keep < 1:
        raise ModelError(reg_uri, f"--keep must be at least 1 (the newest version always stays), got {keep}")
    fs, path = _require_registry(reg_uri)
    versions = _complete_versions(fs, path)

    def protected() -> dict[str, str]:
        why: dict[str, str] = {v: "newest" for v in versions[-keep:]}
        pointer = _read_json(fs, join(path, CHAMPION), join(strip_file_scheme(reg_uri), CHAMPION)) or {}
        if isinstance(pointer, dict):
            if isinstance(pointer.get("previous"), str):
                why[pointer["previous"]] = "previous champion"
            if isinstance(pointer.get("version"), str):
                why[pointer["version"]] = "champion"
        return why

    kept = protected()
    removed: list[tuple[str, int]] = []
    for v in versions:
        if v in kept:
            continue
        vpath = join(path, v)
        run = _run_folder(fs, path, vpath)
        size = _size(fs, vpath) + (_size(fs, run) if run else 0)
        if not dry_run:
            if v in protected():  # promoted since we looked
                kept = protected()
                continue
            if run:
                fs.rm(run, recursive=True)
            fs.rm(vpath, recursive=True)
        removed.append((v, size))
    return Pruned(removed, {v: kept[v] for v in versions if v in kept}, sum(b for _, b in removed), dry_run)


def _missing_version(available: list[str]) -> str:
    return f"no such version; available: {', '.join(available)}" if available else "no such version; " \
        "the registry holds no versions yet"


def resolve(uri: str) -> str:
    """What ``--model`` names → an artifact folder.

    * a folder with ``model.json`` → itself (even if its name ends in ``@vN``);
    * ``REGISTRY@vN`` (only a final ``@v<digits>``) → ``REGISTRY/vN``;
    * a registry folder → its champion's folder (ModelError when there is none yet);
    * anything else → unchanged (loading it reports what is missing).
    """
    fs, path = _fs(uri)
    try:
        if fs.exists(join(path, "model.json")):
            return uri
    except (OSError, ValueError):
        return uri
    m = _SELECTOR_RE.match(uri.rstrip("/"))
    if m:
        base, version = m.group(1), m.group(2)
        if not is_registry(base):
            raise ModelError(base, f"is not a model registry (asked for version {version})")
        bfs, bpath = _fs(base)
        available = _complete_versions(bfs, bpath)
        if version not in available:
            raise ModelError(uri, _missing_version(available))
        return join(strip_file_scheme(base), version)
    if is_registry(uri):
        champ = champion(uri)
        if champ is None:
            raise ModelError(uri, "registry has no champion yet (promote a version first)")
        return join(strip_file_scheme(uri), champ)
    return uri

