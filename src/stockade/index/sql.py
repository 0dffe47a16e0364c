"""The index on SQLAlchemy 2: one implementation for SQLite and PostgreSQL.

SQLite runs in WAL mode and write transactions start with ``BEGIN IMMEDIATE`` so that
concurrent writers queue instead of failing. Commits are made durable by Stockade, not inside
SQLite's write lock: the connection runs with ``synchronous=NORMAL`` (SQLite still syncs the
WAL before and the database after every checkpoint), and every write returns only after an
``fdatasync`` of the WAL file that holds its commit (:meth:`SqlIndex._sync_wal`). Writers
therefore hold the lock for their statements only, and the syncs of concurrent writers
overlap instead of queueing behind it.

PostgreSQL runs at READ COMMITTED; the insert-or-select pattern and row locks on the study
keep counters right under concurrent writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import SQLAlchemyError

from stockade.errors import ConfigError, IndexFailure, StockadeError
from stockade.index.base import InstanceRecord, JournalEntry, Node, Recorded, StoredInstance
from stockade.index.query import STORED_COLUMNS, find, locate
from stockade.index.record import InstanceWriter, Ticket
from stockade.index.schema import (
    blob_deletions,
    instances,
    nodes,
    patients,
    series,
    staging_journal,
    studies,
)
from stockade.query import Found, Query

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
#: Published tokens kept before their journal entries are dropped in a transaction of their own.
MAX_PUBLISHED_BACKLOG = 10_000


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
                # Durability comes from SqlIndex._sync_wal after each write (module note).
                cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.execute("PRAGMA foreign_keys = ON")
                # LIKE as in PostgreSQL and PS3.4 C.2.2.2.4: case matters (names match on
                # their case-folded key columns instead).
                cursor.execute("PRAGMA case_sensitive_like = ON")
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


def _node_row(node: Node) -> dict[str, Any]:
    """The columns of a ``nodes`` row for *node*."""
    return {
        "name": node.name,
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port,
        "allow": ",".join(sorted(node.allow)),
        "tls": node.tls,
        "cert_sha256": node.cert_sha256,
    }


class SqlIndex:
    """An :class:`~stockade.index.base.Index` over SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._instances = InstanceWriter(self.engine)
        # Writers of this process take turns (thread lock); on SQLite the writers of all
        # processes do too (file lock). PostgreSQL takes concurrent writers.
        self._thread_lock = threading.Lock()
        self._process_lock: contextlib.AbstractContextManager[object] = (
            _SqliteWriteLock(url)
            if self.engine.dialect.name == "sqlite"
            else contextlib.nullcontext()
        )
        self._queue: list[Ticket] = []
        self._published: list[str] = []
        database = make_url(url).database if self.engine.dialect.name == "sqlite" else None
        self._wal = f"{database}-wal" if database and database != ":memory:" else None
        self._queue_lock = threading.Lock()

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
            self._sync_wal()
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot migrate the index: {exc.__class__.__name__}") from exc

    # -- writing ---------------------------------------------------------------------------

    def _write(self) -> Connection:
        return self.engine.connect().execution_options(stockade_write=True)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction that is durable when the block ends."""
        with self._write() as conn, conn.begin():
            yield conn
        self._sync_wal()

    def _sync_wal(self) -> None:
        """Make every commit made so far durable (SQLite; a no-op on PostgreSQL, whose
        commits are durable when they return).

        Any descriptor of the WAL file flushes it. A WAL that is gone was checkpointed into
        the database and removed by SQLite (which synced the database first); the database
        file is then synced instead, so that a wrong path fails loudly rather than silently.
        """
        if self._wal is None:
            return
        try:
            try:
                fd = os.open(self._wal, os.O_RDONLY)
            except FileNotFoundError:
                fd = os.open(self._wal[: -len("-wal")], os.O_RDONLY)
        except OSError as exc:
            raise IndexFailure(f"cannot make the index durable: {exc.strerror}") from None
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise IndexFailure(f"cannot make the index durable: {exc.strerror}") from None
        finally:
            os.close(fd)

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
        ticket = Ticket(record, allow_replace)
        self._group([ticket])
        return ticket.outcome()

    def record_all(
        self, records: Sequence[InstanceRecord], *, allow_replace: bool
    ) -> list[Recorded | StockadeError]:
        """Record several instances, in order, in the group commit (usually one transaction
        for all of them, each in its own savepoint); durable on return. Each result is the
        instance's :class:`Recorded` or the error that refused it alone (as :meth:`record`
        raises it)."""
        tickets = [Ticket(record, allow_replace) for record in records]
        if tickets:
            self._group(tickets)
        return [ticket.error or ticket.outcome() for ticket in tickets]

    def _group(self, tickets: list[Ticket]) -> None:
        """Group commit of *tickets*: the thread that gets the write lock records every
        instance queued by this process's threads so far, in one transaction; the others
        find theirs done. Durable on return."""
        with self._queue_lock:
            self._queue.extend(tickets)
        with self._thread_lock:
            if not all(ticket.done for ticket in tickets):
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                    published, self._published = self._published, []
                with self._process_lock:
                    self._instances.record_batch(batch, published)
        # Outside the locks: whoever committed our instances, they are durable after this.
        self._sync_wal()

    def record_many(self, records: list[InstanceRecord]) -> list[Recorded]:
        """Record several instances in one transaction (a savepoint each), e.g. to load an
        index in bulk; durable on return. Raises the first refusal, after the others."""
        tickets = [Ticket(record, False) for record in records]
        with self._thread_lock, self._process_lock:
            self._instances.record_batch(tickets)
        self._sync_wal()
        return [ticket.outcome() for ticket in tickets]

    # -- the staging journal ---------------------------------------------------------------

    def published(self, token: str) -> None:
        """Forget the journal entry of *token* with the next write (no transaction of its
        own: the entry only matters after a crash, and recovery checks it then)."""
        with self._queue_lock:
            self._published.append(token)
            flush = len(self._published) >= MAX_PUBLISHED_BACKLOG
        if flush:
            self._flush_published()

    def _flush_published(self) -> None:
        with self._queue_lock:
            tokens, self._published = self._published, []
        if tokens:
            self.drop_journal(tokens)

    def staging_journal(self) -> list[JournalEntry]:
        """Every journal entry (recovery checks those of dead processes)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    staging_journal.c.token,
                    staging_journal.c.area,
                    instances.c.sop_uid,
                    staging_journal.c.sha256,
                ).join(instances, instances.c.id == staging_journal.c.instance_pk, isouter=True)
            ).all()
        return [JournalEntry(r.token, r.area, r.sop_uid or "", r.sha256) for r in rows]

    def drop_journal(self, tokens: list[str]) -> None:
        """Remove journal entries."""
        with self._thread_lock, self._process_lock, self._writing() as conn:
            for start in range(0, len(tokens), 500):
                conn.execute(
                    staging_journal.delete().where(
                        staging_journal.c.token.in_(tokens[start : start + 500])
                    )
                )

    def forget_instance(self, sop_instance_uid: str) -> None:
        """Remove an instance and keep its parents' counters right; parents left without
        children go too. For instances whose blob was lost before they were acknowledged."""
        with self._thread_lock, self._process_lock, self._writing() as conn:
            row = conn.execute(
                select(instances.c.id, instances.c.series_pk).where(
                    instances.c.sop_uid == sop_instance_uid
                )
            ).first()
            if row is None:
                return
            self._remove_instance(conn, row.id, row.series_pk)

    @staticmethod
    def _remove_instance(conn: Connection, instance_pk: int, series_pk: int) -> None:
        """Delete one instance row; fix its parents' counters; drop parents left empty."""
        conn.execute(staging_journal.delete().where(staging_journal.c.instance_pk == instance_pk))
        conn.execute(instances.delete().where(instances.c.id == instance_pk))
        left = conn.execute(
            select(func.count()).where(instances.c.series_pk == series_pk)
        ).scalar_one()
        study_pk = conn.execute(
            select(series.c.study_pk).where(series.c.id == series_pk)
        ).scalar_one()
        if left:
            conn.execute(
                update(series)
                .where(series.c.id == series_pk)
                .values(num_instances=series.c.num_instances - 1)
            )
        else:
            conn.execute(series.delete().where(series.c.id == series_pk))
        modalities = (
            conn.execute(
                select(series.c.modality)
                .where(series.c.study_pk == study_pk, series.c.modality.is_not(None))
                .distinct()
            )
            .scalars()
            .all()
        )
        conn.execute(
            update(studies)
            .where(studies.c.id == study_pk)
            .values(
                num_instances=studies.c.num_instances - 1,
                num_series=studies.c.num_series - (0 if left else 1),
                modalities="\\".join(sorted(modalities))[:256] or None,
                updated_at=_now(),
            )
        )
        study = conn.execute(
            select(studies.c.num_instances, studies.c.patient_pk).where(studies.c.id == study_pk)
        ).one()
        if study.num_instances == 0:
            patient_pk = study.patient_pk
            conn.execute(studies.delete().where(studies.c.id == study_pk))
            conn.execute(
                update(patients)
                .where(patients.c.id == patient_pk)
                .values(num_studies=patients.c.num_studies - 1)
            )
            if not conn.execute(
                select(func.count()).where(studies.c.patient_pk == patient_pk)
            ).scalar_one():
                conn.execute(patients.delete().where(patients.c.id == patient_pk))

    def delete_instances(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        before_commit: Callable[[Connection, list[StoredInstance]], None] | None = None,
    ) -> list[StoredInstance]:
        """Delete a study, a series of it, or one instance of that series, in one transaction.

        Counters and the modality list are kept right and parents left empty go too; the blob
        of every deleted row is queued for deletion (``blob_deletions``: the caller deletes it
        and calls :meth:`forget_deletion`; after a crash, start-up does). *before_commit* runs
        in the same transaction with the deleted instances (the audit record of the
        deletion). Returns the deleted instances, none if nothing matched.
        """
        stmt = self._stored.add_columns(instances.c.id, instances.c.series_pk).where(
            studies.c.study_uid == study_uid
        )
        if series_uid is not None:
            stmt = stmt.where(series.c.series_uid == series_uid)
        if sop_instance_uid is not None:
            stmt = stmt.where(instances.c.sop_uid == sop_instance_uid)
        width = len(STORED_COLUMNS)
        try:
            with self._thread_lock, self._process_lock, self._writing() as conn:
                rows = conn.execute(stmt.order_by(instances.c.id)).all()
                gone = [StoredInstance(*row[:width]) for row in rows]
                for row in rows:
                    self._remove_instance(conn, row[width], row[width + 1])
                for key in sorted({inst.blob_key for inst in gone}):
                    referenced = conn.execute(
                        select(instances.c.id).where(instances.c.blob_key == key).limit(1)
                    ).first()
                    queued = conn.execute(
                        select(blob_deletions.c.blob_key).where(blob_deletions.c.blob_key == key)
                    ).first()
                    if referenced is None and queued is None:
                        conn.execute(blob_deletions.insert().values(blob_key=key, queued_at=_now()))
                if before_commit is not None:
                    before_commit(conn, gone)
        except SQLAlchemyError as exc:
            log.error("index delete failed: %s", exc.__class__.__name__, exc_info=exc)
            raise IndexFailure(f"the index could not delete ({exc.__class__.__name__})") from None
        return gone

    @contextlib.contextmanager
    def chained(self, lock_key: int) -> Iterator[Connection]:
        """A write transaction that no other holder of *lock_key* in any process runs beside:
        for an append-only chain whose next entry depends on the last one (the audit trail).

        SQLite: the file lock every writer of the index takes, then ``BEGIN IMMEDIATE``.
        PostgreSQL: ``pg_advisory_xact_lock(lock_key)``, held until the transaction ends (at
        READ COMMITTED each later statement then sees what the previous holder committed).
        The commit is durable when the block ends.
        """
        with self._process_lock, self._write() as conn, conn.begin():
            if self.engine.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(lock_key)))
            yield conn
        self._sync_wal()

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[Connection]:
        """A read connection (a database error becomes :class:`IndexFailure`)."""
        with self._reading(what) as conn:
            yield conn

    # -- reading ---------------------------------------------------------------------------

    _stored = (
        select(*STORED_COLUMNS)
        .join(series, series.c.id == instances.c.series_pk)
        .join(studies, studies.c.id == series.c.study_pk)
        .join(patients, patients.c.id == studies.c.patient_pk)
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
                yield StoredInstance(*row[: len(STORED_COLUMNS)])
            last = rows[-1][-1]

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[Connection]:
        """A read connection; a database error becomes :class:`IndexFailure`."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            log.error("index read failed (%s): %s", what, exc.__class__.__name__, exc_info=exc)
            raise IndexFailure(f"the index could not {what} ({exc.__class__.__name__})") from None

    def find(self, query: Query) -> Found:
        """Evaluate *query* (PS3.4 C.2.2.2 matching, see :mod:`stockade.index.query`).

        Raises
        ------
        InvalidQuery
            A condition the engine cannot evaluate.
        IndexFailure
            The database failed.
        """
        with self._reading("run the query") as conn:
            return find(conn, query)

    def updated_series(
        self, since: datetime | None, until: datetime
    ) -> list[tuple[str, str, datetime]]:
        """(study UID, series UID, study's last update) of the series of every study
        updated after *since* and not after *until*, oldest update first."""
        stmt = (
            select(studies.c.study_uid, series.c.series_uid, studies.c.updated_at)
            .join(series, series.c.study_pk == studies.c.id)
            .where(studies.c.updated_at <= until)
            .order_by(studies.c.updated_at, series.c.id)
            .limit(10_000)
        )
        if since is not None:
            stmt = stmt.where(studies.c.updated_at > since)
        with self._reading("list updated series") as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(stmt)]

    def locate(self, query: Query) -> list[StoredInstance]:
        """The instances a retrieve at *query*'s level sends (:func:`index.query.locate`).

        Raises
        ------
        IndexFailure
            The database failed.
        """
        with self._reading("locate the instances") as conn:
            return locate(conn, query)

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

    def stored_bytes(self) -> int:
        """The bytes of every stored object (their sizes as the index holds them)."""
        with self.engine.connect() as conn:
            total = select(func.coalesce(func.sum(instances.c.size), 0))
            return int(conn.execute(total).scalar_one())

    # -- blob deletions --------------------------------------------------------------------

    def queued_deletions(self) -> list[str]:
        """Blob keys queued for deletion and not referenced by any instance."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(blob_deletions.c.blob_key)).scalars())

    def forget_deletion(self, key: str) -> None:
        """Drop a done deletion from the queue."""
        with self._writing() as conn:
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
            with self._writing() as conn:
                conn.execute(nodes.insert().values(**_node_row(node), created_at=_now()))
        except SAIntegrityError:
            raise ConfigError(f"a node named {node.name!r} exists already") from None

    def replace_node(self, name: str, node: Node) -> bool:
        """Replace the peer *name* by *node* in one statement (see :class:`Index`).

        Raises
        ------
        ConfigError
            *node* is renamed to the name of another node.
        """
        try:
            with self._writing() as conn:
                changed = conn.execute(
                    nodes.update().where(nodes.c.name == name).values(**_node_row(node))
                )
                return changed.rowcount > 0
        except SAIntegrityError:
            raise ConfigError(f"a node named {node.name!r} exists already") from None

    def remove_node(self, name: str) -> bool:
        """Remove a DICOM peer by name."""
        with self._writing() as conn:
            return conn.execute(nodes.delete().where(nodes.c.name == name)).rowcount > 0

    def nodes(self) -> list[Node]:
        """All DICOM peers, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    nodes.c.name,
                    nodes.c.ae_title,
                    nodes.c.host,
                    nodes.c.port,
                    nodes.c.allow,
                    nodes.c.tls,
                    nodes.c.cert_sha256,
                ).order_by(nodes.c.name)
            )
            return [
                Node(
                    r.name,
                    r.ae_title,
                    r.host,
                    r.port,
                    frozenset(a for a in r.allow.split(",") if a),
                    bool(r.tls),
                    r.cert_sha256,
                )
                for r in rows
            ]

    def close(self) -> None:
        """Drop the journal entries of published blobs; dispose of the connection pool."""
        try:
            self._flush_published()
        except SQLAlchemyError as exc:  # recovery checks the entries left at the next start
            log.warning("could not tidy the staging journal: %s", exc.__class__.__name__)
        self._instances.close()
        self.engine.dispose()
