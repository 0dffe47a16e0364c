"""Every audited operation against a real ``stockade serve`` writes exactly one record.

DCMTK drives DIMSE (storescu, findscu, getscu, movescu, echoscu), httpx drives DICOMweb
(STOW-RS, QIDO-RS, WADO-RS) and the CLI drives node changes, deletion and the trail itself.
After each operation the test reads the records written since the one before and checks
there is exactly one of the operation's type, with its actor, peer address, patient and
study. A secret given to Stockade along the way (the database password on PostgreSQL, a
DIMSE user-identity password, an HTTP bearer token) must appear in no record and no log.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.conftest import database

from .conftest import (
    AE_TITLE,
    DCMTK_TIMEOUTS,
    HOST,
    StockadeServer,
    clean_env,
    free_port,
    require_dcmtk,
    storescu,
    write_ct_series,
)

SECRET = "s3cr3t-" + secrets.token_hex(8)
#: HTTP Basic credentials of the user ``audituser`` whose password is :data:`SECRET`.
BASIC = "Basic " + base64.b64encode(f"audituser:{SECRET}".encode()).decode()
SCU = "AUDSCU"


class Rig:
    """A running server, its study files, and a cursor over its audit records."""

    def __init__(self, server: StockadeServer, root: Path) -> None:
        self.server = server
        self.root = root
        self.seen = 0
        self.files = write_ct_series(root / "dimse", 2, size=16, patient_id="AUD-DIMSE")
        self.web_files = write_ct_series(root / "web", 1, size=16, seed=3, patient_id="AUD-WEB")
        first = pydicom.dcmread(next(iter(self.files.values())))
        self.study = str(first.StudyInstanceUID)
        self.series = str(first.SeriesInstanceUID)
        self.web_study = str(pydicom.dcmread(next(iter(self.web_files.values()))).StudyInstanceUID)
        self.dest_port = free_port()

    def new_records(self) -> list[dict[str, Any]]:
        """Records written since the last call."""
        records = self.server.audit()
        fresh, self.seen = records[self.seen :], len(records)
        return fresh

    def one(self, event_type: str) -> dict[str, Any]:
        """The only record of *event_type* among the new ones (and nothing unexpected).

        Waits (bounded) for it: a record may land just after the client has its answer
        (a WADO-RS retrieve is recorded once its stream has ended)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            r["type"] == event_type for r in self.server.audit()[self.seen :]
        ):
            time.sleep(0.05)
        fresh = self.new_records()
        found = [r for r in fresh if r["type"] == event_type]
        assert len(found) == 1, [r["type"] for r in fresh]
        others = [r["type"] for r in fresh if r["type"] != event_type]
        assert not others, f"unexpected records besides {event_type}: {others}"
        return found[0]


