"""WADO-RS (PS3.18 10.4) through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import io
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid
from starlette.exceptions import StarletteDeprecationWarning

from stockade.archive import Archive
from stockade.audit.events import Actor, InstancesRetrieved
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.part10 import read_part10
from stockade.ingest import Origin
from stockade.web import metadata
from stockade.web.app import create_app
from stockade.web.wado import dicom_candidates, parse_accept
from tests.conftest import authed, bearer
from tests.dicomfactory import make_dataset, part10

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its test client; httpx is what is installed.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
J2K = "1.2.840.10008.1.2.4.90"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'
OCTET_ACCEPT = 'multipart/related; type="application/octet-stream"'


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def store(archive: Archive, data: bytes) -> pydicom.Dataset:
    archive.store_file(data, Origin(via="import"))
    return pydicom.dcmread(io.BytesIO(data))


def store_ds(archive: Archive, **overrides: Any) -> tuple[pydicom.Dataset, bytes]:
    data = part10(make_dataset(**overrides))
    return store(archive, data), data


def store_testfile(archive: Archive, name: str) -> tuple[pydicom.Dataset, bytes]:
    data = Path(str(get_testdata_file(name))).read_bytes()
    return store(archive, data), data


def url(ds: pydicom.Dataset, level: str = "instance") -> str:
    out = f"/dicomweb/studies/{ds.StudyInstanceUID}"
    if level in ("series", "instance"):
        out += f"/series/{ds.SeriesInstanceUID}"
    if level == "instance":
        out += f"/instances/{ds.SOPInstanceUID}"
    return out


def parts(response: Any) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related answer (RFC 2046 5.1) into (headers, body) pairs."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related")
    boundary = re.search(r"boundary=([^;\s]+)", content_type)
    assert boundary
    delimiter = b"--" + boundary.group(1).strip('"').encode()
    body = response.content
    assert body.startswith(delimiter)
    pieces = body[len(delimiter) :].split(b"\r\n" + delimiter)
    assert pieces[-1] in (b"--", b"--\r\n")
    out = []
    for piece in pieces[:-1]:
        assert piece.startswith(b"\r\n")
        head, _, data = piece[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        assert int(headers["content-length"]) == len(data)
        out.append((headers, data))
    return out


def email_parts(response: Any) -> list[bytes]:
    """The same answer split by the standard library's MIME parser."""
    raw = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart()
    return [part.get_payload(decode=True) for part in message.iter_parts()]


def dataset_of(data: bytes) -> bytes:
    """The data set of a Part 10 file (after its File Meta, which Stockade rewrites)."""
    return data[read_part10(data).dataset_offset :]


def retrievals(audit: MemoryAuditSink) -> list[InstancesRetrieved]:
    return [e for e in audit.events if isinstance(e, InstancesRetrieved)]


# -- Accept parsing --------------------------------------------------------------------------


def test_accept_ranges_are_ordered_by_q_then_position() -> None:
    ranges = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90;'
        ' q=0.5, multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2,'
        " text/html; q=0, */*; q=0.1"
    )
    assert [(r.media, r.params.get("transfer-syntax"), r.q) for r in ranges] == [
        ("multipart/related", IMPLICIT, 1.0),
        ("multipart/related", J2K, 0.5),
        ("*/*", None, 0.1),
    ]
    assert dicom_candidates(ranges) == [IMPLICIT, J2K, EXPLICIT]
    assert dicom_candidates(parse_accept(None)) == [EXPLICIT]
    assert dicom_candidates(parse_accept(f"{DICOM_ACCEPT}; transfer-syntax=*")) == ["*"]


# -- instances, series, studies --------------------------------------------------------------


def test_study_series_and_instance_retrieve(
    client: TestClient, archive: Archive, audit: MemoryAuditSink
) -> None:
    study, series = generate_uid(), generate_uid()
    sent = {}
    for number in (2, 1, 3):
        ds, data = store_ds(
            archive, StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=number
        )
        sent[str(ds.SOPInstanceUID)] = data
    other, other_data = store_ds(archive, StudyInstanceUID=study)
    sent[str(other.SOPInstanceUID)] = other_data

    r = client.get(f"/dicomweb/studies/{study}", headers={"Accept": DICOM_ACCEPT})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert r.headers["content-disposition"] == "attachment"
    assert r.headers["x-content-type-options"] == "nosniff"
    got = parts(r)
    assert len(got) == 4
    assert email_parts(r) == [data for _, data in got]
    for headers, data in got:
        assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
        assert data[:132] == bytes(128) + b"DICM"
        ds = pydicom.dcmread(io.BytesIO(data))
        original = sent[str(ds.SOPInstanceUID)]  # stored Explicit VR LE: sent as stored
        assert dataset_of(data) == dataset_of(original)
    event = retrievals(audit)[-1]
    assert (event.service, event.located, event.completed, event.outcome) == (
        "wado",
        4,
        4,
        "success",
    )

    first = pydicom.dcmread(io.BytesIO(got[0][1]))
    r = client.get(url(first, "series"))
    numbers = [pydicom.dcmread(io.BytesIO(d)).InstanceNumber for _, d in parts(r)]
    assert numbers == [1, 2, 3]
    r = client.get(url(first))
    assert [d for _, d in parts(r)] == [got[0][1]]


