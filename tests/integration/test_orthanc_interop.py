"""Interoperability with a second real PACS: Orthanc from Debian.

Orthanc queries Stockade and pulls a study with C-MOVE (its REST API drives its C-FIND and
C-MOVE SCU); Stockade queries Orthanc and pulls studies from it with ``stockade query`` and
``stockade retrieve`` (C-GET and C-MOVE), and pushes one with ``stockade send``. Pixel data
is compared with what was generated.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import require_tool

from .conftest import (
    HOST,
    READY_TIMEOUT,
    StockadeServer,
    assert_verify_intact,
    clean_env,
    echoscu,
    free_port,
    storescu,
    write_ct_series,
)

ORTHANC = "/usr/sbin/Orthanc"
pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    proc: subprocess.Popen[bytes]

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
            raw = response.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])


@dataclass
class Pair:
    stockade: StockadeServer
    orthanc: Orthanc


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Stockade and Orthanc, each knowing the other, shared by the module's tests: each
    test has patients of its own and compares with what either held before it."""
    tmp_path = tmp_path_factory.mktemp("interop")
    if not os.access(ORTHANC, os.X_OK):
        require_tool("Orthanc")  # skips (fails in CI): apt-get install orthanc
    for tool in ("storescu", "echoscu"):
        require_tool(tool)
    stockade = StockadeServer(tmp_path / "stockade")
    stockade.root.mkdir()
    dicom_port, http_port = free_port(), free_port()
    data = tmp_path / "orthanc"
    data.mkdir()
    config = {
        "Name": "interop",
        "StorageDirectory": str(data / "storage"),
        "IndexDirectory": str(data / "index"),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {"stockade": ["STOCKADE", HOST, stockade.port]},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [ORTHANC, str(tmp_path / "orthanc.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        start_new_session=True,
    )
    orthanc = Orthanc(dicom_port, http_port, proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                if orthanc.count() == 0:
                    break
            assert proc.poll() is None, (tmp_path / "orthanc.log").read_text()
            assert time.monotonic() < deadline, "Orthanc did not start"
            time.sleep(0.1)  # readiness polling only
        stockade.add_nodes(
            ("orthanc", "ORTHANC", dicom_port, "echo,find,get,move,store"),
            ("echoscu", "ECHOSCU", 104, "echo"),
            ("storescu", "STORESCU", 104, "store"),
        )
        stockade.start()
        yield Pair(stockade, orthanc)
    finally:
        if stockade.proc is not None:
            stockade.stop()
        stockade.assert_no_secret_written()
        proc.terminate()
        proc.wait(30)
        log.close()


def _store_to_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "ORTHANC",
            HOST,
            str(orthanc.dicom_port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _study_uid(files: dict[str, Path]) -> str:
    return str(pydicom.dcmread(next(iter(files.values()))).StudyInstanceUID)


def _orthanc_sop_uids(orthanc: Orthanc) -> dict[str, str]:
    """SOP Instance UID -> Orthanc's identifier, of every instance Orthanc holds."""
    return {
        item["MainDicomTags"]["SOPInstanceUID"]: item["ID"]
        for item in orthanc.rest("GET", "/instances?expand")
    }


def _stockade_pixels(pair: Pair) -> dict[str, bytes]:
    """PixelData of every instance Stockade holds, read from its blobs."""
    out = {}
    for row in pair.stockade.rows():
        ds = pydicom.dcmread(pair.stockade.data_dir / "blobs" / row.blob_key)
        out[row.sop_uid] = ds.PixelData
    return out


def test_orthanc_queries_stockade_and_pulls_a_study_with_c_move(pair: Pair, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "a", 5, patient_id="INTEROP-A", series_count=2)
    in_orthanc = pair.orthanc.count()  # the module's servers are shared
    result = storescu(pair.stockade.port, list(files.values()))
    assert result.returncode == 0, result.stdout
    study = _study_uid(files)

    query = pair.orthanc.rest(
        "POST",
        "/modalities/stockade/query",
        {"Level": "Study", "Query": {"StudyInstanceUID": "", "PatientID": "INTEROP-A"}},
    )
    answers = pair.orthanc.rest("GET", f"/queries/{query['ID']}/answers?expand&simplify")
    assert [a["StudyInstanceUID"] for a in answers] == [study]
    assert answers[0]["PatientID"] == "INTEROP-A"

    pair.orthanc.rest("POST", f"/queries/{query['ID']}/retrieve", "ORTHANC")
    assert pair.orthanc.count() == in_orthanc + 5
    pulled = {uid: ident for uid, ident in _orthanc_sop_uids(pair.orthanc).items() if uid in files}
    assert set(pulled) == set(files)
    for instance in pulled.values():
        raw = pair.orthanc.rest("GET", f"/instances/{instance}/file")
        ds = pydicom.dcmread(io.BytesIO(raw))
        original = pydicom.dcmread(files[str(ds.SOPInstanceUID)])
        assert ds.PixelData == original.PixelData
    moves = [
        e
        for e in pair.stockade.audit()
        if e["type"] == "InstancesRetrieved" and e["service"] != "cache"
    ]
    assert moves[-1]["service"] == "move" and moves[-1]["completed"] == 5
    assert moves[-1]["destination"] == "ORTHANC"


def test_stockade_queries_orthanc_and_retrieves_with_get_and_move(
    pair: Pair, tmp_path: Path
) -> None:
    # patients of this test only (the servers are shared): Orthanc holds others' by now
    by_get = write_ct_series(tmp_path / "g", 3, patient_id="PULLED-G", seed=3)
    by_move = write_ct_series(tmp_path / "m", 4, patient_id="PULLED-M", seed=4)
    in_orthanc = pair.orthanc.count()
    held_before = set(_stockade_pixels(pair))
    records_before = len(pair.stockade.audit())
    _store_to_orthanc(pair.orthanc, [*by_get.values(), *by_move.values()])
    assert pair.orthanc.count() == in_orthanc + 7

    listed = pair.stockade.cli(
        "query", "orthanc", "-k", "PatientID=PULLED-*", "-k", "StudyInstanceUID=", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert {r["StudyInstanceUID"] for r in rows} == {_study_uid(by_get), _study_uid(by_move)}

    first = pair.stockade.cli(
        "query", "orthanc", "-k", "PatientID=PULLED-*", "--limit", "1", "--json"
    )
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 1 and "stopped at --limit 1" in first.stderr

    got = pair.stockade.cli("retrieve", "orthanc", "--study", _study_uid(by_get))
    assert got.returncode == 0, got.stdout + got.stderr
    assert "retrieved 3, warning 0, failed 0" in got.stdout
    moved = pair.stockade.cli(
        "retrieve", "orthanc", "--study", _study_uid(by_move), "--method", "move"
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "retrieved 4, warning 0, failed 0" in moved.stdout

    held = _stockade_pixels(pair)
    assert set(held) - held_before == set(by_get) | set(by_move)
    for uid, path in {**by_get, **by_move}.items():
        assert held[uid] == pydicom.dcmread(path).PixelData
    assert_verify_intact(pair.stockade, len(held_before) + 7)
    stored = [e for e in pair.stockade.audit()[records_before:] if e["type"] == "InstanceStored"]
    assert len(stored) == 7
    assert {e["actor"]["ae_title"] for e in stored} == {"ORTHANC"}


def test_stockade_sends_a_study_to_orthanc(pair: Pair, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "s", 4, patient_id="INTEROP-S", seed=5)
    in_orthanc = pair.orthanc.count()  # the module's servers are shared
    result = storescu(pair.stockade.port, list(files.values()))
    assert result.returncode == 0, result.stdout
    done = pair.stockade.cli("send", "orthanc", "--study", _study_uid(files))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent 4, warning 0, failed 0" in done.stdout
    assert pair.orthanc.count() == in_orthanc + 4
    assert set(files) <= set(_orthanc_sop_uids(pair.orthanc))
    assert echoscu(pair.stockade.port).returncode == 0
