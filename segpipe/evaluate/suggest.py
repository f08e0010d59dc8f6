"""Where to label next: the chunk regions of finished outputs where the model is least sure.

Every output written by ``segment`` holds one uncertainty value per chunk (:mod:`segpipe.io.uncertainty`:
the mean normalised softmax entropy of the chunk's pixels). :func:`suggest_regions` ranks the chunks of
all the outputs it is given and picks ``top`` of them by :func:`select_regions`:

* by score, highest first;
* **no near-duplicates:** a chunk touching a picked chunk of the same image (one of its 8
  neighbours) is never picked — it would show the annotator the same place twice;
* **spread:** while the first pass runs, an image gets at most ``ceil(top / images)`` picks and a
  majority class (the most frequent class id of the chunk's level-0 pixels, nodata excluded) at most
  ``ceil(top / classes)``; when that leaves places free, a second pass fills them by score alone,
  still without near-duplicates. The first pass looks at the best :func:`scan_limit` candidates only
  (each needs its chunk read for its class).

Memory stays bounded whatever the number of outputs: the outputs are read one at a time and only the
best :func:`scan_limit` chunks of all of them are kept (:func:`best_candidates`, a bounded heap), which
gives exactly the picks of a full sort (see there). When fewer than ``top`` regions come back, a note
says why (outputs left out, too few chunks with a value, the rest touching picks).

:func:`write_suggestions` writes them as rectangles with ``image``, ``output``, ``rank``, ``score`` and
``class`` properties, in the format of the file's extension: in the output's map CRS for georeferenced
outputs; in **level-0 pixels** for whole slides and in pixels for other images, with QuPath's
``objectType: "annotation"`` and a ``name``, so that QuPath imports a GeoJSON file as rectangle
annotations.

Why this module is long: the ranking rule, the bounded stream of chunks it ranks and the rectangles in
each file's units (written, and printed by ``segpipe suggest``) are one answer to one question; the
rectangles need the picked outputs' metadata that ranking reads, and the notes on what was left out.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError, InputError, SegpipeError
from segpipe.core.geometry import ChunkGrid
from segpipe.core.retry import RetryPolicy
from segpipe.export.features import write_features
from segpipe.export.meta import OutputMeta, level0_mapping, read_output_meta
from segpipe.io.output import inspect_output, open_labels
from segpipe.io.storage import filesystem, has_scheme, output_errors, strip_file_scheme
from segpipe.io.uncertainty import read_uncertainty

log = logging.getLogger("segpipe.evaluate.suggest")

#: the number of regions the nightly flow publishes
DEFAULT_TOP = 20


@dataclass(frozen=True)
class Candidate:
    """One chunk of one output (``image`` = the output's index) and its uncertainty."""

    image: int
    iy: int
    ix: int
    score: float

    def touches(self, other: Candidate) -> bool:
        """Same image and one of the 8 neighbours (or the same chunk)."""
        return self.image == other.image and abs(self.iy - other.iy) <= 1 and abs(self.ix - other.ix) <= 1


def scan_limit(top: int) -> int:
    """How many of the best candidates the spreading pass examines (each costs one chunk read)."""
    return max(1000, 50 * top)


def select_regions(candidates: Sequence[Candidate], top: int, class_of: Callable[[Candidate], str],
                   classes: int) -> list[Candidate]:
    """Pick up to ``top`` candidates by the rules of this module's docstring; returns them by rank.

    Pure: ``class_of`` gives a candidate's majority class (asked only for candidates that could be
    picked), ``classes`` is how many classes there are. Ties in score go to the earlier image, row
    and column, so a run is reproducible.
    """
    if top < 1:
        raise ConfigError("--top", f"must be at least 1, got {top}")
    order = sorted((c for c in candidates if math.isfinite(c.score)), key=lambda c: (-c.score, c.image, c.iy, c.ix))
    images = len({c.image for c in order})
    per_image = math.ceil(top / max(images, 1))
    per_class = math.ceil(top / max(classes, 1))
    picked: list[Candidate] = []
    by_image: Counter[int] = Counter()
    by_class: Counter[str] = Counter()

    def free(c: Candidate) -> bool:
        return not any(c.touches(p) for p in picked)

    for c in order[:scan_limit(top)]:
        if len(picked) == top:
            break
        if by_image[c.image] >= per_image or not free(c):
            continue
        cls = class_of(c)
        if by_class[cls] >= per_class:
            continue
        picked.append(c)
        by_image[c.image] += 1
        by_class[cls] += 1
    if len(picked) < top:  # the quotas left places free: fill them by score alone
        chosen = set(picked)
        for c in order:
            if len(picked) == top:
                break
            if c not in chosen and free(c):
                picked.append(c)
                chosen.add(c)
    return sorted(picked, key=lambda c: (-c.score, c.image, c.iy, c.ix))


@dataclass(frozen=True)
class Suggestion:
    """One suggested region: a chunk of an output, in that output's full-resolution pixels."""

    rank: int
    score: float
    image: str  #: the source image (as recorded in the output), else the output
    output: str
    class_name: str
    chunk: tuple[int, int]
    box: tuple[int, int, int, int]  #: x0, y0, x1, y1 in the output's level-0 pixels

    def as_row(self) -> dict[str, Any]:
        """A flat row (for tables and artifacts)."""
        x0, y0, x1, y1 = self.box
        return {"rank": self.rank, "score": round(self.score, 4), "image": self.image, "class": self.class_name,
                "x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "output": self.output}


@dataclass(frozen=True)
class _Output:
    """What picking needs of one output besides its uncertainty: the rest is read again for the picks only."""

    meta: OutputMeta
    chunk_size: int
    labels: Any  #: the level-0 class-id array (read one chunk at a time, for majority classes)


def best_candidates(values: Iterable[tuple[int, np.ndarray]], keep: int) -> tuple[list[Candidate], int]:
    """The ``keep`` best chunks over every output's uncertainty array, and how many chunks have a value.

    ``values``: (output index, its (chunk rows, chunk cols) array), read one output at a time; a bounded
    min-heap keeps the best ``keep`` by :func:`select_regions`' order (score, then earlier image, row and
    column), so memory does not grow with the number of outputs or chunks. With ``keep`` =
    :func:`scan_limit` the picks equal those from all candidates: the first pass looks at no more than
    these, and the second pass always fills ``top`` places among them — ``top`` picks make at most
    ``9·top`` candidates touch one, and ``scan_limit(top) ≥ 50·top``.
    """
    heap: list[tuple[float, int, int, int]] = []  # (score, -image, -iy, -ix): the root is the worst kept
    total = 0
    for image, array in values:
        ys, xs = np.nonzero(np.isfinite(array))
        scores = array[ys, xs].astype(np.float64)
        total += len(scores)
        if len(heap) == keep and len(scores):  # only chunks at least as good as the worst kept can enter
            better = scores >= heap[0][0]
            ys, xs, scores = ys[better], xs[better], scores[better]
        for k in np.lexsort((xs, ys, -scores))[:keep]:  # this output's best first
            item = (float(scores[k]), -image, -int(ys[k]), -int(xs[k]))
            if len(heap) < keep:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
            else:
                break  # the rest of this output is worse still
    return [Candidate(-i, -y, -x, score) for score, i, y, x in heap], total


def find_outputs(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """The outputs named by ``paths``: a segpipe output is itself; any other folder gives every segpipe output
    (``*.zarr``) below it. Returns (outputs named directly, outputs found in folders)."""
    named: list[str] = []
    found: list[str] = []
    for path in paths:
        kind = inspect_output(path).kind
        if kind == "segpipe":
            named.append(path)
            continue
        if kind == "none":
            raise InputError(path, "does not exist")
        fs, root = filesystem(strip_file_scheme(path))
        hits = [h for h in sorted(fs.glob(root.rstrip("/") + "/**/*.zarr")) if fs.isdir(h)]
        more = [fs.unstrip_protocol(h) if has_scheme(path) else h for h in hits]  # s3://bucket/… stays remote
        more = [h for h in more if inspect_output(h).kind == "segpipe"]
        if kind == "file" or not more:
            raise InputError(path, "is not a segpipe output, nor a folder holding any")
        found.extend(more)
    return named, found


def _no_uncertainty() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = f"segpipe {version('segpipe')}"
    except PackageNotFoundError:  # a source checkout that was never installed
        ours = "this segpipe"
    return ("has no uncertainty array (it was segmented before segment stored one): re-run `segpipe segment` on "
            f"its image with {ours} and --overwrite (flow parameter overwrite=True) to add it")


def _open(uri: str) -> _Output:
    with output_errors(uri, "read"):  # a bucket's fault is a TransientIOError (retried), not a bare OSError
        meta = read_output_meta(uri)  # refuses unfinished outputs, with one line
        labels = open_labels(uri)
    return _Output(meta, int(labels.chunks[-1]), labels)  # level 0 is chunked on the chunk grid


def _load(uri: str) -> tuple[_Output, np.ndarray]:
    """An output (refused when unfinished or without uncertainty, one line) and its uncertainty array."""
    output = _open(uri)
    values = read_uncertainty(uri)
    if values is None:
        raise InputError(uri, _no_uncertainty())
    meta, chunk = output.meta, output.chunk_size
    if ChunkGrid(meta.height, meta.width, chunk).shape != values.shape:
        raise InputError(uri, f"uncertainty array of shape {values.shape} does not fit its {chunk}-pixel chunk grid")
    return output, values


def suggest_regions(paths: Sequence[str], top: int = DEFAULT_TOP, notes: list[str] | None = None,
                    strict: bool = True, retry: RetryPolicy | None = None) -> list[Suggestion]:
    """The ``top`` regions where labels would help most, over every output named by ``paths``.

    With ``strict``, outputs named directly must be finished and have an uncertainty array (an
    InputError says to re-run ``segment`` otherwise); outputs found inside a folder (and, without
    ``strict``, any output) that are unfinished, have no uncertainty or cannot be read now are left out
    with a line appended to ``notes``. Fewer than ``top`` regions: a line in ``notes`` says why. Each
    output's reads are retried with ``retry`` (default: the default :class:`RetryPolicy`) when a storage
    fault may pass.
    """
    if top < 1:
        raise ConfigError("--top", f"must be at least 1, got {top}")
    retry = retry or RetryPolicy()
    named, found = find_outputs(paths)
    required = list(dict.fromkeys(named)) if strict else []
    uris = [*required, *[u for u in dict.fromkeys([*named, *found]) if u not in required]]
    kept: list[str] = []  # the outputs that take part, by index (only their names stay in memory)
    class_names: set[str] = set()
    left_out = 0

    def arrays() -> Iterator[tuple[int, np.ndarray]]:
        nonlocal left_out
        for uri in uris:
            try:
                output, values = retry.call(lambda: _load(uri))  # noqa: B023 - called at once
            except SegpipeError as e:
                if uri in required:
                    raise
                left_out += 1
                if notes is not None:
                    notes.append(f"{e}; left out")
                continue
            class_names.update(output.meta.classes)
            kept.append(uri)
            yield len(kept) - 1, values

    candidates, total = best_candidates(arrays(), scan_limit(top))
    opened: dict[int, _Output] = {}  # the outputs of candidates whose class was asked (a few)

    def output(i: int) -> _Output:
        if i not in opened:
            if len(opened) >= 16:
                opened.pop(next(iter(opened)))
            opened[i] = retry.call(lambda: _open(kept[i]))
        return opened[i]

    cache: dict[Candidate, str] = {}

    def class_of(c: Candidate) -> str:
        if c not in cache:
            cache[c] = retry.call(lambda: _majority_class(output(c.image), c.iy, c.ix))
        return cache[c]

    picks = select_regions(candidates, top, class_of, len(class_names))
    result = []
    for rank, c in enumerate(picks, 1):
        o = output(c.image)
        chunk = ChunkGrid(o.meta.height, o.meta.width, o.chunk_size).chunk(c.iy, c.ix)
        result.append(Suggestion(rank, c.score, o.meta.source or kept[c.image], kept[c.image], class_of(c),
                                 (c.iy, c.ix), (chunk.x0, chunk.y0, chunk.x0 + chunk.w, chunk.y0 + chunk.h)))
    if len(result) < top and notes is not None:
        notes.append(fewer_reason(len(result), top, total, len(kept), left_out))
    return result


def fewer_reason(found: int, top: int, chunks: int, outputs: int, left_out: int) -> str:
    """Why ``found`` regions and not ``top``: one line (pure)."""
    why = [f"{found} region(s) instead of --top {top}:"]
    if left_out:
        why.append(f"{left_out} output(s) left out (see the notes above);")
    if chunks < top:
        why.append(f"the {outputs} output(s) ranked have {chunks} chunk(s) with an uncertainty value in all "
                   "(chunks without data and slide background have none)")
    else:
        why.append(f"the other {chunks - found} chunk(s) with a value each touch a picked region of the same "
                   "image (two neighbours are never both suggested)")
    return " ".join(why)


def _majority_class(output: _Output, iy: int, ix: int) -> str:
    """The most frequent class of one chunk's level-0 pixels (nodata excluded; ties: the lower id)."""
    meta = output.meta
    c = output.chunk_size
    with output_errors(meta.uri, "read"):
        block = np.asarray(output.labels[iy * c:(iy + 1) * c, ix * c:(ix + 1) * c]).ravel()
    if meta.nodata is not None:
        block = block[block != meta.nodata]
    if not block.size:
        return ""
    cls = int(np.bincount(block).argmax())
    return meta.classes[cls] if cls < len(meta.classes) else str(cls)


@dataclass(frozen=True)
class Regions:
    """Suggestions as the rectangles a file holds: in the first georeferenced output's CRS, or in level-0
    pixels (slides) / pixels (other images)."""

    geoms: list[Any]
    crs_wkt: str | None
    pixels: bool  #: pixel space (no CRS)
    metas: dict[str, OutputMeta]


def region_geometries(suggestions: Sequence[Suggestion], path: str = "the file") -> Regions:
    """The rectangle of each suggestion in the file's coordinates (see :func:`write_suggestions`)."""
    import shapely

    metas = {s.output: read_output_meta(s.output) for s in suggestions}
    georef = {u: m.transform is not None for u, m in metas.items()}
    if len(set(georef.values())) > 1:
        raise ConfigError(path, "cannot hold regions of georeferenced and of pixel-space outputs together; "
                                "run suggest on each kind separately")
    crs = next((m.crs_wkt for m in metas.values() if m.crs_wkt), None)
    geoms = []
    for s in suggestions:
        meta = metas[s.output]
        x0, y0, x1, y1 = s.box
        if meta.transform is not None:
            a, b, c, d, e, f = meta.transform
            ring = [(a * x + b * y + c, d * x + e * y + f) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
            geom = shapely.Polygon(ring)
            if crs and meta.crs_wkt and meta.crs_wkt != crs:
                geom = _reproject(geom, meta.crs_wkt, crs)
        else:
            l0 = level0_mapping(meta)
            k = l0.scale if l0 else 1.0
            bx1, by1 = x1 * k, y1 * k
            if l0 is not None and l0.width and l0.height:  # the last resampled pixels may reach past the slide
                bx1, by1 = min(bx1, float(l0.width)), min(by1, float(l0.height))
            geom = shapely.box(x0 * k, y0 * k, bx1, by1)
        geoms.append(geom)
    return Regions(geoms, crs, bool(suggestions) and not any(georef.values()), metas)


def region_lines(suggestions: Sequence[Suggestion], regions: Regions) -> list[str]:
    """One line per suggestion with its box in the file's units: CRS coordinates (and the CRS) for
    georeferenced outputs; level-0 pixels and micrometres for slides; pixels for other images."""
    crs_name = _crs_name(regions.crs_wkt) if regions.crs_wkt else None
    lines = []
    for s, geom in zip(suggestions, regions.geoms):
        x0, y0, x1, y1 = geom.bounds
        meta = regions.metas[s.output]
        if not regions.pixels:
            where = f"x {x0:.2f}–{x1:.2f}, y {y0:.2f}–{y1:.2f}" + (f" ({crs_name})" if crs_name else "")
        elif meta.is_slide and level0_mapping(meta) is not None:
            where = f"level-0 px x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f}"
            l0 = level0_mapping(meta)
            if meta.mpp and l0 is not None:
                um = meta.mpp / l0.scale  # µm per level-0 pixel
                where += f" (µm x {x0 * um:.1f}–{x1 * um:.1f}, y {y0 * um:.1f}–{y1 * um:.1f})"
        else:
            where = f"px x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f}"
        lines.append(f"{s.rank:>3}  {s.score:.3f}  {s.class_name or '-':<12} {s.image}  {where}")
    return lines


def _crs_name(wkt: str) -> str:
    from rasterio.crs import CRS

    try:
        crs = CRS.from_wkt(wkt)
    except Exception:  # noqa: BLE001 - a name is only a label here
        return "the output's CRS"
    return crs.to_string() if crs.to_epsg() else (crs.to_dict().get("proj") or "the output's CRS")


def write_suggestions(suggestions: Sequence[Suggestion], path: str) -> int:
    """Write ``suggestions`` as rectangles to ``path`` (format by extension); returns how many.

    Georeferenced outputs: polygons in the map CRS of the first one (others are reprojected).
    Slides: level-0 pixels (:func:`segpipe.export.meta.level0_mapping`); other images: pixels. Pixel
    features carry QuPath's ``objectType: "annotation"`` and a ``name``. Georeferenced and pixel
    outputs cannot share one file.
    """
    regions = region_geometries(suggestions, path)
    fields: dict[str, list[Any]] = {
        "image": [s.image for s in suggestions], "output": [s.output for s in suggestions],
        "rank": [s.rank for s in suggestions], "score": [float(s.score) for s in suggestions],
        "class": [s.class_name for s in suggestions],
    }
    if regions.pixels:  # QuPath: rectangle annotations, named by rank
        fields["objectType"] = ["annotation"] * len(suggestions)
        fields["name"] = [f"suggestion {s.rank} ({s.score:.3f})" for s in suggestions]
    write_features(path, regions.geoms, fields, regions.crs_wkt, layer="suggestions")
    return len(suggestions)


def _reproject(geom: Any, src_wkt: str, dst_wkt: str) -> Any:
    """A polygon from one CRS to another (edges densified: a rectangle's sides may curve)."""
    import shapely
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    src, dst = CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt)
    if src == dst:
        return geom
    return shapely.geometry.shape(transform_geom(src, dst, shapely.geometry.mapping(geom), antimeridian_cutting=False,
                                                 precision=-1))
