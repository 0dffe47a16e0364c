"""QIDO-RS routes in-process (Starlette's test client) on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydicom.uid import generate_uid
from starlette.testclient import TestClient

from stockade.archive import Archive
from stockade.audit.events import QueryPerformed
from stockade.audit.sink import MemoryAuditSink
from stockade.ingest import Origin
from stockade.web.app import create_app
from stockade.web.dicomjson import attribute, row_to_json
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10


def test_dicom_json_values() -> None:
    assert attribute("PN", "Yamada^Tarou=山田^太郎") == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}],
    }
    assert attribute("IS", 7) == {"vr": "IS", "Value": [7]}
    assert attribute("CS", "CT\\MR") == {"vr": "CS", "Value": ["CT", "MR"]}
    assert attribute("LO", None) == {"vr": "LO"}
    assert list(row_to_json({"StudyInstanceUID": "1.2", "PatientID": "P"})) == [
        "00100020",
        "0020000D",
    ]


def _store(archive: Archive, count: int) -> str:
    study = generate_uid()
    for number in range(1, count + 1):
        ds = make_dataset(
            StudyInstanceUID=study, InstanceNumber=number, PatientName="Doe^Jane", PatientID="Q1"
        )
        archive.store_file(part10(ds), Origin(via="import"))
    return study


def test_search_levels_fields_and_audit(archive: Archive, audit: MemoryAuditSink) -> None:
    study = _store(archive, 3)
    client = authed(TestClient(create_app(archive), client=("127.0.0.9", 50000)), archive)
    found = client.get("/dicomweb/studies", params={"00100020": "Q1", "includefield": "all"})
    assert found.status_code == 200
    (item,) = found.json()
    assert item["0020000D"]["Value"] == [study]
    assert item["00201208"]["Value"] == [3]
    assert item["00201200"]["Value"] == [1]  # NumberOfPatientRelatedStudies, from "all"
    assert item["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")
    assert list(item) == sorted(item)
    instances = client.get(f"/dicomweb/studies/{study}/instances", params={"limit": "2"})
    assert len(instances.json()) == 2
    assert "additional results" in instances.headers["warning"]
    rest = client.get(f"/dicomweb/studies/{study}/instances", params={"offset": "2"})
    assert len(rest.json()) == 1 and "warning" not in rest.headers
    queries = [e for e in audit.events if isinstance(e, QueryPerformed)]
    assert queries[0].actor.via == "web" and queries[0].actor.address == "127.0.0.9"
    assert queries[0].keys == {"PatientID": "Q1"} and queries[0].matches == 1


def test_limit_over_the_maximum_is_lowered_with_a_warning(archive: Archive) -> None:
    _store(archive, 3)
    archive.settings = dataclasses.replace(archive.settings, query_max_results=2)
    client = authed(TestClient(create_app(archive)), archive)
    page = client.get("/dicomweb/instances", params={"limit": "10"})
    assert len(page.json()) == 2
    assert "lowered to the maximum page 2" in page.headers["warning"]


def test_errors_are_problem_documents(archive: Archive) -> None:
    client = authed(TestClient(create_app(archive)), archive)
    for path, params, status in (
        ("/dicomweb/studies", {"PatientName": "a", "00100010": "b"}, 400),
        ("/dicomweb/studies", {"includefield": "ImagePositionPatient"}, 400),
        ("/dicomweb/studies", {"offset": "1e3"}, 400),
        ("/dicomweb/studies", {"fuzzymatching": "maybe"}, 400),
        ("/dicomweb/studies/1.2..3/series", {}, 400),
        ("/dicomweb/nowhere", {}, 404),
    ):
        response = client.get(path, params=params)
        assert response.status_code == status, (path, params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json()["status"] == status
    assert client.post("/dicomweb/studies/1.2/series").status_code == 405


def test_capabilities_list_every_route(archive: Archive) -> None:
    app = create_app(archive)
    client = authed(TestClient(app), archive)
    for method in ("OPTIONS", "GET"):
        response = client.request(method, "/dicomweb")
        assert response.status_code == 200
        document = response.json()
        paths = {r["path"]: r["methods"] for r in document["resources"]}
        assert paths["/dicomweb/studies"] == ["GET", "POST"] or set(paths["/dicomweb/studies"])
        for expected in (
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            "/dicomweb/studies/{study}/metadata",
            "/dicomweb/studies/{study}/thumbnail",
            "/dicomweb/wado",
        ):
            assert expected in paths, sorted(paths)
        assert set(document["mediaTypes"]) == {"QIDO-RS", "WADO-RS", "STOW-RS", "WADO-URI"}
    doc = (
        Path(__file__).resolve().parent.parent / "docs" / "conformance" / "dicomweb.md"
    ).read_text()
    missing = [
        p for p in paths if f"`{p.removeprefix('/dicomweb')}`" not in doc and p != "/dicomweb"
    ]
    assert not missing, f"resources not in docs/conformance/dicomweb.md: {missing}"


def test_cors_only_for_configured_origins(archive: Archive) -> None:
    """No CORS grant by default; with explicit origins, those and only those (SR-3)."""
    plain = authed(TestClient(create_app(archive)), archive)
    foreign = {"Origin": "https://evil.example"}
    assert (
        "access-control-allow-origin" not in plain.get("/dicomweb/studies", headers=foreign).headers
    )
    archive.settings = dataclasses.replace(
        archive.settings, http_cors_origins="https://viewer.example, http://127.0.0.1:3000"
    )
    client = authed(TestClient(create_app(archive)), archive)
    allowed = client.get("/dicomweb/studies", headers={"Origin": "https://viewer.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "access-control-allow-credentials" not in allowed.headers
    refused = client.get("/dicomweb/studies", headers=foreign)
    assert "access-control-allow-origin" not in refused.headers
    preflight = client.options(
        "/dicomweb/studies",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_setting_is_validated() -> None:
    import pytest

    from stockade.errors import ConfigError
    from stockade.settings import load

    for bad in ("*", "https://viewer.example/path", "viewer.example"):
        with pytest.raises(ConfigError, match="http_cors_origins"):
            load(environ={}, overrides={"http_cors_origins": bad})
    assert load(environ={}, overrides={"http_cors_origins": "https://a.example:8443"})


def test_orderby_sorts_every_page(archive: Archive) -> None:
    days = ["20240103", "20240301", "20231120", "20240215", "20240101"]
    for i, day in enumerate(days):
        ds = make_dataset(PatientID=f"P{i}", PatientName=f"NAME^{'EDCBA'[i]}", StudyDate=day)
        archive.store_file(part10(ds), Origin(via="import"))
    client = authed(TestClient(create_app(archive)), archive, "radiologist")

    def dates(**params: str) -> list[str]:
        answer = client.get("/dicomweb/studies", params=params)
        assert answer.status_code == 200, answer.text
        return [s["00080020"]["Value"][0] for s in answer.json()]

    newest = sorted(days, reverse=True)
    assert dates(orderby="-StudyDate") == newest
    pages = [dates(orderby="-StudyDate,StudyTime", limit="2", offset=o) for o in ("0", "2", "4")]
    assert [d for page in pages for d in page] == newest
    by_name = client.get("/dicomweb/studies", params={"orderby": "00100010"}).json()
    assert [s["00100020"]["Value"][0] for s in by_name] == ["P4", "P3", "P2", "P1", "P0"]
    for bad in ("SeriesNumber", "SOPInstanceUID", "Nonsense", "-"):
        answer = client.get("/dicomweb/studies", params={"orderby": bad})
        assert answer.status_code == 400, bad
        assert answer.headers["content-type"] == "application/problem+json"
