"""Evaluating a :class:`~stockade.query.Query` in SQL: the one query engine of the index.

Every condition becomes part of the WHERE clause (PS3.4 C.2.2.2 matching rules, see
:mod:`stockade.dicom.matching`); nothing is filtered afterwards in Python, so paging and
the result cap are exact. Wildcards use ``LIKE`` with a backslash escape, so ``%`` and
``_`` in a value match only themselves; SQLite's ``LIKE`` is made case-sensitive
(``PRAGMA case_sensitive_like``) to behave as PostgreSQL's does. Person names match on their
case-folded key column unless names are case-sensitive.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    exists,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.sql import FromClause

from stockade.dicom.attributes import Level
from stockade.dicom.matching import Condition, Kind, like_pattern, normalize_name
from stockade.errors import InvalidQuery
from stockade.index.base import StoredInstance
from stockade.index.schema import instances, patients, series, studies
from stockade.query import KEYS, Found, Query

_s2 = studies.alias("patient_studies")
_se2 = series.alias("study_series")
_in2 = instances.alias("patient_instances")
_se3 = series.alias("patient_series")

#: keyword -> the column (or computed expression) holding it
_COLUMNS: dict[str, ColumnElement[Any]] = {
    "PatientID": patients.c.patient_id,
    "IssuerOfPatientID": patients.c.issuer,
    "PatientName": patients.c.patient_name,
    "PatientBirthDate": patients.c.birth_date,
    "PatientSex": patients.c.sex,
    "NumberOfPatientRelatedStudies": patients.c.num_studies,
    "NumberOfPatientRelatedSeries": select(func.coalesce(func.sum(_s2.c.num_series), 0))
    .where(_s2.c.patient_pk == patients.c.id)
    .correlate(patients)
    .scalar_subquery(),
    "NumberOfPatientRelatedInstances": select(func.coalesce(func.sum(_s2.c.num_instances), 0))
    .where(_s2.c.patient_pk == patients.c.id)
    .correlate(patients)
    .scalar_subquery(),
    "StudyInstanceUID": studies.c.study_uid,
    "StudyDate": studies.c.study_date,
    "StudyTime": studies.c.study_time,
    "AccessionNumber": studies.c.accession_number,
    "StudyID": studies.c.study_id,
    "StudyDescription": studies.c.description,
    "ReferringPhysicianName": studies.c.referring_name,
    "ModalitiesInStudy": studies.c.modalities,
    "NumberOfStudyRelatedSeries": studies.c.num_series,
    "NumberOfStudyRelatedInstances": studies.c.num_instances,
    "SeriesInstanceUID": series.c.series_uid,
    "Modality": series.c.modality,
    "SeriesNumber": series.c.series_number,
    "SeriesDescription": series.c.description,
    "BodyPartExamined": series.c.body_part,
    "SeriesDate": series.c.series_date,
    "SeriesTime": series.c.series_time,
    "NumberOfSeriesRelatedInstances": series.c.num_instances,
    "SOPInstanceUID": instances.c.sop_uid,
    "SOPClassUID": instances.c.sop_class_uid,
    "InstanceNumber": instances.c.instance_number,
    "Rows": instances.c.rows,
    "Columns": instances.c.columns,
    "NumberOfFrames": instances.c.frames,
}
#: person-name keywords -> their case-folded matching column
_NAME_KEYS: dict[str, ColumnElement[Any]] = {
    "PatientName": patients.c.patient_name_key,
    "ReferringPhysicianName": studies.c.referring_name_key,
}
_ROOT = {
    Level.PATIENT: patients,
    Level.STUDY: studies,
    Level.SERIES: series,
    Level.IMAGE: instances,
}


#: The columns of a :class:`StoredInstance`, in its field order (instance level join).
STORED_COLUMNS: tuple[ColumnElement[Any], ...] = (
    instances.c.sop_uid,
    instances.c.sop_class_uid,
    studies.c.study_uid,
    series.c.series_uid,
    instances.c.transfer_syntax,
    instances.c.blob_key,
    instances.c.sha256,
    instances.c.size,
    patients.c.patient_id,
)


def _from(level: Level) -> FromClause:
    source: FromClause = patients
    if level in (Level.STUDY, Level.SERIES, Level.IMAGE):
        source = studies.join(patients, patients.c.id == studies.c.patient_pk)
    if level in (Level.SERIES, Level.IMAGE):
        source = series.join(source, studies.c.id == series.c.study_pk)
    if level is Level.IMAGE:
        source = instances.join(source, series.c.id == instances.c.series_pk)
    return source


def _text(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    if "*" in value or "?" in value:
        return column.like(like_pattern(value), escape="\\")
    return column == value


def _name(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    """A person name matches as a whole or, for a value without ``=``, on its first
    component group (``Yamada^Tarou`` matches ``Yamada^Tarou=山田^太郎``, PS3.5 6.2.1)."""
    whole = _text(column, value)
    if "=" in value:
        return whole
    pattern = like_pattern(value) + "=%"
    return or_(whole, column.like(pattern, escape="\\"))


def _time_prefix(column: ColumnElement[Any], bound: str) -> ColumnElement[Any]:
    return func.substr(column, 1, len(bound))


def _condition(cond: Condition, query: Query) -> ColumnElement[bool]:
    key = KEYS[cond.keyword]
    if cond.keyword == "ModalitiesInStudy":
        items = cond.values
        return exists(
            select(literal(1)).where(
                _se2.c.study_pk == studies.c.id,
                or_(*(_text(_se2.c.modality, item) for item in items)),
            )
        )
    column = _COLUMNS[cond.keyword]
    if key.vr == "PN":
        if not query.case_sensitive_names:
            column = _NAME_KEYS[cond.keyword]
        values = [normalize_name(v) if not query.case_sensitive_names else v for v in cond.values]
        return or_(*(_name(column, str(v)) for v in values))
    if cond.kind is Kind.RANGE:
        parts = []
        if cond.low is not None:
            parts.append(column >= cond.low)
        if cond.high is not None:
            upper = _time_prefix(column, cond.high) if key.vr == "TM" else column
            parts.append(upper <= cond.high)
        return and_(*parts)
    if key.vr in ("IS", "US"):
        numbers = [int(v) for v in cond.values]
        return column.in_(numbers) if len(numbers) > 1 else column == numbers[0]
    if key.vr == "UI":
        return column.in_(cond.values) if cond.kind is Kind.LIST else column == cond.value
    if key.vr == "TM":  # a single time matches at its precision: 1030 is 10:30:xx
        return _time_prefix(column, cond.value) == cond.value
    return or_(*(_text(column, v) for v in cond.values))


def _scoped(query: Query, level: Level) -> list[ColumnElement[bool]]:
    """The caller's scope as a condition (none without a scope): a study is visible when it
    is in the scope or belongs to a patient in it; a patient when it is, or has such a
    study."""
    scope = query.scope
    if scope is None:
        return []
    study_ok = or_(
        studies.c.study_uid.in_(sorted(scope.studies)) if scope.studies else false(),
        patients.c.patient_id.in_(sorted(scope.patients)) if scope.patients else false(),
    )
    if level is Level.PATIENT:
        return [
            or_(
                patients.c.patient_id.in_(sorted(scope.patients)) if scope.patients else false(),
                exists(
                    select(literal(1)).where(
                        studies.c.patient_pk == patients.c.id,
                        studies.c.study_uid.in_(sorted(scope.studies)),
                    )
                )
                if scope.studies
                else false(),
            )
        ]
    return [study_ok]


def _check(query: Query) -> None:
    unknown = [c.keyword for c in query.conditions if c.keyword not in _COLUMNS]
    if unknown:
        raise InvalidQuery(f"cannot match on {', '.join(unknown)}")


def locate(conn: Connection, query: Query) -> list[StoredInstance]:
    """The instances below every entity *query* matches, at most ``query.limit + 1``
    (so that the caller sees a cap was passed), by series, instance number and arrival.

    The conditions are those of :func:`find`, evaluated on the instance level join, so a
    retrieve locates exactly what a query at the same level with the same keys matches.
    """
    _check(query)
    stmt = (
        select(*STORED_COLUMNS)
        .select_from(_from(Level.IMAGE))
        .where(*(_condition(c, query) for c in query.conditions), *_scoped(query, Level.IMAGE))
        .order_by(studies.c.id, series.c.id, instances.c.instance_number, instances.c.id)
        .limit(query.limit + 1)
    )
    return [StoredInstance(*row) for row in conn.execute(stmt)]


def _sort(query: Query) -> list[ColumnElement[Any]]:
    """The ORDER BY terms of *query*'s sort keys (names by their case-folded key); a missing
    value sorts last either way, on both databases."""
    out: list[ColumnElement[Any]] = []
    for keyword, descending in query.order:
        column = _NAME_KEYS.get(keyword, _COLUMNS[keyword])
        out.append((column.desc() if descending else column.asc()).nulls_last())
    return out


def find(conn: Connection, query: Query) -> Found:
    """Run *query*; at most ``query.limit`` rows after ``query.offset``, in storage order.

    Raises
    ------
    InvalidQuery
        A condition on a key this engine cannot match.
    """
    _check(query)
    names = [k for k in query.return_keys if k in _COLUMNS]
    stmt = (
        select(*(_COLUMNS[k].label(k) for k in names))
        .select_from(_from(query.level))
        .where(*(_condition(c, query) for c in query.conditions), *_scoped(query, query.level))
        .order_by(*_sort(query), _ROOT[query.level].c.id)
        .limit(query.limit + 1)
        .offset(query.offset)
    )
    rows = conn.execute(stmt).all()
    more = len(rows) > query.limit
    out = []
    for row in rows[: query.limit]:
        record: dict[str, str | int | None] = {}
        for name, value in zip(names, row, strict=True):
            record[name] = None if value == "" else value
        out.append(record)
    return Found(out, more)
