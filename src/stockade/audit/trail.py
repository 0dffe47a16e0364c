"""The audit trail: append-only records in the index database, one SHA-256 hash chain.

Threat model SR-23. Every record is stored as canonical JSON (keys sorted, ASCII, no
spaces) with its sequence number inside; its hash is SHA-256 over the previous record's
hash, a newline and that text, so editing, removing or moving any record breaks the chain
from there on (:meth:`AuditTrail.verify` names the first broken record). The columns beside
the JSON (time, type, actor, and the patients and studies in ``audit_subject``) are copies
for filtering, and verification checks them against it too.

All processes of an archive append to the one chain: an append runs alone among appends
(SQLite's write lock, held by every writer of the index; on PostgreSQL a transaction-scoped
advisory lock), reads the last record and adds its own after it, so the chain stays linear.

Appends are group commits, like the index's: :meth:`AuditTrail.emit` queues the record and
the thread that gets the append lock writes every record its process has queued in one
transaction, so a record is committed before the operation it describes answers (a
streamed retrieve is recorded when its stream ends), and concurrent operations share one
commit. If the database fails, records stay queued and go
with the next append; those still unwritten at close are saved as JSON lines
(``unwritten-<pid>-<time>.jsonl``, 0600) beside the trail and logged.

The last sequence number and hash are also kept in ``<data_dir>/audit/chain-head`` (0600),
outside the database, so that removing the newest records is detected as well; an export to
a syslog collector (:mod:`stockade.audit.syslog`) keeps a copy beyond the reach of anyone
who can write to this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from stockade.audit.events import AuditEvent
from stockade.errors import ConfigError, IndexFailure
from stockade.index.schema import audit_record, audit_subject
from stockade.index.sql import SqlIndex

log = logging.getLogger(__name__)

#: ``prev_hash`` of the first record.
GENESIS = "0" * 64
#: PostgreSQL advisory lock key of appends ("STKAUDIT" as a signed 64-bit integer).
LOCK_KEY = int.from_bytes(b"STKAUDIT", "big") & (2**63 - 1)
#: Longest text value kept in a record (longer ones are cut, with a marker).
MAX_TEXT = 4096
#: Most items kept in a list or mapping of a record.
MAX_ITEMS = 1000
#: Verification reads this many records at a time.
BATCH = 1000


def bounded(value: Any) -> Any:
    """*value* with every string cut to :data:`MAX_TEXT` characters and every list or
    mapping to :data:`MAX_ITEMS` items (record values come from peers: never unbounded)."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "...[cut]"
    if isinstance(value, dict):
        return {str(k)[:256]: bounded(v) for k, v in list(value.items())[:MAX_ITEMS]}
    if isinstance(value, list | tuple):
        return [bounded(v) for v in list(value)[:MAX_ITEMS]]
    return value


def canonical(record: dict[str, Any]) -> str:
    """The canonical JSON text of a record: what its hash covers."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_hash(prev_hash: str, text: str) -> str:
    """SHA-256 (hex) of the previous hash, a newline and the canonical record."""
    return hashlib.sha256(f"{prev_hash}\n{text}".encode("ascii")).hexdigest()


def _cut(value: Any, size: int) -> str | None:
    return None if value is None else str(value)[:size]


def columns(record: dict[str, Any]) -> dict[str, str | None]:
    """The filter columns of ``audit_record`` for *record*."""
    actor = record.get("actor") or {}
    return {
        "time": str(record.get("time", ""))[:40],
        "type": str(record.get("type", ""))[:40],
        "outcome": str(record.get("outcome", ""))[:16],
        "actor_user": _cut(actor.get("user"), 128),
        "actor_ae": _cut(actor.get("ae_title"), 16),
        "actor_address": _cut(actor.get("address"), 64),
        "via": str(actor.get("via") or "")[:16],
    }


def subjects(record: dict[str, Any]) -> set[tuple[str, str]]:
    """The patients (``P``) and studies (``S``) a record concerns: its ``patient_id``,
    ``patient_ids``, ``study_uid`` and ``study_uids``, and the PatientID and
    StudyInstanceUID keys of a query or retrieve."""
    found: set[tuple[str, str]] = set()
    keys = record.get("keys")
    keys = keys if isinstance(keys, dict) else {}
    for kind, one, many, key in (
        ("P", "patient_id", "patient_ids", "PatientID"),
        ("S", "study_uid", "study_uids", "StudyInstanceUID"),
    ):
        values: list[str] = []
        if isinstance(record.get(one), str):
            values.append(record[one])
        listed = record.get(many)
        if isinstance(listed, list):
            values += [v for v in listed if isinstance(v, str)]
        if isinstance(keys.get(key), str):
            # A list of UIDs (PS3.4 C.2.2.2.2) names several; a wildcard names nobody.
            values += [v for v in keys[key].split("\\") if "*" not in v and "?" not in v]
        found.update((kind, v.strip()[:64]) for v in values if v.strip())
    return found


def _parse_head(raw: bytes) -> tuple[int, str] | None:
    """``(seq, hash)`` from the chain head file's content, or None."""
    try:
        fields = raw.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(fields) != 2 or not fields[0].isdigit() or len(fields[1]) != 64:
        return None
    return int(fields[0]), fields[1]


