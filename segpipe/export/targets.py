"""Where an export is written: a local path, or a temporary local file uploaded to a remote one.

Every export writes through :func:`local_target`; sidecars written next to the local file
(``.aux.xml``, ``.qml``, a shapefile's ``.shx``/``.dbf``/``.prj``) travel with it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from segpipe.core.errors import OutputError
from segpipe.io.storage import filesystem, has_scheme, strip_file_scheme


def output_stem(path: str) -> str:
    return os.path.splitext(path)[0]


@contextlib.contextmanager
def local_target(path: str, suffix: str | None = None) -> Iterator[str]:
    """A local file path to write; for a remote ``path`` a temp file uploaded afterwards.

    Sidecars written next to the temp file (``export.tif.aux.xml``, ``export.qml``, a
    shapefile's ``.shx``/``.dbf``/``.prj``) are uploaded next to ``path`` under the same rule:
    the temp name's ``export`` is replaced by ``path`` without its extension.
    """
    if not has_scheme(path):
        local = strip_file_scheme(path)
        parent = os.path.dirname(os.path.abspath(local))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise OutputError(path, f"cannot be written ({e.strerror or e})") from None
        yield local
        return
    ext = os.path.splitext(path)[1] or (suffix or "")
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
        local = os.path.join(tmp, "export" + ext)
        yield local
        fs, remote = filesystem(path)
        remote_stem = output_stem(remote)
        try:
            for name in sorted(os.listdir(tmp)):
                if name.startswith("export"):
                    fs.put_file(os.path.join(tmp, name), remote_stem + name[len("export"):])
        except OSError as e:
            raise OutputError(path, f"cannot be uploaded ({e})") from None


def remove_quietly(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
