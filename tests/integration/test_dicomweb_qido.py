"""QIDO-RS against dicomweb-client: the tricky archive of the C-FIND tests, searched over HTTP.

The same synthetic patients (names differing only in case or in ``^`` components, ``%`` and
``_`` in IDs, non-ASCII names, dates at range edges) and the same independent reference
matcher as ``test_dimse_find.py``; results are compared as whole sets. C-FIND and QIDO-RS
share one query engine, so they must agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import database

from .conftest import StockadeServer
from .test_dimse_find import (
    Patient,
    _all,
    build_patients,
    name_form,
    populate,
    studies_where,
    wild,
)

STUDY_UID, PATIENT_ID, SERIES_UID, SOP_UID = "0020000D", "00100020", "0020000E", "00080018"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def web_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StockadeServer, list[Patient]]]:
    root = tmp_path_factory.mktemp(f"qido-{request.param}")
    with database(request.param, root) as url:
        server = StockadeServer(root, db_url=url, settings={"STOCKADE_QUERY_MAX_RESULTS": "60"})
        patients = build_patients()
        populate(server, patients)
        server.start()
        try:
            yield server, patients
        finally:
            if server.proc is not None:
                server.stop()
            server.assert_no_secret_written()


def values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def uids(results: list[dict[str, Any]], tag: str = STUDY_UID) -> set[str]:
    found = [values(r, tag)[0] for r in results]
    assert len(found) == len(set(found)), "a result was returned twice"
    return set(found)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("smith^john", {"CASE-1", "CASE-2"}),
        ("SMITH^JOHN*", {"CASE-1", "CASE-2", "CASE-3"}),
        ("doe^jane*", {"COMP-1", "COMP-2"}),
        ("*^id", {"IDX1", "ID11"}),
    ],
)
def test_person_names(
    web_server: tuple[StockadeServer, list[Patient]], value: str, expected: set[str]
) -> None:
    server, patients = web_server
    client = server.web()
    results = client.search_for_studies(search_filters={"PatientName": value})
    want = studies_where(
        patients, lambda p, s: wild(name_form(p.name), name_form(value), fold=True)
    )
    assert {p.pid for p in patients for s in p.studies if s.uid in want} == expected
    assert uids(results) == want


@pytest.mark.parametrize("value", ["ID%1", "ID_1", "ID_*", "ID?1", "id_1"])
def test_patient_ids_treat_percent_and_underscore_literally(
    web_server: tuple[StockadeServer, list[Patient]], value: str
) -> None:
    server, patients = web_server
    client = server.web()
    results = client.search_for_studies(search_filters={"00100020": value})
    assert uids(results) == studies_where(patients, lambda p, s: wild(p.pid, value))


@pytest.mark.parametrize("value", ["20240101-20240131", "-20240101", "20240201-", "20240131"])
def test_study_date_ranges(web_server: tuple[StockadeServer, list[Patient]], value: str) -> None:
    server, patients = web_server
    low, sep, high = value.partition("-")
    if not sep:
        high = low
    client = server.web()
    results = client.search_for_studies(search_filters={"StudyDate": value})
    want = studies_where(
        patients, lambda p, s: (not low or s.date >= low) and (not high or s.date <= high)
    )
    assert want and uids(results) == want


def test_non_ascii_names_come_back_as_stored(
    web_server: tuple[StockadeServer, list[Patient]],
) -> None:
    server, _patients = web_server
    client = server.web()
    for value, pid, stored in (
        ("Müller*", "UTF-1", "Müller^Jürgen"),
        ("山田*", "UTF-2", "山田^太郎"),
        ("ærø^åse", "LAT-1", "Ærø^Åse"),
    ):
        results = client.search_for_studies(search_filters={"PatientName": value})
        assert {values(r, PATIENT_ID)[0] for r in results} == {pid}
        assert all(values(r, "00100010")[0]["Alphabetic"] == stored for r in results)


def test_series_and_instances_with_counts(
    web_server: tuple[StockadeServer, list[Patient]],
) -> None:
    server, patients = web_server
    client = server.web()
    study = max(_all(patients), key=lambda s: sum(len(v[1]) for v in s.series.values()))
    series = client.search_for_series(study_instance_uid=study.uid)
    got = {
        values(r, SERIES_UID)[0]: (values(r, "00080060")[0], values(r, "00201209")[0])
        for r in series
    }
    assert got == {uid: (m, len(sops)) for uid, (m, sops) in study.series.items()}
    series_uid, (_modality, sops) = next(iter(study.series.items()))
    instances = client.search_for_instances(
        study_instance_uid=study.uid, series_instance_uid=series_uid
    )
    assert uids(instances, SOP_UID) == set(sops)
    everywhere = client.search_for_instances(search_filters={"SOPInstanceUID": sops[0]})
    assert uids(everywhere, SOP_UID) == {sops[0]}
    assert values(everywhere[0], STUDY_UID) == [study.uid]  # study attributes included
    url = values(everywhere[0], "00081190")[0]
    assert url.endswith(f"/studies/{study.uid}/series/{series_uid}/instances/{sops[0]}")


def test_paging_limit_offset_and_the_maximum(
    web_server: tuple[StockadeServer, list[Patient]],
) -> None:
    server, patients = web_server
    client = server.web()
    total = sum(len(p.studies) for p in patients)
    assert total > 60
    first = client.search_for_studies(limit=25, offset=0)
    second = client.search_for_studies(limit=25, offset=25)
    assert len(first) == len(second) == 25
    assert not uids(first) & uids(second)
    with server.http() as http:
        capped = http.get(f"{server.dicomweb}/studies", params={"limit": "500"})
        assert capped.status_code == 200 and len(capped.json()) == 60
        warning = capped.headers["warning"]
        assert "lowered to the maximum page 60" in warning
        assert "additional results" in warning
        everything = []
        for offset in range(0, total, 60):
            page = http.get(f"{server.dicomweb}/studies", params={"offset": str(offset)})
            everything += page.json()
        assert uids(everything) == {s.uid for s in _all(patients)}


def test_includefield_and_bad_requests(web_server: tuple[StockadeServer, list[Patient]]) -> None:
    server, _patients = web_server
    with server.http() as http:
        base = server.dicomweb
        one = http.get(f"{base}/studies", params={"PatientID": "CASE-1", "includefield": "all"})
        assert one.status_code == 200
        assert one.headers["content-type"].startswith("application/dicom+json")
        assert one.headers["x-content-type-options"] == "nosniff"
        (item,) = one.json()
        assert "00201200" in item  # NumberOfPatientRelatedStudies, from includefield=all
        for params, fragment in (
            ({"Nonsense": "1"}, "unknown or unsupported attribute"),
            ({"StudyDate": "2024-01"}, "StudyDate"),
            ({"limit": "-1"}, "limit"),
            ({"00081032.00080100": "X"}, "sequence matching"),
        ):
            bad = http.get(f"{base}/studies", params=params)
            assert bad.status_code == 400, (params, bad.text)
            assert bad.headers["content-type"] == "application/problem+json"
            assert fragment in bad.json()["detail"]
        assert http.get(f"{base}/studies/not-a-uid/series").status_code == 400
        assert http.get(f"{base}/studies/1.2.3/series").json() == []