def test_not_found_and_bad_uids(client: TestClient, archive: Archive) -> None:
    ds, _ = store_ds(archive)
    assert client.get(f"/dicomweb/studies/{generate_uid()}").status_code == 404
    r = client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{generate_uid()}")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not-found"
    for bad in ("1.02.3", "abc", "1." + "2" * 70):
        r = client.get(f"/dicomweb/studies/{bad}")
        assert r.status_code == 400, bad
        assert r.json()["status"] == 400
    r = client.get(
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
    )
    assert r.status_code == 200
    assert client.get(f"/dicomweb/studies/{generate_uid()}/metadata").status_code == 404


def test_transfer_syntax_negotiation(client: TestClient, archive: Archive) -> None:
    ds, data = store_testfile(archive, "MR_small_jp2klossless.dcm")
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array

    def get(accept: str | None) -> tuple[int, list[tuple[dict[str, str], bytes]]]:
        headers = {"Accept": accept} if accept is not None else {}
        r = client.get(url(ds, "study"), headers=headers)
        return r.status_code, parts(r) if r.status_code == 200 else []

    def check(got: list[tuple[dict[str, str], bytes]], ts: str) -> None:
        [(headers, body)] = got
        assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
        assert body[:132] == bytes(128) + b"DICM"
        back = pydicom.dcmread(io.BytesIO(body))
        assert back.file_meta.TransferSyntaxUID == ts
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(back.pixel_array, expected)

    for accept, ts in [
        (None, EXPLICIT),  # PS3.18 default
        ("*/*", EXPLICIT),
        (DICOM_ACCEPT, EXPLICIT),
        (f"{DICOM_ACCEPT}; transfer-syntax=*", J2K),
        (f"{DICOM_ACCEPT}; transfer-syntax={IMPLICIT}", IMPLICIT),
        (f'{DICOM_ACCEPT}; transfer-syntax="{J2K}"', J2K),
        (
            f"{DICOM_ACCEPT}; transfer-syntax={J2K}; q=0.4, "
            f"{DICOM_ACCEPT}; transfer-syntax={IMPLICIT}; q=0.8",
            IMPLICIT,
        ),
        # not producible first (a lossy target), then acceptable
        (
            f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.4.50, {DICOM_ACCEPT}; q=0.5",
            EXPLICIT,
        ),
    ]:
        status, got = get(accept)
        assert status == 200, accept
        check(got, ts)
    stored = get(f"{DICOM_ACCEPT}; transfer-syntax=*")[1][0][1]
    assert stored[:128] == bytes(128)
    # the stored data set, as it came, less its Data Set Trailing Padding (FFFC,FFFC): the
    # padding of this file is not blank, which the payload policy strips (docs/security.md)
    kept = data[: data.rindex(b"\xfc\xff\xfc\xff")]
    assert stored[132:].endswith(kept[-1024:])

    for accept in (
        "application/json",
        'multipart/related; type="application/octet-stream"',
        f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.4.50",  # lossy: never produced
        f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.2",  # big endian: never produced
    ):
        r = client.get(url(ds, "study"), headers={"Accept": accept})
        assert r.status_code == 406, accept
        assert r.headers["content-type"] == "application/problem+json"


def test_406_when_the_first_instance_cannot_be_produced(
    client: TestClient, archive: Archive, audit: MemoryAuditSink
) -> None:
    """Stored JPEG Baseline (lossy) never becomes JPEG 2000 Lossless; native pixels can."""
    native, _ = store_ds(archive, Rows=32, Columns=32, PixelData=bytes(2048), InstanceNumber=1)
    lossy, _ = store_testfile(archive, "SC_rgb_jpeg_dcmtk.dcm")
    r = client.get(
        url(lossy, "study"), headers={"Accept": f"{DICOM_ACCEPT}; transfer-syntax={J2K}"}
    )
    assert r.status_code == 406
    r = client.get(
        url(native, "study"), headers={"Accept": f"{DICOM_ACCEPT}; transfer-syntax={J2K}"}
    )
    assert r.status_code == 200
    [(headers, body)] = parts(r)
    assert headers["content-type"].endswith(J2K)
    assert body[:128] == bytes(128)
    refused, sent = retrievals(audit)[-2:]
    assert (refused.outcome, refused.failed, sent.outcome, sent.completed) == (
        "failure",
        1,
        "success",
        1,
    )


