"""STAC searches as values: what to take from a STAC source, and the pure rules that select items.

:class:`StacSearch` is the one settings object of a STAC search (CLI and flow build it with
:func:`segpipe.io.stac.stac_search`); :func:`matches` applies it to the items of a static catalogue as a
STAC API would (bbox and geometry intersection in WGS 84, datetime interval overlap, ``query``
operators ``eq neq lt lte gt gte in startsWith``); :func:`pick_asset` and :func:`band_indexes` choose
an item's asset and map band names to 1-based indexes. No I/O here: documents are read by
:mod:`segpipe.io.stac`.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from segpipe.core.errors import ConfigError, InputError

#: media types and extensions of assets segpipe can segment (the default asset is the one image asset)
_IMAGE_TYPES = ("image/tiff", "image/jp2", "image/png", "image/jpeg", "application/x-hdf")
_IMAGE_EXTENSIONS = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".vrt", ".img")
_QUERY_OPS = {"<=": "lte", ">=": "gte", "!=": "neq", "<": "lt", ">": "gt", "=": "eq"}
_QUERY_RE = re.compile(r"^\s*([^<>=!\s]+)\s*(<=|>=|!=|<|>|=)\s*(.+?)\s*$")


class StacSearch(BaseModel):
    """What to take from a STAC source: the search filters, the asset and the item limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    collections: tuple[str, ...] | None = Field(None, description="Collection ids to search (API) or keep (static).")
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="west, south, east, north in WGS 84 degrees: items intersecting it.")
    intersects: dict[str, Any] | None = Field(None, description="A GeoJSON geometry (WGS 84): items intersecting it.")
    datetime: str | None = Field(
        None, description="RFC 3339 instant or interval ('2024-05-01/2024-06-01', '2024-05-01/..'): items overlapping it.")
    query: dict[str, dict[str, Any]] | None = Field(
        None, description="STAC query extension: {property: {op: value}}, op in eq neq lt lte gt gte in startsWith.")
    max_items: int | None = Field(None, ge=1, description="Refuse a search matching more items than this.")
    asset: str | None = Field(None, description="Asset key or role to segment [default: the item's one image asset].")

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, v: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if v is not None and not (v[1] <= v[3] and -90 <= v[1] <= 90 and -90 <= v[3] <= 90):
            raise ValueError(f"bbox is west,south,east,north in degrees; got {list(v)}")
        return v

    @field_validator("datetime")
    @classmethod
    def _datetime(cls, v: str | None) -> str | None:
        if v is not None:
            parse_interval(v)
        return v

    @property
    def filters(self) -> bool:
        """Whether any search filter is set (a plain URL is then searched as a STAC API)."""
        return any(x is not None for x in (self.collections, self.bbox, self.intersects, self.datetime, self.query,
                                           self.max_items))


def parse_query(query: str | Sequence[str] | dict | None) -> dict[str, dict[str, Any]] | None:
    """``{"eo:cloud_cover": {"lt": 10}}`` from JSON text, a dict, or ``prop<op>value`` expressions."""
    if query is None or isinstance(query, dict):
        return query or None
    texts = [query] if isinstance(query, str) else list(query)
    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        if text.strip().startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError("--query", f"is not valid JSON ({e})") from None
            if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
                raise ConfigError("--query", 'takes {"property": {"op": value}}')
            for k, v in parsed.items():
                out.setdefault(k, {}).update(v)
            continue
        m = _QUERY_RE.match(text)
        if not m:
            raise ConfigError("--query", f"takes property<op>value (op one of <, <=, >, >=, =, !=) or JSON; got {text!r}")
        prop, op, raw = m.groups()
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(prop, {})[_QUERY_OPS[op]] = value
    return out or None


def parse_interval(text: str) -> tuple[_dt.datetime | None, _dt.datetime | None]:
    """(start, end) of an RFC 3339 instant or ``start/end`` interval (``..`` or empty = open), in UTC."""
    parts = text.split("/")
    if len(parts) > 2:
        raise ValueError(f"is an RFC 3339 instant or start/end interval; got {text!r}")
    if len(parts) == 1:
        t = _instant(parts[0], text, end=False)
        return t, (_instant(parts[0], text, end=True) if len(parts[0].strip()) == 10 else t)
    start = None if parts[0].strip() in ("", "..") else _instant(parts[0], text, end=False)
    end = None if parts[1].strip() in ("", "..") else _instant(parts[1], text, end=True)
    if start and end and start > end:
        raise ValueError(f"interval ends before it starts: {text!r}")
    return start, end