def utc_text(when: datetime | date | str) -> str:
    """An instant as records write it (UTC, ISO 8601, milliseconds), for comparisons.

    A date means its midnight; a time without an offset is UTC.

    Raises
    ------
    ConfigError
        *when* is text that is not an ISO 8601 date or date and time.
    """
    if isinstance(when, str):
        text = when.strip()
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{text[:40]!r} is not an ISO 8601 date or time") from None
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class TrailCheck:
    """What :meth:`AuditTrail.verify` found: the first broken record, if any."""

    checked: int
    broken: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when every record is as it was written and none is missing."""
        return self.broken is None


@dataclass
class _Pending:
    record: dict[str, Any]
    done: bool = False


class AuditTrail:
    """An :class:`~stockade.audit.sink.AuditSink` appending to the hash-chained trail.

    Parameters
    ----------
    index : SqlIndex
        The index whose database holds the trail (its migrations create the tables).
    folder : Path
        ``<data_dir>/audit``: the chain head file and records that could not be written.
    """

    def __init__(self, index: SqlIndex, folder: Path) -> None:
        self.index = index
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.head_path = folder / "chain-head"
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._failing = False
        self._head_fd = -1

    # -- appending -------------------------------------------------------------------------

    def emit(self, event: AuditEvent) -> None:
        """Append *event*; returns once it is committed (or, if the database fails, kept
        to be written with the next append). Never raises for a database failure: the
        operation the event describes has happened already."""
        self.emit_many([event])

    def emit_many(self, events: Sequence[AuditEvent]) -> None:
        """Append *events* in order, in one transaction with whatever else is queued; as
        :meth:`emit`."""
        batch = [_Pending(bounded(event.as_record())) for event in events]
        if not batch:
            return
        with self._queue_lock:
            self._queue.extend(batch)
        with self._flush_lock:
            if not all(pending.done for pending in batch):
                self._flush()

    def _flush(self) -> None:
        """Write every queued record in one transaction (caller holds the flush lock)."""
        with self._queue_lock:
            batch = list(self._queue)
        if not batch:
            return
        try:
            with self.index.chained(LOCK_KEY) as conn:
                head = self._append(conn, [p.record for p in batch])
        except (SQLAlchemyError, IndexFailure) as exc:
            if not self._failing:
                log.error(
                    "audit trail: %d record(s) not written yet (%s); kept for the next append",
                    len(batch),
                    exc.__class__.__name__,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("audit trail: writing again")
            self._failing = False
        with self._queue_lock:
            del self._queue[: len(batch)]
        for pending in batch:
            pending.done = True
        self._note_head(*head)

    def append_in(self, conn: Connection, events: Sequence[AuditEvent]) -> None:
        """Append *events* inside the caller's write transaction on the index (so that a
        change and its record commit together). On SQLite that transaction already holds
        the write lock; on PostgreSQL the append lock is taken here."""
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(LOCK_KEY)))
        self._append(conn, [bounded(e.as_record()) for e in events])

    @staticmethod
    def _append(conn: Connection, records: list[dict[str, Any]]) -> tuple[int, str]:
        """Insert *records* after the last one; return the new last sequence and hash."""
        last = conn.execute(
            select(audit_record.c.seq, audit_record.c.hash)
            .order_by(audit_record.c.seq.desc())
            .limit(1)
        ).first()
        seq, prev = (int(last.seq), str(last.hash)) if last else (0, GENESIS)
        rows: list[dict[str, Any]] = []
        subject_rows: list[dict[str, Any]] = []
        for record in records:
            seq += 1
            full = {**record, "seq": seq}
            text = canonical(full)
            digest = chain_hash(prev, text)
            rows.append(
                {**columns(full), "seq": seq, "record": text, "prev_hash": prev, "hash": digest}
            )
            subject_rows += [{"kind": k, "value": v, "seq": seq} for k, v in sorted(subjects(full))]
            prev = digest
        conn.execute(audit_record.insert(), rows)
        if subject_rows:
            conn.execute(audit_subject.insert(), subject_rows)
        return seq, prev

    def _note_head(self, seq: int, digest: str) -> None:
        """Record the chain head outside the database: overwritten in place (one
        fixed-width write, no file created or renamed per append), and only ever forwards
        (a head that lags after a race between processes is harmless; one ahead of the
        database is never written, as this runs after the commit)."""
        try:
            if self._head_fd < 0:
                self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT, 0o600)
            current = _parse_head(os.pread(self._head_fd, 128, 0))
            if current is not None and current[0] >= seq:
                return
            os.pwrite(self._head_fd, f"{seq:020d} {digest}\n".encode("ascii"), 0)
        except OSError as exc:
            log.warning("audit trail: chain head not saved: %s", exc.strerror)

    def _read_head(self) -> tuple[int, str] | None:
        try:
            return _parse_head(self.head_path.read_bytes()[:128])
        except OSError:
            return None

    def close(self) -> None:
        """Write what is still queued; save what cannot be written to a file."""
        with self._flush_lock:
            self._flush()
            with self._queue_lock:
                left, self._queue = self._queue, []
            if self._head_fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(self._head_fd)
                os.close(self._head_fd)
                self._head_fd = -1
        if not left:
            return
        path = self.folder / f"unwritten-{os.getpid()}-{int(time.time())}.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                for pending in left:
                    os.write(fd, (canonical(pending.record) + "\n").encode("ascii"))
            finally:
                os.close(fd)
            log.error(
                "audit trail: %d record(s) could not be written; saved to %s", len(left), path
            )
        except OSError as exc:
            log.critical("audit trail: %d record(s) lost: %s", len(left), exc.strerror)

    # -- reading ---------------------------------------------------------------------------

    def records(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        user: str | None = None,
        ae_title: str | None = None,
        patient: str | None = None,
        study: str | None = None,
        event_type: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Records matching every filter given, oldest first: the first *limit* from
        *since* when it is given, else the newest *limit*.

        Raises
        ------
        ConfigError
            *since* or *until* is not an ISO 8601 date or time.
        IndexFailure
            The database failed.
        """
        stmt = select(audit_record.c.record)
        if since:
            stmt = stmt.where(audit_record.c.time >= utc_text(since))
        if until:
            stmt = stmt.where(audit_record.c.time < utc_text(until))
        if user:
            stmt = stmt.where(audit_record.c.actor_user == user[:128])
        if ae_title:
            stmt = stmt.where(audit_record.c.actor_ae == ae_title.strip()[:16])
        if event_type:
            stmt = stmt.where(audit_record.c.type == event_type[:40])
        for kind, value in (("P", patient), ("S", study)):
            if value:
                stmt = stmt.where(
                    audit_record.c.seq.in_(
                        select(audit_subject.c.seq).where(
                            audit_subject.c.kind == kind, audit_subject.c.value == value[:64]
                        )
                    )
                )
        limit = max(1, min(limit, 100_000))
        order = audit_record.c.seq if since else audit_record.c.seq.desc()
        with self.index.reading("list the audit trail") as conn:
            texts = list(conn.execute(stmt.order_by(order).limit(limit)).scalars())
        if not since:
            texts.reverse()
        return [json.loads(t) for t in texts]

    def after(self, seq: int, limit: int = 100) -> list[dict[str, Any]]:
        """Records after sequence number *seq*, in order (what an exporter sends next)."""
        with self.index.reading("read the audit trail") as conn:
            texts = conn.execute(
                select(audit_record.c.record)
                .where(audit_record.c.seq > seq)
                .order_by(audit_record.c.seq)
                .limit(limit)
            ).scalars()
            return [json.loads(t) for t in texts]

    def last_seq(self) -> int:
        """The sequence number of the newest record (0 when the trail is empty)."""
        with self.index.reading("read the audit trail") as conn:
            return int(conn.execute(select(func.max(audit_record.c.seq))).scalar() or 0)

    def _rows(self) -> Iterator[tuple[Any, set[tuple[str, str]]]]:
        """Every record row in sequence order with its subject rows, read in batches."""
        last = -1
        while True:
            with self.index.reading("verify the audit trail") as conn:
                rows = conn.execute(
                    select(audit_record)
                    .where(audit_record.c.seq > last)
                    .order_by(audit_record.c.seq)
                    .limit(BATCH)
                ).all()
                if not rows:
                    return
                found: dict[int, set[tuple[str, str]]] = {}
                for kind, value, seq in conn.execute(
                    select(audit_subject.c.kind, audit_subject.c.value, audit_subject.c.seq).where(
                        audit_subject.c.seq > last, audit_subject.c.seq <= rows[-1].seq
                    )
                ):
                    found.setdefault(int(seq), set()).add((kind, value))
            for row in rows:
                yield row, found.pop(int(row.seq), set())
            last = int(rows[-1].seq)

    def verify(self) -> TrailCheck:
        """Walk the chain from the first record; return the first that is broken.

        A record is broken when its sequence number is not the one after the previous
        record's (one was deleted), its ``prev_hash`` is not the previous record's hash
        (deleted, moved or re-chained), its hash does not match its text (edited), its
        text does not hold its own sequence number (moved) or is not canonical, or its
        columns or subjects differ from the text (edited). The newest record must also be
        at least the chain head kept outside the database, with the same hash there.

        Raises
        ------
        IndexFailure
            The database failed.
        """
        expected_seq, prev, checked = 1, GENESIS, 0
        for row, found in self._rows():
            seq = int(row.seq)
            if seq != expected_seq:
                missing = (
                    f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
                )
                return TrailCheck(
                    checked, expected_seq, f"record {missing} was deleted (next is {seq})"
                )
            problem = _check_row(row, found, prev)
            if problem:
                return TrailCheck(checked, seq, f"record {seq} {problem}")
            prev, expected_seq, checked = str(row.hash), seq + 1, checked + 1
        head = self._read_head()
        if head is not None:
            head_seq, head_hash = head
            if head_seq >= expected_seq:
                gone = (
                    f"{expected_seq}" if head_seq == expected_seq else f"{expected_seq}-{head_seq}"
                )
                return TrailCheck(
                    checked,
                    expected_seq,
                    f"record {gone} was deleted (the chain head says {head_seq} exist)",
                )
            with self.index.reading("verify the audit trail") as conn:
                kept = conn.execute(
                    select(audit_record.c.hash).where(audit_record.c.seq == head_seq)
                ).scalar()
            if head_seq and kept != head_hash:
                return TrailCheck(
                    checked,
                    head_seq,
                    f"record {head_seq} differs from the chain head kept outside the database",
                )
        return TrailCheck(checked)


def _check_row(row: Any, found: set[tuple[str, str]], prev: str) -> str | None:
    """Why a record row is broken, or None."""
    text = str(row.record)
    if chain_hash(str(row.prev_hash), text) != row.hash:
        return "was edited (its hash does not match its content)"
    if row.prev_hash != prev:
        return "does not follow the previous record (a record was deleted, moved or re-chained)"
    try:
        record = json.loads(text)
    except ValueError:
        return "is not valid JSON"
    if not isinstance(record, dict) or canonical(record) != text:
        return "is not in canonical form"
    if record.get("seq") != row.seq:
        return f"holds sequence number {record.get('seq')!r} (moved)"
    for name, value in columns(record).items():
        if getattr(row, name) != value:
            return f"was edited (column {name} differs from the record)"
    if found != subjects(record):
        return "was edited (its patients or studies differ from the record)"
    return None
