"""The one retrieve path (Archive.retrieve and Retrieval), on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from stockade.archive import SERVICES, Archive, Peer
from stockade.audit.events import InstancesRetrieved, SecurityAlert
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.attributes import Level
from stockade.dicom.part10 import read_part10
from stockade.errors import (
    CannotTranscode,
    IntegrityError,
    InvalidQuery,
    NotAuthorized,
    TooManyMatches,
)
from stockade.ingest import Origin
from stockade.retrieve import retrieve_query
from tests.dicomfactory import make_dataset, part10

PEER = Peer("WORKSTATION", "127.0.0.1", "ws", SERVICES)


def _study(archive: Archive, series: int, per_series: int, patient: str = "P1") -> dict[str, bytes]:
    """Store one study; return SOP Instance UID -> the Part 10 bytes sent (out of order)."""
    study = generate_uid()
    sent = {}
    for s in range(series):
        series_uid = generate_uid()
        for number in reversed(range(1, per_series + 1)):
            ds = make_dataset(
                StudyInstanceUID=study,
                SeriesInstanceUID=series_uid,
                SeriesNumber=s + 1,
                InstanceNumber=number,
                PatientID=patient,
                PixelData=bytes([number] * 32),
            )
            data = part10(ds)
            archive.store_file(data, Origin(via="import"))
            sent[str(ds.SOPInstanceUID)] = data
    return sent


def _retrievals(audit: MemoryAuditSink) -> list[InstancesRetrieved]:
    return [e for e in audit.events if isinstance(e, InstancesRetrieved)]


def test_retrieve_query_takes_unique_keys_only() -> None:
    query = retrieve_query(
        Level.SERIES,
        {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.3\\1.4", "Modality": "CT"},
        limit=10,
    )
    assert [(c.keyword, c.values) for c in query.conditions] == [
        ("StudyInstanceUID", ("1.2",)),
        ("SeriesInstanceUID", ("1.3", "1.4")),
    ]
    with pytest.raises(InvalidQuery, match="needs a value for SeriesInstanceUID"):
        retrieve_query(Level.SERIES, {"StudyInstanceUID": "1.2"}, limit=10)
    with pytest.raises(InvalidQuery, match="wildcard"):
        retrieve_query(Level.STUDY, {"StudyInstanceUID": "1.2*"}, limit=10)
    with pytest.raises(InvalidQuery, match="wildcard"):
        retrieve_query(Level.PATIENT, {"PatientID": "P?"}, limit=10)


def test_locate_study_series_and_image_in_order(archive: Archive) -> None:
    sent = _study(archive, series=2, per_series=3)
    other = _study(archive, series=1, per_series=2, patient="P2")
    first = archive.find_instance(next(iter(sent)))
    assert first is not None
    study = first.study_instance_uid

    retrieval = archive.retrieve(Level.STUDY, {"StudyInstanceUID": study}, service="get", peer=PEER)
    assert {i.sop_instance_uid for i in retrieval.instances} == set(sent)
    assert len(retrieval.instances) == 6
    assert all(i.patient_id == "P1" for i in retrieval.instances)
    # stored in descending order; located by series, then instance number ascending
    order = [
        (
            i.series_instance_uid,
            int(pydicom.dcmread(io.BytesIO(sent[i.sop_instance_uid])).InstanceNumber),
        )
        for i in retrieval.instances
    ]
    assert [n for _, n in order] == [1, 2, 3, 1, 2, 3]
    assert order[0][0] == order[2][0] != order[3][0] == order[5][0]

    series_uid = first.series_instance_uid
    by_series = archive.retrieve(
        Level.SERIES,
        {"StudyInstanceUID": study, "SeriesInstanceUID": series_uid},
        service="move",
        peer=PEER,
        destination="DEST",
    )
    assert len(by_series.instances) == 3
    assert {i.series_instance_uid for i in by_series.instances} == {series_uid}

    one = archive.retrieve(
        Level.IMAGE,
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": first.sop_instance_uid,
        },
        service="get",
        peer=PEER,
    )
    assert [i.sop_instance_uid for i in one.instances] == [first.sop_instance_uid]

    both = archive.retrieve(Level.PATIENT, {"PatientID": "P2"}, service="get", peer=PEER)
    assert {i.sop_instance_uid for i in both.instances} == set(other)


def test_dataset_is_the_stored_bytes_and_finish_audits_once(
    archive: Archive, audit: MemoryAuditSink
) -> None:
    sent = _study(archive, series=1, per_series=2)
    uid = next(iter(sent))
    inst = archive.find_instance(uid)
    assert inst is not None
    retrieval = archive.retrieve(
        Level.STUDY, {"StudyInstanceUID": inst.study_instance_uid}, service="get", peer=PEER
    )
    for located in retrieval.instances:
        ts, view = retrieval.dataset(located, [located.transfer_syntax])
        data = bytes(view)
        assert ts == located.transfer_syntax
        original = sent[located.sop_instance_uid]
        assert data == original[read_part10(original).dataset_offset :]
        retrieval.done(located, "completed")
    assert retrieval.remaining == 0
    retrieval.finish()
    retrieval.finish()
    (event,) = _retrievals(audit)
    assert (event.service, event.completed, event.failed, event.outcome) == ("get", 2, 0, "success")
    assert event.study_uids == [inst.study_instance_uid] and event.patient_ids == ["P1"]
    assert event.actor.ae_title == "WORKSTATION"


def test_a_changed_blob_is_never_returned(archive: Archive, audit: MemoryAuditSink) -> None:
    sent = _study(archive, series=1, per_series=2)
    uid = next(iter(sent))
    inst = archive.find_instance(uid)
    assert inst is not None
    path = archive.settings.data_dir / "blobs" / inst.blob_key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    retrieval = archive.retrieve(
        Level.STUDY, {"StudyInstanceUID": inst.study_instance_uid}, service="get", peer=PEER
    )
    victim = next(i for i in retrieval.instances if i.sop_instance_uid == uid)
    with pytest.raises(IntegrityError, match="SHA-256"):
        retrieval.dataset(victim, [victim.transfer_syntax])
    alerts = [e for e in audit.events if isinstance(e, SecurityAlert)]
    assert [(a.finding, a.sop_instance_uid) for a in alerts] == [("integrity", uid)]
    path.unlink()
    with pytest.raises(IntegrityError, match="unreadable"):
        retrieval.read(victim)
    shorter = dataclasses.replace(victim, size=victim.size + 1)
    with pytest.raises(IntegrityError):
        retrieval.read(shorter)


def test_refusals_are_audited(archive: Archive, audit: MemoryAuditSink) -> None:
    sent = _study(archive, series=1, per_series=3)
    inst = archive.find_instance(next(iter(sent)))
    assert inst is not None
    keys = {"StudyInstanceUID": inst.study_instance_uid}
    find_only = Peer("VIEWER", "127.0.0.1", "viewer", frozenset({"find"}))
    with pytest.raises(NotAuthorized):
        archive.retrieve(Level.STUDY, keys, service="move", peer=find_only)
    with pytest.raises(InvalidQuery):
        archive.retrieve(Level.STUDY, {}, service="get", peer=PEER)
    small = dataclasses.replace(archive.settings, retrieve_max_instances=2)
    archive.settings = small
    with pytest.raises(TooManyMatches, match="retrieve_max_instances"):
        archive.retrieve(Level.STUDY, keys, service="get", peer=PEER)
    events = _retrievals(audit)
    assert [e.outcome for e in events] == ["failure"] * 3
    assert [e.located for e in events] == [0, 0, 0]
    assert all(e.reason for e in events)


def test_dataset_falls_back_to_the_next_candidate_a_codec_manages(archive: Archive) -> None:
    """A 4 x 4 image is too small for the JPEG 2000 encoder: the next accepted syntax is
    used; with no candidate left the reason says so."""
    sent = _study(archive, series=1, per_series=1)
    inst = archive.find_instance(next(iter(sent)))
    assert inst is not None
    retrieval = archive.retrieve(
        Level.STUDY, {"StudyInstanceUID": inst.study_instance_uid}, service="get", peer=PEER
    )
    (located,) = retrieval.instances
    j2k, implicit = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2"
    ts, data = retrieval.dataset(located, [j2k, implicit])
    assert ts == implicit
    ds = pydicom.dcmread(
        io.BytesIO(bytes(data)), force=True
    )  # implicit VR little endian, no File Meta
    assert ds.PixelData == bytes([1] * 32) and ds.SOPInstanceUID == located.sop_instance_uid
    with pytest.raises(CannotTranscode):
        retrieval.dataset(located, [j2k])
    with pytest.raises(CannotTranscode, match="accepted no transfer syntax"):
        retrieval.dataset(located, [])
