"""C-STORE data sets staged while they arrive (Archive.receive_dimse), and the staging files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from stockade.archive import SERVICES, Archive, Peer
from stockade.errors import DatasetMismatch, NotAuthorized
from stockade.index.base import Outcome
from stockade.storage.filesystem import SPARES, FilesystemBlobStore
from tests.dicomfactory import bare, make_dataset

PEER = Peer("MODALITY", "127.0.0.1", None, SERVICES)
EV = ExplicitVRLittleEndian


def _staged_objects(root: Path) -> list[Path]:
    """Non-empty staging files: staged objects (empty ones are spares kept ready)."""
    return [p for p in (root / "staging").rglob("*.tmp") if p.stat().st_size > 0]


def _send(archive: Archive, data: bytes, sop_class: str, sop_uid: str, chunk: int = 7) -> object:
    """Feed *data* to the archive in fragments, as the DIMSE adapter does."""
    receiving = archive.receive_dimse(
        EV, sop_class_uid=sop_class, sop_instance_uid=sop_uid, peer=PEER
    )
    assert receiving is not None
    view = memoryview(data)
    for pos in range(0, len(data), chunk):
        receiving.write(view[pos : pos + chunk])
    return archive.store_dimse(
        bytearray(data),
        EV,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        peer=PEER,
        abstract_syntax=sop_class,
        receiving=receiving,
    )


def _blob(archive: Archive, sop_uid: str) -> bytes:
    inst = archive.find_instance(sop_uid)
    assert inst is not None
    with archive.store.open(inst.blob_key) as fh:
        return fh.read()


def test_streamed_object_is_stored_exactly_as_when_buffered(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset()
    data = bare(ds)
    buffered_stages: list[object] = []
    stage = archive.store.stage
    monkeypatch.setattr(
        archive.store, "stage", lambda parts: buffered_stages.append(parts) or stage(parts)
    )
    result = _send(archive, data, CTImageStorage, ds.SOPInstanceUID)
    assert result.outcome is Outcome.STORED  # type: ignore[attr-defined]
    assert buffered_stages == []  # the bytes staged while arriving were kept as they are
    streamed = _blob(archive, ds.SOPInstanceUID)

    # a UID of the same length, so that both File Meta have the same size
    last = ds.SOPInstanceUID[-1]
    twin = make_dataset(SOPInstanceUID=ds.SOPInstanceUID[:-1] + ("2" if last == "1" else "1"))
    archive.store_dimse(
        bare(twin),
        EV,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=twin.SOPInstanceUID,
        peer=PEER,
    )
    buffered = _blob(archive, twin.SOPInstanceUID)
    # Same layout: zero preamble, Stockade's meta, the data set as received.
    assert streamed[:128] == bytes(128) and streamed[128:132] == b"DICM"
    assert streamed.endswith(data)
    assert len(streamed) - len(data) == len(buffered) - len(bare(twin))
    assert archive.verify().ok
    assert _staged_objects(archive.settings.data_dir) == []


def test_streamed_object_that_disagrees_with_its_request_leaves_nothing(archive: Archive) -> None:
    ds = make_dataset()
    other_uid = generate_uid()
    with pytest.raises(DatasetMismatch):
        _send(archive, bare(ds), CTImageStorage, other_uid)
    assert archive.counts()["instances"] == 0
    assert _staged_objects(archive.settings.data_dir) == []
    assert list(archive.store.keys()) == []


def test_streamed_object_with_trailing_bytes_is_stored_without_them(archive: Archive) -> None:
    ds = make_dataset()
    data = bare(ds)
    result = _send(archive, data + b"\x00" * 3 + b"MZ-not-dicom", CTImageStorage, ds.SOPInstanceUID)
    assert result.warnings  # type: ignore[attr-defined]
    stored = _blob(archive, ds.SOPInstanceUID)
    assert stored.endswith(data)
    assert b"MZ-not-dicom" not in stored
    assert archive.verify().ok
    assert _staged_objects(archive.settings.data_dir) == []


def test_peer_without_store_permission_gets_no_staging(archive: Archive) -> None:
    echo_only = Peer("ECHOER", "127.0.0.1", "echoer", frozenset({"echo"}))
    ds = make_dataset()
    assert (
        archive.receive_dimse(
            EV, sop_class_uid=CTImageStorage, sop_instance_uid=ds.SOPInstanceUID, peer=echo_only
        )
        is None
    )
    with pytest.raises(NotAuthorized):
        archive.store_dimse(
            bare(ds),
            EV,
            sop_class_uid=CTImageStorage,
            sop_instance_uid=ds.SOPInstanceUID,
            peer=echo_only,
        )


def test_invalid_request_uid_is_not_staged(archive: Archive) -> None:
    assert (
        archive.receive_dimse(
            EV, sop_class_uid=CTImageStorage, sop_instance_uid="../../x", peer=PEER
        )
        is None
    )
    assert _staged_objects(archive.settings.data_dir) == []


def test_writer_abort_and_errors(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    writer = store.writer()
    writer.write(b"partial data set")
    writer.abort()
    assert _staged_objects(tmp_path) == []
    writer.abort()  # idempotent

    writer = store.writer()
    writer.write(b"abc")
    writer.start_sync()
    writer.write(b"late")  # after the sync started: refused at finish, never half-kept
    with pytest.raises(Exception, match="blob store"):
        writer.finish()
    assert _staged_objects(tmp_path) == []

    writer = store.writer()
    writer.write(b"abc")
    staged = writer.finish()
    assert staged.size == 3
    store.commit(staged)
    with store.open(staged.key) as fh:
        assert fh.read() == b"abc"
    store.close()
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())


def test_spare_staging_files_are_refilled_and_removed_at_close(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    keys = set()
    for i in range(SPARES * 3):  # more than the spares prepared at first
        staged = store.stage([b"object %d" % i])
        keys.add(store.commit(staged))
    assert len(keys) == SPARES * 3
    assert set(store.keys()) == keys
    store.close()
    assert list((tmp_path / "staging").iterdir()) == []


class _Crash(BaseException):
    """Stands for the process dying at that point."""


def _die(store: FilesystemBlobStore) -> Path:
    """Let the store's process "die": its staging lock is released, nothing is cleaned."""
    import fcntl
    import os

    area = store._area
    assert area is not None
    fcntl.flock(store._lock_fd, fcntl.LOCK_UN)
    os.close(store._lock_fd)
    store._area = None
    return area


