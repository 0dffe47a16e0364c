"""C-FIND against DCMTK findscu: full result sets over a synthetic archive with tricky values.

The expected matches are computed here by a reference matcher written independently of the
SQL engine (regular expressions over the generated values), and compared as whole sets.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from stockade.ingest import Origin
from tests.conftest import database
from tests.dicomfactory import make_dataset, part10

from .conftest import (
    AE_TITLE,
    DCMTK_TIMEOUTS,
    HOST,
    StockadeServer,
    clean_env,
    message_pdus,
    raw_associate,
    recv_pdu,
    require_dcmtk,
)
from .fill import archive_of

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
DATES = ("20231231", "20240101", "20240115", "20240131", "20240201")


@dataclass
class Study:
    uid: str
    date: str
    series: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # uid: (mod, sops)


@dataclass
class Patient:
    pid: str
    name: str
    charset: str | None = None
    studies: list[Study] = field(default_factory=list)


SPECIAL: tuple[tuple[str, str, str | None], ...] = (
    ("CASE-1", "Smith^John", None),
    ("CASE-2", "SMITH^JOHN", None),
    ("CASE-3", "smith^johnny", None),
    ("ID%1", "Percent^Pat", None),
    ("ID_1", "Under^Score", None),
    ("IDX1", "Plain^Id", None),
    ("ID11", "Other^Id", None),
    ("UTF-1", "Müller^Jürgen", "ISO_IR 192"),
    ("UTF-2", "山田^太郎", "ISO_IR 192"),
    ("LAT-1", "Ærø^Åse", "ISO_IR 100"),
    ("COMP-1", "Doe^Jane^^^", None),
    ("COMP-2", "Doe^Jane^Q", None),
    ("COMP-3", "Doe", None),
)


def build_patients() -> list[Patient]:
    patients = [Patient(pid, name, cs) for pid, name, cs in SPECIAL]
    patients += [Patient(f"GEN-{i:03d}", f"Gen^Patient{i}") for i in range(40)]
    n = 0
    for i, patient in enumerate(patients):
        for s in range(1 + i % 2):
            study = Study(generate_uid(), DATES[(i + s) % len(DATES)])
            for k, modality in enumerate(("CT", "MR")[: 1 + (i + s) % 2]):
                sops = [generate_uid() for _ in range(1 + (n + k) % 3)]
                study.series[generate_uid()] = (modality, sops)
            n += 1
            patient.studies.append(study)
    return patients


def populate(server: StockadeServer, patients: list[Patient]) -> None:
    """Store the archive in-process through the ingest pipeline (import path)."""
    with archive_of(server) as archive:
        for patient in patients:
            for study in patient.studies:
                for series_uid, (modality, sops) in study.series.items():
                    for number, sop in enumerate(sops, 1):
                        ds = make_dataset(
                            SOPInstanceUID=sop,
                            StudyInstanceUID=study.uid,
                            SeriesInstanceUID=series_uid,
                            PatientID=patient.pid,
                            PatientName=patient.name,
                            StudyDate=study.date,
                            Modality=modality,
                            InstanceNumber=number,
                        )
                        if patient.charset:
                            ds.SpecificCharacterSet = patient.charset
                        archive.store_file(part10(ds), Origin(via="import"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def archive_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StockadeServer, list[Patient]]]:
    """One populated archive per database for the whole module (queries do not change it)."""
    require_dcmtk("findscu")
    root = tmp_path_factory.mktemp(f"find-{request.param}")
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


def findscu(
    server: StockadeServer, out: Path, model: str, *keys: str, extra: tuple[str, ...] = ()
) -> tuple[list[pydicom.Dataset], str]:
    """Run findscu with -X; the response identifiers (in order) and findscu's output."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-v", model, "-aec", AE_TITLE, *DCMTK_TIMEOUTS, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, *extra, HOST, str(server.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return responses, result.stdout


# -- the reference matcher ----------------------------------------------------------------


def wild(value: str | None, pattern: str, *, fold: bool = False) -> bool:
    text = value or ""
    if fold:
        text, pattern = text.casefold(), pattern.casefold()
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, flags=re.DOTALL) is not None


def name_form(name: str) -> str:
    return "=".join(group.rstrip("^") for group in name.split("="))


def studies_where(patients: list[Patient], test: Callable[[Patient, Study], bool]) -> set[str]:
    return {s.uid for p in patients for s in p.studies if test(p, s)}


def study_uids(responses: list[pydicom.Dataset]) -> set[str]:
    uids = [str(r.StudyInstanceUID) for r in responses]
    assert len(uids) == len(set(uids)), "a study was returned twice"
    return set(uids)


# -- tests ------------------------------------------------------------------------------------

