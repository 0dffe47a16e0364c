"""The index on SQLAlchemy 2: one implementation for SQLite and PostgreSQL.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk before it returns) and
write transactions start with ``BEGIN IMMEDIATE`` so that concurrent writers queue instead of
failing. PostgreSQL runs at READ COMMITTED; the insert-or-select pattern below and row locks on
the study keep counters right under concurrent writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import SQLAlchemyError

from stockade.errors import ConfigError, DuplicateConflict, HierarchyConflict, IndexFailure
from stockade.index.base import InstanceRecord, Node, Outcome, Recorded, StoredInstance
from stockade.index.schema import blob_deletions, instances, nodes, patients, series, studies

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def name_key(name: str | None) -> str | None:
    """The case-folded form of a person name used for matching (PS3.4 C.2.2.2.1)."""
    return None if name is None else name.casefold()


def _now() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str) -> Engine:
    """Create an engine with Stockade's connection settings for the URL's dialect."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, pool_size=8, max_overflow=24, pool_timeout=60)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA busy_timeout = 60000")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = FULL")
                cursor.execute("PRAGMA foreign_keys = ON")
                cursor.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                write = conn.get_execution_options().get("stockade_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        if url.startswith("postgresql"):
            return create_engine(url, pool_size=8, max_overflow=24, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ConfigError(f"cannot use database URL: {exc}") from None
    raise ConfigError("database_url must be a sqlite:// or postgresql+psycopg:// URL")


class _SqliteWriteLock:
    """Serialises SQLite writers of all processes with a blocking file lock.

    SQLite's own busy handler polls with sleeps of up to 100 ms; a writer blocked on
    ``flock`` instead wakes the moment the previous one commits.
    """

    def __init__(self, url: str) -> None:
        database = make_url(url).database
        self._path = f"{database}.writelock" if database and database != ":memory:" else None
        self._thread_lock = threading.Lock()
        self._fd = -1

    def __enter__(self) -> object:
        self._thread_lock.acquire()
        if self._path is not None:
            if self._fd < 0:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


class SqlIndex:
    """An :class:`~stockade.index.base.Index` over SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        self._statements()
        self._writer: contextlib.AbstractContextManager[object] = (
            _SqliteWriteLock(url)
            if self.engine.dialect.name == "sqlite"
            else contextlib.nullcontext()
        )

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> None:
        """Run the Alembic migrations up to head."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot migrate the index: {exc.__class__.__name__}") from exc

    # -- writing ---------------------------------------------------------------------------

    def _write(self) -> Connection:
        return self.engine.connect().execution_options(stockade_write=True)

    def record(self, record: InstanceRecord, *, allow_replace: bool) -> Recorded:
        """Record an instance and its parents in one transaction.

        Raises
        ------
        DuplicateConflict
            Another object holds the SOP Instance UID and *allow_replace* is False.
        HierarchyConflict
            The study or series already belongs to another patient or study.
        IndexFailure
            The database failed.
        """
        for attempt in range(3):
            try:
                with self._writer, self._write() as conn, conn.begin():
                    return self._record(conn, record, allow_replace)
            except SAIntegrityError:
                # A concurrent writer inserted the same row first; the retry will see it.
                if attempt == 2:
                    raise IndexFailure("the index kept refusing the instance") from None
            except SQLAlchemyError as exc:
                log.error("index write failed: %s", exc.__class__.__name__, exc_info=exc)
                raise IndexFailure(
                    f"the index could not record the instance ({exc.__class__.__name__})"
                ) from None
        raise IndexFailure("the index kept refusing the instance")  # pragma: no cover

    def _statements(self) -> None:
        """Build every write statement once: SQLAlchemy then reuses their compiled form."""
        ins = self._insert
        self._sel_instance = select(
            instances.c.id, instances.c.sha256, instances.c.blob_key, instances.c.series_pk
        ).where(instances.c.sop_uid == bindparam("b_sop_uid"))
        self._sel_patient = select(patients.c.id).where(
            patients.c.patient_id == bindparam("b_patient_id"),
            patients.c.issuer == bindparam("b_issuer"),
        )
        self._sel_study = select(studies.c.id, studies.c.patient_pk).where(
            studies.c.study_uid == bindparam("b_study_uid")
        )
        self._sel_series = select(series.c.id, series.c.study_pk).where(
            series.c.series_uid == bindparam("b_series_uid")
        )
        # RETURNING tells whether this statement created the row (rowcount does not, on
        # every driver, for INSERT .. ON CONFLICT DO NOTHING).
        self._ins_patient = ins(patients).on_conflict_do_nothing().returning(patients.c.id)
        self._ins_study = ins(studies).on_conflict_do_nothing().returning(studies.c.id)
        self._ins_series = ins(series).on_conflict_do_nothing().returning(series.c.id)
        self._ins_instance = instances.insert()
        self._upd_instance = update(instances).where(instances.c.id == bindparam("b_pk"))
        self._upd_series = (
            update(series)
            .where(series.c.id == bindparam("b_pk"))
            .values(num_instances=series.c.num_instances + 1)
        )
        self._upd_study = (
            update(studies)
            .where(studies.c.id == bindparam("b_pk"))
            .values(
                num_instances=studies.c.num_instances + bindparam("b_new_instance"),
                num_series=studies.c.num_series + bindparam("b_new_series"),
                updated_at=bindparam("b_now"),
            )
        )
        self._sel_modalities = (
            select(series.c.modality)
            .where(series.c.study_pk == bindparam("b_pk"), series.c.modality.is_not(None))
            .distinct()
        )
        self._upd_modalities = (
            update(studies)
            .where(studies.c.id == bindparam("b_pk"))
            .values(modalities=bindparam("b_modalities"))
        )
        self._upd_patient = (
            update(patients)
            .where(patients.c.id == bindparam("b_pk"))
            .values(num_studies=patients.c.num_studies + 1)
        )
        self._count_blob = (
            select(func.count())
            .select_from(instances)
            .where(instances.c.blob_key == bindparam("b_key"))
        )
        self._queue_deletion = ins(blob_deletions).on_conflict_do_nothing()

    def _find_or_insert(
        self,
        conn: Connection,
        find: Any,
        params: dict[str, Any],
        insert_stmt: Any,
        values: dict[str, Any],
    ) -> tuple[Any, bool]:
        row = conn.execute(find, params).first()
        if row is not None:
            return row, False
        created = conn.execute(insert_stmt, values).first() is not None
        return conn.execute(find, params).one(), created

    def _record(self, conn: Connection, rec: InstanceRecord, allow_replace: bool) -> Recorded:
        now = _now()
        text = rec.text
        sop_uid = text("SOPInstanceUID")
        existing = conn.execute(self._sel_instance, {"b_sop_uid": sop_uid}).first()
        if existing is not None and existing.sha256 == rec.sha256:
            return Recorded(Outcome.DUPLICATE)
        if existing is not None and not allow_replace:
            raise DuplicateConflict(
                f"SOP Instance {sop_uid} is already stored with different content; "
                "replacement is disabled (setting allow_replace)"
            )

        patient_id, issuer = text("PatientID") or "", text("IssuerOfPatientID") or ""
        patient, _ = self._find_or_insert(
            conn,
            self._sel_patient,
            {"b_patient_id": patient_id, "b_issuer": issuer},
            self._ins_patient,
            {
                "patient_id": patient_id,
                "issuer": issuer,
                "patient_name": text("PatientName"),
                "patient_name_key": name_key(text("PatientName")),
                "birth_date": text("PatientBirthDate"),
                "sex": text("PatientSex"),
                "num_studies": 0,
                "created_at": now,
            },
        )
        patient_pk = patient.id
        study_uid = text("StudyInstanceUID")
        study, new_study = self._find_or_insert(
            conn,
            self._sel_study,
            {"b_study_uid": study_uid},
            self._ins_study,
            {
                "study_uid": study_uid,
                "patient_pk": patient_pk,
                "study_date": text("StudyDate"),
                "study_time": text("StudyTime"),
                "accession_number": text("AccessionNumber"),
                "study_id": text("StudyID"),
                "description": text("StudyDescription"),
                "referring_name": text("ReferringPhysicianName"),
                "referring_name_key": name_key(text("ReferringPhysicianName")),
                "modalities": None,
                "num_series": 0,
                "num_instances": 0,
                "created_at": now,
                "updated_at": now,
            },
        )
        if study.patient_pk != patient_pk:
            raise HierarchyConflict(
                f"study {study_uid} is stored under another patient; this object names "
                f"PatientID {patient_id!r} (no silent merge)"
            )
        study_pk = study.id
        series_uid = text("SeriesInstanceUID")
        found_series, new_series = self._find_or_insert(
            conn,
            self._sel_series,
            {"b_series_uid": series_uid},
            self._ins_series,
            {
                "series_uid": series_uid,
                "study_pk": study_pk,
                "modality": text("Modality"),
                "series_number": rec.get("SeriesNumber"),
                "description": text("SeriesDescription"),
                "body_part": text("BodyPartExamined"),
                "series_date": text("SeriesDate"),
                "series_time": text("SeriesTime"),
                "num_instances": 0,
                "created_at": now,
            },
        )
        if found_series.study_pk != study_pk:
            raise HierarchyConflict(
                f"series {series_uid} is stored in another study than {study_uid}"
            )
        series_pk = found_series.id

        values = {
            "series_pk": series_pk,
            "sop_class_uid": text("SOPClassUID"),
            "instance_number": rec.get("InstanceNumber"),
            "rows": rec.get("Rows"),
            "columns": rec.get("Columns"),
            "frames": rec.get("NumberOfFrames"),
            "transfer_syntax": rec.transfer_syntax,
            "size": rec.size,
            "sha256": rec.sha256,
            "blob_key": rec.blob_key,
            "preamble": rec.preamble,
            "trailing_bytes": rec.trailing_bytes,
            "origin": rec.origin,
            "sender_ae": rec.sender_ae,
            "sender_address": rec.sender_address,
            "received_at": rec.received_at,
        }
        if existing is not None:
            if existing.series_pk != series_pk:
                raise HierarchyConflict(
                    f"a replacement of {sop_uid} must stay in the series of the stored object"
                )
            conn.execute(self._upd_instance, {"b_pk": existing.id, **values})
            if not conn.execute(self._count_blob, {"b_key": existing.blob_key}).scalar_one():
                conn.execute(
                    self._queue_deletion, {"blob_key": existing.blob_key, "queued_at": now}
                )
            conn.execute(
                self._upd_study,
                {"b_pk": study_pk, "b_new_instance": 0, "b_new_series": 0, "b_now": now},
            )
            return Recorded(Outcome.REPLACED, replaced_blob_key=existing.blob_key)

        conn.execute(self._ins_instance, {"sop_uid": sop_uid, **values})
        conn.execute(self._upd_series, {"b_pk": series_pk})
        # Updating the study row locks it; the modality recount below therefore sees every
        # series that a concurrent writer committed before us (READ COMMITTED).
        conn.execute(
            self._upd_study,
            {
                "b_pk": study_pk,
                "b_new_instance": 1,
                "b_new_series": 1 if new_series else 0,
                "b_now": now,
            },
        )
        if new_series:
            found = conn.execute(self._sel_modalities, {"b_pk": study_pk}).scalars().all()
            conn.execute(
                self._upd_modalities,
                {"b_pk": study_pk, "b_modalities": "\\".join(sorted(found))[:256] or None},
            )
        if new_study:
            conn.execute(self._upd_patient, {"b_pk": patient_pk})
        return Recorded(Outcome.STORED)

    # -- reading ---------------------------------------------------------------------------

    _stored = (
        select(
            instances.c.sop_uid,
            instances.c.sop_class_uid,
            studies.c.study_uid,
            series.c.series_uid,
            instances.c.transfer_syntax,
            instances.c.blob_key,
            instances.c.sha256,
            instances.c.size,
        )
        .join(series, series.c.id == instances.c.series_pk)
        .join(studies, studies.c.id == series.c.study_pk)
    )

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """The instance with this SOP Instance UID, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(self._stored.where(instances.c.sop_uid == sop_instance_uid)).first()
        return None if row is None else StoredInstance(*row)

    def is_blob_indexed(self, key: str) -> bool:
        """True if some instance refers to blob *key*."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(instances.c.id).where(instances.c.blob_key == key).limit(1)
                ).first()
                is not None
            )

    def instances(self) -> Iterator[StoredInstance]:
        """Every instance, streamed in batches."""
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    self._stored.add_columns(instances.c.id)
                    .where(instances.c.id > last)
                    .order_by(instances.c.id)
                    .limit(1000)
                ).all()
            if not rows:
                return
            for row in rows:
                yield StoredInstance(*row[:8])
            last = rows[-1][-1]

    def counts(self) -> dict[str, int]:
        """Numbers of patients, studies, series and instances."""
        with self.engine.connect() as conn:
            return {
                name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                for name, table in (
                    ("patients", patients),
                    ("studies", studies),
                    ("series", series),
                    ("instances", instances),
                )
            }

    # -- blob deletions --------------------------------------------------------------------

    def queued_deletions(self) -> list[str]:
        """Blob keys queued for deletion and not referenced by any instance."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(blob_deletions.c.blob_key)).scalars())

    def forget_deletion(self, key: str) -> None:
        """Drop a done deletion from the queue."""
        with self._write() as conn, conn.begin():
            conn.execute(blob_deletions.delete().where(blob_deletions.c.blob_key == key))

    # -- nodes -----------------------------------------------------------------------------

    def add_node(self, node: Node) -> None:
        """Add a DICOM peer.

        Raises
        ------
        ConfigError
            A node with that name exists already.
        """
        try:
            with self._write() as conn, conn.begin():
                conn.execute(
                    nodes.insert().values(
                        name=node.name,
                        ae_title=node.ae_title,
                        host=node.host,
                        port=node.port,
                        allow=",".join(sorted(node.allow)),
                        created_at=_now(),
                    )
                )
        except SAIntegrityError:
            raise ConfigError(f"a node named {node.name!r} exists already") from None

    def remove_node(self, name: str) -> bool:
        """Remove a DICOM peer by name."""
        with self._write() as conn, conn.begin():
            return conn.execute(nodes.delete().where(nodes.c.name == name)).rowcount > 0

    def nodes(self) -> list[Node]:
        """All DICOM peers, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    nodes.c.name, nodes.c.ae_title, nodes.c.host, nodes.c.port, nodes.c.allow
                ).order_by(nodes.c.name)
            )
            return [
                Node(
                    r.name,
                    r.ae_title,
                    r.host,
                    r.port,
                    frozenset(a for a in r.allow.split(",") if a),
                )
                for r in rows
            ]

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()
