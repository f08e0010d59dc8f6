"""OME-Zarr (OME-NGFF 0.4 and 0.5) multiscale images, local or on buckets, read as a pyramid like a slide's.

What is read from the metadata (``multiscales[0]``; 0.5 keeps it under the ``ome`` attribute):

* the **axes**: ``y`` and ``x`` (type ``space``), an optional channel axis (type ``channel``, or named
  ``c``) that becomes the bands, and any other axis (``t``, ``z``) only when it has one element;
* the **levels**: the ``datasets`` in order, each a Zarr array, listed in ``info.level_shapes``;
* the **pixel size**: level 0's ``x`` scale (``coordinateTransformations``, times the multiscale's own
  scale, if any) in the axis's ``unit``, as microns per pixel; a level's is that times its size ratio, so
  ``--mpp`` picks a level and resamples from it exactly as for a slide (:mod:`segpipe.core.grid`,
  :func:`segpipe.io.readers.resample.on_grid`).

A bioformats2raw conversion (``bioformats2raw.layout``) is read through its first image (``0/``). Windows
read only the chunks they cover. The reader follows the slide readers (``PyramidReader`` of
:mod:`segpipe.io.readers.slide`): one pyramid level as it is, the level shapes, the mpp, reflection past
the edges, thumbnails for the tissue mask.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.errors import InputError
from segpipe.io.readers.base import ImageInfo
from segpipe.io.readers.raster import select_bands
from segpipe.io.readers.slide import PyramidReader, check_level  # noqa: PLC2701 - the slide readers' shared logic
from segpipe.io.storage import filesystem, has_scheme, join, strip_file_scheme

#: NGFF space units → micrometres
_UNIT_TO_UM = {"angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "micron": 1.0, "millimeter": 1e3,
               "centimeter": 1e4, "meter": 1e6}


def is_zarr_store(uri: str) -> bool:
    """Whether ``uri`` is a Zarr group folder or prefix (``zarr.json`` of Zarr 3, ``.zgroup``/``.zattrs`` of 2)."""
    fs, path = filesystem(strip_file_scheme(uri))
    try:
        return any(fs.exists(join(path, name)) for name in ("zarr.json", ".zattrs", ".zgroup"))
    except (OSError, ValueError):
        return False


def _ome(attrs: dict[str, Any]) -> dict[str, Any]:
    """The NGFF attributes of a group: 0.5 nests them under ``ome``, 0.4 keeps them at the top."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def _scale(transforms: Any, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale") or []) == ndim:
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    return scale


