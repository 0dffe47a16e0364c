"""Recording instances in batches (group commit): one transaction, one savepoint each."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from pydicom.uid import generate_uid

from stockade.errors import DuplicateConflict, HierarchyConflict, IndexFailure
from stockade.index.base import InstanceRecord, Outcome
from stockade.index.record import Ticket
from stockade.index.sql import SqlIndex


def _record(sop: str, series: str, study: str, patient: str, sha: str) -> InstanceRecord:
    return InstanceRecord(
        attributes={
            "SOPInstanceUID": sop,
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "SeriesInstanceUID": series,
            "StudyInstanceUID": study,
            "PatientID": patient,
            "PatientName": "Doe^Jane",
            "Modality": "CT",
        },
        sha256=sha * 64,
        blob_key=f"sha256/{sha * 2}/{sha * 64}",
        size=100,
        transfer_syntax="1.2.840.10008.1.2.1",
        preamble="none",
        trailing_bytes=0,
        origin="dimse",
        sender_ae="TEST",
        sender_address="127.0.0.1",
        received_at=datetime.now(UTC),
    )


@pytest.fixture
def index(db_url: str) -> SqlIndex:
    idx = SqlIndex(db_url)
    idx.migrate()
    return idx


def test_batch_keeps_each_outcome_to_its_own_instance(index: SqlIndex) -> None:
    study, series, other_study = generate_uid(), generate_uid(), generate_uid()
    first, second = generate_uid(), generate_uid()
    index.record(_record(first, series, study, "P1", "a"), allow_replace=False)

    tickets = [
        Ticket(_record(second, series, study, "P1", "b"), False),  # new: stored
        Ticket(_record(first, series, study, "P1", "c"), False),  # other content: conflict
        Ticket(_record(generate_uid(), series, other_study, "P1", "d"), False),  # bad series
        Ticket(_record(first, series, study, "P1", "a"), False),  # same content: duplicate
        Ticket(_record(second, series, study, "P1", "b"), False),  # duplicate within batch
    ]
    index._instances.record_batch(tickets)

    assert all(t.done for t in tickets)
    assert tickets[0].outcome().outcome is Outcome.STORED
    with pytest.raises(DuplicateConflict):
        tickets[1].outcome()
    with pytest.raises(HierarchyConflict):
        tickets[2].outcome()
    assert tickets[3].outcome().outcome is Outcome.DUPLICATE
    assert tickets[4].outcome().outcome is Outcome.DUPLICATE
    # The refused ones left nothing behind, not even their study.
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 2}
    found = index.find_instance(first)
    assert found is not None and found.sha256 == "a" * 64
    index.close()


def test_concurrent_writers_of_one_process_all_get_their_answer(index: SqlIndex) -> None:
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(40)]
    outcomes: dict[str, Outcome] = {}
    barrier = threading.Barrier(8, timeout=30)

    def write(chunk: list[str]) -> None:
        barrier.wait()
        for uid in chunk:
            sha = format(uids.index(uid) % 16, "x")
            outcomes[uid] = index.record(
                _record(uid, series, study, "P2", sha), allow_replace=False
            ).outcome

    threads = [threading.Thread(target=write, args=(uids[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == sorted(uids)
    assert set(outcomes.values()) == {Outcome.STORED}
    assert index.counts()["instances"] == 40
    index.close()


def test_a_failed_transaction_fails_every_ticket_of_the_batch(index: SqlIndex) -> None:
    tickets = [Ticket(_record(generate_uid(), generate_uid(), generate_uid(), "P3", "e"), False)]
    index._instances._begin = lambda cur: cur.execute("NOT SQL")  # type: ignore[method-assign]
    index._instances.record_batch(tickets)
    with pytest.raises(IndexFailure):
        tickets[0].outcome()
    index.close()


def test_sqlite_writes_return_after_their_wal_is_synced(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite runs with synchronous=NORMAL; every write syncs the WAL before returning."""
    import os
    from pathlib import Path

    from stockade.index.base import Node

    assert isinstance(tmp_path, Path)
    index = SqlIndex(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    index.migrate()
    synced: list[str] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    index.record(
        _record(generate_uid(), generate_uid(), generate_uid(), "P4", "f"), allow_replace=False
    )
    assert synced == [str(tmp_path / "index.sqlite3-wal")]
    index.add_node(Node("peer", "PEER", "127.0.0.1", 104, frozenset({"echo"})))
    assert len(synced) == 2
    with index.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    assert mode == 1  # NORMAL: SQLite does not sync inside its write lock; Stockade does
    index.close()


def test_record_many_records_a_bulk_in_one_call(index: SqlIndex) -> None:
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(5)]
    results = index.record_many(
        [_record(uid, series, study, "P5", format(i, "x")) for i, uid in enumerate(uids)]
    )
    assert [r.outcome for r in results] == [Outcome.STORED] * 5
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 5}
    with pytest.raises(DuplicateConflict):
        index.record_many([_record(uids[0], series, study, "P5", "f")])
    index.close()
