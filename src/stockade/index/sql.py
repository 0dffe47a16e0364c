"""The index on SQLAlchemy 2: one implementation for SQLite and PostgreSQL.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk before it returns) and
write transactions start with ``BEGIN IMMEDIATE`` so that concurrent writers queue instead of
failing. PostgreSQL runs at READ COMMITTED; the insert-or-select pattern below and row locks on
the study keep counters right under concurrent writers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
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


class SqlIndex:
    """An :class:`~stockade.index.base.Index` over SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert

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
                with self._write() as conn, conn.begin():
                    return self._record(conn, record, allow_replace)
            except SAIntegrityError:
                # A concurrent writer inserted the same row first; the retry will see it.
                if attempt == 2:
                    raise IndexFailure("the index kept refusing the instance") from None
            except SQLAlchemyError as exc:
                log.error("index write failed: %s", exc.__class__.__name__, exc_info=exc)
                raise IndexFailure(f"the index could not record the instance "
                                   f"({exc.__class__.__name__})") from None
        raise IndexFailure("the index kept refusing the instance")  # pragma: no cover

    def _upsert_id(self, conn: Connection, table: Any, match: dict[str, Any],
                   values: dict[str, Any]) -> tuple[int, bool]:
        where = [table.c[k] == v for k, v in match.items()]
        row = conn.execute(select(table.c.id).where(*where)).first()
        if row is not None:
            return int(row[0]), False
        stmt = self._insert(table).values(**match, **values).on_conflict_do_nothing()
        created = conn.execute(stmt).rowcount == 1
        row = conn.execute(select(table.c.id).where(*where)).one()
        return int(row[0]), created

    def _record(self, conn: Connection, rec: InstanceRecord, allow_replace: bool) -> Recorded:
        now = _now()
        sop_uid = rec.text("SOPInstanceUID")
        existing = conn.execute(
            select(instances.c.id, instances.c.sha256, instances.c.blob_key,
                   instances.c.series_pk).where(instances.c.sop_uid == sop_uid)
        ).first()
        if existing is not None and existing.sha256 == rec.sha256:
            return Recorded(Outcome.DUPLICATE)
        if existing is not None and not allow_replace:
            raise DuplicateConflict(
                f"SOP Instance {sop_uid} is already stored with different content; "
                "replacement is disabled (setting allow_replace)")

        patient_pk, new_patient = self._upsert_id(
            conn, patients,
            {"patient_id": rec.text("PatientID") or "", "issuer": rec.text("IssuerOfPatientID")
             or ""},
            {"patient_name": rec.text("PatientName"),
             "patient_name_key": name_key(rec.text("PatientName")),
             "birth_date": rec.text("PatientBirthDate"), "sex": rec.text("PatientSex"),
             "num_studies": 0, "created_at": now},
        )
        study_uid = rec.text("StudyInstanceUID")
        study_pk, new_study = self._upsert_id(
            conn, studies, {"study_uid": study_uid},
            {"patient_pk": patient_pk, "study_date": rec.text("StudyDate"),
             "study_time": rec.text("StudyTime"),
             "accession_number": rec.text("AccessionNumber"), "study_id": rec.text("StudyID"),
             "description": rec.text("StudyDescription"),
             "referring_name": rec.text("ReferringPhysicianName"),
             "referring_name_key": name_key(rec.text("ReferringPhysicianName")),
             "modalities": None, "num_series": 0, "num_instances": 0, "created_at": now,
             "updated_at": now},
        )
        owner = conn.execute(select(studies.c.patient_pk).where(studies.c.id == study_pk)).one()
        if owner[0] != patient_pk:
            raise HierarchyConflict(
                f"study {study_uid} is stored under another patient; this object names "
                f"PatientID {rec.text('PatientID')!r} (no silent merge)")
        series_uid = rec.text("SeriesInstanceUID")
        series_pk, new_series = self._upsert_id(
            conn, series, {"series_uid": series_uid},
            {"study_pk": study_pk, "modality": rec.text("Modality"),
             "series_number": rec.get("SeriesNumber"),
             "description": rec.text("SeriesDescription"),
             "body_part": rec.text("BodyPartExamined"), "series_date": rec.text("SeriesDate"),
             "series_time": rec.text("SeriesTime"), "num_instances": 0, "created_at": now},
        )
        parent = conn.execute(select(series.c.study_pk).where(series.c.id == series_pk)).one()
        if parent[0] != study_pk:
            raise HierarchyConflict(
                f"series {series_uid} is stored in another study than {study_uid}")

        values = {
            "series_pk": series_pk, "sop_class_uid": rec.text("SOPClassUID"),
            "instance_number": rec.get("InstanceNumber"), "rows": rec.get("Rows"),
            "columns": rec.get("Columns"), "frames": rec.get("NumberOfFrames"),
            "transfer_syntax": rec.transfer_syntax, "size": rec.size, "sha256": rec.sha256,
            "blob_key": rec.blob_key, "preamble": rec.preamble,
            "trailing_bytes": rec.trailing_bytes, "origin": rec.origin,
            "sender_ae": rec.sender_ae, "sender_address": rec.sender_address,
            "received_at": rec.received_at,
        }
        if existing is not None:
            if existing.series_pk != series_pk:
                raise HierarchyConflict(
                    f"a replacement of {sop_uid} must stay in series of the stored object")
            conn.execute(update(instances).where(instances.c.id == existing.id).values(values))
            still_used = conn.execute(
                select(func.count()).select_from(instances)
                .where(instances.c.blob_key == existing.blob_key)).scalar_one()
            if not still_used:
                conn.execute(self._insert(blob_deletions).values(
                    blob_key=existing.blob_key, queued_at=now).on_conflict_do_nothing())
            conn.execute(update(studies).where(studies.c.id == study_pk)
                         .values(updated_at=now))
            return Recorded(Outcome.REPLACED, replaced_blob_key=existing.blob_key)

        conn.execute(instances.insert().values(sop_uid=sop_uid, **values))
        conn.execute(update(series).where(series.c.id == series_pk)
                     .values(num_instances=series.c.num_instances + 1))
        # Updating the study row locks it; the modality recount below therefore sees every
        # series that a concurrent writer committed before us (READ COMMITTED).
        conn.execute(update(studies).where(studies.c.id == study_pk).values(
            num_instances=studies.c.num_instances + 1,
            num_series=studies.c.num_series + (1 if new_series else 0),
            updated_at=now))
        if new_series:
            found = conn.execute(
                select(series.c.modality).where(series.c.study_pk == study_pk)
                .where(series.c.modality.is_not(None)).distinct()).scalars().all()
            conn.execute(update(studies).where(studies.c.id == study_pk)
                         .values(modalities="\\".join(sorted(found))[:256] or None))
        if new_study:
            conn.execute(update(patients).where(patients.c.id == patient_pk)
                         .values(num_studies=patients.c.num_studies + 1))
        del new_patient
        return Recorded(Outcome.STORED)

    # -- reading ---------------------------------------------------------------------------

    _stored = (
        select(instances.c.sop_uid, instances.c.sop_class_uid, studies.c.study_uid,
               series.c.series_uid, instances.c.transfer_syntax, instances.c.blob_key,
               instances.c.sha256, instances.c.size)
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
            return conn.execute(
                select(instances.c.id).where(instances.c.blob_key == key).limit(1)
            ).first() is not None

    def instances(self) -> Iterator[StoredInstance]:
        """Every instance, streamed in batches."""
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    self._stored.add_columns(instances.c.id).where(instances.c.id > last)
                    .order_by(instances.c.id).limit(1000)).all()
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
                for name, table in (("patients", patients), ("studies", studies),
                                    ("series", series), ("instances", instances))
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
                conn.execute(nodes.insert().values(
                    name=node.name, ae_title=node.ae_title, host=node.host, port=node.port,
                    allow=",".join(sorted(node.allow)), created_at=_now()))
        except SAIntegrityError:
            raise ConfigError(f"a node named {node.name!r} exists already") from None

    def remove_node(self, name: str) -> bool:
        """Remove a DICOM peer by name."""
        with self._write() as conn, conn.begin():
            return conn.execute(nodes.delete().where(nodes.c.name == name)).rowcount > 0

    def nodes(self) -> list[Node]:
        """All DICOM peers, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(nodes.c.name, nodes.c.ae_title, nodes.c.host,
                                       nodes.c.port, nodes.c.allow).order_by(nodes.c.name))
            return [Node(r.name, r.ae_title, r.host, r.port,
                         frozenset(a for a in r.allow.split(",") if a)) for r in rows]

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()