class OmeZarrReader(PyramidReader):
    """One image of an OME-Zarr store: its multiscale levels as a pyramid, its channel axis as bands."""

    def __init__(self, uri: str, bands: Sequence[int] | None = None, *, level: int | None = None,
                 group: Any = None) -> None:
        self._group = group if group is not None else open_group(uri)
        ome = _ome(dict(self._group.attrs))
        if "multiscales" not in ome and "bioformats2raw.layout" in ome and "0" in self._group:
            self._group = self._group["0"]  # a bioformats2raw conversion: its first image
            ome = _ome(dict(self._group.attrs))
        multiscales = ome.get("multiscales")
        if not isinstance(multiscales, list) or not multiscales or not multiscales[0].get("datasets"):
            raise InputError(uri, "is a Zarr store without OME-NGFF multiscales metadata")
        ms = multiscales[0]
        axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes") or []]
        names = [str(a.get("name", "")).lower() for a in axes]
        self._arrays: list[Any] = []
        for ds in ms["datasets"]:
            try:
                self._arrays.append(self._group[ds["path"]])
            except (KeyError, TypeError) as e:
                raise InputError(uri, f"multiscales lists dataset {ds.get('path')!r}, which is missing ({e})") from None
        ndim = self._arrays[0].ndim
        if not names:  # NGFF 0.1/0.2 had no axes: tczyx, the last ndim of them
            names = list("tczyx")[-ndim:]
            axes = [{"name": n} for n in names]
        if len(names) != ndim or "y" not in names or "x" not in names:
            raise InputError(uri, f"has axes {names} for {ndim}-D arrays; expected y and x")
        self._axes = names
        band = [i for i, a in enumerate(axes) if a.get("type") == "channel" or names[i] == "c"]
        shape0 = self._arrays[0].shape
        others = [names[i] for i in range(ndim) if names[i] not in ("y", "x") and i not in band and shape0[i] > 1]
        if len(band) > 1 or others:
            raise InputError(uri, f"has axes {names} of shape {list(shape0)}; segpipe reads 2-D images with one "
                                  "channel axis (t and z of size 1)")
        self._band_axis = band[0] if band else None
        count = shape0[self._band_axis] if self._band_axis is not None else 1
        self._indexes = select_bands(count, bands, uri)
        y, x = names.index("y"), names.index("x")
        self._level_shapes = [(int(a.shape[y]), int(a.shape[x])) for a in self._arrays]
        global_scale = _scale(ms.get("coordinateTransformations"), ndim)
        scale0 = _scale(ms["datasets"][0].get("coordinateTransformations"), ndim)
        unit = str(axes[x].get("unit") or "").lower()
        base_mpp = scale0[x] * global_scale[x] * _UNIT_TO_UM[unit] if unit in _UNIT_TO_UM else None
        base_mpp = base_mpp if base_mpp and math.isfinite(base_mpp) and base_mpp > 0 else None
        # a level's pixel size follows from its size, as for every pyramid (segpipe.core.grid decides levels by
        # shape); the datasets' own scales say the same for any pyramid written by a conforming tool
        self._level = check_level(uri, level, len(self._arrays))
        height, width = self._level_shapes[self._level]
        downsample = self._level_shapes[0][1] / width
        self.info = ImageInfo(
            uri=uri, height=height, width=width, count=len(self._indexes), dtype=str(self._arrays[0].dtype),
            mpp=base_mpp * downsample if base_mpp else None, driver="ome-zarr",
            level_shapes=tuple(self._level_shapes),
            extra={
                "level": self._level,
                "level_count": len(self._arrays),
                "vendor": "ome-zarr",
                "ngff_version": ome.get("version") or ms.get("version"),
            },
        )

    def _read_level(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        selection: list[Any] = []
        for i, name in enumerate(self._axes):
            if name == "y":
                selection.append(slice(y0, y0 + h))
            elif name == "x":
                selection.append(slice(x0, x0 + w))
            elif i == self._band_axis:
                selection.append([b - 1 for b in self._indexes])
            else:
                selection.append(0)
        try:
            block = np.asarray(self._arrays[level].get_orthogonal_selection(tuple(selection)))
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise InputError(self.info.uri, f"corrupt or unreadable OME-Zarr level {level} ({e})") from None
        kept = [i for i, s in enumerate(selection) if not isinstance(s, int)]
        if self._band_axis is None:
            return block[None, ...]
        # kept axes keep their NGFF order (channel before y and x), so the band axis is already first
        return np.moveaxis(block, kept.index(self._band_axis), 0)

    def close(self) -> None:
        self._arrays = []
        self._group = None


def open_group(uri: str) -> Any:
    """The store's root group, read-only (Zarr 2 or 3, local or any fsspec URL)."""
    import zarr

    try:
        return zarr.open_group(strip_file_scheme(uri).rstrip("/"), mode="r")
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise InputError(uri, f"cannot be opened as a Zarr store ({e})") from None
    except Exception as e:  # noqa: BLE001 - zarr's GroupNotFoundError and store errors
        raise InputError(uri, f"cannot be opened as a Zarr store ({type(e).__name__}: {e})") from None


def open_omezarr(uri: str, bands: Sequence[int] | None = None, level: int | None = None) -> OmeZarrReader | None:
    """An :class:`OmeZarrReader` when ``uri`` is a Zarr store with OME-NGFF multiscales (or a bioformats2raw
    layout), else None; decided by content. Remote URLs are probed only when they end in ``.zarr`` (an image
    file on a bucket costs no extra request). A Zarr store that is not an OME-Zarr image, or a segpipe output
    (class ids, not an image), is refused in one line."""
    path = strip_file_scheme(uri).rstrip("/")
    if has_scheme(uri) and not path.lower().endswith(".zarr"):
        return None
    if not has_scheme(uri) and not os.path.isdir(path):
        return None
    if not is_zarr_store(uri):
        return None
    group = open_group(uri)
    attrs = dict(group.attrs)
    if "segpipe" in attrs:
        raise InputError(uri, "is a segpipe output (class ids), not an image to segment")
    ome = _ome(attrs)
    if "multiscales" not in ome and "bioformats2raw.layout" not in ome:
        raise InputError(uri, "is a Zarr store without OME-NGFF multiscales metadata; segpipe reads OME-Zarr images")
    return OmeZarrReader(uri, bands, level=level, group=group)