def _instant(part: str, text: str, end: bool) -> _dt.datetime:
    part = part.strip()
    try:
        if len(part) == 10:  # a date: the whole day
            d = _dt.date.fromisoformat(part)
            t = _dt.time.max if end else _dt.time.min
            return _dt.datetime.combine(d, t, tzinfo=_dt.UTC)
        value = _dt.datetime.fromisoformat(part.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"takes RFC 3339 times like 2024-05-01T00:00:00Z or start/end; got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=_dt.UTC)


def _item_times(item: dict[str, Any]) -> tuple[_dt.datetime | None, _dt.datetime | None]:
    props = item.get("properties") or {}
    start = props.get("start_datetime") or props.get("datetime")
    end = props.get("end_datetime") or props.get("datetime")
    try:
        return (_instant(start, start, False) if start else None, _instant(end, end, True) if end else None)
    except ValueError:
        return None, None


def matches(item: dict[str, Any], search: StacSearch, collection: str | None) -> bool:
    """Whether a static catalogue's item passes the search's filters (as an API would decide)."""
    if search.collections and collection not in search.collections:
        return False
    if search.bbox is not None or search.intersects is not None:
        import shapely.geometry

        geom = item.get("geometry")
        if not geom:
            return False
        shape = shapely.geometry.shape(geom)
        if search.bbox is not None and not shape.intersects(shapely.geometry.box(*search.bbox)):
            return False
        if search.intersects is not None and not shape.intersects(shapely.geometry.shape(search.intersects)):
            return False
    if search.datetime is not None:
        lo, hi = parse_interval(search.datetime)
        start, end = _item_times(item)
        if start is None or end is None or (hi is not None and start > hi) or (lo is not None and end < lo):
            return False
    props = item.get("properties") or {}
    for prop, ops in (search.query or {}).items():
        if not all(_compare(props.get(prop), op, value) for op, value in ops.items()):
            return False
    return True


def _compare(have: Any, op: str, want: Any) -> bool:
    if op == "eq":
        return bool(have == want)
    if op == "neq":
        return bool(have != want)
    if op == "in":
        return have in (want if isinstance(want, list) else [want])
    if op == "startsWith":
        return isinstance(have, str) and have.startswith(str(want))
    if have is None:
        return False
    try:
        return bool({"lt": have < want, "lte": have <= want, "gt": have > want, "gte": have >= want}[op])
    except TypeError:
        return False
    except KeyError:
        raise ConfigError("--query", f"unknown operator {op!r}; use eq neq lt lte gt gte in startsWith") from None


def pick_asset(item: dict[str, Any], href: str, wanted: str | None) -> tuple[str, dict[str, Any]]:
    """(key, asset) to segment: ``wanted`` as a key, else as a role (exactly one asset with it); without
    ``wanted``, the item's one image asset (role ``data`` preferred). One line naming the item otherwise."""
    assets = item.get("assets") or {}
    names = ", ".join(sorted(assets)) or "none"
    if wanted:
        if wanted in assets:
            return wanted, assets[wanted]
        by_role = [k for k, a in assets.items() if wanted in (a.get("roles") or [])]
        if len(by_role) == 1:
            return by_role[0], assets[by_role[0]]
        if by_role:
            raise InputError(href, f"has {len(by_role)} assets with role {wanted!r} ({', '.join(sorted(by_role))}); "
                                   "name one with --asset")
        raise InputError(href, f"has no asset {wanted!r} (assets: {names})")
    images = [k for k, a in assets.items() if _is_image(a)]
    data = [k for k in images if "data" in (assets[k].get("roles") or [])]
    chosen = data if len(data) == 1 else images
    if len(chosen) == 1:
        return chosen[0], assets[chosen[0]]
    if not chosen:
        raise InputError(href, f"has no image asset (assets: {names}); choose one with --asset")
    raise InputError(href, f"has {len(chosen)} image assets ({', '.join(sorted(chosen))}); choose one with --asset")


def _is_image(asset: dict[str, Any]) -> bool:
    media = str(asset.get("type") or "").lower()
    if media:
        return media.startswith(_IMAGE_TYPES)
    path = urllib.parse.urlsplit(str(asset.get("href") or "")).path.lower()
    return path.endswith(_IMAGE_EXTENSIONS)


def band_indexes(names: Sequence[str], item: dict[str, Any], key: str, asset: dict[str, Any], href: str
                 ) -> tuple[int, ...]:
    """1-based indexes of band ``names`` in the asset (its ``bands``/``eo:bands``, by name or common name)."""
    bands = asset.get("bands") or asset.get("eo:bands") or (item.get("properties") or {}).get("eo:bands") or []
    labels: list[set[str]] = []
    for b in bands:
        b = b if isinstance(b, dict) else {}
        labels.append({str(v).lower() for v in (b.get("name"), b.get("common_name"), b.get("eo:common_name")) if v})
    out = []
    for name in names:
        hits = [i + 1 for i, lab in enumerate(labels) if name.lower() in lab]
        if not hits:
            known = ", ".join("/".join(sorted(lab)) or "?" for lab in labels) or "none described"
            raise InputError(href, f"asset {key!r} has no band named {name!r} (bands: {known})")
        out.append(hits[0])
    return tuple(out)
