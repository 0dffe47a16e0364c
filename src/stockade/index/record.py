"""Recording one instance: the write path that every stored object takes.

Every statement is written once in SQLAlchemy Core, so one definition serves SQLite and
PostgreSQL, and compiled once for the engine's dialect. The compiled text then runs on DBAPI
connections that SQLAlchemy's pool opened and that this writer keeps checked out. Measured
on a 2-core machine, SQLAlchemy's per-execution work cost about 2 ms of CPU per stored
instance (nine statements, a pool checkout and the transaction events). Running the compiled
text directly costs a few driver calls, and the archive spends that time on the next
C-STORE instead (docs/benchmarks.md).

Transactions are explicit. On SQLite the writer opens ``BEGIN IMMEDIATE``; the caller
serialises writers of all processes. On PostgreSQL the writer runs at READ COMMITTED and
uses the insert-or-select pattern, with the study row locked by its counter update before
the modalities are recounted.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql import ClauseElement

from stockade.dicom.matching import normalize_name
from stockade.errors import DuplicateConflict, HierarchyConflict, IndexFailure, StockadeError
from stockade.index.base import InstanceRecord, Outcome, Recorded
from stockade.index.schema import (
    blob_deletions,
    instances,
    patients,
    series,
    staging_journal,
    studies,
)

log = logging.getLogger(__name__)

#: Connections kept checked out for writing, at most (more concurrent writers get their own
#: connection for the one transaction and give it back to the pool afterwards).
KEPT_CONNECTIONS = 8


#: The matching form of a person name, kept in the ``*_name_key`` columns.
name_key = normalize_name


class _Sql:
    """One statement compiled for a dialect, with the order of its parameters."""

    def __init__(self, stmt: ClauseElement, engine: Engine) -> None:
        compiled: Any = stmt.compile(dialect=engine.dialect)
        self.text: str = compiled.string
        # Set for positional paramstyles (SQLite's qmark); None for named ones (psycopg).
        self.order: Sequence[str] | None = compiled.positiontup
        # Constants in the statement (the 1 of ``n + 1``) are bound parameters too.
        self.constants = {k: v for k, v in compiled.params.items() if v is not None}

    def params(self, values: dict[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """Parameters in the form the driver's paramstyle wants."""
        if self.constants:
            values = {**self.constants, **values}
        if self.order is None:
            return values
        return [values[name] for name in self.order]


def _values(table: Any, names: Sequence[str]) -> dict[str, Any]:
    return {name: bindparam(f"v_{name}") for name in names}


class Ticket:
    """One instance waiting to be recorded, and then its outcome."""

    __slots__ = ("allow_replace", "done", "error", "record", "result")

    def __init__(self, record: InstanceRecord, allow_replace: bool) -> None:
        self.record = record
        self.allow_replace = allow_replace
        self.done = False
        self.result: Recorded | None = None
        self.error: StockadeError | None = None

    def succeed(self, result: Recorded) -> None:
        """Recorded, with this result."""
        self.result, self.done = result, True

    def fail(self, error: StockadeError) -> None:
        """Refused, or the transaction failed."""
        self.error, self.done = error, True

    def outcome(self) -> Recorded:
        """The result, or raise the error."""
        if self.error is not None:
            raise self.error
        if self.result is None:  # pragma: no cover - record_batch marks every ticket
            raise IndexFailure("the instance was not recorded")
        return self.result


class _Retry(Exception):
    """A concurrent writer created the same row first; run the transaction again."""