def _wait_http(server: StockadeServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            # 401: up, and asking for credentials (every route needs them)
            if httpx.options(server.dicomweb, timeout=2).status_code in (200, 401):
                return
        time.sleep(0.1)  # readiness polling only
    pytest.fail(f"DICOMweb did not answer within {timeout} s\n{server.log_tail()}")


def _secret_url(url: str) -> str:
    """*url* with :data:`SECRET` as the password (PostgreSQL here trusts loopback)."""
    if not url.startswith("postgresql"):
        return url
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_dcmtk("storescu", "findscu", "getscu", "movescu", "storescp", "echoscu")
    root = tmp_path_factory.mktemp(f"audit-ops-{request.param}")
    with database(request.param, root) as url:
        server = StockadeServer(
            root,
            db_url=_secret_url(url),
            settings={"STOCKADE_METADATA_WARM_DELAY": "0", "STOCKADE_HTTP_WORKERS": "1"},
        )
        rig = Rig(server, root)
        server.start()
        try:
            _wait_http(server)
            made = server.cli(
                "user", "add", "audituser", "--role", "admin", "--password-stdin", input=SECRET
            )
            assert made.returncode == 0, made.stderr
            rig.new_records()  # the start and the user
            yield rig
        finally:
            if server.proc is not None:
                server.stop()
            server.assert_no_secret_written()


def _dcmtk(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=clean_env(),
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def _storescp(port: int, out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "-aet", "AUDDEST", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while _dcmtk(["echoscu", "-aec", "AUDDEST", HOST, str(port)]).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)  # readiness polling only
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _actor(record: dict[str, Any], via: str, ae: str | None = None) -> None:
    actor = record["actor"]
    assert actor["via"] == via
    if via in {"dimse", "web", "stow"}:
        assert actor["address"] == HOST
    if ae is not None:
        assert actor["ae_title"] == ae


def test_node_add_is_one_configuration_record(rig: Rig) -> None:
    added = rig.server.cli(
        "node", "add", "auditscu", "--ae", SCU, "--host", HOST, "--port", "104",
        "--allow", "echo,store,find,get,move",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    record = rig.one("NodeChanged")
    assert (record["name"], record["action"]) == ("auditscu", "add")
    assert record["actor"] == {
        "via": "cli",
        "user": getpass.getuser(),
        "ae_title": None,
        "address": None,
    }
    added = rig.server.cli(
        "node", "add", "auddest", "--ae", "AUDDEST", "--host", HOST,
        "--port", str(rig.dest_port), "--allow", "echo",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    rig.one("NodeChanged")


def test_c_store_is_one_record_per_instance(rig: Rig) -> None:
    done = storescu(
        rig.server.port, list(rig.files.values()), "--user", "audituser", "--password", SECRET,
        aet=SCU,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    fresh = rig.new_records()
    assert [r["type"] for r in fresh] == ["InstanceStored"] * 2
    for record in fresh:
        _actor(record, "dimse", SCU)
        assert (record["patient_id"], record["study_uid"]) == ("AUD-DIMSE", rig.study)
    assert {r["sop_instance_uid"] for r in fresh} == set(rig.files)


def test_stow_rs_is_one_record(rig: Rig) -> None:
    path = next(iter(rig.web_files.values()))
    boundary = "auditboundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    answer = httpx.post(
        f"{rig.server.dicomweb}/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            "Authorization": BASIC,
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    record = rig.one("InstanceStored")
    _actor(record, record["actor"]["via"])
    assert record["actor"]["via"] in {"stow", "web"}
    assert (record["patient_id"], record["study_uid"]) == ("AUD-WEB", rig.web_study)


def test_c_find_is_one_record(rig: Rig) -> None:
    done = _dcmtk(
        ["findscu", "-S", "-aet", SCU, "-aec", AE_TITLE, *DCMTK_TIMEOUTS,
         "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=AUD-DIMSE", "-k", "StudyInstanceUID",
         HOST, str(rig.server.port)]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    record = rig.one("QueryPerformed")
    _actor(record, "dimse", SCU)
    assert (record["keys"]["PatientID"], record["matches"]) == ("AUD-DIMSE", 1)


def test_qido_rs_is_one_record(rig: Rig) -> None:
    answer = httpx.get(
        f"{rig.server.dicomweb}/studies",
        params={"PatientID": "AUD-WEB"},
        headers={"Authorization": BASIC},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    record = rig.one("QueryPerformed")
    _actor(record, "web")
    assert (record["keys"]["PatientID"], record["matches"]) == ("AUD-WEB", 1)


def test_c_get_is_one_record(rig: Rig) -> None:
    out = rig.root / "got"
    out.mkdir()
    done = _dcmtk(
        ["getscu", "-S", "-aet", SCU, "-aec", AE_TITLE, *DCMTK_TIMEOUTS, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={rig.study}",
         HOST, str(rig.server.port)]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert len(list(out.iterdir())) == 2
    record = rig.one("InstancesRetrieved")
    _actor(record, "dimse", SCU)
    assert (record["service"], record["completed"]) == ("get", 2)
    assert (record["patient_ids"], record["study_uids"]) == (["AUD-DIMSE"], [rig.study])


def test_c_move_is_one_record(rig: Rig) -> None:
    with _storescp(rig.dest_port, rig.root / "moved"):
        rig.new_records()  # the echo of the readiness poll is not audited, but be sure
        done = _dcmtk(
            ["movescu", "-S", "-aet", SCU, "-aec", AE_TITLE, "-aem", "AUDDEST", *DCMTK_TIMEOUTS,
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={rig.study}",
             HOST, str(rig.server.port)]
        )  # fmt: skip
    assert done.returncode == 0, done.stdout
    record = rig.one("InstancesRetrieved")
    _actor(record, "dimse", SCU)
    assert (record["service"], record["destination"], record["completed"]) == ("move", "AUDDEST", 2)
    assert (record["patient_ids"], record["study_uids"]) == (["AUD-DIMSE"], [rig.study])


def test_wado_rs_is_one_record(rig: Rig) -> None:
    answer = httpx.get(
        f"{rig.server.dicomweb}/studies/{rig.web_study}",
        headers={"Accept": 'multipart/related; type="application/dicom"', "Authorization": BASIC},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text[:500]
    record = rig.one("InstancesRetrieved")
    _actor(record, "web")
    assert (record["service"], record["completed"]) == ("wado", 1)
    assert (record["patient_ids"], record["study_uids"]) == (["AUD-WEB"], [rig.web_study])


def test_rejected_association_is_one_security_record(rig: Rig) -> None:
    refused = _dcmtk(["echoscu", "-aet", "INTRUDER", "-aec", AE_TITLE, HOST, str(rig.server.port)])
    assert refused.returncode != 0
    record = rig.one("AssociationRejected")
    _actor(record, "dimse", "INTRUDER")
    assert record["outcome"] == "failure"


def test_delete_is_one_record(rig: Rig) -> None:
    deleted = rig.server.cli("delete", "--study", rig.study, "--series", rig.series, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 2 instances" in deleted.stdout
    record = rig.one("InstancesDeleted")
    assert record["actor"]["user"] == getpass.getuser() and record["actor"]["via"] == "cli"
    assert (record["patient_ids"], record["study_uids"], record["deleted"]) == (
        ["AUD-DIMSE"],
        [rig.study],
        2,
    )
    assert rig.server.count() == 1
    refused = rig.server.cli("delete", "--study", rig.study)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert rig.new_records() == []


def test_audit_list_by_patient_and_user(rig: Rig) -> None:
    listed = rig.server.cli("audit", "list", "--patient", "AUD-DIMSE", "--json")
    assert listed.returncode == 0, listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["type"], r.get("service")) for r in records] == [
        ("InstanceStored", None),
        ("InstanceStored", None),
        ("QueryPerformed", None),
        ("InstancesRetrieved", "get"),
        ("InstancesRetrieved", "move"),
        ("InstancesDeleted", None),
    ]
    listed = rig.server.cli("audit", "list", "--user", getpass.getuser(), "--json")
    assert listed.returncode == 0, listed.stderr
    types = [json.loads(line)["type"] for line in listed.stdout.splitlines()]
    assert types == ["NodeChanged", "NodeChanged", "InstancesDeleted", "AuditLogUsed"]
    text = rig.server.cli("audit", "list", "--patient", "AUD-WEB")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert [line.split()[2] for line in lines] == [
        "InstanceStored",
        "QueryPerformed",
        "InstancesRetrieved",
    ]
    assert all("patient=AUD-WEB" in line for line in lines[::2])
    fresh = rig.new_records()
    assert [r["type"] for r in fresh] == ["AuditLogUsed"] * 3


def test_trail_verifies_then_an_edit_and_a_deletion_are_named(rig: Rig) -> None:
    ok = rig.server.cli("audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "chain intact" in ok.stdout
    assert rig.server.stop() == 0
    target, original = rig.server.query(
        "SELECT seq, record FROM audit_record WHERE type = 'InstancesDeleted' ORDER BY seq"
    )[0]
    _sql(
        rig,
        "UPDATE audit_record SET record = :r WHERE seq = :s",
        r=original.replace("AUD-DIMSE", "OTHER"),
        s=target,
    )
    broken = rig.server.cli("audit", "verify")
    assert broken.returncode == 1
    assert f"BROKEN at record {target}:" in broken.stdout and "edited" in broken.stdout
    _sql(rig, "UPDATE audit_record SET record = :r WHERE seq = :s", r=original, s=target)
    assert rig.server.cli("audit", "verify").returncode == 0
    _sql(rig, "DELETE FROM audit_record WHERE seq = :s", s=target - 1)
    broken = rig.server.cli("audit", "verify")
    assert broken.returncode == 1
    assert f"BROKEN at record {target - 1}:" in broken.stdout and "deleted" in broken.stdout


def _sql(rig: Rig, statement: str, **params: object) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(rig.server.index_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


def test_no_secret_in_any_record_or_log(rig: Rig) -> None:
    """Runs last: everything the server and the CLI wrote is searched for the secret."""
    records = json.dumps(rig.server.audit())
    assert rig.server.audit(), "no records to search"
    assert SECRET not in records
    texts = [p for p in rig.root.rglob("*") if p.is_file() and p.suffix in {".log", ".jsonl", ""}]
    assert any(p.suffix == ".log" for p in texts)
    for path in texts:
        if path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), f"the secret is in {path}"
