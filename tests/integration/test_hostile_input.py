"""Hostile input against a running server, through real peers (threat model SR-8 to SR-14,
SR-20): polyglots and hidden payloads by DCMTK storescu (C-STORE), dicomweb-client (STOW-RS)
and ``stockade import``; then nothing served carries a non-zero preamble or the payload.
Hostile sizes over the wire are refused with a status or an abort, the server's memory stays
under a stated bound, and the next request is served."""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests import polyglots
from tests.dicomfactory import bare, make_dataset, part10
from tests.test_screening import nested_sequences

from .conftest import (
    StockadeServer,
    echoscu,
    raw_associate,
    recv_pdu,
    require_dcmtk,
    store_responses,
    storescu,
)

PAYLOAD_MARKERS = (b"This program cannot be run", b"\x7fELF\x02", b"PK\x03\x04", b"/JavaScript")


def _high_water_marks(server: StockadeServer) -> dict[int, int]:
    """VmHWM (peak resident memory, bytes) of each process of the server."""
    marks = {}
    for pid in server.group_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if m := re.search(r"^VmHWM:\s+(\d+) kB", status, re.M):
            marks[pid] = int(m.group(1)) * 1024
    return marks


def _served_files(server: StockadeServer) -> list[bytes]:
    """Every stored instance, as WADO-RS serves it (study-level retrieves)."""
    client = server.web()
    out = []
    for study in client.search_for_studies():
        uid = study["0020000D"]["Value"][0]
        response = server.get(
            f"{server.dicomweb}/studies/{uid}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
            timeout=60,
        )
        assert response.status_code == 200
        boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
        for part in response.content.split(b"--" + boundary.encode())[1:-1]:
            out.append(part.split(b"\r\n\r\n", 1)[1][:-2])
    return out


def test_polyglots_by_every_transport_are_held_and_nothing_served_carries_them(
    make_server: Callable[..., StockadeServer], tmp_path: Path
) -> None:
    require_dcmtk("storescu", "echoscu")
    server = make_server()
    server.start()
    clean = make_dataset()

    # C-STORE: DCMTK sends the data sets (no preamble on the wire; DCMTK itself drops Data
    # Set Trailing Padding, so the padding carrier is tested with a raw peer in
    # tests/test_screening.py)
    files = tmp_path / "dimse"
    files.mkdir()
    sent: dict[str, str] = {}
    for name in ("private-pe", "nested-pe", "active-pdf", "hidden-active-pdf", "cda-entity"):
        build, kind = polyglots.DATASET_PAYLOADS[name]
        ds, raw = build()
        path = files / f"{name}.dcm"
        path.write_bytes(polyglots.as_file(ds, raw))
        sent[str(path)] = kind
    (files / "clean.dcm").write_bytes(part10(clean))
    result = storescu(server.port, [files], "+sd", "-xs")
    responses = store_responses(result.stdout)
    for path in sent:
        # C004 (quarantined) is one of the Cannot Understand statuses (PS3.4 B.2.3)
        assert responses[path] == "Error: CannotUnderstand", (path, result.stdout[-3000:])
    assert "Success" in responses[str(files / "clean.dcm")]

    # STOW-RS: dicomweb-client posts Part 10 files, preambles included
    client = server.web()
    stow = []
    for name in ("pe", "elf", "html"):
        data = part10(make_dataset(), preamble=polyglots.PREAMBLES[name])
        stow.append(pydicom.dcmread(io.BytesIO(data)))
        assert stow[-1].preamble == polyglots.PREAMBLES[name]
    answer = client.store_instances([*stow, pydicom.dcmread(io.BytesIO(part10(make_dataset())))])
    failed = answer.FailedSOPSequence
    assert sorted(item.ReferencedSOPInstanceUID for item in failed) == sorted(
        ds.SOPInstanceUID for ds in stow
    )
    assert {item.FailureReason for item in failed} == {0xC004}
    assert len(answer.ReferencedSOPSequence) == 1

    # import: a folder with a ZIP-appended file and ELF in the File Meta
    folder = tmp_path / "cd"
    folder.mkdir()
    (folder / "zip.dcm").write_bytes(polyglots.zip_appended())
    (folder / "meta.dcm").write_bytes(polyglots.meta_elf())
    (folder / "macho.dcm").write_bytes(
        part10(make_dataset(), preamble=polyglots.PREAMBLES["macho"])
    )
    imported = server.cli("import", str(folder), "--quiet")
    assert imported.returncode == 1 and imported.stdout.count("stored 0") == 1
    assert imported.stderr.count("held in quarantine") == 3

    listing = server.cli("quarantine", "list")
    assert listing.returncode == 0
    assert "11 quarantined object(s)" in listing.stdout
    vias = re.findall(r"^[0-9a-f]{32}\s+\S+\s+(\w+)", listing.stdout, re.M)
    assert sorted(set(vias)) == ["dimse", "import", "web"]

    served = _served_files(server)
    assert len(served) == 2  # the clean C-STORE and the clean STOW instance
    for body in served:
        assert body[:128] == bytes(128) and body[128:132] == b"DICM"
        assert not any(marker in body for marker in PAYLOAD_MARKERS)

    # an administrator releases one; it is served with a zero preamble
    qid = re.search(r"^([0-9a-f]{32}).*\bimport\b", listing.stdout, re.M)
    assert qid
    show = server.cli("quarantine", "show", qid.group(1))
    assert "finding:" in show.stdout
    released = server.cli("quarantine", "release", qid.group(1))
    assert released.returncode == 0, released.stderr
    served = _served_files(server)
    assert len(served) == 3
    assert all(body[:128] == bytes(128) for body in served)
    assert "10 quarantined object(s)" in server.cli("quarantine", "list").stdout
    assert server.cli("quarantine", "show", "../../etc/passwd").returncode == 1
    assert server.verify().returncode == 0


