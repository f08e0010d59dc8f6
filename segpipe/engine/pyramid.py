"""Lower-resolution pyramid levels of an output, written chunk by chunk.

Level ``L+1`` is level ``L`` halved (``ceil``) on both image axes. Each output chunk of
level ``L+1`` depends only on the 2×2 block of level-``L`` chunks that covers it, so a
level is written as independent chunk tasks (one writer per chunk, as for level 0) and
nothing holds a whole level in memory. Levels are written one after the other.

* class ids are reduced by the **mode** of each 2×2 block (:func:`downsample_mode`):
  averaging class ids would invent classes;
* probabilities are reduced by the **mean** of each 2×2 block (:func:`downsample_mean`).

Odd sizes: the last row/column of blocks is partial (2×1, 1×2 or 1×1 pixels). Both
reductions pad the array by repeating its last row/column (``numpy.pad(mode="edge")``):
a partial block then holds each of its pixels the same number of times, so its mode,
its ties and its mean are exactly those of the partial block itself.

Faults and the fence: on a Dask client each task retries storage faults that may pass with the run's
:class:`~segpipe.core.retry.RetryPolicy` and reports its retries; its key carries the run's prefix, and it
looks at its own state before each chunk it writes (:func:`segpipe.engine.fence.cancelled`), so when a
task fails for good the driver cancels the others and waits until none runs before the image's lock is
let go — as for the tile tasks.

Metadata: the root ``ome.multiscales[0].datasets`` lists every level with
``scale = s0·2^L`` and ``translation = t0 + s0·(2^L − 1)/2`` (``s0``/``t0`` are level 0's).
The translation follows NGFF practice of placing pixel *centres*: level-``L`` pixel ``i``
covers level-0 pixels ``[2^L·i, 2^L·(i+1))``, whose centre is ``2^L·i + (2^L − 1)/2``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal

import numpy as np

from segpipe.core.classes import label_dtype
from segpipe.core.errors import OutputError
from segpipe.core.geometry import batches, ceil_div
from segpipe.core.retry import RetryPolicy
from segpipe.engine.fence import Fenced, RunTasks, cancelled
from segpipe.io.storage import output_errors, strip_file_scheme

Reduction = Literal["mode", "mean"]

#: output chunks per task: big enough to amortise opening the arrays, small enough to spread
_CHUNKS_PER_TASK = 8


# --------------------------------------------------------------------------- pure numerics


def _pad_even(values: np.ndarray) -> np.ndarray:
    """Pad the last two axes to even sizes by repeating the last row/column (see module doc)."""
    h, w = values.shape[-2:]
    if h % 2 == 0 and w % 2 == 0:
        return values
    pad = [(0, 0)] * (values.ndim - 2) + [(0, h % 2), (0, w % 2)]
    return np.pad(values, pad, mode="edge")


def downsample_mode(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """2×2 mode of class ids over the last two axes; output is ``ceil(h/2) × ceil(w/2)``.

    Ties go to the **lowest class id** (deterministic, and class 0 is usually background,
    so a 2-2 split between background and an object leaves the background). Values must be
    ``< num_classes`` or the nodata label; the result has the label dtype of
    :func:`segpipe.core.classes.label_dtype` (the nodata label is the dtype's maximum, so it
    loses every tie).

    Each of the four pixels ``v`` of a block gets the key ``count(v) · 2^bits + (max − v)``, with
    ``count(v)`` from the six pairwise equalities of the block; the largest key wins and
    carries its value. Six comparisons and integer adds on contiguous quarter planes: the cost
    does not grow with ``num_classes``, and is a sixth of the per-pixel ``where`` chain it replaced
    (docs/benchmarks.md, "Design measurements").
    """
    dtype = label_dtype(num_classes)
    if labels.ndim < 2:
        raise ValueError(f"labels must have at least 2 axes, got shape {labels.shape}")
    x = _pad_even(labels).astype(dtype, copy=False)
    top = np.iinfo(dtype).max
    bits = 8 * np.dtype(dtype).itemsize
    key_dtype = np.uint16 if bits == 8 else np.uint32  # count ≤ 4 ⇒ key < 2^(bits + 3)
    a, b, c, d = (np.ascontiguousarray(x[..., i::2, j::2]) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    ab, ac, ad, bc, bd, cd = a == b, a == c, a == d, b == c, b == d, c == d
    best: np.ndarray | None = None
    for v, (e1, e2, e3) in ((a, (ab, ac, ad)), (b, (ab, bc, bd)), (c, (ac, bc, cd)), (d, (ad, bd, cd))):
        key = np.subtract(top, v, dtype=key_dtype)
        count = e1.astype(key_dtype)
        count += e2
        count += e3
        count += 1
        count <<= bits
        key += count
        best = key if best is None else np.maximum(best, key, out=best)
    assert best is not None
    best &= top
    return np.subtract(top, best, dtype=key_dtype).astype(dtype)


def downsample_mean(values: np.ndarray) -> np.ndarray:
    """2×2 mean over the last two axes for uint8/uint16 data, rounded half up, same dtype."""
    if values.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"mean downsampling expects uint8 or uint16, got {values.dtype}")
    x = _pad_even(values).astype(np.uint32)
    total = x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(values.dtype)


def level_shapes(height: int, width: int, min_size: int) -> list[tuple[int, int]]:
    """Image shapes of levels 0, 1, …: each ``ceil(previous / 2)``, until both sides ≤ ``min_size``.

    Level 0 is always listed; a level is added while the previous one has a side > ``min_size``.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be positive, got {min_size}")
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append((ceil_div(h, 2), ceil_div(w, 2)))
    return shapes


