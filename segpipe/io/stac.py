"""STAC in: the images of STAC items, collections, catalogues and STAC API searches.

A STAC *source* is a STAC document (an Item, Collection or Catalog as a local path or URL ending in
``.json``; static catalogues are walked link by link) or a STAC API (its landing-page URL, searched
with :class:`StacSearch`: collections, bbox or an intersecting geometry, a datetime interval, a
``query``). Each matching item gives one :class:`~segpipe.io.storage.SourceImage`:

* ``uri`` is the chosen asset's href, read in place (a COG by ranges through GDAL, no download);
* ``relative`` is ``<collection>/<item id><asset extension>``, so outputs are named
  ``OUT/<collection>/<item id>.zarr``;
* ``fingerprint`` is the item's id and ``updated`` time (else ``created``, else its datetime) plus the
  asset's ``file:checksum``: an item whose output is complete and whose ``updated`` did not change is
  skipped by the engine's ownership rules, so a nightly search over a growing collection segments the
  new (and the changed) items only;
* ``item`` (:class:`~segpipe.io.storage.ItemRef`) goes into the output's provenance.

The same filters apply to static catalogues (:func:`segpipe.core.stac.matches`: bbox and geometry intersection in
WGS 84, datetime interval overlap, ``query`` operators ``eq neq lt lte gt gte in startsWith``).
``max_items`` is a guard, not a cap: a search matching more items is refused in one line, before
anything is written (a cap would silently leave the rest, night after night).

Band names (``--bands red,green,nir``) map to 1-based band indexes through the asset's ``bands``
(STAC 1.1) or ``eo:bands``, by ``name`` or common name; every item must agree.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from segpipe.core.errors import ConfigError, InputError, SegpipeError, TransientIOError
from segpipe.core.results import ImageResult
from segpipe.core.stac import StacSearch, band_indexes, matches, parse_interval, parse_query, pick_asset
from segpipe.io.storage import ItemRef, SourceImage, filesystem, has_scheme, safe_relative, strip_file_scheme

#: links followed when a static catalogue is walked
_WALKED = ("child", "item")
_MAX_DEPTH = 32


def stac_search(*, collections: str | Sequence[str] | None = None, bbox: str | Sequence[float] | None = None,
                intersects: str | dict | None = None, datetime: str | None = None,
                query: str | Sequence[str] | dict | None = None, max_items: int | None = None,
                asset: str | None = None) -> StacSearch:
    """The one builder of :class:`StacSearch` for the CLI and the flow (text as users type it).

    ``collections``: comma-separated ids; ``bbox``: ``"w,s,e,n"``; ``intersects``: a GeoJSON file
    (path or URL) or a geometry; ``query``: JSON or ``prop<op>value`` expressions (``eo:cloud_cover<10``).
    """
    if isinstance(collections, str):
        collections = [c.strip() for c in collections.split(",") if c.strip()]
    if isinstance(bbox, str):
        try:
            bbox = [float(x) for x in bbox.split(",")]
        except ValueError:
            raise ConfigError("--bbox", f"takes west,south,east,north in degrees; got {bbox!r}") from None
    if bbox is not None and len(bbox) != 4:
        raise ConfigError("--bbox", f"takes 4 numbers (west,south,east,north); got {len(bbox)}")
    if datetime:
        try:
            parse_interval(datetime)
        except ValueError as e:
            raise ConfigError("--datetime", str(e)) from None
    geometry = _geometry(intersects) if isinstance(intersects, str) else intersects
    return StacSearch(collections=tuple(collections) if collections else None,
                      bbox=tuple(bbox) if bbox is not None else None, intersects=geometry, datetime=datetime or None,
                      query=parse_query(query), max_items=max_items, asset=asset or None)


def _geometry(path: str) -> dict[str, Any]:
    """The geometry of a GeoJSON file: a geometry, a Feature, or the union of a FeatureCollection's features."""
    doc = read_json(path)
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "Feature":
        return doc["geometry"]
    if kind == "FeatureCollection":
        import shapely.geometry
        from shapely import union_all

        shapes = [shapely.geometry.shape(f["geometry"]) for f in doc.get("features", []) if f.get("geometry")]
        if not shapes:
            raise InputError(path, "has no feature with a geometry")
        return shapely.geometry.mapping(union_all(shapes))
    if kind in ("Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString"):
        return doc
    raise InputError(path, f"is not a GeoJSON geometry, Feature or FeatureCollection (type {kind!r})")


# --------------------------------------------------------------------------- reading documents


