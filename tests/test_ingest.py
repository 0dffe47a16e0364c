"""The ingest pipeline through the Archive facade, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from stockade.archive import SERVICES, Archive, Peer
from stockade.audit.events import InstanceRejected, InstanceStored, SecurityAlert
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.inspect import Kind
from stockade.dicom.part10 import read_part10
from stockade.errors import (
    DuplicateConflict,
    HierarchyConflict,
    InvalidAttribute,
    InvalidObject,
    NotAuthorized,
    ObjectTooLarge,
    Quarantined,
    StockadeError,
)
from stockade.index.base import InstanceRecord, Outcome, Recorded
from stockade.index.sql import SqlIndex
from stockade.ingest import Origin
from stockade.security.policy import Action, Policy
from stockade.storage.filesystem import FilesystemBlobStore
from tests.dicomfactory import bare, make_dataset, part10

IMPORT = Origin(via="import")
PEER = Peer("MODALITY", "127.0.0.1", None, SERVICES)


def _stored_file(archive: Archive, sop_uid: str) -> bytes:
    inst = archive.find_instance(sop_uid)
    assert inst is not None
    with archive.store.open(inst.blob_key) as fh:
        return fh.read()


PE_PREAMBLE = b"MZ\x90\x00" + b"\x00" * 56 + b"\x80\x00\x00\x00" + b"\x00" * 64


@pytest.mark.parametrize(
    ("preamble", "kind"),
    [
        (PE_PREAMBLE, "executable"),
        (b"\x7fELF" + bytes(124), "executable"),
        (b"#!/bin/sh\n" + bytes(118), "executable"),
        (b"<html><script>" + bytes(114), "markup"),
        (b"II*\x00\x08\x00\x00\x00" + bytes(120), "tiff"),
        (bytes(128), "zero"),
    ],
)
def test_preamble_is_classified_and_zeroed(
    archive: Archive, audit: MemoryAuditSink, preamble: bytes, kind: str
) -> None:
    # Stripping the preamble (zeroing it) is what the policy does here; by default an
    # executable or markup preamble quarantines the object (tests/test_screening.py).
    archive.ingest.policy = Policy(
        {Kind.EXECUTABLE_PREAMBLE: Action.STRIP, Kind.MARKUP_PREAMBLE: Action.STRIP}
    )
    ds = make_dataset()
    data = part10(ds, preamble=preamble)
    archive.store_file(data, IMPORT)
    stored = _stored_file(archive, ds.SOPInstanceUID)
    assert stored[:128] == bytes(128) and stored[128:132] == b"DICM"
    original = read_part10(data)
    assert stored.endswith(data[original.dataset_offset :])
    alerts = [e for e in audit.events if isinstance(e, SecurityAlert)]
    assert len(alerts) == (1 if kind in ("executable", "markup") else 0)
    with archive.index.engine.connect() as conn:  # type: ignore[attr-defined]
        from sqlalchemy import text

        row = conn.execute(text("select preamble from instances")).one()
    assert row[0] == kind


@pytest.mark.parametrize("bad_uid", ["../../x", "1." + "2" * 63, "1.02.3", "/etc/cron.d/x"])
def test_invalid_uids_are_refused_and_nothing_is_stored(
    archive: Archive, audit: MemoryAuditSink, tmp_path: Path, bad_uid: str
) -> None:
    ds = make_dataset(SOPInstanceUID=bad_uid)
    with pytest.raises(InvalidAttribute, match="SOPInstanceUID"):
        archive.store_file(part10(ds), IMPORT)
    with pytest.raises(InvalidAttribute):
        archive.store_dimse(
            bare(ds),
            "1.2.840.10008.1.2.1",
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=bad_uid,
            peer=PEER,
        )
    assert archive.counts()["instances"] == 0
    assert list(archive.store.keys()) == []
    assert not (tmp_path / "x").exists()
    assert sum(isinstance(e, InstanceRejected) for e in audit.events) == 2


def test_study_uid_longer_than_64_is_refused(archive: Archive) -> None:
    ds = make_dataset(StudyInstanceUID="1." + "3" * 63)
    with pytest.raises(InvalidAttribute, match=r"StudyInstanceUID .* 65 characters"):
        archive.store_file(part10(ds), IMPORT)


def test_duplicate_conflict_and_replacement(archive: Archive, settings: object) -> None:
    ds = make_dataset()
    assert archive.store_file(part10(ds), IMPORT).outcome is Outcome.STORED
    assert archive.store_file(part10(ds), IMPORT).outcome is Outcome.DUPLICATE
    first = _stored_file(archive, ds.SOPInstanceUID)
    ds.PatientName = "Changed^Name"
    with pytest.raises(DuplicateConflict):
        archive.store_file(part10(ds), IMPORT)
    assert _stored_file(archive, ds.SOPInstanceUID) == first  # nothing changed
    archive.ingest.settings = dataclasses.replace(archive.settings, allow_replace=True)
    assert archive.store_file(part10(ds), IMPORT).outcome is Outcome.REPLACED
    assert _stored_file(archive, ds.SOPInstanceUID) != first
    assert len(list(archive.store.keys())) == 1  # the old blob is gone
    assert archive.verify().ok


def test_prepared_files_are_recorded_together(archive: Archive, audit: MemoryAuditSink) -> None:
    """Steps 1-4 stage without recording; finish records a batch in one call to the index,
    in order, and a refusal (here a conflict with an earlier file of the same batch)
    touches only its own file."""
    ds = make_dataset()
    other = make_dataset(StudyInstanceUID=ds.StudyInstanceUID)
    first = part10(ds)
    ds.PatientName = "Changed^Name"
    conflicting = part10(ds)
    prepared = [archive.prepare_file(f, IMPORT) for f in (first, part10(other), first, conflicting)]
    assert archive.counts()["instances"] == 0  # nothing recorded, nothing acknowledged
    calls = []
    record_all = archive.index.record_all

    def counted(
        records: Sequence[InstanceRecord], *, allow_replace: bool
    ) -> list[Recorded | StockadeError]:
        calls.append(len(records))
        return record_all(records, allow_replace=allow_replace)

    archive.index.record_all = counted  # type: ignore[method-assign]
    results = archive.finish_files(prepared)
    assert calls == [4]
    assert [getattr(r, "outcome", None) for r in results[:3]] == [
        Outcome.STORED,
        Outcome.STORED,
        Outcome.DUPLICATE,
    ]
    assert isinstance(results[3], DuplicateConflict)
    assert archive.counts()["instances"] == 2
    kept = _stored_file(archive, ds.SOPInstanceUID)
    assert kept.endswith(first[read_part10(first).dataset_offset :])  # not the conflicting one
    assert len(list(archive.store.keys())) == 2
    stored = [e for e in audit.events if isinstance(e, InstanceStored)]
    assert [e.result for e in stored] == ["stored", "stored", "duplicate"]
    rejected = [e for e in audit.events if isinstance(e, InstanceRejected)]
    assert [e.sop_instance_uid for e in rejected] == [ds.SOPInstanceUID]  # the refused one
    assert archive.verify().ok


def test_study_under_another_patient_is_refused(archive: Archive) -> None:
    ds = make_dataset()
    archive.store_file(part10(ds), IMPORT)
    other = make_dataset(StudyInstanceUID=ds.StudyInstanceUID, PatientID="OTHER")
    with pytest.raises(HierarchyConflict):
        archive.store_file(part10(other), IMPORT)
    assert archive.counts()["instances"] == 1


def test_counts_and_modalities(archive: Archive) -> None:
    study = generate_uid()
    for modality, series in (("CT", generate_uid()), ("MR", generate_uid())):
        for _ in range(2):
            archive.store_file(
                part10(
                    make_dataset(
                        StudyInstanceUID=study, Modality=modality, SeriesInstanceUID=series
                    )
                ),
                IMPORT,
            )
    from sqlalchemy import text

    with archive.index.engine.connect() as conn:  # type: ignore[attr-defined]
        row = conn.execute(text("select num_series, num_instances, modalities from studies")).one()
    assert tuple(row) == (2, 4, "CT\\MR")


def test_trailing_zip_is_not_stored(archive: Archive) -> None:
    ds = make_dataset()
    data = part10(ds) + b"PK\x03\x04" + b"\x14" * 60
    with pytest.raises(Quarantined, match="polyglot-trailer"):  # the default action
        archive.store_file(data, IMPORT)
    assert archive.find_instance(ds.SOPInstanceUID) is None
    archive.ingest.policy = Policy({Kind.POLYGLOT_TRAILER: Action.STRIP})
    result = archive.store_file(data, IMPORT)
    assert any("not stored" in w for w in result.warnings)
    assert b"PK\x03\x04" not in _stored_file(archive, ds.SOPInstanceUID)
    assert archive.verify().ok


def test_deflated_is_stored_as_received(archive: Archive) -> None:
    ds = make_dataset(PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 192")
    data = part10(ds, ts=DeflatedExplicitVRLittleEndian)
    archive.store_file(data, IMPORT)
    stored = _stored_file(archive, ds.SOPInstanceUID)
    offset = read_part10(data).dataset_offset
    assert stored.endswith(data[offset:])
    with archive.index.engine.connect() as conn:  # type: ignore[attr-defined]
        from sqlalchemy import text

        name, key = conn.execute(text("select patient_name, patient_name_key from patients")).one()
    assert (name, key) == ("Müller^Jürgen", "müller^jürgen")


def test_deflate_bomb_is_capped(archive: Archive) -> None:
    ds = make_dataset()
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = bomb.compress(bytes(50 * 1024 * 1024)) + bomb.flush()
    small = dataclasses.replace(archive.settings, max_inflated_size=1024 * 1024)
    archive.ingest.settings = small
    with pytest.raises(ObjectTooLarge, match="inflates past"):
        archive.store_dimse(
            raw,
            DeflatedExplicitVRLittleEndian,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            peer=PEER,
        )


def test_not_dicom_and_mismatch(archive: Archive) -> None:
    with pytest.raises(InvalidObject, match="DICM"):
        archive.store_file(b"hello world" * 20, IMPORT)
    ds = make_dataset()
    with pytest.raises(InvalidAttribute, match="abstract syntax"):
        archive.store_dimse(
            bare(ds),
            "1.2.840.10008.1.2.1",
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            peer=PEER,
            abstract_syntax="1.2.840.10008.5.1.4.1.1.4",
        )
    with pytest.raises(InvalidObject, match="differs"):
        archive.store_dimse(
            bare(ds),
            "1.2.840.10008.1.2.1",
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=generate_uid(),
            peer=PEER,
        )
    echo_only = Peer("X", "127.0.0.1", "n", frozenset({"echo"}))
    with pytest.raises(NotAuthorized):
        archive.store_dimse(
            bare(ds),
            "1.2.840.10008.1.2.1",
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            peer=echo_only,
        )
    assert archive.counts()["instances"] == 0


def test_verify_detects_a_flipped_byte(archive: Archive) -> None:
    ds = make_dataset()
    archive.store_file(part10(ds), IMPORT)
    inst = archive.find_instance(ds.SOPInstanceUID)
    assert inst is not None
    path = archive.store.blobs / inst.blob_key  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = archive.verify()
    assert not report.ok and "no longer matches" in report.problems[0]


def test_recovery_publishes_committed_and_discards_unacknowledged(
    settings: object, audit: MemoryAuditSink
) -> None:
    from stockade.settings import Settings

    assert isinstance(settings, Settings)
    # A "dead" process: it staged two blobs, committed the index row of one, then died.
    dead_store = FilesystemBlobStore(settings.data_dir)
    index = SqlIndex(settings.index_url)
    dead = Archive(settings, dead_store, index, audit)
    dead.prepare()
    ds = make_dataset()
    staged_kept = dead_store.stage([b"will be replaced"])
    dead_store.discard(staged_kept)
    real = part10(ds)
    from stockade.ingest import Ingest

    ingest = Ingest(settings, dead_store, index, audit)
    commit = dead_store.commit
    dead_store.commit = lambda staged: staged.key  # type: ignore[method-assign]
    ingest.from_file(real, IMPORT)  # row committed, blob left in staging
    dead_store.commit = commit  # type: ignore[method-assign]
    orphan = dead_store.stage([b"never indexed"])
    area = dead_store._area
    assert area is not None
    import fcntl
    import os

    fcntl.flock(dead_store._lock_fd, fcntl.LOCK_UN)  # the process "dies"
    os.close(dead_store._lock_fd)
    dead_store._area = None

    fresh = Archive(settings, FilesystemBlobStore(settings.data_dir), index, audit)
    report = fresh.prepare()
    assert (report.published, report.discarded) == (1, 1)
    assert not area.exists()
    assert not fresh.store.exists(orphan.key)
    assert fresh.verify().ok and fresh.counts()["instances"] == 1
    fresh.close()