def level_path(array: str, level: int) -> str:
    """Array path of pyramid ``level`` of ``array``: ``"0"`` → ``"1"``, ``"2"``…; others ``"<name>_<L>"``."""
    if level == 0:
        return array
    if array.isdigit():
        return str(int(array) + level)
    return f"{array}_{level}"


def level_transforms(scale0: Sequence[float], translation0: Sequence[float], level: int) -> list[dict]:
    """NGFF coordinateTransformations of ``level`` given level 0's (see the module docstring)."""
    f = 2**level
    scale = [float(s) * f for s in scale0]
    translation = [float(t) + float(s) * (f - 1) / 2 for s, t in zip(scale0, translation0)]
    return [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]


# --------------------------------------------------------------------------- chunk tasks


def _write_unit(arr: Any) -> tuple[int, ...]:
    """The block one writer owns: the shard when the array is sharded, else the chunk."""
    return tuple(arr.shards or arr.chunks)


def _downsample_batch(
    group_uri: str, src_path: str, dst_path: str, reduction: Reduction, num_classes: int,
    keys: list[tuple[int, ...]],
) -> int:
    """Compute and write the destination chunks ``keys`` (chunk-grid indices); returns pixels written.

    Runs on a worker: opens the arrays itself so only paths and indices travel.
    """
    from segpipe.io.chunks import RawChunks

    raw_src, raw_dst = RawChunks.open(group_uri, src_path), RawChunks.open(group_uri, dst_path)
    if raw_src is not None and raw_dst is not None:  # plain chunks: read/write them directly
        with output_errors(group_uri):  # a bucket's fault is a TransientIOError, retried by the task
            return _downsample_raw(raw_src, raw_dst, reduction, num_classes, keys)
    import zarr

    with output_errors(group_uri):
        group = zarr.open_group(group_uri, mode="r+")
        src, dst = group[src_path], group[dst_path]
        unit = _write_unit(dst)
        written = 0
        for key in keys:
            dst_sel, src_sel = _selections(key, unit, dst.shape, src.shape)
            out = _reduce(src[tuple(src_sel)], reduction, num_classes)
            if cancelled():  # the fence: the image failed, its lock is about to be let go
                raise Fenced(key)
            dst[tuple(dst_sel)] = out.astype(dst.dtype, copy=False)
            written += int(np.prod(out.shape))
    return written


def _downsample_raw(src: Any, dst: Any, reduction: Reduction, num_classes: int, keys: list[tuple[int, ...]]) -> int:
    """:func:`_downsample_batch` on plain chunks: the same selections and reductions, whole-chunk I/O."""
    written = 0
    for key in keys:
        _, src_sel = _selections(key, dst.chunks, dst.shape, src.shape)
        out = _reduce(src.read(src_sel), reduction, num_classes)
        if cancelled():  # the fence (see the module docstring)
            raise Fenced(key)
        dst.write(key, out)
        written += int(np.prod(out.shape))
    return written


def _selections(key: tuple[int, ...], unit: Sequence[int], dst_shape: Sequence[int], src_shape: Sequence[int],
                ) -> tuple[list[slice], list[slice]]:
    """The destination block ``key`` (one write unit) and the source block it is reduced from: the last
    two axes twice as large (clipped to the source), leading axes (classes) the same."""
    dst_sel, src_sel = [], []
    for axis, (i, c) in enumerate(zip(key, unit)):
        lo, hi = i * c, min((i + 1) * c, dst_shape[axis])
        dst_sel.append(slice(lo, hi))
        if axis < len(dst_shape) - 2:
            src_sel.append(slice(lo, hi))
        else:
            src_sel.append(slice(2 * lo, min(2 * hi, src_shape[axis])))
    return dst_sel, src_sel