STUDY_KEYS = ("QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("smith^john", {"CASE-1", "CASE-2"}),
        ("SMITH^JOHN*", {"CASE-1", "CASE-2", "CASE-3"}),
        ("doe^jane", {"COMP-1"}),
        ("doe^jane*", {"COMP-1", "COMP-2"}),
        ("doe", {"COMP-3"}),
        ("*^id", {"IDX1", "ID11"}),
    ],
)
def test_person_names_match_case_insensitively_and_by_component(
    archive_server: tuple[StockadeServer, list[Patient]],
    tmp_path: Path,
    value: str,
    expected: set[str],
) -> None:
    server, patients = archive_server
    responses, output = findscu(server, tmp_path, "-S", *STUDY_KEYS, f"PatientName={value}")
    want = studies_where(
        patients, lambda p, s: wild(name_form(p.name), name_form(value), fold=True)
    )
    assert {p.pid for p in patients for s in p.studies if s.uid in want} == expected
    assert study_uids(responses) == want, output[-2000:]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ID%1", {"ID%1"}),
        ("ID_1", {"ID_1"}),
        ("ID_*", {"ID_1"}),
        ("ID%*", {"ID%1"}),
        ("ID?1", {"ID%1", "ID_1", "IDX1", "ID11"}),
        ("id_1", set()),  # LO matching is case-sensitive
    ],
)
def test_patient_ids_treat_percent_and_underscore_literally(
    archive_server: tuple[StockadeServer, list[Patient]],
    tmp_path: Path,
    value: str,
    expected: set[str],
) -> None:
    server, patients = archive_server
    responses, output = findscu(
        server,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        f"PatientID={value}",
        "PatientName",
        "NumberOfPatientRelatedStudies",
    )
    got = {str(r.PatientID): int(r.NumberOfPatientRelatedStudies) for r in responses}
    assert set(got) == expected == {p.pid for p in patients if wild(p.pid, value)}, output
    for patient in patients:
        if patient.pid in got:
            assert got[patient.pid] == len(patient.studies)


@pytest.mark.parametrize(
    "value", ["20240101-20240131", "-20240101", "20240201-", "20240131", "20231231-20231231"]
)
def test_study_date_ranges_include_their_edges(
    archive_server: tuple[StockadeServer, list[Patient]], tmp_path: Path, value: str
) -> None:
    server, patients = archive_server
    low, sep, high = value.partition("-")
    if not sep:
        high = low

    def inside(date: str) -> bool:
        return (not low or date >= low) and (not high or date <= high)

    responses, output = findscu(server, tmp_path, "-S", *STUDY_KEYS, f"StudyDate={value}")
    want = studies_where(patients, lambda p, s: inside(s.date))
    assert want
    assert study_uids(responses) == want, output[-2000:]
    assert {str(r.StudyDate) for r in responses} <= {s.date for s in [*_all(patients)]}


def _all(patients: list[Patient]) -> Iterator[Study]:
    for patient in patients:
        yield from patient.studies


@pytest.mark.parametrize(
    ("value", "pid", "stored"),
    [
        ("Müller*", "UTF-1", "Müller^Jürgen"),
        ("山田*", "UTF-2", "山田^太郎"),
        ("ærø^åse", "LAT-1", "Ærø^Åse"),
    ],
)
def test_non_ascii_names_in_iso_ir_192(
    archive_server: tuple[StockadeServer, list[Patient]],
    tmp_path: Path,
    value: str,
    pid: str,
    stored: str,
) -> None:
    server, _patients = archive_server
    responses, output = findscu(
        server,
        tmp_path,
        "-S",
        "SpecificCharacterSet=ISO_IR 192",
        *STUDY_KEYS,
        f"PatientName={value}",
    )
    assert {str(r.PatientID) for r in responses} == {pid}, output[-2000:]
    for response in responses:
        assert response.SpecificCharacterSet == "ISO_IR 192"
        assert str(response.PatientName) == stored


def test_series_and_image_levels_with_counts_and_uid_lists(
    archive_server: tuple[StockadeServer, list[Patient]], tmp_path: Path
) -> None:
    server, patients = archive_server
    study = max(_all(patients), key=lambda s: sum(len(v[1]) for v in s.series.values()))
    responses, output = findscu(
        server,
        tmp_path / "series",
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    got = {
        str(r.SeriesInstanceUID): (str(r.Modality), int(r.NumberOfSeriesRelatedInstances))
        for r in responses
    }
    assert got == {uid: (m, len(sops)) for uid, (m, sops) in study.series.items()}, output

    series_uid, (_modality, sops) = next(iter(study.series.items()))
    for model, extra_keys in (("-S", ()), ("-P", (f"PatientID={_owner(patients, study)}",))):
        responses, output = findscu(
            server,
            tmp_path / "image",
            model,
            "QueryRetrieveLevel=IMAGE",
            *extra_keys,
            f"StudyInstanceUID={study.uid}",
            f"SeriesInstanceUID={series_uid}",
            "SOPInstanceUID",
            "InstanceNumber",
        )
        assert {str(r.SOPInstanceUID) for r in responses} == set(sops), output
        assert sorted(int(r.InstanceNumber) for r in responses) == list(range(1, len(sops) + 1))

    wanted = [*sops[:1], generate_uid()]  # one stored, one unknown
    responses, output = findscu(
        server,
        tmp_path / "list",
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study.uid}",
        f"SeriesInstanceUID={series_uid}",
        f"SOPInstanceUID={chr(92).join(wanted)}",
    )
    assert [str(r.SOPInstanceUID) for r in responses] == sops[:1], output


