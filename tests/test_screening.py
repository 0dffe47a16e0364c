"""The hidden-payload policy through the Archive: polyglots and payloads by import (Part 10
files) and C-STORE (bare data sets), quarantine, release, strip, reject, and hostile sizes."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from stockade.archive import SERVICES, Archive, Peer
from stockade.audit.events import InstanceStored, QuarantineChanged, SecurityAlert
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.inspect import Kind
from stockade.errors import InvalidObject, LimitExceeded, Quarantined, RefusedByPolicy
from stockade.ingest import Origin
from stockade.security.policy import Action, Policy, parse_actions
from tests import polyglots
from tests.dicomfactory import bare, make_dataset, part10

IMPORT = Origin(via="import")
PEER = Peer("MODALITY", "127.0.0.1", None, SERVICES)


def _blob(archive: Archive, sop_uid: str) -> bytes:
    inst = archive.find_instance(sop_uid)
    assert inst is not None
    with archive.store.open(inst.blob_key) as fh:
        return fh.read()


def _dimse(archive: Archive, ds: Dataset, raw: bytes | None = None) -> object:
    return archive.store_dimse(
        bare(ds) if raw is None else raw,
        ExplicitVRLittleEndian,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        peer=PEER,
    )


def _alerts(audit: MemoryAuditSink) -> list[SecurityAlert]:
    return [e for e in audit.events if isinstance(e, SecurityAlert)]


@pytest.mark.parametrize("name", sorted(polyglots.PREAMBLES))
def test_polyglot_preambles_are_quarantined(
    archive: Archive, audit: MemoryAuditSink, name: str
) -> None:
    ds = make_dataset()
    data = part10(ds, preamble=polyglots.PREAMBLES[name])
    with pytest.raises(Quarantined, match=polyglots.PREAMBLE_KIND[name]):
        archive.store_file(data, IMPORT)
    assert archive.find_instance(ds.SOPInstanceUID) is None
    [entry] = archive.quarantined()
    assert entry.sop_instance_uid == ds.SOPInstanceUID
    assert [f["kind"] for f in entry.findings] == [polyglots.PREAMBLE_KIND[name]]
    assert archive.ingest.quarantine.read(entry.id) == data  # kept as received, evidence
    [alert] = _alerts(audit)
    assert (alert.finding, alert.action, alert.quarantine_id) == (
        polyglots.PREAMBLE_KIND[name],
        "quarantine",
        entry.id,
    )
    assert alert.study_uid == ds.StudyInstanceUID and alert.patient_id == "PID-1"


def _stow(archive: Archive, data: bytes) -> None:
    """Post one Part 10 file with STOW-RS; raise Quarantined as ingest would (the failure
    reason C004 and the text of the response carry it)."""
    from starlette.testclient import TestClient

    from stockade.web.app import create_app
    from tests.conftest import authed

    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    client = authed(TestClient(create_app(archive)), archive)
    response = client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
    )
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC004]
    raise Quarantined(failed["00091001"]["Value"][0])


@pytest.mark.parametrize("name", sorted(polyglots.PREAMBLES))
def test_polyglot_preambles_are_quarantined_by_stow(archive: Archive, name: str) -> None:
    data = part10(make_dataset(), preamble=polyglots.PREAMBLES[name])
    with pytest.raises(Quarantined, match=polyglots.PREAMBLE_KIND[name]):
        _stow(archive, data)
    assert archive.counts()["instances"] == 0
    [entry] = archive.quarantined()
    assert entry.via == "web" and archive.ingest.quarantine.read(entry.id) == data


@pytest.mark.parametrize("name", sorted(polyglots.DATASET_PAYLOADS))
@pytest.mark.parametrize("transport", ["import", "dimse", "web"])
def test_hidden_payloads_are_quarantined(
    archive: Archive, audit: MemoryAuditSink, name: str, transport: str
) -> None:
    build, kind = polyglots.DATASET_PAYLOADS[name]
    ds, raw = build()
    store: Callable[[], object] = {
        "import": lambda: archive.store_file(polyglots.as_file(ds, raw), IMPORT),
        "dimse": lambda: _dimse(archive, ds, raw),
        "web": lambda: _stow(archive, polyglots.as_file(ds, raw)),
    }[transport]
    with pytest.raises(Quarantined, match=kind):
        store()
    assert archive.counts()["instances"] == 0
    [entry] = archive.quarantined()
    assert kind in {f["kind"] for f in entry.findings}
    assert entry.via == transport
    assert kind in {a.finding for a in _alerts(audit)}


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (polyglots.zip_appended, "polyglot-trailer"),
        (polyglots.meta_elf, "executable-payload"),
    ],
)
def test_file_level_payloads(archive: Archive, data: Callable[[], bytes], kind: str) -> None:
    with pytest.raises(Quarantined, match=kind):
        archive.store_file(data(), IMPORT)
    assert archive.counts()["instances"] == 0


def test_tiff_preamble_is_benign_and_zeroed(archive: Archive, audit: MemoryAuditSink) -> None:
    ds = make_dataset()
    result = archive.store_file(part10(ds, preamble=polyglots.TIFF_PREAMBLE), IMPORT)
    assert result.outcome.value == "stored"
    assert _blob(archive, ds.SOPInstanceUID)[:128] == bytes(128)
    assert _alerts(audit) == []


def test_tiff_preamble_kept_by_the_whole_slide_opt_in(archive: Archive) -> None:
    import dataclasses

    archive.ingest.settings = dataclasses.replace(archive.settings, keep_tiff_preamble=True)
    ds = make_dataset()
    archive.store_file(part10(ds, preamble=polyglots.TIFF_PREAMBLE), IMPORT)
    assert _blob(archive, ds.SOPInstanceUID)[:128] == polyglots.TIFF_PREAMBLE
    other = make_dataset()
    with pytest.raises(Quarantined):  # the opt-in keeps TIFF headers only
        archive.store_file(part10(other, preamble=polyglots.PREAMBLES["pe"]), IMPORT)


def test_harmless_documents_and_vendor_xml_are_stored(
    archive: Archive, audit: MemoryAuditSink
) -> None:
    pdf = polyglots.harmless_pdf()
    archive.store_file(part10(pdf), IMPORT)
    vendor = make_dataset()
    vendor.add_new(0x00190010, "LO", "ACME XML")
    vendor.add_new(0x00191001, "OB", b'<?xml version="1.0"?><acme mode="fast"/>\n')
    result = archive.store_file(part10(vendor), IMPORT)
    assert result.outcome.value == "stored" and not result.discarded
    assert b"acme mode" in _blob(archive, vendor.SOPInstanceUID)  # stored unchanged
    [alert] = _alerts(audit)  # the default for markup in a private value: alert only
    assert (alert.finding, alert.action, alert.where) == ("markup-payload", "alert", "(0019,1001)")


def test_strip_cuts_top_level_elements_and_quarantines_nested_ones(
    archive: Archive, audit: MemoryAuditSink
) -> None:
    archive.ingest.policy = Policy({Kind.EXECUTABLE_PAYLOAD: Action.STRIP})
    ds = polyglots.private_pe()
    result = _dimse(archive, ds)
    assert getattr(result, "discarded", False)
    blob = _blob(archive, ds.SOPInstanceUID)
    assert b"This program cannot be run" not in blob
    assert b"ACME 1.0" in blob  # only the offending element went
    assert archive.verify().ok
    nested = polyglots.nested_pe()
    with pytest.raises(Quarantined):
        _dimse(archive, nested)
    assert [a.action for a in _alerts(audit)] == ["strip", "quarantine"]


def test_reject_keeps_nothing(archive: Archive, audit: MemoryAuditSink) -> None:
    archive.ingest.policy = Policy(parse_actions("executable-payload=reject"))
    ds = polyglots.padding_pe()
    with pytest.raises(RefusedByPolicy, match="executable-payload"):
        archive.store_file(part10(ds), IMPORT)
    assert archive.quarantined() == [] and archive.counts()["instances"] == 0
    assert {a.finding: a.action for a in _alerts(audit)} == {
        "executable-payload": "reject",
        "trailing-padding": "strip",
    }


def test_release_stores_with_a_zero_preamble_and_delete_forgets(
    archive: Archive, audit: MemoryAuditSink
) -> None:
    from stockade.audit.events import Actor

    first, second = make_dataset(), make_dataset()
    for ds in (first, second):
        with pytest.raises(Quarantined):
            archive.store_file(part10(ds, preamble=polyglots.PREAMBLES["pe"]), IMPORT)
    by_uid = {e.sop_instance_uid: e.id for e in archive.quarantined()}
    admin = Actor(user="admin", via="cli")
    result = archive.release(by_uid[first.SOPInstanceUID], actor=admin)
    assert result.outcome.value == "stored"
    blob = _blob(archive, first.SOPInstanceUID)
    assert blob[:128] == bytes(128) and b"This program" not in blob
    archive.discard_quarantined(by_uid[second.SOPInstanceUID], actor=admin)
    assert archive.quarantined() == []
    changes = [e for e in audit.events if isinstance(e, QuarantineChanged)]
    assert [(c.action, c.sop_instance_uid, c.actor.user) for c in changes] == [
        ("release", first.SOPInstanceUID, "admin"),
        ("delete", second.SOPInstanceUID, "admin"),
    ]
    assert sum(isinstance(e, InstanceStored) for e in audit.events) == 1


def test_the_same_bytes_are_quarantined_once(archive: Archive) -> None:
    data = part10(make_dataset(), preamble=polyglots.PREAMBLES["elf"])
    for _ in range(3):
        with pytest.raises(Quarantined):
            archive.store_file(data, IMPORT)
    [entry] = archive.quarantined()
    assert entry.times == 3


# -- hostile sizes (SR-13, SR-14) ------------------------------------------------------------


def _peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_lying_length_is_refused_without_allocating(archive: Archive) -> None:
    ds = make_dataset()
    data = bytearray(part10(ds))
    # Patient ID (0010,0020) LO: point its 2-byte length at 0xFFF0, then a private OB at
    # 0xFFFFFFF0 in a 1 KB file.
    lie = b"\x09\x00\x10\x10OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + b"x" * 32
    data = part10(make_dataset())
    pos = data.index(b"\x10\x00\x10\x00")  # Patient's Name: insert before group 0010
    hostile = data[:pos] + lie

    def store() -> None:
        with pytest.raises(InvalidObject, match="4294967280 bytes but only"):
            archive.store_file(hostile, IMPORT)

    assert _peak(store) < 4 * 2**20
    assert archive.counts()["instances"] == 0


def nested_sequences(depth: int) -> tuple[Dataset, bytes]:
    """A data set (Explicit VR LE) ending with *depth* nested Content Sequences of undefined
    length, encoded by hand (writers recurse and would overflow the stack first)."""
    ds = make_dataset()
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    for keyword in ("PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    del ds.PixelData
    opener = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closer = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return ds, bare(ds) + opener * depth + closer * depth


def test_ten_thousand_nested_sequences_are_refused(archive: Archive) -> None:
    ds, raw = nested_sequences(10_000)

    def store() -> None:
        with pytest.raises(LimitExceeded, match="nested deeper"):
            archive.store_dimse(
                raw,
                ExplicitVRLittleEndian,
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.SOPInstanceUID,
                peer=PEER,
            )

    assert _peak(store) < 4 * 2**20
    shallow_ds, shallow = nested_sequences(5)  # the same shape, shallow: stored
    archive.store_dimse(
        shallow,
        ExplicitVRLittleEndian,
        sop_class_uid=shallow_ds.SOPClassUID,
        sop_instance_uid=shallow_ds.SOPInstanceUID,
        peer=PEER,
    )
    assert archive.counts()["instances"] == 1


@pytest.mark.parametrize("encapsulated", [False, True])
def test_huge_pixel_description_is_refused_before_anything_decodes(
    archive: Archive, encapsulated: bool
) -> None:
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"\x00\x00\xff\xff" * 2 + bytes(40)
    ds = make_dataset(Rows=65535, Columns=65535, NumberOfFrames=10000)
    if encapsulated:
        ds.PixelData = encapsulate([siz])
        data = part10(ds, ts=JPEG2000Lossless)
    else:
        ds.PixelData = bytes(64)
        data = part10(ds)

    def store() -> None:
        with pytest.raises(LimitExceeded, match="over max_decoded_size"):
            archive.store_file(data, IMPORT)

    assert _peak(store) < 4 * 2**20
    assert archive.counts()["instances"] == 0


def test_short_native_pixel_data_is_refused(archive: Archive) -> None:
    ds = make_dataset(Rows=64, Columns=64, PixelData=bytes(100))
    with pytest.raises(InvalidObject, match="native Pixel Data"):
        archive.store_file(part10(ds), IMPORT)


def test_policy_setting_is_validated() -> None:
    assert parse_actions("trailing-data=reject, markup-payload=quarantine") == {
        Kind.TRAILING_DATA: Action.REJECT,
        Kind.MARKUP_PAYLOAD: Action.QUARANTINE,
    }
    for bad in ("nonsense=strip", "trailing-data=delete", "trailing-data", "a=b,a=b"):
        with pytest.raises(ValueError):
            parse_actions(bad)