def read_json(href: str) -> Any:
    """A JSON document from a local path or any fsspec URL (http, s3, …), or one line saying why not."""
    fs, path = filesystem(strip_file_scheme(href))
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(href, "does not exist") from None
    except IsADirectoryError:
        raise InputError(href, "is a folder, not a STAC document") from None
    except OSError as e:
        raise InputError(href, f"cannot be read ({_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - aiohttp and botocore errors are not OSErrors
        raise InputError(href, f"cannot be read ({_reason(e)})") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(href, f"is not JSON ({e})") from None


def _reason(e: BaseException) -> str:
    unreachable = _unreachable(e)
    if unreachable:
        return unreachable
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _unreachable(e: BaseException) -> str | None:
    """Why a server could not be reached at all (refused, unknown host, timed out), from the exception chain;
    None for an answer that came back wrong. HTTP clients wrap these (requests, aiohttp), so walk the causes."""
    import socket

    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cur, socket.gaierror):
            return "unknown host"
        if isinstance(cur, TimeoutError):
            return "timed out"
        cur = cur.__cause__ or cur.__context__
    text = str(e)
    for words, why in (("Connection refused", "connection refused"), ("Connect call failed", "connection refused"),
                       ("Name or service not known", "unknown host"), ("timed out", "timed out")):
        if words in text:
            return why
    return None


def resolve_href(base: str, href: str) -> str:
    """``href`` made absolute against the document at ``base`` (a path or a URL)."""
    if has_scheme(href) or href.startswith("file://"):
        return strip_file_scheme(href)
    if has_scheme(base):
        return urllib.parse.urljoin(base, href)
    if os.path.isabs(href):
        return os.path.normpath(href)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(strip_file_scheme(base))), href))


def _self_href(doc: dict[str, Any], fallback: str) -> str:
    for link in doc.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == "self" and link.get("href"):
            return resolve_href(fallback, link["href"]) if fallback else str(link["href"])
    return fallback


def is_stac_document(source: str) -> bool:
    """A source given as a STAC document: a path or URL ending in ``.json``."""
    return strip_file_scheme(source).split("?", 1)[0].lower().endswith(".json")


def walk_static(href: str, doc: dict[str, Any] | None = None) -> Iterator[tuple[dict[str, Any], str, str | None]]:
    """Every item under a static STAC document: (item, its href, its collection id).

    Follows ``child`` and ``item`` links depth first; a link that cannot be read stops the walk with
    one line naming the document that holds it and the link (nothing is segmented from a catalogue
    that is only partly readable: which items are missing would be a guess).
    """
    seen: set[str] = set()

    def walk(href: str, doc: dict[str, Any], collection: str | None, depth: int
             ) -> Iterator[tuple[dict[str, Any], str, str | None]]:
        if href in seen or depth > _MAX_DEPTH:
            return
        seen.add(href)
        kind = doc.get("type")
        if kind == "Feature":
            yield doc, href, doc.get("collection") or collection
            return
        if kind == "FeatureCollection":  # an ItemCollection saved to a file
            for item in doc.get("features") or []:
                yield item, _self_href(item, href), item.get("collection") or collection
            return
        if kind not in ("Catalog", "Collection"):
            raise InputError(href, f"is not a STAC Item, Collection or Catalog (type {kind!r})")
        if kind == "Collection":
            collection = str(doc.get("id") or collection)
        for link in doc.get("links") or []:
            if not isinstance(link, dict) or link.get("rel") not in _WALKED or not link.get("href"):
                continue
            target = resolve_href(href, str(link["href"]))
            try:
                child = read_json(target)
            except InputError as e:
                raise InputError(href, f"links to {target}, which {e.problem}") from None
            if not isinstance(child, dict):
                raise InputError(target, "is not a STAC document (not a JSON object)")
            yield from walk(target, child, collection, depth + 1)

    root = doc if doc is not None else read_json(href)
    if not isinstance(root, dict):
        raise InputError(href, "is not a STAC document (not a JSON object)")
    yield from walk(href, root, None, 0)


# --------------------------------------------------------------------------- items → images


def _extension(asset_href: str) -> str:
    ext = posixpath.splitext(urllib.parse.urlsplit(asset_href).path)[1]
    return ext if ext and len(ext) <= 8 else ".asset"


def item_image(item: dict[str, Any], href: str, collection: str | None, wanted: str | None) -> SourceImage:
    """The :class:`SourceImage` of one item's chosen asset."""
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise InputError(href, "is a STAC item without an id")
    key, asset = pick_asset(item, href, wanted)
    if not asset.get("href"):
        raise InputError(href, f"asset {key!r} has no href")
    uri = resolve_href(href, str(asset["href"]))
    if not has_scheme(uri):
        uri = os.path.normpath(os.path.abspath(uri))  # one spelling per local file, as list_images
    props = item.get("properties") or {}
    updated = asset.get("updated") or props.get("updated") or props.get("created")
    when = props.get("datetime") or props.get("start_datetime")
    fingerprint = f"stac:{item_id}:{updated or when or ''}"
    if asset.get("file:checksum"):
        fingerprint += f":{asset['file:checksum']}"
    relative = safe_relative(f"{collection}/{item_id}" if collection else item_id) + _extension(uri)
    ref = ItemRef(href=href, id=item_id, collection=collection, asset=key, updated=updated, datetime=when)
    return SourceImage(uri, relative, fingerprint, int(asset.get("file:size") or 0), item=ref)