def _reduce(block: np.ndarray, reduction: Reduction, num_classes: int) -> np.ndarray:
    return downsample_mode(block, num_classes) if reduction == "mode" else downsample_mean(block)


def _run_tasks(fn: Any, task_args: list, client: Any, tasks: RunTasks | None = None) -> list[int]:
    """Run ``fn(args)`` for every item: on the Dask ``client`` when given (as ``tasks``' tasks: retried,
    fenced, counted, see :meth:`RunTasks.map`), else in a thread pool. Only small counters come back."""
    if not task_args:
        return []
    if client is not None:
        tasks = tasks or RunTasks(uuid.uuid4().hex, RetryPolicy(attempts=1))
        return [int(c["value"]) for c in tasks.map(client, "pyramid", fn, task_args)]
    workers = max(1, min(len(task_args), os.cpu_count() or 1, 4))
    if workers == 1:
        return [fn(a) for a in task_args]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segpipe-pyramid") as pool:
        return list(pool.map(fn, task_args))


def _build_levels(
    group_uri: str, array: str, reduction: Reduction, num_classes: int, min_size: int | None, client: Any,
    keep_written: bool = False, tasks: RunTasks | None = None,
) -> list[tuple[str, int]]:
    """Write levels 1, 2, … of ``array``; returns ``[(path, level), …]``. With ``keep_written``, a level
    array that exists with the right layout is kept and only its chunks not in the store are computed
    (plain arrays, which is what segpipe writes; other layouts are rebuilt whole through zarr-python)."""
    from segpipe.io.chunks import RawChunks

    plain = RawChunks.open(group_uri, array)
    if plain is not None and len(plain.shape) >= 2:
        return _build_plain_levels(group_uri, array, plain, reduction, num_classes, min_size, client, keep_written,
                                   tasks)
    import zarr

    group_uri = strip_file_scheme(group_uri)
    try:
        group = zarr.open_group(group_uri, mode="r+")
    except (FileNotFoundError, ValueError) as e:
        raise OutputError(group_uri, f"is not a Zarr group that can be updated ({e})") from None
    if array not in group:
        raise OutputError(group_uri, f"has no array {array!r} to build a pyramid from")
    base = group[array]
    if base.ndim < 2:
        raise OutputError(group_uri, f"array {array!r} has {base.ndim} axes; a pyramid needs (…, y, x)")
    unit = _write_unit(base)
    height, width = base.shape[-2:]
    shapes = level_shapes(height, width, min_size or max(unit[-2:]))
    written: list[tuple[str, int]] = []
    src = base
    for level, (h, w) in enumerate(shapes[1:], start=1):
        path = level_path(array, level)
        dst = group.create_array(
            name=path, shape=tuple(base.shape[:-2]) + (h, w), chunks=base.chunks, shards=base.shards,
            dtype=base.dtype, compressors=base.compressors, filters=base.filters, serializer=base.serializer,
            fill_value=base.fill_value, dimension_names=base.metadata.dimension_names, overwrite=True,
        )
        grid = [range(ceil_div(n, c)) for n, c in zip(dst.shape, unit)]
        keys = [tuple(int(i) for i in k) for k in np.ndindex(*[len(r) for r in grid])]
        # partial of a module-level function: picklable for Dask process workers
        fn = partial(_downsample_batch, group_uri, src.path, dst.path, reduction, num_classes)
        _run_tasks(fn, batches(keys, _CHUNKS_PER_TASK), client, tasks)
        written.append((path, level))
        src = dst
    return written


