"""STOW-RS against a real ``stockade serve``, with dicomweb-client as the sender.

What is stored must be what was sent (the data set bytes behind Stockade's own File Meta),
``stockade verify`` must find every blob intact, an instance of another study sent to
``/studies/{study}`` must fail alone with 0xA900, and an upload whose declared size is over
``http_max_body_size`` must be refused with 413 before its body is sent.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import database

from .conftest import (
    HOST,
    StockadeServer,
    assert_index_matches_storage,
    assert_verify_intact,
    ct_dataset,
    dataset_offset,
)

BODY_LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StockadeServer]:
    root = tmp_path_factory.mktemp(f"stow-{request.param}")
    with database(request.param, root) as url:
        srv = StockadeServer(
            root,
            db_url=url,
            http_workers=2,  # uploads staged by more than one process
            settings={"STOCKADE_HTTP_MAX_BODY_SIZE": str(BODY_LIMIT)},
        )
        srv.start()
        try:
            wait_http(srv)
            yield srv
        finally:
            if srv.proc is not None:
                srv.stop()
            srv.assert_no_secret_written()


def wait_http(server: StockadeServer, timeout: float = 30) -> None:
    """Poll (bounded) until the HTTP listener answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if server.get(f"{server.dicomweb}/studies", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # readiness polling only
    pytest.fail(f"DICOMweb did not answer within {timeout} s\n{server.log_tail()}")


def study(count: int, seed: int = 1) -> list[Dataset]:
    """*count* CT instances of one new study, as built in memory (no preamble)."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        ct_dataset(
            generate_uid(), study_uid, series_uid, size=64, number=i + 1, rng=rng, patient_id="W1"
        )
        for i in range(count)
    ]


def encoded_dataset(ds: Dataset) -> bytes:
    """The data set bytes dicomweb-client sends (it writes the file with pydicom)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    raw = buf.getvalue()
    if raw[128:132] != b"DICM":  # no preamble: File Meta first (pydicom without a preamble)
        raw = bytes(128) + b"DICM" + raw
    return raw[dataset_offset(raw) :]


def test_store_a_study_and_the_bytes_are_what_was_sent(server: StockadeServer) -> None:
    datasets = study(5)
    sent = {ds.SOPInstanceUID: encoded_dataset(ds) for ds in datasets}
    client = server.web()
    before = server.count()  # the module's server is shared
    answer = client.store_instances(datasets)
    assert "FailedSOPSequence" not in answer
    assert {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence} == set(sent)
    study_uid = datasets[0].StudyInstanceUID
    assert answer.RetrieveURL == f"{server.dicomweb}/studies/{study_uid}"

    rows = [row for row in assert_index_matches_storage(server) if row.sop_uid in sent]
    assert {row.sop_uid for row in rows} == set(sent)
    files = server.blob_files()
    for row in rows:
        stored = files[row.blob_key].read_bytes()
        assert stored[:128] == bytes(128)
        assert stored[dataset_offset(stored) :] == sent[row.sop_uid]
        assert row.trailing_bytes == 0
    assert_verify_intact(server, before + 5)

    # The same study again: duplicates are successes, nothing new is stored.
    again = client.store_instances(datasets)
    assert len(again.ReferencedSOPSequence) == 5
    assert server.count() == before + 5
    stored_events = [e for e in server.audit() if e.get("type") == "InstanceStored"]
    assert stored_events, "no InstanceStored audit record"


def test_instance_of_another_study_fails_alone(server: StockadeServer) -> None:
    mine = study(2, seed=2)
    foreign = study(1, seed=3)
    client = server.web()
    before = {row.sop_uid for row in server.rows()}  # the module's server is shared
    answer = client.store_instances([*mine, *foreign], study_instance_uid=mine[0].StudyInstanceUID)
    (failed,) = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == foreign[0].SOPInstanceUID
    assert failed.FailureReason == 0xA900
    assert "study instance UID mismatch" in failed[0x00091001].value
    assert len(answer.ReferencedSOPSequence) == 2
    assert {row.sop_uid for row in server.rows()} - before == {ds.SOPInstanceUID for ds in mine}
    assert_verify_intact(server, len(before) + 2)


@pytest.mark.parametrize("expect_continue", [False, True])
def test_too_large_upload_is_refused_before_its_body(
    server: StockadeServer, expect_continue: bool
) -> None:
    port = int(server.dicomweb.split(":")[2].split("/")[0])
    token = server.token
    head = (
        "POST /dicomweb/studies HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=x\r\n'
        f"Content-Length: {10 * 1024**3}\r\n"
        + ("Expect: 100-continue\r\n" if expect_continue else "")
        + "\r\n"
    )
    before = server.count()  # the module's server is shared
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(head.encode())  # the 10 GiB body is never sent
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer
    assert time.monotonic() - started < 5
    assert server.count() == before


def test_chunked_upload_over_the_limit_is_413(server: StockadeServer) -> None:
    """A chunked body without Content-Length that grows past http_max_body_size gets 413
    as soon as it does: the client sends one chunk past the limit, then waits (it never
    ends the body), so the answer cannot come from the end of the request."""
    port = int(server.dicomweb.split(":")[2].split("/")[0])
    token = server.token
    head = (
        "POST /dicomweb/studies HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=x\r\n'
        "Transfer-Encoding: chunked\r\n\r\n"
    )

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    before = server.count()  # the module's server is shared
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=20) as sock:
        sock.sendall(head.encode() + chunk(b"--x\r\nContent-Type: application/dicom\r\n\r\n"))
        block = b"\x00" * 65536
        for _ in range(BODY_LIMIT // len(block) + 1):
            sock.sendall(chunk(block))
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, f"connection closed without an answer: {answer!r}"
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert time.monotonic() - started < 15
    assert server.count() == before


def test_metadata_and_bulk_data_stored_then_retrieved_by_dicomweb_client(
    server: StockadeServer,
) -> None:
    """DICOM JSON metadata with the pixels as octet-stream bulk parts (PS3.18 10.5.1.2),
    sent with httpx; dicomweb-client retrieves what was stored."""
    datasets = study(3, seed=4)
    boundary = "json-bulk"
    body = b""
    objects = []
    for ds in datasets:
        uri = f"{server.dicomweb}/upload/{ds.SOPInstanceUID}/pixels"
        obj = ds.to_json_dict(bulk_data_threshold=1 << 30)
        obj["7FE00010"] = {"vr": "OW", "BulkDataURI": uri}
        objects.append(obj)
        body += (
            (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Location: {uri}\r\n\r\n"
            ).encode()
            + ds.PixelData
            + b"\r\n"
        )
    metadata = f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
    body = metadata + json.dumps(objects).encode() + b"\r\n" + body + f"--{boundary}--\r\n".encode()
    before = server.count()  # the module's server is shared
    response = server.post(
        f"{server.dicomweb}/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}'
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    stored = response.json()["00081199"]["Value"]
    assert [item["00081155"]["Value"] for item in stored] == [[d.SOPInstanceUID] for d in datasets]

    client = server.web()
    for ds in datasets:
        got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert got.PatientID == ds.PatientID and got.InstanceNumber == ds.InstanceNumber
        assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert_verify_intact(server, before + 3)
