"""Exports of one finished image, called by the applications (CLI, flows, demo) after the engine.

The engine writes the Zarr output and stops there; what else a run writes next to it (COG,
vectors, preview) is the application's choice, so the engine never imports this package.
"""

from __future__ import annotations

from segpipe.core.errors import SegpipeError
from segpipe.core.results import ImageResult
from segpipe.export import Exports, write_exports
from segpipe.io.storage import storage_error


def write_image_exports(result: ImageResult, exports: Exports) -> None:
    """COG / vectors / preview next to a finished output, then its STAC item (CLI and flow alike); a failure
    fails the image."""
    if not exports or result.status not in ("done", "skipped") or not result.output:
        return
    try:
        result.extra["exports"] = write_exports(result.output, result.source, exports,
                                                recompute=result.status == "done", notes=result.notes)
        if exports.stac:  # last: the item lists the exports as assets
            from segpipe.export.stac import write_stac

            result.extra["exports"].update(write_stac(result.output, result.extra["exports"], result.notes))
    except SegpipeError as e:
        result.status, result.error = "failed", f"export of {result.output}: {e}"
    except OSError as e:  # permanent or a fault that may pass (a bucket's 5xx or 403): one line either way
        result.status, result.error = "failed", f"export of {result.output}: {storage_error(result.output, e, 'written')}"
