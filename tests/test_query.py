"""The query model and matching rules (PS3.4 C.2.2.2), through Archive.query."""

from __future__ import annotations

import pytest

from stockade.archive import SERVICES, Archive, Peer
from stockade.audit.events import QueryPerformed
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.attributes import Level
from stockade.dicom.matching import Kind, like_pattern, normalize_name, parse
from stockade.errors import InvalidQuery, NotAuthorized
from stockade.ingest import Origin
from tests.dicomfactory import make_dataset, part10

PEER = Peer("WORKSTATION", "127.0.0.1", None, SERVICES)


@pytest.mark.parametrize(
    ("vr", "raw", "kind", "values", "low", "high"),
    [
        ("LO", "", Kind.UNIVERSAL, (), None, None),
        ("LO", "*", Kind.UNIVERSAL, (), None, None),
        ("LO", "AB*", Kind.WILDCARD, ("AB*",), None, None),
        ("LO", "A%B", Kind.SINGLE, ("A%B",), None, None),
        ("CS", "CT\\MR", Kind.LIST, ("CT", "MR"), None, None),
        ("UI", "1.2\\1.3", Kind.LIST, ("1.2", "1.3"), None, None),
        ("DA", "20240101-", Kind.RANGE, (), "20240101", None),
        ("DA", "-20240131", Kind.RANGE, (), None, "20240131"),
        ("TM", "0900-1030", Kind.RANGE, (), "0900", "1030"),
        ("IS", " 7 ", Kind.SINGLE, ("7",), None, None),
    ],
)
def test_parse_matching_values(
    vr: str, raw: str, kind: Kind, values: tuple[str, ...], low: str | None, high: str | None
) -> None:
    cond = parse("Key", vr, raw)
    assert (cond.kind, cond.values, cond.low, cond.high) == (kind, values, low, high)


@pytest.mark.parametrize(
    ("vr", "raw"),
    [
        ("DA", "2024-01-01"),
        ("DA", "20240131-20240101"),
        ("DA", "2024*"),
        ("TM", "25:00"),
        ("UI", "1.2.*"),
        ("UI", "../../x"),
        ("IS", "seven"),
        ("LO", "x" * 70_000),
        ("CS", "\\".join(["CT"] * 1001)),
    ],
)
def test_parse_refuses_what_no_rule_accepts(vr: str, raw: str) -> None:
    with pytest.raises(InvalidQuery):
        parse("Key", vr, raw)


def test_like_pattern_and_name_form() -> None:
    assert like_pattern("a%b_c\\d*e?") == "a\\%b\\_c\\\\d%e_"
    assert normalize_name("Doe^Jane^^^") == "doe^jane"
    assert normalize_name("Yamada^Tarou=山田^太郎=") == "yamada^tarou=山田^太郎"


def test_archive_query_is_audited(archive: Archive, audit: MemoryAuditSink) -> None:
    for pid in ("A1", "A2", "B1"):
        archive.store_file(part10(make_dataset(PatientID=pid)), Origin(via="import"))
    found = archive.query(Level.STUDY, {"PatientID": "A*"}, peer=PEER)
    assert sorted(str(r["PatientID"]) for r in found.rows) == ["A1", "A2"]
    assert not found.more
    page = archive.query(Level.STUDY, {"PatientID": ""}, peer=PEER, limit=2)
    assert len(page.rows) == 2 and page.more

    with pytest.raises(InvalidQuery):
        archive.query(Level.STUDY, {"StudyDate": "yesterday"}, peer=PEER)
    echo_only = Peer("ECHOER", "127.0.0.1", "echoer", frozenset({"echo"}))
    with pytest.raises(NotAuthorized):
        archive.query(Level.STUDY, {"PatientID": "A1"}, peer=echo_only)

    events = [e for e in audit.events if isinstance(e, QueryPerformed)]
    assert [(e.outcome, e.matches, e.truncated) for e in events] == [
        ("success", 2, False),
        ("success", 2, True),
        ("failure", 0, False),
        ("failure", 0, False),
    ]
    assert events[0].keys == {"PatientID": "A*"} and events[0].actor.ae_title == "WORKSTATION"
    assert events[2].reason and "date" in events[2].reason


def test_results_sorted_by_keys_across_pages(archive: Archive) -> None:
    made = [
        ("P3", "zeta^anna", "20240105"),
        ("P1", "Alpha^Bob", "20240301"),
        ("P4", "beta^carl", "20231231"),
        ("P2", "ALPHA^ann", "20240301"),
        ("P5", "Gamma^Dora", ""),
    ]
    for pid, name, day in made:
        ds = make_dataset(PatientID=pid, PatientName=name, StudyDate=day)
        archive.store_file(part10(ds), Origin(via="import"))

    def ids(order: list[tuple[str, bool]], **page: int) -> list[str]:
        found = archive.query(Level.STUDY, {"PatientID": ""}, order=order, **page)
        return [str(r["PatientID"]) for r in found.rows]

    # newest first; a tie (P1, P2: the same day) keeps storage order; no date sorts last
    assert ids([("StudyDate", True)]) == ["P1", "P2", "P3", "P4", "P5"]
    assert ids([("StudyDate", False)]) == ["P4", "P3", "P1", "P2", "P5"]
    # names case-insensitively, then the second key decides
    assert ids([("PatientName", False), ("PatientID", True)]) == ["P2", "P1", "P4", "P5", "P3"]
    # pages follow the order
    pages = [ids([("StudyDate", True)], limit=2, offset=o) for o in (0, 2, 4)]
    assert pages == [["P1", "P2"], ["P3", "P4"], ["P5"]]
    for bad in (
        [("SeriesNumber", False)],  # below the study level
        [("SOPInstanceUID", False)],  # not sortable
        [("Nonsense", True)],
        [("StudyDate", True)] * 5,  # too many keys
    ):
        with pytest.raises(InvalidQuery):
            archive.query(Level.STUDY, {}, order=bad)