@dataclass
class StacListing:
    """What a run's sources gave: ``sources`` for :func:`segpipe.engine.segment.segment_many` (STAC items as
    listed :class:`SourceImage` values, other sources as they were given), the band indexes that ``--bands``
    names resolved to, and one line per item that cannot be segmented (the other items still run)."""

    sources: list[str | SourceImage] = field(default_factory=list)
    bands: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  #: (item href, one line)
    stac: bool = False  #: some source was a STAC source

    @property
    def images(self) -> list[SourceImage]:
        return [s for s in self.sources if isinstance(s, SourceImage)]

    def failed_results(self) -> list[ImageResult]:
        """A failed result per item that could not be segmented (for the run's summary and exit code)."""
        return [ImageResult(source=href, output="", status="failed", error=line) for href, line in self.problems]


def search_items(source: str, search: StacSearch) -> list[tuple[dict[str, Any], str, str | None]]:
    """The items a STAC source selects: (item, href, collection id), at most ``max_items`` or refused."""
    limit = search.max_items
    if is_stac_document(source):
        found = [(item, href, coll) for item, href, coll in walk_static(source) if matches(item, search, coll)]
    else:
        found = _api_search(source, search)
    if limit is not None and len(found) > limit:
        raise InputError(source, f"the search matches more than {limit} items (--max-items {limit}); narrow it with "
                                 "--bbox/--datetime/--collections or raise --max-items (nothing was segmented)")
    return found


def _api_search(url: str, search: StacSearch) -> list[tuple[dict[str, Any], str, str | None]]:
    """A STAC API item search through pystac-client (pages followed; one extra item to detect ``max_items``)."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        client = Client.open(url)
        result = client.search(collections=list(search.collections) if search.collections else None,
                               bbox=list(search.bbox) if search.bbox else None, intersects=search.intersects,
                               datetime=search.datetime, query=search.query,
                               max_items=search.max_items + 1 if search.max_items else None)
        items = list(result.items_as_dicts())
    except (APIError, OSError) as e:
        if _unreachable(e):  # a nightly run retries this (flows/segment.py), bad answers it does not
            raise TransientIOError(url, f"the STAC API cannot be reached ({_unreachable(e)})") from None
        raise InputError(url, f"the STAC API cannot be searched ({_reason(e)})") from None
    except NotImplementedError as e:  # pystac-client's DoesNotConformTo: no item search
        raise InputError(url, f"is not a STAC API with item search ({_reason(e)})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(url, f"did not answer as a STAC API ({_reason(e)})") from None
    out = []
    for item in items:
        coll = item.get("collection")
        href = _self_href(item, "") or f"{url.rstrip('/')}/collections/{coll}/items/{item.get('id')}"
        out.append((item, href, coll))
    return out


def is_stac_source(source: str, search: StacSearch) -> bool:
    """A STAC document (``.json``), or any source when search filters are given (a STAC API's URL)."""
    return is_stac_document(source) or search.filters


def list_sources(sources: Sequence[str], search: StacSearch, bands: str | None = None) -> StacListing:
    """Expand the STAC sources among ``sources`` into their items' images, ``bands`` names resolved.

    Other sources are kept as they are (the engine lists them). Raises one :class:`InputError` when a
    STAC source cannot be searched (unreachable, broken link, more than ``max_items``), before anything
    is written; an item that cannot be segmented (no such asset, no such band) is one line in
    ``problems`` and the others are listed.
    """
    listing = StacListing(bands=bands)
    names = _band_names(bands)
    resolved: tuple[int, ...] | None = None
    for source in sources:
        if not is_stac_source(source, search):  # band names then fail in the settings, as numbers are expected
            listing.sources.append(source)
            continue
        listing.stac = True
        for item, href, coll in search_items(source, search):
            try:
                image = item_image(item, href, coll, search.asset)
                if names:
                    assert image.item is not None
                    asset = (item.get("assets") or {})[image.item.asset]
                    idx = band_indexes(names, item, image.item.asset, asset, href)
                    if resolved is not None and idx != resolved:
                        raise InputError(href, f"bands {','.join(names)} are at {list(idx)} in this item but at "
                                               f"{list(resolved)} in the others; search such items separately")
                    resolved = idx
            except SegpipeError as e:
                listing.problems.append((href, str(e) if href in str(e) else f"{href}: {e}"))
                continue
            listing.sources.append(image)
    if resolved is not None:
        listing.bands = ",".join(str(i) for i in resolved)
    elif names and listing.stac and not listing.sources:
        listing.bands = None  # no item to segment (each is a problem line): nothing to resolve the names against
    return listing


def _band_names(bands: str | None) -> list[str] | None:
    """Band names in ``--bands`` (None when it is empty or numeric)."""
    parts = [p.strip() for p in (bands or "").split(",") if p.strip()]
    if not parts or all(p.isdigit() for p in parts):
        return None
    return parts