@pytest.mark.parametrize("reached_disk", [False, True])
def test_crash_between_index_commit_and_blob_sync(
    settings: object, reached_disk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index row commits while the blob syncs; after a crash in between, recovery keeps
    the instance if the bytes reached the disk and removes the row if they did not."""
    from stockade.audit.sink import MemoryAuditSink
    from stockade.index.sql import SqlIndex
    from stockade.settings import Settings

    assert isinstance(settings, Settings)
    audit = MemoryAuditSink()
    store = FilesystemBlobStore(settings.data_dir)
    index = SqlIndex(settings.index_url)
    dying = Archive(settings, store, index, audit)
    dying.prepare()
    kept = make_dataset(PatientID="KEPT")
    _send(dying, bare(kept), CTImageStorage, kept.SOPInstanceUID)  # a normal store first

    ds = make_dataset(PatientID="P-CRASH")
    receiving = dying.receive_dimse(
        EV, sop_class_uid=CTImageStorage, sop_instance_uid=ds.SOPInstanceUID, peer=PEER
    )
    assert receiving is not None
    receiving.write(bare(ds))

    def crash() -> None:
        raise _Crash

    monkeypatch.setattr(receiving.writer, "finish", crash)
    monkeypatch.setattr(receiving.writer, "abort", lambda: None)
    with pytest.raises(_Crash):
        dying.store_dimse(
            bytearray(bare(ds)),
            EV,
            sop_class_uid=CTImageStorage,
            sop_instance_uid=ds.SOPInstanceUID,
            peer=PEER,
            receiving=receiving,
        )
    assert dying.counts()["instances"] == 2  # the row committed before the "crash"
    assert [e.sop_instance_uid for e in index.staging_journal()] == [ds.SOPInstanceUID]
    area = _die(store)
    staged = [p for p in area.glob("*.tmp") if p.stat().st_size > 0]
    assert len(staged) == 1
    if not reached_disk:
        staged[0].write_bytes(staged[0].read_bytes()[:200])  # the tail never got there

    fresh = Archive(settings, FilesystemBlobStore(settings.data_dir), index, audit)
    fresh.prepare()
    assert index.staging_journal() == []
    counts = fresh.counts()
    if reached_disk:
        assert counts == {"patients": 2, "studies": 2, "series": 2, "instances": 2}
        assert _blob(fresh, ds.SOPInstanceUID).endswith(bare(ds))
    else:
        assert counts == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
        assert fresh.find_instance(ds.SOPInstanceUID) is None
    assert fresh.find_instance(kept.SOPInstanceUID) is not None
    report = fresh.verify()
    assert report.ok, report.problems
    assert _staged_objects(settings.data_dir) == []
    fresh.close()


def test_journal_is_empty_after_a_clean_stop(archive: Archive) -> None:
    for _ in range(3):
        ds = make_dataset()
        _send(archive, bare(ds), CTImageStorage, ds.SOPInstanceUID)
    archive.index.close()  # type: ignore[attr-defined]
    assert archive.index.staging_journal() == []  # type: ignore[attr-defined]
