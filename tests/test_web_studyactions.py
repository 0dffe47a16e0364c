"""The study page's actions through the ASGI app, on SQLite and PostgreSQL: a study as a
streamed ZIP, sending it to a node, deleting it, the node list; roles and scopes."""

from __future__ import annotations

import io
import re
import socket
import struct
import time
import warnings
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from starlette.exceptions import StarletteDeprecationWarning

from stockade.archive import Archive
from stockade.audit.events import Actor, InstancesDeleted, InstancesRetrieved
from stockade.audit.sink import MemoryAuditSink
from stockade.auth.roles import Role
from stockade.ingest import Origin
from stockade.query import Scope
from stockade.web import studyactions
from stockade.web.app import create_app
from stockade.web.studyactions import ZipStream, entry_names
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ADMIN = Actor(via="internal")


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def _as(archive: Archive, role: str) -> TestClient:
    client: TestClient = authed(TestClient(create_app(archive)), archive, role)
    return client


def _scoped(archive: Archive, name: str, role: Role, scope: Scope) -> TestClient:
    archive.accounts.add(name, role, "Pw-" + generate_uid(), ADMIN, scope=scope)
    token, _ = archive.accounts.create_token(name, timedelta(days=1), "t", ADMIN)
    return TestClient(create_app(archive), headers={"Authorization": f"Bearer {token}"})


def _study(archive: Archive, series: int = 2, per_series: int = 3) -> list[pydicom.Dataset]:
    """A study of *series* series of *per_series* instances, stored out of order."""
    study = generate_uid()
    made = []
    for s in range(series):
        uid = generate_uid()
        for i in range(per_series):
            made.append(
                make_dataset(
                    StudyInstanceUID=study,
                    SeriesInstanceUID=uid,
                    SeriesNumber=s + 1,
                    InstanceNumber=i + 1,
                    PatientID="ZIP-1",
                    PixelData=bytes([s, i]) * 16,
                )
            )
    for ds in reversed(made):
        archive.store_file(part10(ds), Origin(via="import"))
    return made


def _parts(response: Any) -> list[bytes]:
    boundary = re.search(r"boundary=([^;\s]+)", response.headers["content-type"])
    assert boundary
    delimiter = b"--" + boundary.group(1).encode()
    pieces = response.content[len(delimiter) :].split(b"\r\n" + delimiter)[:-1]
    return [p[2:].partition(b"\r\n\r\n")[2] for p in pieces]


def _events(audit: MemoryAuditSink, kind: type[Any]) -> list[Any]:
    return [e for e in audit.events if isinstance(e, kind)]


# -- the ZIP ---------------------------------------------------------------------------------


