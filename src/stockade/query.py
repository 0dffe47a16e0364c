"""The one query model: what C-FIND (PS3.4 C.4.1) and QIDO-RS (PS3.18 10.6) ask the index.

An adapter turns its identifier or query parameters into text values per keyword and calls
:func:`build`; the index evaluates the :class:`Query` in SQL (``index/query.py``) with the
matching rules of :mod:`stockade.dicom.matching`.

Keys are those of the Patient Root and Study Root information models (PS3.4 C.6.1.1 and
C.6.2.1) that the index holds, plus the computed return keys (counts and
ModalitiesInStudy). Each key belongs to a level of the hierarchy; a query at one level may
carry conditions on its own level and the levels above (the unique keys PS3.4 C.4.1.2.1
requires and, as most archives accept, other keys of those levels). Keys of levels below
the query level are not matched and not returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stockade.dicom.attributes import INDEXED, Level
from stockade.dicom.matching import Condition, Kind, parse
from stockade.errors import InvalidQuery

LEVEL_ORDER: tuple[Level, ...] = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


@dataclass(frozen=True)
class Key:
    """A query key: its tag, keyword, VR and level, and whether it can be matched on."""

    tag: int
    keyword: str
    vr: str
    level: Level
    matchable: bool = True


_COMPUTED: tuple[Key, ...] = (
    Key(0x00080061, "ModalitiesInStudy", "CS", Level.STUDY),
    Key(0x00201200, "NumberOfPatientRelatedStudies", "IS", Level.PATIENT, False),
    Key(0x00201202, "NumberOfPatientRelatedSeries", "IS", Level.PATIENT, False),
    Key(0x00201204, "NumberOfPatientRelatedInstances", "IS", Level.PATIENT, False),
    Key(0x00201206, "NumberOfStudyRelatedSeries", "IS", Level.STUDY, False),
    Key(0x00201208, "NumberOfStudyRelatedInstances", "IS", Level.STUDY, False),
    Key(0x00201209, "NumberOfSeriesRelatedInstances", "IS", Level.SERIES, False),
)
KEYS: dict[str, Key] = {
    **{a.keyword: Key(a.tag, a.keyword, a.vr, a.level) for a in INDEXED},
    **{k.keyword: k for k in _COMPUTED},
}
KEYS_BY_TAG: dict[int, Key] = {k.tag: k for k in KEYS.values()}

#: The unique key of each level (PS3.4 C.6.1.1 and C.6.2.1).
UNIQUE: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}


def at_or_above(level: Level) -> frozenset[Level]:
    """The levels whose keys a query at *level* may match and return."""
    return frozenset(LEVEL_ORDER[: LEVEL_ORDER.index(level) + 1])


@dataclass(frozen=True)
class Scope:
    """What a caller may see: these studies, and every study of these patients (threat model
    SR-16). Applied inside the query, in SQL; a caller without a scope sees everything."""

    studies: frozenset[str] = frozenset()
    patients: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Query:
    """A query at one level: conditions, keys to return, a page of the results, and the
    caller's scope."""

    level: Level
    conditions: tuple[Condition, ...]
    return_keys: tuple[str, ...]
    limit: int
    offset: int = 0
    case_sensitive_names: bool = False
    scope: Scope | None = None
    #: Sort keys, most significant first: (keyword, descending). Empty: storage order.
    order: tuple[tuple[str, bool], ...] = ()


#: Keywords results may be sorted by (QIDO-RS ``orderby``, a Stockade extension; C-FIND
#: answers in storage order).
ORDERABLE = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "SeriesNumber",
        "SeriesDate",
        "SeriesTime",
        "Modality",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "InstanceNumber",
    }
)
MAX_ORDER_KEYS = 4


@dataclass(frozen=True)
class Found:
    """The page of matches of a :class:`Query`, and whether more matched beyond it."""

    rows: list[dict[str, str | int | None]]
    more: bool


def build(
    level: Level,
    values: Mapping[str, str | None],
    *,
    return_keys: Iterable[str] = (),
    limit: int,
    offset: int = 0,
    case_sensitive_names: bool = False,
    scope: Scope | None = None,
    order: Iterable[tuple[str, bool]] = (),
) -> Query:
    """A :class:`Query` from text values per keyword (an empty value means "return it").

    *order* sorts the results by keywords of :data:`ORDERABLE` at or above *level*
    (``(keyword, descending)``, most significant first); ties keep storage order.

    Every key with a value becomes a condition; every key named, with or without a value,
    is returned, together with the unique keys of the query level and the levels above.
    Keys Stockade does not index, and keys below the query level, are left out: the
    adapter answers them with an empty value.

    Raises
    ------
    InvalidQuery
        A value that no matching rule accepts, a condition on a computed count, or a
        negative limit or offset.
    """
    if limit < 0 or offset < 0:
        raise InvalidQuery("limit and offset must not be negative")
    allowed = at_or_above(level)
    sort = tuple(order)
    if len(sort) > MAX_ORDER_KEYS:
        raise InvalidQuery(f"at most {MAX_ORDER_KEYS} sort keys")
    for keyword, _ in sort:
        known = KEYS.get(keyword)
        if keyword not in ORDERABLE or known is None or known.level not in allowed:
            raise InvalidQuery(f"results at the {level} level cannot be sorted by {keyword[:64]!r}")
    conditions = []
    returned: list[str] = [UNIQUE[lv] for lv in LEVEL_ORDER if lv in allowed]
    for keyword, raw in values.items():
        key = KEYS.get(keyword)
        if key is None or key.level not in allowed:
            continue
        if keyword not in returned:
            returned.append(keyword)
        condition = parse(keyword, key.vr, raw)
        if condition.kind is Kind.UNIVERSAL:
            continue
        if not key.matchable:
            raise InvalidQuery(f"{keyword} is a return key only; it cannot be matched")
        conditions.append(condition)
    for keyword in return_keys:
        key = KEYS.get(keyword)
        if key is not None and key.level in allowed and keyword not in returned:
            returned.append(keyword)
    return Query(
        level,
        tuple(conditions),
        tuple(returned),
        limit,
        offset,
        case_sensitive_names,
        scope,
        sort,
    )
