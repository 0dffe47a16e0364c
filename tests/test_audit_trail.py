"""The hash-chained audit trail on SQLite and PostgreSQL: appends, listing, verification."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from stockade.app import build_archive
from stockade.archive import Archive
from stockade.audit.events import (
    EVENT_TYPES,
    Actor,
    InstancesRetrieved,
    InstanceStored,
    NodeChanged,
    QueryPerformed,
)
from stockade.audit.trail import GENESIS, AuditTrail, canonical, chain_hash, subjects, utc_text
from stockade.errors import ConfigError, NotFound
from stockade.ingest import Origin
from stockade.settings import Settings

from .dicomfactory import make_dataset, part10


@pytest.fixture
def trail_archive(settings: Settings) -> Iterator[Archive]:
    """An archive built as ``stockade`` builds it (the trail as its audit sink)."""
    arch = build_archive(settings)
    arch.prepare()
    try:
        yield arch
    finally:
        arch.close()


def _trail(archive: Archive) -> AuditTrail:
    assert isinstance(archive.audit_sink, AuditTrail)
    return archive.audit_sink


def _stored(n: int, patient: str = "P1", study: str = "1.2.3") -> InstanceStored:
    return InstanceStored(
        actor=Actor(ae_title="SCU", address="127.0.0.1", via="dimse"),
        study_uid=study,
        sop_instance_uid=f"1.2.3.4.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        patient_id=patient,
        result="stored",
        preamble="zero",
    )


def _execute(archive: Archive, sql: str) -> None:
    engine = create_engine(archive.settings.index_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def test_records_chain_from_genesis(trail_archive: Archive) -> None:
    trail = _trail(trail_archive)
    for n in range(3):
        trail.emit(_stored(n))
    engine = create_engine(trail_archive.settings.index_url, poolclass=NullPool)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT seq, record, prev_hash, hash FROM audit_record ORDER BY seq")
        ).all()
    engine.dispose()
    assert [r.seq for r in rows] == [1, 2, 3]
    prev = GENESIS
    for row in rows:
        record = json.loads(row.record)
        assert record["seq"] == row.seq and canonical(record) == row.record
        assert row.prev_hash == prev and row.hash == chain_hash(prev, row.record)
        prev = row.hash
    assert trail.verify().ok and trail.verify().checked == 3
    assert trail.head_path.read_text().split() == [f"{3:020d}", prev]
    assert oct(trail.head_path.stat().st_mode & 0o777) == "0o600"


def test_concurrent_appends_stay_one_chain(trail_archive: Archive, settings: Settings) -> None:
    """Threads of this process and a second archive (another process's view) append at
    once: one gapless chain, every record once."""
    other = build_archive(settings)
    try:
        sinks = [_trail(trail_archive), _trail(other)]

        def append(i: int) -> None:
            for n in range(25):
                sinks[i % 2].emit(_stored(i * 100 + n))

        threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other.close()
    check = _trail(trail_archive).verify()
    assert check.ok, check.reason
    assert check.checked == 100
    uids = [r["sop_instance_uid"] for r in _trail(trail_archive).records(limit=1000)]
    assert sorted(uids) == sorted(f"1.2.3.4.{i * 100 + n}" for i in range(4) for n in range(25))


@pytest.mark.parametrize(
    ("sql", "broken", "says"),
    [
        ("UPDATE audit_record SET record = replace(record, 'P1', 'P9') WHERE seq = 3", 3, "edited"),
        ("UPDATE audit_record SET actor_ae = 'OTHER' WHERE seq = 2", 2, "column actor_ae"),
        ("DELETE FROM audit_record WHERE seq = 3", 3, "deleted"),
        ("DELETE FROM audit_record WHERE seq = 5", 5, "deleted"),
        ("DELETE FROM audit_subject WHERE seq = 4", 4, "patients or studies"),
        ("UPDATE audit_subject SET value = 'P9' WHERE seq = 1 AND kind = 'P'", 1, "patients"),
    ],
)
def test_verify_names_the_broken_record(
    trail_archive: Archive, sql: str, broken: int, says: str
) -> None:
    trail = _trail(trail_archive)
    for n in range(5):
        trail.emit(_stored(n))
    assert trail.verify().ok
    _execute(trail_archive, sql)
    check = trail.verify()
    assert not check.ok
    assert check.broken == broken, check.reason
    assert says in str(check.reason) and f"record {broken}" in str(check.reason)


def test_verify_detects_records_swapped_and_rechained(trail_archive: Archive) -> None:
    """Records 2 and 3 exchange their content; even with hashes recomputed for each row,
    the chain (and the sequence number inside the record) gives it away."""
    trail = _trail(trail_archive)
    for n in range(4):
        trail.emit(_stored(n))
    engine = create_engine(trail_archive.settings.index_url, poolclass=NullPool)
    with engine.begin() as conn:
        rows = {
            r.seq: r
            for r in conn.execute(text("SELECT seq, record, prev_hash FROM audit_record")).all()
        }
        for a, b in ((2, 3), (3, 2)):
            record = rows[b].record
            conn.execute(
                text("UPDATE audit_record SET record = :r, hash = :h WHERE seq = :s"),
                {"r": record, "h": chain_hash(rows[a].prev_hash, record), "s": a},
            )
    engine.dispose()
    check = trail.verify()
    assert not check.ok and check.broken == 2, check.reason


def test_verify_detects_the_newest_record_deleted(trail_archive: Archive) -> None:
    trail = _trail(trail_archive)
    for n in range(3):
        trail.emit(_stored(n))
    _execute(trail_archive, "DELETE FROM audit_record WHERE seq = 3")
    check = trail.verify()
    assert not check.ok and check.broken == 3
    assert "chain head" in str(check.reason)


def test_records_filtered_by_patient_study_user_type_and_time(trail_archive: Archive) -> None:
    trail = _trail(trail_archive)
    trail.emit(_stored(1, patient="ALICE", study="1.1"))
    trail.emit(_stored(2, patient="BOB", study="2.2"))
    trail.emit(
        QueryPerformed(
            actor=Actor(address="127.0.0.1", via="web"),
            level="STUDY",
            keys={"PatientID": "ALICE", "StudyInstanceUID": "1.1\\3.3"},
            matches=1,
        )
    )
    trail.emit(
        QueryPerformed(
            actor=Actor(address="127.0.0.1", via="web"),
            level="STUDY",
            keys={"PatientID": "AL*"},
            matches=1,
        )
    )
    trail.emit(
        InstancesRetrieved(
            actor=Actor(ae_title="VIEWER", address="127.0.0.1", via="dimse"),
            service="get",
            destination="VIEWER",
            level="STUDY",
            keys={"StudyInstanceUID": "1.1"},
            study_uids=["1.1"],
            patient_ids=["ALICE"],
            located=1,
            completed=1,
            warning=0,
            failed=0,
        )
    )
    trail.emit(NodeChanged(actor=Actor(via="cli", user="carol"), name="pacs", action="add"))

    def types(**filters: str) -> list[str]:
        return [r["type"] for r in trail.records(**filters)]

    assert types(patient="ALICE") == ["InstanceStored", "QueryPerformed", "InstancesRetrieved"]
    assert types(patient="BOB") == ["InstanceStored"]
    assert types(study="3.3") == ["QueryPerformed"]
    assert types(user="carol") == ["NodeChanged"]
    assert types(ae_title="VIEWER") == ["InstancesRetrieved"]
    assert types(event_type="QueryPerformed") == ["QueryPerformed", "QueryPerformed"]
    assert types(since="2000-01-01") == types()
    assert types(since="2999-01-01") == []
    assert len(trail.records(limit=2)) == 2
    assert [r["seq"] for r in trail.records(limit=2)] == [5, 6]  # the newest, oldest first
    with pytest.raises(ConfigError):
        trail.records(since="yesterday")


def test_subjects_and_time_normalisation() -> None:
    assert subjects({"keys": {"PatientID": "A\\B", "StudyInstanceUID": "1.2"}}) == {
        ("P", "A"),
        ("P", "B"),
        ("S", "1.2"),
    }
    assert subjects({"keys": {"PatientID": "DOE*"}}) == set()
    assert utc_text("2026-01-02") == "2026-01-02T00:00:00.000+00:00"
    assert utc_text("2026-01-02T03:00:00+02:00") == "2026-01-02T01:00:00.000+00:00"


def test_long_and_hostile_values_are_bounded(trail_archive: Archive) -> None:
    trail = _trail(trail_archive)
    trail.emit(
        QueryPerformed(
            actor=Actor(ae_title="X", address="127.0.0.1", via="dimse"),
            level="STUDY",
            keys={"PatientName": "A" * 100_000, "x" * 1000: "\x00<b>&"},
            matches=0,
        )
    )
    (record,) = trail.records()
    assert len(record["keys"]["PatientName"]) < 5000
    assert trail.verify().ok


def test_database_down_keeps_records_and_writes_them_later(
    settings: Settings, tmp_path: Path
) -> None:
    """Records emitted while the trail's table cannot be written are kept and go with the
    next append; the chain stays whole."""
    arch = build_archive(settings)
    arch.prepare()
    trail = _trail(arch)
    try:
        _execute(arch, "ALTER TABLE audit_record RENAME TO audit_record_away")
        trail.emit(_stored(1))  # no exception: the store it describes has happened
        trail.emit(_stored(2))
        _execute(arch, "ALTER TABLE audit_record_away RENAME TO audit_record")
        trail.emit(_stored(3))
        records = trail.records()
        assert [r["sop_instance_uid"] for r in records] == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]
        assert trail.verify().ok
    finally:
        arch.close()


def test_unwritable_records_are_saved_at_close(settings: Settings) -> None:
    arch = build_archive(settings)
    arch.prepare()
    trail = _trail(arch)
    _execute(arch, "ALTER TABLE audit_record RENAME TO audit_record_away")
    trail.emit(_stored(7))
    arch.close()
    saved = list(trail.folder.glob("unwritten-*.jsonl"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["sop_instance_uid"] == "1.2.3.4.7"
    assert oct(saved[0].stat().st_mode & 0o777) == "0o600"


def test_delete_study_series_instance_with_one_record_each(trail_archive: Archive) -> None:
    arch = trail_archive
    study, series_a, series_b = "1.2.826.0.1.9.1", "1.2.826.0.1.9.2", "1.2.826.0.1.9.3"
    uids = []
    for i, series in enumerate([series_a, series_a, series_b, series_b]):
        uid = f"1.2.826.0.1.9.10.{i}"
        uids.append(uid)
        ds = make_dataset(
            SOPInstanceUID=uid, StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="DEL"
        )
        arch.store_file(part10(ds), Origin(via="import"))
    other = "1.2.826.0.1.9.20"
    ds = make_dataset(SOPInstanceUID="1.2.826.0.1.9.21", StudyInstanceUID=other, PatientID="KEEP")
    arch.store_file(part10(ds), Origin(via="import"))
    actor = Actor(via="cli", user="dora")
    keys = {i.sop_instance_uid: i.blob_key for i in arch.index.instances()}

    gone = arch.delete(study, series_a, uids[0], actor=actor)
    assert [g.sop_instance_uid for g in gone] == [uids[0]]
    assert arch.counts()["instances"] == 4
    gone = arch.delete(study, series_b, actor=actor)
    assert sorted(g.sop_instance_uid for g in gone) == uids[2:]
    assert arch.counts() == {"patients": 2, "studies": 2, "series": 2, "instances": 2}
    gone = arch.delete(study, actor=actor)
    assert [g.sop_instance_uid for g in gone] == [uids[1]]
    assert arch.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    with pytest.raises(NotFound):
        arch.delete(study, actor=actor)
    for uid in uids:
        assert not arch.store.exists(keys[uid])
    assert arch.store.exists(keys["1.2.826.0.1.9.21"])
    assert arch.index.queued_deletions() == []
    assert arch.verify().ok

    deleted = _trail(arch).records(event_type="InstancesDeleted")
    assert [(r["level"], r["deleted"], r["outcome"]) for r in deleted] == [
        ("IMAGE", 1, "success"),
        ("SERIES", 2, "success"),
        ("STUDY", 1, "success"),
        ("STUDY", 0, "failure"),
    ]
    assert all(r["patient_ids"] == ["DEL"] for r in deleted[:3])
    assert all(r["study_uids"] == [study] for r in deleted)
    assert all(r["actor"]["user"] == "dora" for r in deleted)
    assert [r["type"] for r in _trail(arch).records(patient="KEEP")] == ["InstanceStored"]
    assert _trail(arch).verify().ok


def test_every_event_type_has_no_secret_field() -> None:
    import dataclasses

    for event in EVENT_TYPES:
        for f in dataclasses.fields(event):
            assert not any(w in f.name.lower() for w in ("password", "secret", "token", "key_"))


def test_cli_list_and_verify(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stockade.cli import main

    config = tmp_path / "stockade.toml"
    config.write_text(
        f"data_dir = {json.dumps(str(settings.data_dir))}\n"
        f"database_url = {json.dumps(settings.index_url)}\n"
    )
    arch = build_archive(settings)
    arch.prepare()
    _trail(arch).emit(_stored(1, patient="CLI\x1b[31m"))
    arch.close()
    assert main(["--config", str(config), "audit", "list", "--patient", "CLI\x1b[31m"]) == 0
    line = capsys.readouterr().out.strip()
    assert "InstanceStored" in line and "\x1b" not in line and "\\x1b[31m" in line
    assert main(["--config", str(config), "audit", "list", "--json", "--type", "AuditLogUsed"]) == 0
    (used,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert used["filters"] == {"patient": "CLI\x1b[31m"} and used["records"] == 1
    assert main(["--config", str(config), "audit", "verify"]) == 0
    assert "chain intact" in capsys.readouterr().out
    (settings.data_dir / "audit" / "unwritten-1-2.jsonl").write_text("{}\n")
    assert main(["--config", str(config), "audit", "verify"]) == 1
    assert "could not be written" in capsys.readouterr().out
    assert main(["--config", str(config), "audit", "list", "--since", "tomorrow"]) == 2
    assert main(["--config", str(config), "delete", "--study", "1.2.3"]) == 2
    assert main(["--config", str(config), "delete", "--study", "1.2.3", "--yes"]) == 1