def _c_store_raw(
    port: int, sop_uid: str, dataset: bytes, transfer_syntax: str, sop_class: str = CTImageStorage
) -> tuple[int, str]:
    """Send one C-STORE with *dataset* as its raw data set; return (status, error comment)."""
    sock = raw_associate(port, sop_class, transfer_syntax, "HOSTILE")
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    for item in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(item)
        sock.sendall(pdu.encode())
    pdu_type, body = recv_pdu(sock)
    assert pdu_type == 0x04, f"expected P-DATA-TF, got {pdu_type:#04x}"
    command = body[4 + 2 :]  # PDV item length, context id, message control header
    status = comment = None
    pos = 0
    while pos + 8 <= len(command):  # Implicit VR Little Endian command set (PS3.7 6.3.1)
        group, elem, length = struct.unpack_from("<HHL", command, pos)
        value = command[pos + 8 : pos + 8 + length]
        if (group, elem) == (0x0000, 0x0900):
            status = struct.unpack("<H", value)[0]
        if (group, elem) == (0x0000, 0x0902):
            comment = value.decode("ascii", "replace").strip()
        pos += 8 + length
    sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
    sock.close()
    assert status is not None
    return status, comment or ""


#: Zeros are compressed once, 64 MiB of them; repeating those blocks makes the bombs.
ZERO_RUN = 64 * 2**20