def test_zip_holds_every_instance_as_wado_serves_it(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    made = _study(archive)
    study = made[0].StudyInstanceUID
    answer = client.get(f"/api/studies/{study}/zip")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers["content-disposition"] == f'attachment; filename="study-{study}.zip"'
    archive_file = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive_file.testzip() is None  # every CRC-32 right
    names = archive_file.namelist()
    assert names == [f"S{s:04d}/I{i:05d}.dcm" for s in (1, 2) for i in (1, 2, 3)]
    wado = client.get(f"/dicomweb/studies/{study}", headers={"Accept": AS_STORED})
    assert wado.status_code == 200
    served = {pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID: p for p in _parts(wado)}
    assert len(served) == len(made) == len(names)
    folders: dict[str, set[str]] = {}
    for name in names:
        data = archive_file.read(name)
        assert data[:128] == bytes(128)
        assert data[128:132] == b"DICM"
        ds = pydicom.dcmread(io.BytesIO(data))
        assert data == served[ds.SOPInstanceUID]
        folder, instance = name.split("/")
        folders.setdefault(folder, set()).add(ds.SeriesInstanceUID)
        assert instance == f"I{int(ds.InstanceNumber):05d}.dcm"  # in instance order
    assert sorted(folders) == ["S0001", "S0002"]
    assert all(len(uids) == 1 for uids in folders.values())  # one folder per series
    record = _events(audit, InstancesRetrieved)[0]
    assert record.service == "zip" and record.outcome == "success"
    assert (record.located, record.completed, record.failed) == (6, 6, 0)
    assert record.study_uids == [study] and record.actor.via == "web"


def test_zip_entry_names_never_come_from_dicom_values(archive: Archive, client: TestClient) -> None:
    hostile = make_dataset(
        PatientName="../../etc/passwd", SeriesDescription="..\\..\\x", PatientID="../x"
    )
    archive.store_file(part10(hostile), Origin(via="import"))
    answer = client.get(f"/api/studies/{hostile.StudyInstanceUID}/zip")
    assert zipfile.ZipFile(io.BytesIO(answer.content)).namelist() == ["S0001/I00001.dcm"]


def test_zip_leaves_out_a_damaged_instance_and_names_it(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    made = _study(archive, series=1, per_series=2)
    inst = archive.find_instance(made[0].SOPInstanceUID)
    assert inst is not None
    blob = archive.settings.data_dir / "blobs" / inst.blob_key
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")
    answer = client.get(f"/api/studies/{made[0].StudyInstanceUID}/zip")
    found = zipfile.ZipFile(io.BytesIO(answer.content))
    assert found.namelist() == ["S0001/I00002.dcm", "MISSING.txt"]
    assert b"S0001/I00001.dcm" in found.read("MISSING.txt")
    record = _events(audit, InstancesRetrieved)[0]
    assert (record.completed, record.failed, record.outcome) == (1, 1, "failure")


def test_zip_permission_scope_and_missing(archive: Archive) -> None:
    made = _study(archive, series=1, per_series=1)
    study = made[0].StudyInstanceUID
    assert _as(archive, "auditor").get(f"/api/studies/{study}/zip").status_code == 403
    scoped = _scoped(archive, "scoped", Role.REFERRER, Scope(frozenset({generate_uid()})))
    theirs = scoped.get(f"/api/studies/{study}/zip")
    missing = _as(archive, "referrer").get(f"/api/studies/{generate_uid()}/zip")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.headers["content-type"] == "application/problem+json"
    assert _as(archive, "referrer").get(f"/api/studies/{study}/zip").status_code == 200
    assert _as(archive, "referrer").get("/api/studies/1.2.x/zip").status_code == 400


def test_zip_streaming_writer_with_zip64_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ZIP64 fields are written as APPNOTE 4.5.3 wants when a size or an offset needs
    them (the threshold lowered, so that a few bytes stand for 4 GiB)."""
    monkeypatch.setattr(studyactions, "ZIP64_FROM", 100)
    monkeypatch.setattr(studyactions, "ZIP64_ENTRIES", 2)
    writer = ZipStream(time.localtime())
    files = {f"S0001/I{n:05d}.dcm": bytes([n]) * (40 + 50 * n) for n in range(1, 5)}
    out = bytearray()
    for name, data in files.items():
        for chunk in writer.entry(name, [data[:10], memoryview(data)[10:]]):
            out += chunk
    out += writer.end()
    assert struct.unpack("<I", out[-22:-18])[0] == 0x06054B50
    assert b"PK\x06\x06" in out and b"PK\x06\x07" in out  # ZIP64 end record and locator
    found = zipfile.ZipFile(io.BytesIO(bytes(out)))
    assert found.testzip() is None
    assert {n: found.read(n) for n in found.namelist()} == files


def test_entry_names_number_series_and_instances_in_order() -> None:
    from stockade.retrieve import StoredInstance

    def inst(series: str) -> StoredInstance:
        return StoredInstance(
            generate_uid(), "1.2", "1.3", series, "1.2.840.10008.1.2.1", "", "", 0
        )

    assert entry_names([inst("a"), inst("a"), inst("b"), inst("a")]) == [
        "S0001/I00001.dcm",
        "S0001/I00002.dcm",
        "S0002/I00001.dcm",
        "S0001/I00003.dcm",
    ]


# -- sending ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nodes_and_send_errors(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    made = _study(archive, series=1, per_series=2)
    study = made[0].StudyInstanceUID
    port = _free_port()  # nobody listens there
    archive.add_node("nowhere", "NOWHERE", "127.0.0.1", port, frozenset({"store"}))
    archive.add_node("alpha", "ALPHA", "127.0.0.1", 11112, frozenset())
    assert client.get("/api/nodes").json() == [
        {"name": "alpha", "ae_title": "ALPHA"},
        {"name": "nowhere", "ae_title": "NOWHERE"},
    ]
    assert _as(archive, "auditor").get("/api/nodes").status_code == 403
    unknown = client.post(f"/api/studies/{study}/send", json={"node": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    for body in (b"[]", b"{", b'{"node": 5}', b'{"node": "' + b"x" * 5000 + b'"}'):
        bad = client.post(f"/api/studies/{study}/send", content=body)
        assert bad.status_code == 400, body[:20]
    missing = client.post(f"/api/studies/{generate_uid()}/send", json={"node": "nowhere"})
    assert missing.status_code == 404
    down = client.post(f"/api/studies/{study}/send", json={"node": "nowhere"})
    assert down.status_code == 502
    assert "nowhere (NOWHERE) could not be reached" in down.json()["detail"]
    sent = [e for e in _events(audit, InstancesRetrieved) if e.service == "send"]
    assert sent[-1].failed == 2 and sent[-1].destination == "NOWHERE"
    assert sent[-1].outcome == "failure"
    refused = _as(archive, "auditor").post(f"/api/studies/{study}/send", json={"node": "alpha"})
    assert refused.status_code == 403


def test_send_stores_the_study_on_the_node(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    made = _study(archive, series=2, per_series=2)
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="TAKER")
    ae.supported_contexts = AllStoragePresentationContexts
    port = _free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        archive.add_node("taker", "TAKER", "127.0.0.1", port, frozenset())
        answer = client.post(
            f"/api/studies/{made[0].StudyInstanceUID}/send", json={"node": "taker"}
        )
    finally:
        server.shutdown()
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "node": "taker",
        "ae_title": "TAKER",
        "located": 4,
        "completed": 4,
        "warning": 0,
        "failed": 0,
    }
    assert sorted(received) == sorted(ds.SOPInstanceUID for ds in made)
    record = next(e for e in _events(audit, InstancesRetrieved) if e.service == "send")
    assert record.destination == "TAKER" and record.completed == 4 and record.actor.via == "web"


# -- deleting --------------------------------------------------------------------------------


def test_delete_needs_the_delete_permission_and_is_audited(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    made = _study(archive, series=2, per_series=2)
    study = made[0].StudyInstanceUID
    for role in ("radiologist", "technologist", "referrer", "auditor"):
        refused = _as(archive, role).delete(f"/api/studies/{study}")
        assert refused.status_code == 403, role
    assert archive.counts()["instances"] == 4
    assert not _events(audit, InstancesDeleted)
    answer = client.delete(f"/api/studies/{study}")
    assert answer.status_code == 200 and answer.json() == {"deleted": 4}
    assert archive.counts()["instances"] == 0
    record = _events(audit, InstancesDeleted)[0]
    assert record.outcome == "success" and record.deleted == 4
    assert record.study_uids == [study] and record.actor.user == "test-admin"
    assert client.get(f"/dicomweb/studies/{study}/series").status_code in (200, 404)
    assert client.get("/dicomweb/studies", params={"StudyInstanceUID": study}).json() == []
    again = client.delete(f"/api/studies/{study}")
    assert again.status_code == 404
    assert client.delete("/api/studies/not-a-uid").status_code == 400


def test_delete_out_of_scope_is_404(archive: Archive) -> None:
    made = _study(archive, series=1, per_series=1)
    scoped = _scoped(archive, "scoped-admin", Role.ADMIN, Scope(frozenset({generate_uid()})))
    answer = scoped.delete(f"/api/studies/{made[0].StudyInstanceUID}")
    assert answer.status_code == 404
    assert archive.counts()["instances"] == 1


def test_session_cookie_needs_the_csrf_header(archive: Archive) -> None:
    made = _study(archive, series=1, per_series=1)
    password = "Pw-" + generate_uid()
    archive.accounts.add("admin2", Role.ADMIN, password, ADMIN)
    browser = TestClient(create_app(archive))
    login = browser.post("/auth/login", json={"username": "admin2", "password": password})
    csrf = login.json()["csrf_token"]
    url = f"/api/studies/{made[0].StudyInstanceUID}"
    assert browser.delete(url).status_code in (401, 403)
    assert archive.counts()["instances"] == 1
    assert browser.get(url + "/zip").status_code == 200  # a safe method: the cookie is enough
    assert browser.delete(url, headers={"X-CSRF-Token": csrf}).json() == {"deleted": 1}