def _build_plain_levels(
    group_uri: str, array: str, base: Any, reduction: Reduction, num_classes: int, min_size: int | None,
    client: Any, keep_written: bool, tasks: RunTasks | None = None,
) -> list[tuple[str, int]]:
    """:func:`_build_levels` for plain arrays (segpipe's own layout, :class:`RawChunks`): each level's
    metadata is the base's with its shape, written directly (zarr-python's group open and array
    creation cost more than the level's chunks on small images: docs/benchmarks.md, "Design measurements")."""
    import json

    from segpipe.io.chunks import RawChunks
    from segpipe.io.output import done_chunks
    from segpipe.io.storage import filesystem, join, write_atomic

    group_uri = strip_file_scheme(group_uri)
    fs, root = filesystem(group_uri)
    unit = base.chunks
    height, width = base.shape[-2:]
    written: list[tuple[str, int]] = []
    src = array
    for level, (h, w) in enumerate(level_shapes(height, width, min_size or max(unit[-2:]))[1:], start=1):
        path = level_path(array, level)
        meta = {**base.meta, "shape": [*base.shape[:-2], h, w]}
        existing = RawChunks.open(group_uri, path) if keep_written else None
        keep = existing is not None and existing.meta == meta
        if not keep:  # (re)create the level, as zarr's create_array(overwrite=True) would
            with output_errors(group_uri):
                if fs.exists(join(root, path)):
                    fs.rm(join(root, path), recursive=True)
                fs.makedirs(join(root, path), exist_ok=True)
                write_atomic(fs, join(root, path, "zarr.json"), json.dumps(meta, indent=2).encode(), durable=False)
        keys = [tuple(int(i) for i in k) for k in np.ndindex(*[ceil_div(n, c) for n, c in zip(meta["shape"], unit)])]
        if keep and len(unit) == 2:
            present = done_chunks(group_uri, path)  # written by the tile tasks (level 1) or a pass cut short
            keys = [k for k in keys if k not in present]
        _run_tasks(partial(_downsample_batch, group_uri, src, path, reduction, num_classes),
                   batches(keys, _CHUNKS_PER_TASK), client, tasks)
        written.append((path, level))
        src = path
    return written


def _root_attrs(group_uri: str) -> tuple[dict, Any]:
    """The root attributes and a function that replaces them: direct JSON for segpipe's outputs."""
    from segpipe.io.output import read_attrs, write_attrs

    attrs = read_attrs(strip_file_scheme(group_uri))
    if attrs is None:
        raise OutputError(group_uri, "is not a Zarr group that can be updated")
    return attrs, partial(write_attrs, strip_file_scheme(group_uri))


# --------------------------------------------------------------------------- public API


def build_pyramid(
    group_uri: str, *, array: str = "0", num_classes: int, min_size: int | None = None, client: Any = None,
    keep_written: bool = False, tasks: RunTasks | None = None,
) -> list[str]:
    """Write mode-downsampled levels of the class-id ``array`` and list them in the NGFF metadata.

    Levels go down until both sides are ≤ ``min_size`` (default: the chunk side). With a
    Dask ``client`` one task per few output chunks is submitted with ``client.map`` and
    only pixel counters are gathered; without one, a local thread pool writes the chunks.
    When ``array`` is the first dataset of ``ome.multiscales[0]`` the datasets list is
    rewritten to level 0 plus the new levels. Returns the new level paths. ``keep_written``: chunks
    already in the store (level 1 written by the tile tasks from the labels in memory, or an earlier
    pass of the same run) are kept, not recomputed; only for outputs of one run, whose level 0 they
    were computed from. ``tasks``: the image run whose key prefix, retry policy and retry count the Dask
    tasks use (see the module docstring).
    """
    label_dtype(num_classes)  # validates num_classes
    levels = _build_levels(group_uri, array, "mode", num_classes, min_size, client, keep_written, tasks)
    attrs, write = _root_attrs(group_uri)
    ome = dict(attrs.get("ome") or {})
    multiscales = list(ome.get("multiscales") or [])
    if multiscales and multiscales[0].get("datasets") and multiscales[0]["datasets"][0].get("path") == array:
        ms = dict(multiscales[0])
        base = ms["datasets"][0]
        ndim = len(ms.get("axes") or [None, None])
        scale0, translation0 = [1.0] * ndim, [0.0] * ndim
        for t in base.get("coordinateTransformations") or []:
            if t.get("type") == "scale":
                scale0 = list(t["scale"])
            elif t.get("type") == "translation":
                translation0 = list(t["translation"])
        ms["datasets"] = [base] + [
            {"path": path, "coordinateTransformations": level_transforms(scale0, translation0, level)}
            for path, level in levels
        ]
        multiscales[0] = ms
        ome["multiscales"] = multiscales
        write({**attrs, "ome": ome})
    return [path for path, _ in levels]


def build_probability_pyramid(
    group_uri: str, *, array: str = "probabilities", min_size: int | None = None, client: Any = None,
    tasks: RunTasks | None = None,
) -> list[str]:
    """Write mean-downsampled levels ``<array>_1``, ``<array>_2``, … of the (class, y, x) probabilities.

    Same chunk walk as :func:`build_pyramid`. The level paths are recorded in the root
    ``segpipe.probability_levels`` attribute (the NGFF multiscales describe the labels only).
    """
    levels = _build_levels(group_uri, array, "mean", 256, min_size, client, tasks=tasks)
    attrs, write = _root_attrs(group_uri)
    seg = dict(attrs.get("segpipe") or {})
    seg["probability_levels"] = [array] + [path for path, _ in levels]
    write({**attrs, "segpipe": seg})
    return [path for path, _ in levels]
