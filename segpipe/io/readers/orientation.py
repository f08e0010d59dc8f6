"""EXIF orientation: serve the upright (displayed) image of a rotated/flipped photo, window by window.

EXIF orientation o (1–8) says how the stored pixels are turned for display. Readers serve the
*displayed* image: a window of it maps to one window of the stored image plus a flip/transpose.

    displayed (r, c) ← stored:  1 (r, c)   2 (r, W-1-c)   3 (H-1-r, W-1-c)   4 (H-1-r, c)
                                5 (c, r)   6 (H-1-c, r)   7 (H-1-c, W-1-r)   8 (c, W-1-r)

(Pillow's ImageOps.exif_transpose gives the same image.) Used by
:class:`segpipe.io.readers.raster.RasterioReader`; georeferenced images are never turned.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segpipe.io.storage import has_scheme, strip_file_scheme


def oriented_size(orientation: int, height: int, width: int) -> tuple[int, int]:
    """Displayed (height, width) of a stored ``height`` × ``width`` image."""
    return (width, height) if orientation >= 5 else (height, width)


def stored_window(orientation: int, height: int, width: int, y0: int, x0: int, h: int, w: int
                  ) -> tuple[int, int, int, int]:
    """The stored (y0, x0, h, w) holding displayed window (y0, x0, h, w); ``height``/``width`` are stored."""
    H, W = height, width
    if orientation <= 4:
        sy = H - y0 - h if orientation in (3, 4) else y0
        sx = W - x0 - w if orientation in (2, 3) else x0
        return sy, sx, h, w
    sy = H - x0 - w if orientation in (6, 7) else x0  # displayed columns run along stored rows
    sx = W - y0 - h if orientation in (7, 8) else y0
    return sy, sx, w, h


def orient_block(orientation: int, block: np.ndarray) -> np.ndarray:
    """A stored (…, h, w) block as displayed (see :func:`stored_window`)."""
    o = orientation
    if o == 1:
        return block
    if o == 2:
        return block[..., :, ::-1]
    if o == 3:
        return block[..., ::-1, ::-1]
    if o == 4:
        return block[..., ::-1, :]
    t = np.swapaxes(block, -1, -2)
    return {5: t, 6: t[..., :, ::-1], 7: t[..., ::-1, ::-1], 8: t[..., ::-1, :]}[o]


def _png_exif(path: str) -> bytes | None:
    """The eXIf chunk of a PNG before its image data (None when there is none)."""
    import struct

    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(length + 4, 1)


def exif_orientation(path: str, driver: str, tags: dict[str, str]) -> int:
    """EXIF orientation (1–8) of a JPEG (from GDAL), a local PNG (eXIf) or a local TIFF (tag 274); 1 if none."""
    value: Any = tags.get("EXIF_Orientation")
    try:
        if value is None and driver == "PNG" and not has_scheme(path):
            raw = _png_exif(strip_file_scheme(path))
            if raw:
                from PIL import Image

                exif = Image.Exif()
                exif.load(raw if raw.startswith(b"Exif") else b"Exif\x00\x00" + raw)
                value = exif.get(0x0112)
        elif value is None and driver == "GTiff" and not has_scheme(path):
            import tifffile

            with tifffile.TiffFile(strip_file_scheme(path)) as tf:
                tag = tf.pages[0].tags.get(274)
                value = tag.value if tag is not None else None
        o = int(value) if value is not None else 1
    except (OSError, ValueError, TypeError, ImportError, SyntaxError):  # unreadable EXIF: as stored
        return 1
    return o if 1 <= o <= 8 else 1