class InstanceWriter:
    """Records instances with their patient, study and series in one transaction each."""

    PATIENT = ("patient_id", "issuer", "patient_name", "patient_name_key", "birth_date", "sex")
    STUDY = (
        "study_uid",
        "patient_pk",
        "study_date",
        "study_time",
        "accession_number",
        "study_id",
        "description",
        "referring_name",
        "referring_name_key",
    )
    STUDY_COUNTERS = ("modalities", "num_series", "num_instances", "created_at", "updated_at")
    SERIES = (
        "series_uid",
        "study_pk",
        "modality",
        "series_number",
        "description",
        "body_part",
        "series_date",
        "series_time",
    )
    INSTANCE = (
        "series_pk",
        "sop_class_uid",
        "instance_number",
        "rows",
        "columns",
        "frames",
        "transfer_syntax",
        "size",
        "sha256",
        "blob_key",
        "preamble",
        "trailing_bytes",
        "origin",
        "sender_ae",
        "sender_address",
        "received_at",
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        dbapi = engine.dialect.loaded_dbapi
        self._integrity_error: type[Exception] = dbapi.IntegrityError
        self._dbapi_error: type[Exception] = dbapi.Error
        # DateTime values go through the dialect's own conversion (SQLite stores text).
        processor = instances.c.received_at.type.bind_processor(engine.dialect)
        self._time: Any = processor if processor is not None else (lambda value: value)
        self._kept: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._compile()

    def _sql(self, stmt: ClauseElement) -> _Sql:
        return _Sql(stmt, self.engine)

    def _compile(self) -> None:
        ins = sqlite_insert if self.sqlite else pg_insert
        sql = self._sql
        self.sel_instance = sql(
            select(
                instances.c.id, instances.c.sha256, instances.c.blob_key, instances.c.series_pk
            ).where(instances.c.sop_uid == bindparam("sop_uid"))
        )
        self.sel_patient = sql(
            select(patients.c.id).where(
                patients.c.patient_id == bindparam("patient_id"),
                patients.c.issuer == bindparam("issuer"),
            )
        )
        self.sel_study = sql(
            select(studies.c.id, studies.c.patient_pk).where(
                studies.c.study_uid == bindparam("study_uid")
            )
        )
        self.sel_series = sql(
            select(series.c.id, series.c.study_pk).where(
                series.c.series_uid == bindparam("series_uid")
            )
        )
        counters = ("num_studies", "created_at")
        self.ins_patient = sql(
            ins(patients)
            .values(_values(patients, self.PATIENT + counters))
            .on_conflict_do_nothing()
        )
        self.ins_study = sql(
            ins(studies)
            .values(
                _values(
                    studies,
                    (*self.STUDY, *self.STUDY_COUNTERS),
                )
            )
            .on_conflict_do_nothing()
        )
        self.ins_series = sql(
            ins(series)
            .values(_values(series, (*self.SERIES, "num_instances", "created_at")))
            .on_conflict_do_nothing()
        )
        self.ins_instance = sql(
            insert(instances)
            .values(_values(instances, ("sop_uid", *self.INSTANCE)))
            .returning(instances.c.id)
        )
        self.ins_journal = sql(
            insert(staging_journal).values(
                _values(staging_journal, ("token", "area", "instance_pk", "sha256"))
            )
        )
        self.del_journal = sql(
            staging_journal.delete().where(staging_journal.c.token == bindparam("token"))
        )
        self.upd_instance = sql(
            update(instances)
            .where(instances.c.id == bindparam("pk"))
            .values(_values(instances, self.INSTANCE))
        )
        self.upd_series = sql(
            update(series)
            .where(series.c.id == bindparam("pk"))
            .values(num_instances=series.c.num_instances + 1)
        )
        self.upd_study = sql(
            update(studies)
            .where(studies.c.id == bindparam("pk"))
            .values(
                num_instances=studies.c.num_instances + bindparam("new_instance"),
                num_series=studies.c.num_series + bindparam("new_series"),
                updated_at=bindparam("now"),
            )
        )
        self.sel_modalities = sql(
            select(series.c.modality)
            .where(series.c.study_pk == bindparam("pk"), series.c.modality.is_not(None))
            .distinct()
        )
        self.upd_modalities = sql(
            update(studies)
            .where(studies.c.id == bindparam("pk"))
            .values(modalities=bindparam("modalities"))
        )
        self.upd_patient = sql(
            update(patients)
            .where(patients.c.id == bindparam("pk"))
            .values(num_studies=patients.c.num_studies + 1)
        )
        self.count_blob = sql(
            select(func.count())
            .select_from(instances)
            .where(instances.c.blob_key == bindparam("key"))
        )
        self.queue_deletion = sql(
            ins(blob_deletions)
            .values(_values(blob_deletions, ("blob_key", "queued_at")))
            .on_conflict_do_nothing()
        )

    # -- connections -----------------------------------------------------------------------

    def _checkout(self) -> Any:
        try:
            return self._kept.get_nowait()
        except queue.Empty:
            return self.engine.raw_connection()

    def _checkin(self, conn: Any, healthy: bool) -> None:
        if not healthy:
            conn.invalidate()
        elif self._kept.qsize() < KEPT_CONNECTIONS:
            self._kept.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Give every kept connection back to the pool."""
        while True:
            try:
                self._kept.get_nowait().close()
            except queue.Empty:
                return

    # -- recording -------------------------------------------------------------------------

    def _begin(self, cur: Any) -> None:
        if self.sqlite:
            cur.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: Any, cur: Any) -> None:
        if self.sqlite:
            cur.execute("COMMIT")
        else:
            conn.commit()

    def _rollback(self, conn: Any, cur: Any) -> None:
        # Best effort: the error that made us roll back is the one worth reporting.
        with contextlib.suppress(Exception):
            if self.sqlite:
                cur.execute("ROLLBACK")
            else:
                conn.rollback()

    def record_batch(self, tickets: Sequence[Ticket], published: Sequence[str] = ()) -> None:
        """Record every ticket's instance in one transaction, each in its own savepoint.

        Concurrent C-STOREs thus share one commit, and with it one synchronous flush of
        the database, while a refusal (a conflict, a hierarchy error) or a race lost
        against another process touches only its own instance. Every ticket is done when
        this returns.
        """
        pending = list(tickets)
        try:
            for _attempt in range(3):
                pending = self._attempt(pending, published)
                published = ()
                if not pending:
                    return
            for ticket in pending:
                ticket.fail(IndexFailure("the index kept refusing the instance"))
        finally:
            for ticket in tickets:
                if not ticket.done:
                    ticket.fail(IndexFailure("the index write was interrupted"))

    def _attempt(self, tickets: list[Ticket], published: Sequence[str]) -> list[Ticket]:
        """One transaction over *tickets*; returns those that lost a race (to retry)."""
        pooled = self._checkout()
        conn = pooled.driver_connection
        healthy = False  # until the transaction ended cleanly
        cur = conn.cursor()
        outcomes: list[tuple[Ticket, Recorded | StockadeError]] = []
        retry: list[Ticket] = []
        try:
            self._begin(cur)
            for token in published:  # journal entries of blobs published since
                self._run(cur, self.del_journal, {"token": token})
            for ticket in tickets:
                cur.execute("SAVEPOINT instance")
                try:
                    outcome: Recorded | StockadeError = self._record(
                        cur, ticket.record, ticket.allow_replace
                    )
                except StockadeError as exc:
                    outcome = exc
                except Exception as exc:
                    if not isinstance(exc, (_Retry, self._integrity_error)):
                        raise
                    # A concurrent writer created the same row first: the retry sees it.
                    cur.execute("ROLLBACK TO SAVEPOINT instance")
                    cur.execute("RELEASE SAVEPOINT instance")
                    retry.append(ticket)
                    continue
                if isinstance(outcome, StockadeError):
                    cur.execute("ROLLBACK TO SAVEPOINT instance")
                cur.execute("RELEASE SAVEPOINT instance")
                outcomes.append((ticket, outcome))
            self._commit(conn, cur)
            healthy = True
        except Exception as exc:
            self._rollback(conn, cur)
            if not isinstance(exc, self._dbapi_error):
                raise
            log.error("index write failed: %s", exc.__class__.__name__, exc_info=exc)
            failure = IndexFailure(
                f"the index could not record the instance ({exc.__class__.__name__})"
            )
            for ticket in tickets:
                ticket.fail(failure)
            return []
        finally:
            cur.close()
            self._checkin(pooled, healthy)
        for ticket, outcome in outcomes:
            if isinstance(outcome, StockadeError):
                ticket.fail(outcome)
            else:
                ticket.succeed(outcome)
        return retry

    @staticmethod
    def _run(cur: Any, sql: _Sql, values: dict[str, Any]) -> None:
        cur.execute(sql.text, sql.params(values))

    def _one(self, cur: Any, sql: _Sql, values: dict[str, Any]) -> Any:
        self._run(cur, sql, values)
        return cur.fetchone()

    def _find_or_insert(
        self, cur: Any, find: _Sql, key: dict[str, Any], insert_sql: _Sql, values: dict[str, Any]
    ) -> tuple[Any, bool]:
        row = self._one(cur, find, key)
        if row is not None:
            return row, False
        self._run(cur, insert_sql, values)
        created = cur.rowcount == 1
        row = self._one(cur, find, key)
        if row is None:  # pragma: no cover - inserted or found by a concurrent writer
            raise _Retry
        return row, created

    def _record(self, cur: Any, rec: InstanceRecord, allow_replace: bool) -> Recorded:
        now = self._time(datetime.now(UTC))
        text = rec.text
        sop_uid = text("SOPInstanceUID")
        existing = self._one(cur, self.sel_instance, {"sop_uid": sop_uid})
        if existing is not None and existing[1] == rec.sha256:
            return Recorded(Outcome.DUPLICATE)
        if existing is not None and not allow_replace:
            raise DuplicateConflict(
                f"SOP Instance {sop_uid} is already stored with different content; "
                "replacement is disabled (setting allow_replace)"
            )

        patient_id, issuer = text("PatientID") or "", text("IssuerOfPatientID") or ""
        patient, _ = self._find_or_insert(
            cur,
            self.sel_patient,
            {"patient_id": patient_id, "issuer": issuer},
            self.ins_patient,
            {
                "v_patient_id": patient_id,
                "v_issuer": issuer,
                "v_patient_name": text("PatientName"),
                "v_patient_name_key": name_key(text("PatientName")),
                "v_birth_date": text("PatientBirthDate"),
                "v_sex": text("PatientSex"),
                "v_num_studies": 0,
                "v_created_at": now,
            },
        )
        patient_pk = patient[0]
        study_uid = text("StudyInstanceUID")
        study, new_study = self._find_or_insert(
            cur,
            self.sel_study,
            {"study_uid": study_uid},
            self.ins_study,
            {
                "v_study_uid": study_uid,
                "v_patient_pk": patient_pk,
                "v_study_date": text("StudyDate"),
                "v_study_time": text("StudyTime"),
                "v_accession_number": text("AccessionNumber"),
                "v_study_id": text("StudyID"),
                "v_description": text("StudyDescription"),
                "v_referring_name": text("ReferringPhysicianName"),
                "v_referring_name_key": name_key(text("ReferringPhysicianName")),
                "v_modalities": None,
                "v_num_series": 0,
                "v_num_instances": 0,
                "v_created_at": now,
                "v_updated_at": now,
            },
        )
        if study[1] != patient_pk:
            raise HierarchyConflict(
                f"study {study_uid} is stored under another patient; this object names "
                f"PatientID {patient_id!r} (no silent merge)"
            )
        study_pk = study[0]
        series_uid = text("SeriesInstanceUID")
        found_series, new_series = self._find_or_insert(
            cur,
            self.sel_series,
            {"series_uid": series_uid},
            self.ins_series,
            {
                "v_series_uid": series_uid,
                "v_study_pk": study_pk,
                "v_modality": text("Modality"),
                "v_series_number": rec.get("SeriesNumber"),
                "v_description": text("SeriesDescription"),
                "v_body_part": text("BodyPartExamined"),
                "v_series_date": text("SeriesDate"),
                "v_series_time": text("SeriesTime"),
                "v_num_instances": 0,
                "v_created_at": now,
            },
        )
        if found_series[1] != study_pk:
            raise HierarchyConflict(
                f"series {series_uid} is stored in another study than {study_uid}"
            )
        series_pk = found_series[0]

        values = {
            "v_series_pk": series_pk,
            "v_sop_class_uid": text("SOPClassUID"),
            "v_instance_number": rec.get("InstanceNumber"),
            "v_rows": rec.get("Rows"),
            "v_columns": rec.get("Columns"),
            "v_frames": rec.get("NumberOfFrames"),
            "v_transfer_syntax": rec.transfer_syntax,
            "v_size": rec.size,
            "v_sha256": rec.sha256,
            "v_blob_key": rec.blob_key,
            "v_preamble": rec.preamble,
            "v_trailing_bytes": rec.trailing_bytes,
            "v_origin": rec.origin,
            "v_sender_ae": rec.sender_ae,
            "v_sender_address": rec.sender_address,
            "v_received_at": self._time(rec.received_at),
        }
        if existing is not None:
            if existing[3] != series_pk:
                raise HierarchyConflict(
                    f"a replacement of {sop_uid} must stay in the series of the stored object"
                )
            old_key = existing[2]
            self._run(cur, self.upd_instance, {"pk": existing[0], **values})
            if not self._one(cur, self.count_blob, {"key": old_key})[0]:
                self._run(
                    cur,
                    self.queue_deletion,
                    {"v_blob_key": old_key, "v_queued_at": now},
                )
            self._bump_study(cur, study_pk, 0, 0, now)
            return Recorded(Outcome.REPLACED, replaced_blob_key=old_key)

        instance_pk = self._one(cur, self.ins_instance, {"v_sop_uid": sop_uid, **values})[0]
        if rec.staging is not None:
            area, token = rec.staging
            self._run(
                cur,
                self.ins_journal,
                {
                    "v_token": token,
                    "v_area": area,
                    "v_instance_pk": instance_pk,
                    "v_sha256": rec.sha256,
                },
            )
        self._run(cur, self.upd_series, {"pk": series_pk})
        # Updating the study row locks it; the modality recount below therefore sees every
        # series that a concurrent writer committed before us (READ COMMITTED).
        self._bump_study(cur, study_pk, 1, 1 if new_series else 0, now)
        if new_series:
            self._run(cur, self.sel_modalities, {"pk": study_pk})
            found = sorted(str(row[0]) for row in cur.fetchall())
            self._run(
                cur,
                self.upd_modalities,
                ({"pk": study_pk, "modalities": "\\".join(found)[:256] or None}),
            )
        if new_study:
            self._run(cur, self.upd_patient, {"pk": patient_pk})
        return Recorded(Outcome.STORED)

    def _bump_study(self, cur: Any, pk: int, instance: int, new_series: int, now: Any) -> None:
        self._run(
            cur,
            self.upd_study,
            {"pk": pk, "new_instance": instance, "new_series": new_series, "now": now},
        )
