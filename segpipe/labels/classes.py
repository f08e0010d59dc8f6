"""The class table of a dataset as labels use it: names, aliases, ignore, unlabelled, priority.

``classes.json`` (contract; keys beyond ``classes`` are optional)::

    {
      "classes": [{"name": "background"},
                  {"name": "building", "aliases": ["house", "Gebäude"], "color": "#d62728"},
                  {"name": "water", "aliases": ["lake"]}],
      "ignore": ["unsure", "cloud"],        names whose pixels are neither trained on nor scored (255)
      "unlabelled": "background",           or "ignore": what unlabelled pixels are (see below)
      "priority": ["water", "building"],    overlaps: first name on top (default: see LabelClasses.rank)
      "region_classes": ["Region*"],        feature classes that mark labelled regions, not a class
      "burn": {"all_touched": false, "buffer": null}
    }

``unlabelled`` decides the pixels that no feature covers: inside a labelled region they get
that class (``"ignore"`` → 255); outside every region they are always 255. An image with
vector labels and no region needs it: a dataset never leaves that to a guess.

Class names are matched exactly first, then case-insensitively with surrounding blanks
stripped, against names and aliases alike (so ``"Building "`` finds ``building``; two spellings
that differ only by case cannot name two different classes). An integer class is taken as the
class id itself. A name found nowhere is a :class:`~segpipe.core.errors.DatasetError` naming
the file, the feature and where it lies (:meth:`LabelClasses.resolve`).

Pure: the JSON is parsed by :mod:`segpipe.labels.dataset`, checked here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segpipe.core.classes import class_colors, parse_color, to_hex
from segpipe.core.errors import ConfigError, DatasetError, validation_problem

#: label value that is neither trained on nor scored (the dataset's ignore value)
IGNORE_INDEX = 255
#: the class name a feature without any class gets (QuPath's word for it), so that
#: ``ignore`` or an alias can say what such features are
UNCLASSIFIED = "Unclassified"
#: QuPath's built-in class for "the region I labelled"
DEFAULT_REGION_CLASSES = ("Region*",)

_SHAPE = ('expected {"classes": [{"name": ..., "color": "#rrggbb", "aliases": [...]}, ...], '
          '"ignore": [...], "unlabelled": "ignore" | <class name>}')


class _ClassEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, description="class name; its index in the list is the class id")
    color: str | None = Field(None, description="display colour '#rrggbb' (default from segpipe.core.classes)")
    aliases: list[str] = Field(default_factory=list, description="other names that map to this class")

    @field_validator("color")
    @classmethod
    def _color(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return to_hex(parse_color(v))  # the one parser: #rgb, #rrggbb, #rrggbbaa
        except ConfigError:
            raise ValueError(f"{v!r} is not a colour; expected '#rrggbb'") from None


class BurnRules(BaseModel):
    """How features become pixels (the ``burn`` object of ``classes.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    all_touched: bool = Field(False, description="burn every pixel a polygon touches, not only those "
                                                 "whose centre lies inside")
    buffer: float | None = Field(None, gt=0, description="buffer (in image pixels) that turns lines and "
                                                         "points into polygons; without it they are refused")


class _ClassesFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    classes: list[_ClassEntry] = Field(min_length=1, max_length=IGNORE_INDEX)
    ignore: list[str] = Field(default_factory=list)
    unlabelled: str | None = None
    priority: list[str] | None = None
    region_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_REGION_CLASSES))
    burn: BurnRules = Field(default_factory=BurnRules)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[_ClassEntry]) -> list[_ClassEntry]:
        names = [c.name for c in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"class name {dup!r} appears twice")
        return v


def _key(name: str) -> str:
    return name.strip().casefold()


