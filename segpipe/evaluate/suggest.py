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

:func:`write_suggestions` writes them as rectangles with ``image``, ``output``, ``rank``, ``score`` and
``class`` properties, in the format of the file's extension: in the output's map CRS for georeferenced
outputs; in **level-0 pixels** for whole slides and in pixels for other images, with QuPath's
``objectType: "annotation"`` and a ``name``, so that QuPath imports a GeoJSON file as rectangle
annotations.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError, InputError, SegpipeError
from segpipe.core.geometry import ChunkGrid
from segpipe.export.features import write_features
from segpipe.export.meta import OutputMeta, level0_mapping, read_output_meta
from segpipe.io.output import inspect_output, open_labels
from segpipe.io.storage import filesystem, has_scheme, strip_file_scheme
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
    meta: OutputMeta
    uncertainty: np.ndarray
    chunk_size: int
    labels: Any  #: the level-0 class-id array (read one chunk at a time, for majority classes)


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


def _load(uri: str) -> _Output:
    meta = read_output_meta(uri)  # refuses unfinished outputs, with one line
    values = read_uncertainty(uri)
    if values is None:
        raise InputError(uri, _no_uncertainty())
    labels = open_labels(uri)
    chunk = int(labels.chunks[-1])  # level 0 is chunked on the chunk grid
    if ChunkGrid(meta.height, meta.width, chunk).shape != values.shape:
        raise InputError(uri, f"uncertainty array of shape {values.shape} does not fit its {chunk}-pixel chunk grid")
    return _Output(meta, values, chunk, labels)


def suggest_regions(paths: Sequence[str], top: int = DEFAULT_TOP, notes: list[str] | None = None,
                    strict: bool = True) -> list[Suggestion]:
    """The ``top`` regions where labels would help most, over every output named by ``paths``.

    With ``strict``, outputs named directly must be finished and have an uncertainty array (an
    InputError says to re-run ``segment`` otherwise); outputs found inside a folder (and, without
    ``strict``, any output) that are unfinished or have no uncertainty are left out with a line
    appended to ``notes``.
    """
    if top < 1:
        raise ConfigError("--top", f"must be at least 1, got {top}")
    named, found = find_outputs(paths)
    outputs: list[_Output] = []
    uris: list[str] = []
    required = list(dict.fromkeys(named)) if strict else []
    for uri in required:
        outputs.append(_load(uri))
        uris.append(uri)
    for uri in [u for u in dict.fromkeys([*named, *found]) if u not in required]:
        try:
            outputs.append(_load(uri))
            uris.append(uri)
        except SegpipeError as e:
            if notes is not None:
                notes.append(f"{e}; left out")
    candidates = [Candidate(i, int(iy), int(ix), float(o.uncertainty[iy, ix]))
                  for i, o in enumerate(outputs) for iy, ix in zip(*np.nonzero(np.isfinite(o.uncertainty)))]
    class_names = {n for o in outputs for n in o.meta.classes}
    cache: dict[Candidate, str] = {}

    def class_of(c: Candidate) -> str:
        if c not in cache:
            cache[c] = _majority_class(outputs[c.image], c.iy, c.ix)
        return cache[c]

    picks = select_regions(candidates, top, class_of, len(class_names))
    result = []
    for rank, c in enumerate(picks, 1):
        o = outputs[c.image]
        chunk = ChunkGrid(o.meta.height, o.meta.width, o.chunk_size).chunk(c.iy, c.ix)
        result.append(Suggestion(rank, c.score, o.meta.source or uris[c.image], uris[c.image], class_of(c),
                                 (c.iy, c.ix), (chunk.x0, chunk.y0, chunk.x0 + chunk.w, chunk.y0 + chunk.h)))
    return result


def _majority_class(output: _Output, iy: int, ix: int) -> str:
    """The most frequent class of one chunk's level-0 pixels (nodata excluded; ties: the lower id)."""
    meta = output.meta
    c = output.chunk_size
    block = np.asarray(output.labels[iy * c:(iy + 1) * c, ix * c:(ix + 1) * c]).ravel()
    if meta.nodata is not None:
        block = block[block != meta.nodata]
    if not block.size:
        return ""
    cls = int(np.bincount(block).argmax())
    return meta.classes[cls] if cls < len(meta.classes) else str(cls)


def write_suggestions(suggestions: Sequence[Suggestion], path: str) -> int:
    """Write ``suggestions`` as rectangles to ``path`` (format by extension); returns how many.

    Georeferenced outputs: polygons in the map CRS of the first one (others are reprojected).
    Slides: level-0 pixels (:func:`segpipe.export.meta.level0_mapping`); other images: pixels. Pixel
    features carry QuPath's ``objectType: "annotation"`` and a ``name``. Georeferenced and pixel
    outputs cannot share one file.
    """
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
    fields: dict[str, list[Any]] = {
        "image": [s.image for s in suggestions], "output": [s.output for s in suggestions],
        "rank": [s.rank for s in suggestions], "score": [float(s.score) for s in suggestions],
        "class": [s.class_name for s in suggestions],
    }
    pixels = bool(suggestions) and not any(georef.values())
    if pixels:  # QuPath: rectangle annotations, named by rank
        fields["objectType"] = ["annotation"] * len(suggestions)
        fields["name"] = [f"suggestion {s.rank} ({s.score:.3f})" for s in suggestions]
    write_features(path, geoms, fields, crs, layer="suggestions")
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