def _owner(patients: list[Patient], study: Study) -> str:
    return next(p.pid for p in patients if study in p.studies)


def test_modalities_in_study_and_study_counts(
    archive_server: tuple[StockadeServer, list[Patient]], tmp_path: Path
) -> None:
    server, patients = archive_server
    responses, output = findscu(
        server,
        tmp_path,
        "-S",
        *STUDY_KEYS,
        "ModalitiesInStudy=MR",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    )
    want = {s.uid: s for s in _all(patients) if any(m == "MR" for m, _ in s.series.values())}
    assert study_uids(responses) == set(want), output[-2000:]
    for response in responses:
        study = want[str(response.StudyInstanceUID)]
        assert int(response.NumberOfStudyRelatedSeries) == len(study.series)
        assert int(response.NumberOfStudyRelatedInstances) == sum(
            len(sops) for _m, sops in study.series.values()
        )
        modalities = response.ModalitiesInStudy
        found = {modalities} if isinstance(modalities, str) else set(modalities)
        assert found == {m for m, _ in study.series.values()}


def test_result_cap_is_reported_and_cancel_stops_the_query(
    archive_server: tuple[StockadeServer, list[Patient]], tmp_path: Path
) -> None:
    server, patients = archive_server
    total = sum(len(p.studies) for p in patients)
    assert total > 60
    responses, output = findscu(server, tmp_path / "cap", "-S", *STUDY_KEYS, extra=("-d",))
    assert len(responses) == 60  # query_max_results, then a failure status that says so
    assert "DIMSE Status                  : 0xa700" in output, output[-2000:]
    assert "more than 60 matches; refine the query" in output

    responses, output = findscu(
        server, tmp_path / "cancel", "-S", *STUDY_KEYS, extra=("--cancel", "3")
    )
    # Responses already on their way when the C-CANCEL-RQ arrives still come (PS3.7
    # 9.3.2.3): with 60 small responses the archive may even be done before it sees the
    # cancel. Either way findscu gets a final status; the exact behaviour is pinned down by
    # test_cancel_before_the_first_match below.
    assert 3 <= len(responses) <= 60, output[-2000:]
    assert (
        "Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in output
        or "Final Find Response (Refused: OutOfResources)" in output
    ), output[-2000:]
    # The association is still usable and the archive still answers.
    responses, _ = findscu(server, tmp_path / "after", "-S", *STUDY_KEYS, "PatientID=CASE-1")
    assert len(responses) == 1


def test_bad_identifiers_get_a_failure_with_a_reason(
    archive_server: tuple[StockadeServer, list[Patient]], tmp_path: Path
) -> None:
    server, _patients = archive_server
    for keys in (
        ("QueryRetrieveLevel=STUDY", "StudyDate=2024-01-01"),
        ("QueryRetrieveLevel=NOPE", "PatientID"),
        ("QueryRetrieveLevel=PATIENT", "PatientID"),  # no PATIENT level in Study Root
        ("QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.x"),
    ):
        responses, output = findscu(server, tmp_path, "-S", *keys, extra=("-d",))
        assert responses == []
        assert "DIMSE Status                  : 0xa900" in output, output
        assert "(0000,0902) LO [" in output, output  # with an Error Comment


def test_cancel_before_the_first_match(
    archive_server: tuple[StockadeServer, list[Patient]],
) -> None:
    """A C-CANCEL-RQ already waiting when the matches are ready stops the query at once:
    no match is sent and the final status is FE00H; the association then serves the next
    query normally."""
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_messages import C_CANCEL_RQ, C_FIND_RQ
    from pynetdicom.dimse_primitives import C_CANCEL, C_FIND

    server, patients = archive_server
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)

    def find_message(message_id: int) -> bytes:
        primitive = C_FIND()
        primitive.MessageID = message_id
        primitive.AffectedSOPClassUID = STUDY_ROOT_FIND
        primitive.Priority = 2
        primitive.Identifier = BytesIO(buf.getvalue())
        message = C_FIND_RQ()
        message.primitive_to_message(primitive)
        return message_pdus(message)

    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 1
    cancel_message = C_CANCEL_RQ()
    cancel_message.primitive_to_message(cancel)

    def responses(sock: object) -> list[int]:
        statuses = []
        while True:
            pdu_type, body = recv_pdu(sock)  # type: ignore[arg-type]
            assert pdu_type == 0x04
            if body[5] == 0x03:  # a whole command: a response
                status = pydicom.dcmread(BytesIO(body[6:]), force=True).Status
                statuses.append(int(status))
                if status not in (0xFF00, 0xFF01):
                    return statuses

    sock = raw_associate(server.port, STUDY_ROOT_FIND, "1.2.840.10008.1.2", "CANCELSCU")
    sock.sendall(find_message(1) + message_pdus(cancel_message))
    assert responses(sock) == [0xFE00]
    sock.sendall(find_message(2))
    statuses = responses(sock)
    assert statuses[-1] == 0xA700 and statuses[:-1] == [0xFF00] * 60
    sock.close()
    assert sum(len(p.studies) for p in patients) > 60