def test_metadata_equals_pydicom_json_without_bulk_data(
    client: TestClient, archive: Archive
) -> None:
    item = pydicom.Dataset()
    item.CodeValue = "T-D0050"
    item.add_new(0x00291010, "OB", bytes(range(256)) * 8)  # 2 KiB inside a sequence item
    ds, data = store_ds(
        archive,
        PatientName="Doe^Jane=ドウ^ジェーン",
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
        AnatomicRegionSequence=pydicom.Sequence([item]),
    )
    stored = pydicom.dcmread(io.BytesIO(data))
    stored.add_new(0x00091010, "OB", b"x" * 10)  # not stored; only to show small stays inline
    small, _ = store_ds(
        archive,
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        InstanceNumber=2,
    )
    r = client.get(url(ds, "instance") + "/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    [got] = r.json()
    expected = pydicom.dcmread(io.BytesIO(data)).to_json_dict()
    pixel = got.pop("7FE00010")
    assert pixel["vr"] in ("OB", "OW")
    base = f"http://testserver/dicomweb{url(ds)[len('/dicomweb') :]}/bulkdata/"
    assert pixel["BulkDataURI"] == base + "7FE00010"
    expected.pop("7FE00010")
    nested = got["00082218"]["Value"][0].pop("00291010")
    assert nested == {"vr": "OB", "BulkDataURI": base + "00082218/0/00291010"}
    expected["00082218"]["Value"][0].pop("00291010")
    assert got == expected

    # the bulk data behind the URIs
    r = client.get(pixel["BulkDataURI"], headers={"Accept": OCTET_ACCEPT})
    assert r.status_code == 200
    [(headers, value)] = parts(r)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    assert value == stored.PixelData
    r = client.get(nested["BulkDataURI"])
    assert [v for _, v in parts(r)] == [bytes(range(256)) * 8]

    # series and study level: both instances, in instance order
    for level in ("series", "study"):
        r = client.get(url(ds, level) + "/metadata")
        objs = r.json()
        assert [o["00080018"]["Value"][0] for o in objs] == [
            ds.SOPInstanceUID,
            small.SOPInstanceUID,
        ]


def test_metadata_cache_is_used_and_invalidated(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, _ = store_ds(archive, InstanceNumber=1)
    calls: list[int] = []
    real = metadata.build

    def counting(retrieval: Any, instances: list[Any]) -> list[bytes | None]:
        calls.append(len(instances))
        return real(retrieval, instances)

    monkeypatch.setattr(metadata, "build", counting)
    series_url = url(ds, "series") + "/metadata"
    assert len(client.get(series_url).json()) == 1
    assert calls == [1]
    cache = list((archive.settings.data_dir / "cache" / "metadata").rglob("*.json"))
    assert len(cache) == 1
    assert str(ds.SeriesInstanceUID) not in str(cache[0])  # named by a hash, not the UID
    assert len(client.get(series_url).json()) == 1
    assert len(client.get(url(ds, "study") + "/metadata").json()) == 1
    assert calls == [1]  # served from the cache

    store_ds(
        archive,
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        InstanceNumber=2,
    )
    grown = client.get(series_url).content
    assert len(json.loads(grown)) == 2
    assert calls == [1, 1]  # only the new instance was read: the other came from the cache
    assert client.get(series_url).content == grown
    assert calls == [1, 1]
    # a damaged cache file is only a miss, and a full build gives the same answer
    cache[0].write_bytes(b"garbage")
    assert client.get(series_url).content == grown
    assert calls == [1, 1, 2]
    r = client.get(series_url, headers={"Accept": "application/dicom"})
    assert r.status_code == 406


def test_metadata_cache_reuses_an_instance_only_with_the_same_hash(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = store_ds(archive, InstanceNumber=1)
    second, _ = store_ds(
        archive,
        StudyInstanceUID=first.StudyInstanceUID,
        SeriesInstanceUID=first.SeriesInstanceUID,
        InstanceNumber=2,
    )
    series_url = url(first, "series") + "/metadata"
    full = client.get(series_url).content
    [path] = (archive.settings.data_dir / "cache" / "metadata").rglob("*.json")
    stamp, index, body = path.read_bytes().split(b"\n", 2)
    assert stamp.startswith(b"2-")  # two instances
    assert body == full.replace(b"http://testserver/dicomweb/studies/", b"/studies/")
    held = archive.find_instance(str(first.SOPInstanceUID))
    assert held is not None and held.sha256.encode() in index

    built: list[str] = []
    real = metadata.build

    def counting(retrieval: Any, instances: list[Any]) -> list[bytes | None]:
        built.extend(i.sop_instance_uid for i in instances)
        return real(retrieval, instances)

    monkeypatch.setattr(metadata, "build", counting)
    # the file claims another content for the first instance: it is read again, the
    # second is taken from the file
    path.write_bytes(b"stale\n" + index.replace(held.sha256.encode(), b"0" * 64) + b"\n" + body)
    assert client.get(series_url).content == full
    assert built == [first.SOPInstanceUID]
    # lengths that do not describe the body: nothing is taken from the file
    entries = index.split(b",")
    uid, sha, length = entries[0].split(b" ")
    entries[0] = b" ".join((uid, sha, str(int(length) + 1).encode()))
    path.write_bytes(b"stale\n" + b",".join(entries) + b"\n" + body)
    built.clear()
    assert client.get(series_url).content == full
    assert built == [first.SOPInstanceUID, second.SOPInstanceUID]
    # deleting an instance removes the series' cache (no metadata of it stays on disk)
    archive.delete(
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        str(second.SOPInstanceUID),
        actor=Actor(via="internal"),
    )
    assert not path.exists()
    built.clear()
    [only] = client.get(series_url).json()
    assert only["00080018"]["Value"] == [first.SOPInstanceUID]
    assert built == [first.SOPInstanceUID]


def test_frames_of_jpeg2000_decoded_and_as_stored(client: TestClient, archive: Archive) -> None:
    ds, data = store_testfile(archive, "MR_small_jp2klossless.dcm")
    source = pydicom.dcmread(io.BytesIO(data))
    frames_url = url(ds) + "/frames/1"
    r = client.get(frames_url, headers={"Accept": f"{OCTET_ACCEPT}; transfer-syntax={EXPLICIT}"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    [(headers, frame)] = parts(r)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    expected = source.pixel_array
    assert np.array_equal(
        np.frombuffer(frame, dtype=expected.dtype).reshape(expected.shape), expected
    )
    assert [d for _, d in parts(client.get(frames_url))] == [frame]  # default: uncompressed

    r = client.get(frames_url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 200
    [(headers, compressed)] = parts(r)
    assert headers["content-type"] == f"image/jp2; transfer-syntax={J2K}"
    assert compressed == get_frame(source.PixelData, 0, number_of_frames=1)
    r = client.get(frames_url, headers={"Accept": 'multipart/related; type="image/jls"'})
    assert r.status_code == 406


def test_frames_of_a_multiframe_native_instance(client: TestClient, archive: Archive) -> None:
    frames = [bytes([n]) * 32 for n in range(1, 4)]
    ds, _ = store_ds(archive, NumberOfFrames=3, PixelData=b"".join(frames))
    r = client.get(url(ds) + "/frames/3,1", headers={"Accept": OCTET_ACCEPT})
    assert r.status_code == 200
    assert [d for _, d in parts(r)] == [frames[2], frames[0]]
    assert client.get(url(ds) + "/frames/4").status_code == 404
    assert client.get(url(ds) + "/frames/1,4").status_code == 404
    for bad in ("0", "a", "1,,2", "-1", "1;2"):
        assert client.get(url(ds) + f"/frames/{bad}").status_code == 400, bad
    r = client.get(url(ds) + "/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 406
    other = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    assert client.get(f"{other}/instances/{generate_uid()}/frames/1").status_code == 404


def test_bulkdata_errors(client: TestClient, archive: Archive) -> None:
    ds, _ = store_ds(archive)
    base = url(ds) + "/bulkdata/"
    assert client.get(base + "00100010").status_code == 404  # not bulk data
    assert client.get(base + "00291010").status_code == 404  # absent
    assert client.get(base + "7FE00010/0").status_code == 400
    assert client.get(base + "XYZ").status_code == 400
    r = client.get(base + "7FE00010", headers={"Accept": DICOM_ACCEPT})
    assert r.status_code == 406
    [(_, value)] = parts(client.get(base + "7FE00010"))
    assert value == bytes(range(32))


def test_a_client_that_goes_away_still_ends_the_retrieval(
    archive: Archive, audit: MemoryAuditSink
) -> None:
    """The stream stops at the first failed send; the audit record says cancelled."""
    study = generate_uid()
    for number in (1, 2, 3):
        store_ds(archive, StudyInstanceUID=study, InstanceNumber=number)
    app = create_app(archive)
    sent: list[dict[str, Any]] = []
    path = f"/dicomweb/studies/{study}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {bearer(archive)}".encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and len(sent) > 2:
            raise OSError("connection reset by peer")
        sent.append(message)

    async def run() -> None:
        with contextlib.suppress(Exception):
            await app(scope, receive, send)  # type: ignore[arg-type]

    asyncio.run(run())
    assert sent[0]["status"] == 200
    event = retrievals(audit)[-1]
    assert (event.located, event.cancelled, event.outcome) == (3, True, "failure")
    assert event.completed < 3