def _zero_blocks() -> tuple[bytes, bytes]:
    """Deflate blocks of :data:`ZERO_RUN` zeros, and an empty final block.

    The blocks are compressed on their own and end in a full flush (byte-aligned, nothing
    referred to before them), so each copy put one after another inflates to another run of
    zeros: compressing gigabytes of zeros for every test run took most of its time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    blocks = compressor.compress(bytes(ZERO_RUN)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return blocks, compressor.flush()


def _deflate_bomb(gigabytes: int) -> bytes:
    """A deflated data set: a valid start, then zeros that inflate to *gigabytes* GiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = bare(make_dataset())[:200]
    start = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    zeros, final = _zero_blocks()
    return start + zeros * (gigabytes * 2**30 // ZERO_RUN) + final


def _gzip_bomb(size: int) -> bytes:
    """A gzip member (RFC 1952) of *size* zeros, a multiple of :data:`ZERO_RUN`, with its
    CRC-32 and length."""
    zeros, final = _zero_blocks()
    runs = size // ZERO_RUN
    crc = 0
    run = bytes(ZERO_RUN)
    for _ in range(runs):
        crc = zlib.crc32(run, crc)
    header = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x02\xff"  # deflate, mtime 0, best, OS unknown
    trailer = struct.pack("<LL", crc, (runs * ZERO_RUN) & 0xFFFFFFFF)
    return header + zeros * runs + final + trailer


@pytest.mark.timeout(600)
def test_hostile_sizes_are_refused_with_memory_bounded(
    make_server: Callable[..., StockadeServer],
) -> None:
    require_dcmtk("echoscu")
    server = make_server(settings={"STOCKADE_HTTP_MAX_BODY_SIZE": str(256 * 2**20)})
    server.start()
    kept = make_dataset()
    assert (
        _c_store_raw(server.port, kept.SOPInstanceUID, bare(kept), ExplicitVRLittleEndian)[0] == 0
    )
    baseline = _high_water_marks(server)

    # a declared length of 0xFFFFFFF0 in a 1 KB data set
    liar = make_dataset()
    raw = bare(liar)
    at = raw.index(b"\x10\x00\x10\x00PN")
    lie = raw[:at] + b"\x09\x00\x10\x10OB\x00\x00" + struct.pack("<L", 0xFFFFFFF0) + bytes(800)
    status, comment = _c_store_raw(server.port, liar.SOPInstanceUID, lie, ExplicitVRLittleEndian)
    # (the Error Comment is an LO: 64 characters of the reason)
    assert (status, "(0009,1010)" in comment) == (0xC000, True), comment

    # 10,000 nested sequences
    deep, raw = nested_sequences(10_000)
    status, comment = _c_store_raw(server.port, deep.SOPInstanceUID, raw, ExplicitVRLittleEndian)
    assert status == 0xA700 and "nested deeper" in comment, comment

    # Rows = Columns = 65535 with 10,000 frames, in a tiny JPEG 2000 data set
    huge = make_dataset(Rows=65535, Columns=65535, NumberOfFrames=10000)
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"\x00\x00\xff\xff" * 2 + bytes(40)
    huge.PixelData = encapsulate([siz])
    status, comment = _c_store_raw(server.port, huge.SOPInstanceUID, bare(huge), JPEG2000Lossless)
    assert status == 0xA700 and "pixel data would decode" in comment, comment

    # a deflated data set that inflates to 4 GiB
    bomb = _deflate_bomb(4)
    assert len(bomb) < 8 * 2**20
    status, comment = _c_store_raw(
        server.port, make_dataset().SOPInstanceUID, bomb, DeflatedExplicitVRLittleEndian
    )
    assert status == 0xA700 and "inflates past" in comment, comment

    # a P-DATA-TF PDU that claims 4 GB: the association is aborted
    sock = raw_associate(server.port, CTImageStorage, ExplicitVRLittleEndian, "HOSTILE")
    sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + bytes(1024))
    pdu_type, _ = recv_pdu(sock)
    assert pdu_type == 0x07  # A-ABORT
    sock.close()

    # STOW-RS: a gzip body that inflates to 1 GiB, past http_max_body_size (256 MiB)
    body = _gzip_bomb(2**30)
    response = server.post(
        f"{server.dicomweb}/studies",
        content=body,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            "Content-Encoding": "gzip",
        },
        timeout=120,
    )
    assert response.status_code == 413 and "http_max_body_size" in response.text
    response = server.post(
        f"{server.dicomweb}/studies",
        content=b"x",
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            "Content-Encoding": "br",
        },
        timeout=30,
    )
    assert response.status_code == 415

    # memory: the bound is 1.5 x max_inflated_size (256 MiB by default) per process: the
    # deflate bomb is inflated into one growing buffer up to that cap (measured: ~316 MiB);
    # everything else stays within a few MiB
    after = _high_water_marks(server)
    growth = {pid: after[pid] - baseline.get(pid, 0) for pid in after}
    assert max(growth.values()) < 384 * 2**20, growth
    assert sorted(growth.values())[-2] < 32 * 2**20, growth
    print(f"peak growth per process (MiB): {[round(g / 2**20) for g in growth.values()]}")

    # the server goes on: echo, a store, and what was stored is intact
    assert echoscu(server.port).returncode == 0
    fresh = make_dataset()
    assert (
        _c_store_raw(server.port, fresh.SOPInstanceUID, bare(fresh), ExplicitVRLittleEndian)[0] == 0
    )
    assert server.count() == 2
    assert server.verify().returncode == 0
    stored = Dataset()
    stored.update(pydicom.dcmread(io.BytesIO(part10(kept))))
    assert stored.SOPInstanceUID == kept.SOPInstanceUID


def test_associations_per_peer_are_capped(make_server: Callable[..., StockadeServer]) -> None:
    require_dcmtk("echoscu")
    server = make_server(settings={"STOCKADE_MAX_ASSOCIATIONS_PER_PEER": "2"})
    server.start()
    held = [
        raw_associate(server.port, CTImageStorage, ExplicitVRLittleEndian, f"HOLD{i}")
        for i in range(2)
    ]
    third = echoscu(server.port)
    assert third.returncode != 0
    assert "Rejected Transient" in third.stdout and "Local Limit Exceeded" in third.stdout
    for sock in held:
        sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
        assert recv_pdu(sock)[0] == 0x06  # A-RELEASE-RP
        sock.close()
    assert echoscu(server.port).returncode == 0  # the slots are free again
