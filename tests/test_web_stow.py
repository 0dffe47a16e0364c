"""STOW-RS (PS3.18 10.5) through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from stockade.archive import Archive
from stockade.audit.events import InstanceRejected, InstanceStored
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.inspect import Kind
from stockade.dicom.part10 import read_part10
from stockade.security.policy import Action, Policy
from stockade.web.app import create_app
from stockade.web.stow import media_type
from tests.conftest import authed, bearer
from tests.dicomfactory import make_dataset, part10

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its test client; httpx is what is installed.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

BOUNDARY = "stow-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILED = "00081198"
REFERENCED = "00081199"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
SOP_INSTANCE = "00081155"
SOP_CLASS = "00081150"
RETRIEVE_URL = "00081190"
PRIVATE_CREATOR = "00090010"
PRIVATE_REASON = "00091001"


def multipart(parts: Iterable[bytes], content_type: str = "application/dicom") -> bytes:
    out = b""
    for data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def post(client: TestClient, body: bytes, path: str = "/dicomweb/studies", **headers: str) -> Any:
    return client.post(path, content=body, headers={"Content-Type": CONTENT_TYPE, **headers})


def values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def test_mixed_request_stores_only_the_valid_instance(client: TestClient, archive: Archive) -> None:
    good = make_dataset()
    truncated = part10(make_dataset())[:-40]
    bad_uid = make_dataset(SOPInstanceUID="../../x")
    response = post(client, multipart([part10(good), truncated, part10(bad_uid)]))
    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    assert archive.counts()["instances"] == 1
    assert archive.find_instance(good.SOPInstanceUID) is not None

    (stored,) = body[REFERENCED]["Value"]
    assert values(stored, SOP_INSTANCE) == [good.SOPInstanceUID]
    assert values(stored, SOP_CLASS) == [good.SOPClassUID]
    assert values(stored, RETRIEVE_URL)[0].endswith(
        f"/dicomweb/studies/{good.StudyInstanceUID}/instances/{good.SOPInstanceUID}"
    )
    assert values(body, RETRIEVE_URL)[0].endswith(f"/dicomweb/studies/{good.StudyInstanceUID}")

    first, second = body[FAILED]["Value"]
    for item in (first, second):
        assert values(item, PRIVATE_CREATOR) == ["STOCKADE"]
        assert values(item, PRIVATE_REASON)[0]
    assert values(first, FAILURE_REASON) == [0xC000]
    assert "malformed" in values(first, PRIVATE_REASON)[0]
    assert values(second, FAILURE_REASON) == [0xC001]
    assert "SOPInstanceUID" in values(second, PRIVATE_REASON)[0]
    # The invalid UID is not sent back as a UID (the reason text quotes it); the class is.
    assert second[SOP_INSTANCE] == {"vr": "UI"}
    assert values(second, SOP_CLASS) == [bad_uid.SOPClassUID]


def test_all_failed_is_409(client: TestClient, archive: Archive) -> None:
    response = post(client, multipart([b"not dicom", part10(make_dataset())[:200]]))
    assert response.status_code == 409, response.text
    assert len(response.json()[FAILED]["Value"]) == 2
    assert REFERENCED not in response.json()
    assert archive.counts()["instances"] == 0


def test_all_stored_is_200_and_a_duplicate_is_a_success(
    client: TestClient, archive: Archive
) -> None:
    ds = make_dataset()
    other = make_dataset(StudyInstanceUID=ds.StudyInstanceUID)
    raw = part10(ds)
    for _ in range(2):
        response = post(client, multipart([raw, part10(other)]))
        assert response.status_code == 200, response.text
        assert len(response.json()[REFERENCED]["Value"]) == 2
        assert FAILED not in response.json()
    assert archive.counts()["instances"] == 2


def test_parts_of_one_request_are_recorded_in_order(client: TestClient, archive: Archive) -> None:
    """Parts of one request share index transactions: a repeated part is a duplicate of the
    first, a changed copy conflicts with it and fails alone, and the answer keeps the order
    of the parts."""
    ds = make_dataset()
    others = [make_dataset(StudyInstanceUID=ds.StudyInstanceUID) for _ in range(6)]
    raw = part10(ds)
    ds.PatientName = "Changed^Name"
    parts = [raw, *map(part10, others[:3]), raw, part10(ds), *map(part10, others[3:])]
    response = post(client, multipart(parts))
    assert response.status_code == 202, response.text
    body = response.json()
    referenced = [values(item, SOP_INSTANCE)[0] for item in body[REFERENCED]["Value"]]
    uids = [o.SOPInstanceUID for o in others]
    assert referenced == [ds.SOPInstanceUID, *uids[:3], ds.SOPInstanceUID, *uids[3:]]
    (failed,) = body[FAILED]["Value"]
    assert values(failed, SOP_INSTANCE) == [ds.SOPInstanceUID]
    assert values(failed, FAILURE_REASON) == [0x0111]
    assert archive.counts()["instances"] == 7


def test_study_mismatch_is_refused_before_storing(
    client: TestClient, archive: Archive, audit: MemoryAuditSink
) -> None:
    mine = make_dataset()
    foreign = make_dataset()
    response = post(
        client,
        multipart([part10(mine), part10(foreign), b"junk"]),
        path=f"/dicomweb/studies/{mine.StudyInstanceUID}",
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert values(body, RETRIEVE_URL)[0].endswith(f"/studies/{mine.StudyInstanceUID}")
    mismatch, junk = body[FAILED]["Value"]
    assert values(mismatch, FAILURE_REASON) == [0xA900]
    assert values(mismatch, SOP_INSTANCE) == [foreign.SOPInstanceUID]
    assert "study instance UID mismatch" in values(mismatch, PRIVATE_REASON)[0]
    assert values(junk, FAILURE_REASON) == [0xA900]
    assert archive.find_instance(foreign.SOPInstanceUID) is None
    assert archive.counts()["instances"] == 1
    rejected = [e for e in audit.events if isinstance(e, InstanceRejected)]
    assert [e.code for e in rejected] == ["study-mismatch", "study-mismatch"]
    # parts are stored concurrently: their audit records may come in either order
    assert {e.sop_instance_uid for e in rejected} == {foreign.SOPInstanceUID, None}


def test_part_without_preamble_as_pydicom_writes_it(client: TestClient, archive: Archive) -> None:
    ds = make_dataset()
    full = part10(ds)
    raw = full[132:]  # File Meta first, no preamble, no DICM
    dataset = full[read_part10(full).dataset_offset :]
    response = post(client, multipart([raw]))
    assert response.status_code == 200, response.text
    stored = archive.find_instance(ds.SOPInstanceUID)
    assert stored is not None
    with archive.store.open(stored.blob_key) as fh:
        blob = fh.read()
    assert blob[:132] == bytes(128) + b"DICM"
    assert blob.endswith(dataset)  # the data set as sent


def test_part_with_unparsable_content_type_fails_alone(
    client: TestClient, archive: Archive
) -> None:
    response = post(client, multipart([part10(make_dataset())], 'application/dicom; x="'))
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert "Content-Type" in values(failed, PRIVATE_REASON)[0]


def test_bad_study_uid_in_url(client: TestClient) -> None:
    response = post(client, multipart([part10(make_dataset())]), path="/dicomweb/studies/1.2.x")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"


def test_polyglot_is_quarantined(client: TestClient, archive: Archive) -> None:
    ds = make_dataset()
    preamble = (b"MZ\x90\x00" + b"This program cannot be run in DOS mode").ljust(128, b"\x00")
    response = post(client, multipart([part10(ds, preamble=preamble)]))
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert values(failed, FAILURE_REASON) == [0xC004]
    assert "quarantine" in values(failed, PRIVATE_REASON)[0]
    assert "executable-preamble" in values(failed, PRIVATE_REASON)[0]
    assert archive.find_instance(ds.SOPInstanceUID) is None
    [entry] = archive.ingest.quarantine.entries()
    assert entry.sop_instance_uid == ds.SOPInstanceUID and entry.via == "web"


def test_polyglot_is_stored_with_a_zero_preamble(client: TestClient, archive: Archive) -> None:
    archive.ingest.policy = Policy({Kind.EXECUTABLE_PREAMBLE: Action.STRIP})
    ds = make_dataset()
    preamble = (b"MZ\x90\x00" + b"This program cannot be run in DOS mode").ljust(128, b"\x00")
    response = post(client, multipart([part10(ds, preamble=preamble)]))
    assert response.status_code == 202, response.text  # stored, with a warning
    (item,) = response.json()[REFERENCED]["Value"]
    assert values(item, WARNING_REASON) == [0xB000]
    assert "preamble" in values(item, PRIVATE_REASON)[0]
    stored = archive.find_instance(ds.SOPInstanceUID)
    assert stored is not None
    with archive.store.open(stored.blob_key) as fh:
        blob = fh.read()
    assert blob[:132] == bytes(128) + b"DICM"
    assert b"MZ\x90\x00" not in blob


def test_wrong_part_content_type_fails_that_part(client: TestClient, archive: Archive) -> None:
    body = multipart([b"<html><script>alert(1)</script></html>"], "text/html")
    body = body.replace(f"--{BOUNDARY}--\r\n".encode(), b"") + multipart([part10(make_dataset())])
    response = post(client, body)
    assert response.status_code == 202, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert values(failed, FAILURE_REASON) == [0xC000]
    assert "text/html" in values(failed, PRIVATE_REASON)[0]
    assert archive.counts()["instances"] == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        f"multipart/related; type=application/dicom+xml; boundary={BOUNDARY}",
        f"multipart/mixed; boundary={BOUNDARY}",
        "",
    ],
)
def test_wrong_media_type_is_415(client: TestClient, content_type: str) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=multipart([part10(make_dataset())]),
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 415, response.text
    assert response.json()["code"] == "unsupported-media-type"


def test_type_parameter_unquoted_and_boundary_quoted(client: TestClient) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=multipart([part10(make_dataset())]),
        headers={
            "Content-Type": f'Multipart/Related; boundary="{BOUNDARY}"; type=application/dicom'
        },
    )
    assert response.status_code == 200, response.text


def test_malformed_bodies_are_400(client: TestClient, archive: Archive) -> None:
    ds = make_dataset()
    truncated = multipart([part10(ds)]).replace(f"--{BOUNDARY}--\r\n".encode(), b"")
    response = post(client, truncated + f"--{BOUNDARY}\r\n\r\npartial".encode())
    assert response.status_code == 400
    problem = response.json()
    assert "close delimiter" in problem["detail"]
    assert problem["stored"] == [ds.SOPInstanceUID]  # what came before stays stored
    assert post(client, f"--{BOUNDARY}--\r\n".encode()).status_code == 400  # no instances
    response = client.post(
        "/dicomweb/studies",
        content=b"x",
        headers={"Content-Type": "multipart/related; type=application/dicom"},
    )
    assert response.status_code == 400  # no boundary


def small_limit(archive: Archive, limit: int) -> Archive:
    archive.settings = dataclasses.replace(archive.settings, http_max_body_size=limit)
    return archive


def run_asgi(
    archive: Archive, chunks: list[bytes] | None, content_length: int | None = None
) -> tuple[int, dict[str, Any], int]:
    """Send one request straight to the ASGI app, the body in *chunks* (None: reading it
    is an error); return the status, the JSON answer and how many chunks were read."""
    app = create_app(archive)
    sent: list[dict[str, Any]] = []
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        assert chunks is not None, "the body was read"
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    token = bearer(app.state.archive)
    headers = [
        (b"host", b"testserver"),
        (b"content-type", CONTENT_TYPE.encode()),
        (b"authorization", f"Bearer {token}".encode()),
    ]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/dicomweb/studies",
        "raw_path": b"/dicomweb/studies",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return sent[0]["status"], json.loads(sent[1]["body"]), read


def test_declared_content_length_over_limit_is_413_before_reading(archive: Archive) -> None:
    status, problem, read = run_asgi(small_limit(archive, 1000), None, content_length=1001)
    assert status == 413
    assert problem["code"] == "too-large"
    assert read == 0


def test_streamed_body_over_limit_is_cut_off_with_413(archive: Archive) -> None:
    first = make_dataset()
    body = multipart([part10(first), part10(make_dataset()), part10(make_dataset())])
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    limit = len(body) - 500
    status, problem, read = run_asgi(small_limit(archive, limit), chunks)
    assert status == 413
    assert "http_max_body_size" in problem["detail"]
    assert read == limit // 100 + 1  # reading stopped at the chunk that went over
    assert first.SOPInstanceUID in problem["stored"]
    assert archive.counts()["instances"] == len(problem["stored"])


def test_part_over_max_object_size_fails_alone(archive: Archive) -> None:
    small = part10(make_dataset())
    big = part10(make_dataset(PixelData=bytes(4096)))
    archive.settings = dataclasses.replace(archive.settings, max_object_size=len(small) + 100)
    with authed(TestClient(create_app(archive)), archive) as client:
        response = post(client, multipart([big, small]))
    assert response.status_code == 202, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert values(failed, FAILURE_REASON) == [0xA700]
    assert "max_object_size" in values(failed, PRIVATE_REASON)[0]


def test_media_type_parameters() -> None:
    assert media_type('multipart/related; type="application/dicom"; boundary="a\\"b"') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": 'a"b'},
    )
    assert media_type("Multipart/Related;TYPE=application/dicom;") == (
        "multipart/related",
        {"type": "application/dicom"},
    )


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_body_is_decoded(client: TestClient, archive: Archive, coding: str) -> None:
    import gzip
    import zlib

    first, second = make_dataset(), make_dataset()
    body = multipart([part10(first), part10(second)])
    packed = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    response = post(client, packed, **{"Content-Encoding": coding})
    assert response.status_code == 200, response.text
    assert archive.counts()["instances"] == 2
    stored = archive.find_instance(first.SOPInstanceUID)
    assert stored is not None


def test_bad_or_unknown_content_encoding(client: TestClient, archive: Archive) -> None:
    import gzip

    body = multipart([part10(make_dataset())])
    response = post(client, body, **{"Content-Encoding": "br"})
    assert response.status_code == 415 and "Content-Encoding" in response.json()["detail"]
    response = post(client, gzip.compress(body)[:-20], **{"Content-Encoding": "gzip"})
    assert response.status_code == 400 and "truncated" in response.json()["detail"]
    response = post(client, body, **{"Content-Encoding": "gzip"})  # not gzip at all
    assert response.status_code == 400
    assert archive.counts()["instances"] == 0


def test_the_signed_in_user_is_recorded_as_the_sender(
    archive: Archive, audit: MemoryAuditSink
) -> None:
    client = authed(TestClient(create_app(archive)), archive, "technologist")
    ds = make_dataset()
    assert post(client, multipart([part10(ds)])).status_code == 200
    stored = [e for e in audit.events if isinstance(e, InstanceStored)]
    assert [(e.sop_instance_uid, e.actor.user, e.actor.via) for e in stored] == [
        (ds.SOPInstanceUID, "test-technologist", "web")
    ]


def test_parts_recorded_in_several_batches_keep_their_order(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's worker thread records every RECORD_BATCH staged parts; the answer and
    the index hold every part, in order, whatever the batches were."""
    from stockade.web import stow

    monkeypatch.setattr(stow, "RECORD_BATCH", 2)
    monkeypatch.setattr(stow, "STORE_AHEAD", 3)
    datasets = [make_dataset() for _ in range(9)]
    batches: list[int] = []
    finish = stow.finish_parts

    def counting(arch: Archive, prepared: list[Any]) -> list[Any]:
        batches.append(len(prepared))
        return finish(arch, prepared)

    monkeypatch.setattr(stow, "finish_parts", counting)
    response = post(client, multipart(map(part10, datasets)))
    assert response.status_code == 200, response.text
    referenced = [values(item, SOP_INSTANCE)[0] for item in response.json()[REFERENCED]["Value"]]
    assert referenced == [d.SOPInstanceUID for d in datasets]
    assert sum(batches) == 9 and max(batches) <= 2
    assert archive.counts()["instances"] == 9


def test_a_failure_in_the_worker_thread_is_answered(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while recording ends the request with a 500 problem document
    (the parts after it are not waited for forever), and the server goes on."""
    from stockade.web import stow

    def broken(arch: Archive, prepared: list[Any]) -> list[Any]:
        raise RuntimeError("index went away")

    client = authed(TestClient(create_app(archive), raise_server_exceptions=False), archive)
    monkeypatch.setattr(stow, "RECORD_BATCH", 1)
    monkeypatch.setattr(stow, "finish_parts", broken)
    response = post(client, multipart(part10(make_dataset()) for _ in range(8)))
    assert response.status_code == 500
    assert "index went away" not in response.text
    monkeypatch.undo()
    ds = make_dataset()
    assert post(client, multipart([part10(ds)])).status_code == 200
    assert archive.find_instance(ds.SOPInstanceUID) is not None
