"""Attribute matching of query keys (PS3.4 C.2.2.2), independent of any wire or database.

C-FIND identifiers and QIDO-RS query parameters both arrive as one text value per key;
:func:`parse` turns such a value into a :class:`Condition` whose kind is one of PS3.4's
matching types:

- universal matching (C.2.2.2.3): an empty value (or only ``*``) matches every entity;
- single value matching (C.2.2.2.1): the value as given;
- wildcard matching (C.2.2.2.4): ``*`` (any run of characters) and ``?`` (one character),
  for string VRs other than DA, TM, DT and UI;
- list of UID matching (C.2.2.2.2): backslash-separated UIDs; Stockade extends list
  matching to the other string VRs (``ModalitiesInStudy=CT\\MR`` matches either, as
  PS3.4 C.6.2.1.2 asks for that key);
- range matching (C.2.2.2.5): ``a-b``, ``a-`` and ``-b`` for DA and TM.

Values are bounded before anything else: a key longer than :data:`MAX_VALUE` characters or
with more than :data:`MAX_LIST` list items is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from stockade.dicom.uids import uid_problem
from stockade.errors import InvalidQuery

#: Longest query value accepted (a long list of UIDs is the longest legitimate one).
MAX_VALUE = 64 * 1024
#: Most items in a list of values.
MAX_LIST = 1000

_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})


class Kind(StrEnum):
    """The matching type of a condition (PS3.4 C.2.2.2)."""

    UNIVERSAL = "universal"
    SINGLE = "single"
    WILDCARD = "wildcard"
    LIST = "list"
    RANGE = "range"


@dataclass(frozen=True)
class Condition:
    """One key's matching: what a query asks of one attribute."""

    keyword: str
    kind: Kind
    values: tuple[str, ...] = ()  # SINGLE and WILDCARD: one; LIST: several
    low: str | None = None  # RANGE: inclusive bounds, None when open
    high: str | None = None

    @property
    def value(self) -> str:
        """The value of a SINGLE or WILDCARD condition."""
        return self.values[0]


def normalize_name(name: str | None) -> str | None:
    """The matching form of a person name (PS3.5 6.2.1): case-folded, and each component
    group without its trailing empty components (``Doe^Jane^^`` is ``doe^jane``)."""
    if name is None:
        return None
    groups = [group.rstrip("^ ") for group in name.casefold().split("=")]
    while len(groups) > 1 and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _check_date(keyword: str, value: str) -> str:
    if not _DATE.fullmatch(value):
        raise InvalidQuery(f"{keyword}: {value[:32]!r} is not a date (YYYYMMDD, PS3.5 6.2)")
    return value


def _check_time(keyword: str, value: str) -> str:
    if not _TIME.fullmatch(value):
        raise InvalidQuery(f"{keyword}: {value[:32]!r} is not a time (HHMMSS.FFFFFF)")
    return value


def _range(keyword: str, vr: str, value: str) -> Condition:
    low, _, high = value.partition("-")
    check = _check_date if vr == "DA" else _check_time
    if not low and not high:
        raise InvalidQuery(f"{keyword}: a range needs at least one bound")
    lo = check(keyword, low) if low else None
    hi = check(keyword, high) if high else None
    if lo is not None and hi is not None and hi < lo:
        raise InvalidQuery(f"{keyword}: range {value[:40]!r} ends before it starts")
    return Condition(keyword, Kind.RANGE, low=lo, high=hi)


def parse(keyword: str, vr: str, raw: str | None) -> Condition:
    """The condition a query value asks for on an attribute of VR *vr*.

    Raises
    ------
    InvalidQuery
        The value cannot be a matching value for that VR (a malformed date, UID or
        number, wildcards where PS3.4 does not allow them, a value over the bounds).
    """
    value = (raw or "").strip(" \x00")
    if len(value) > MAX_VALUE:
        raise InvalidQuery(f"{keyword}: query value longer than {MAX_VALUE} characters")
    if not value or (value.strip("*") == "" and vr not in ("DA", "TM", "DT", "UI")):
        return Condition(keyword, Kind.UNIVERSAL)
    items = value.split("\\")
    if len(items) > MAX_LIST:
        raise InvalidQuery(f"{keyword}: more than {MAX_LIST} values")
    if vr == "UI":
        for uid in items:
            problem = uid_problem(uid)
            if problem:
                raise InvalidQuery(f"{keyword}: {problem}")
        if len(items) > 1:
            return Condition(keyword, Kind.LIST, tuple(items))
        return Condition(keyword, Kind.SINGLE, (value,))
    if vr in ("DA", "TM"):
        if len(items) > 1:
            raise InvalidQuery(f"{keyword}: a date or time key takes one value or one range")
        if "-" in value:
            return _range(keyword, vr, value)
        check = _check_date if vr == "DA" else _check_time
        return Condition(keyword, Kind.SINGLE, (check(keyword, value),))
    if vr in _NUMBER_VRS:
        numbers = []
        for item in items:
            try:
                numbers.append(str(int(item.strip())))
            except ValueError:
                raise InvalidQuery(f"{keyword}: {item[:32]!r} is not a number") from None
        kind = Kind.LIST if len(numbers) > 1 else Kind.SINGLE
        return Condition(keyword, kind, tuple(numbers))
    if vr not in _TEXT_VRS:
        raise InvalidQuery(f"{keyword}: matching on VR {vr} is not supported")
    if len(items) > 1:
        return Condition(keyword, Kind.LIST, tuple(i.strip(" ") for i in items))
    if "*" in value or "?" in value:
        return Condition(keyword, Kind.WILDCARD, (value,))
    return Condition(keyword, Kind.SINGLE, (value,))


def like_pattern(value: str) -> str:
    """A SQL LIKE pattern (escape character backslash) for a DICOM wildcard value:
    ``%``, ``_`` and ``\\`` stand for themselves, ``*`` and ``?`` are the wildcards."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")