@dataclass(frozen=True)
class LabelClasses:
    """The classes of a dataset and the rules that map feature classes to label values.

    Label values: a class id ``0..K-1``, or :data:`IGNORE_INDEX` for ignored names.
    """

    names: tuple[str, ...]
    colors: tuple[str, ...]
    #: exact spelling → value, for names, aliases and ignore names
    exact: Mapping[str, int] = field(repr=False)
    #: case-folded spelling → value
    folded: Mapping[str, int] = field(repr=False)
    #: class id the unlabelled pixels of a region get; IGNORE_INDEX = "ignore"; None = not declared
    unlabelled: int | None
    #: drawing rank per label value (higher is drawn on top); see :meth:`rank`
    ranks: Mapping[int, int] = field(repr=False)
    region_classes: frozenset[str] = frozenset(_key(n) for n in DEFAULT_REGION_CLASSES)
    burn: BurnRules = BurnRules()
    source: str = "classes.json"  #: where these came from (named in errors)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        """A stable text of everything that decides label values (to key caches and compiled labels)."""
        return json.dumps([self.names, sorted(self.exact.items()), sorted(self.folded.items()), self.unlabelled,
                           sorted(self.ranks.items()), sorted(self.region_classes), self.burn.model_dump()])

    def with_unlabelled(self, value: int) -> LabelClasses:
        """The same rules with another ``unlabelled`` value (a class id or IGNORE_INDEX)."""
        return dataclasses.replace(self, unlabelled=value)

    def rank(self, value: int) -> int:
        """Drawing order of a label value: features of a higher rank are burned over lower ones.

        Default: ignore names on top (a person who marks "unsure" means it), then classes from
        the last in ``classes.json`` down to the first (background-like first classes at the
        bottom). ``priority`` lists names first-on-top and puts them above everything not listed.
        """
        return self.ranks[value]

    def is_region(self, name: object) -> bool:
        """True when a feature of class ``name`` marks a labelled region (``region_classes``)."""
        return isinstance(name, str) and _key(name) in self.region_classes

    def resolve(self, value: object, *, uri: str, feature: str, where: str | Callable[[], str]) -> int:
        """Label value of a feature's class: a class id or :data:`IGNORE_INDEX`.

        ``value`` is a name (exact, then case-insensitive, names and aliases alike), an integer
        class id, or None (no class: read as :data:`UNCLASSIFIED`). ``feature`` and ``where``
        (e.g. ``"feature 12 (id 'a7')"`` and ``"near x=…, y=…"``, or a function giving it: computed
        only for an error) name it in the error.
        """
        found = self._lookup(value)
        if found is not None:
            return found
        place = where() if callable(where) else where
        return self._resolve_slow(value, uri=uri, feature=feature, where=place)

    def _lookup(self, value: object) -> int | None:
        if isinstance(value, str):
            found = self.exact.get(value)
            return found if found is not None else self.folded.get(_key(value))
        if type(value) is int and (0 <= value < self.num_classes or value == IGNORE_INDEX):
            return value
        return None

    def _resolve_slow(self, value: object, *, uri: str, feature: str, where: str) -> int:
        if value is None or (isinstance(value, str) and not value.strip()):
            value = UNCLASSIFIED
        if isinstance(value, bool):
            raise DatasetError(uri, f"{feature} {where}: class {value!r} is neither a class name nor an id")
        if isinstance(value, int):
            if 0 <= value < self.num_classes or value == IGNORE_INDEX:
                return value
            raise DatasetError(uri, f"{feature} {where}: class id {value} is out of range "
                                    f"(0..{self.num_classes - 1}, {IGNORE_INDEX} = ignore; {self.source})")
        if isinstance(value, float) and value.is_integer():
            return self.resolve(int(value), uri=uri, feature=feature, where=where)
        if not isinstance(value, str):
            raise DatasetError(uri, f"{feature} {where}: class {value!r} is neither a class name nor an id")
        found = self.exact.get(value)
        if found is None:
            found = self.folded.get(_key(value))
        if found is None:
            hint = (f"; give it a class or list {UNCLASSIFIED!r} under ignore" if value == UNCLASSIFIED else
                    f"; add it to a class's aliases or to ignore in {self.source}")
            raise DatasetError(uri, f"{feature} {where}: unknown class {value!r} (known: "
                                    f"{', '.join(self.names)}){hint}")
        return found


def parse_label_classes(data: Any, uri: str) -> LabelClasses:
    """Check a parsed ``classes.json`` and build its :class:`LabelClasses`; errors name ``uri``."""
    try:
        parsed = _ClassesFile.model_validate(data)
    except ValidationError as e:
        where, what = validation_problem(e.errors()[0])
        raise DatasetError(uri, f"{where or 'top level'}: {what} ({_SHAPE})") from None
    names = tuple(c.name for c in parsed.classes)
    colors = tuple(class_colors(len(names), [c.color for c in parsed.classes]))
    exact: dict[str, int] = {}
    folded: dict[str, int] = {}

    def add(spelling: str, value: int, what: str) -> None:
        for table, key in ((exact, spelling), (folded, _key(spelling))):
            other = table.get(key)
            if other is not None and other != value:
                raise DatasetError(uri, f"{what} {spelling!r} also names "
                                        f"{'ignore' if other == IGNORE_INDEX else repr(names[other])}")
            table[key] = value

    for i, c in enumerate(parsed.classes):
        add(c.name, i, "class")
    for i, c in enumerate(parsed.classes):
        for a in c.aliases:
            add(a, i, f"alias of {c.name!r}")
    for n in parsed.ignore:
        add(n, IGNORE_INDEX, "ignore name")

    unlabelled: int | None = None
    if parsed.unlabelled is not None:
        if _key(parsed.unlabelled) == "ignore":
            unlabelled = IGNORE_INDEX
        elif parsed.unlabelled in exact or _key(parsed.unlabelled) in folded:
            unlabelled = exact.get(parsed.unlabelled, folded.get(_key(parsed.unlabelled)))
        else:
            raise DatasetError(uri, f"unlabelled: {parsed.unlabelled!r} is neither \"ignore\" nor a class "
                                    f"({', '.join(names)})")

    # default ranks: ignore on top, then the last class down to the first
    ranks = {i: i for i in range(len(names))}
    ranks[IGNORE_INDEX] = len(names)
    if parsed.priority is not None:
        top = len(names) + 1 + len(parsed.priority)
        for pos, n in enumerate(parsed.priority):
            value = exact.get(n, folded.get(_key(n)))
            if value is None:
                raise DatasetError(uri, f"priority: {n!r} is not a class, alias or ignore name")
            ranks[value] = top - pos
    region_classes = frozenset(_key(n) for n in parsed.region_classes)
    clash = sorted(n for n in parsed.region_classes if _key(n) in folded)
    if clash:
        raise DatasetError(uri, f"region_classes: {clash[0]!r} is also a class, alias or ignore name")
    return LabelClasses(names, colors, exact, folded, unlabelled, ranks, region_classes, parsed.burn, uri)
