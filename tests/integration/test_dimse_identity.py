"""DIMSE User Identity negotiation (PS3.7 D.3.3.7) mapped to Stockade users, with DCMTK's
storescu as the peer: required identities, wrong passcodes refused, the user in the trail."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

from .conftest import (
    AE_TITLE,
    DCMTK_TIMEOUTS,
    HOST,
    StockadeServer,
    clean_env,
    require_dcmtk,
    write_ct_series,
)


def _store(
    server: StockadeServer, files: list[Path], *identity: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "-v",
            "-aet",
            "IDSCU",
            "-aec",
            AE_TITLE,
            *DCMTK_TIMEOUTS,
            *identity,
            HOST,
            str(server.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def test_passcode_identity_is_required_and_checked(
    make_server: Callable[..., StockadeServer], tmp_path: Path
) -> None:
    require_dcmtk("storescu")
    server = make_server(settings={"STOCKADE_DICOM_USER_IDENTITY": "passcode"})
    server.start()
    password = secrets.token_urlsafe(18)
    server.add_user("modality1", "technologist", password)
    files = list(write_ct_series(tmp_path / "ct", 2, size=16, patient_id="IDENT").values())

    for identity in (
        [],
        ["--user", "modality1"],
        ["--user", "modality1", "--password", "wrong-" * 3],
    ):
        refused = _store(server, files, *identity)
        assert refused.returncode != 0 and "Association Rejected" in refused.stdout, identity
    assert server.count() == 0

    accepted = _store(
        server, files, "--user", "modality1", "--password", password, "--pos-response"
    )
    assert accepted.returncode == 0, accepted.stdout
    assert server.count() == 2
    records = server.audit()
    stored = [r for r in records if r["type"] == "InstanceStored"]
    assert {r["actor"]["user"] for r in stored} == {"modality1"}
    logins = [(r["outcome"], r["method"]) for r in records if r["type"] == "UserLogin"]
    assert logins == [("failure", "dimse-passcode"), ("success", "dimse-passcode")]
    rejected = [r["reason"] for r in records if r["type"] == "AssociationRejected"]
    # the start-up echo (without an identity) was refused too
    assert rejected[-3:] == [
        "user identity: required (dicom_user_identity = passcode)",
        "user identity: a passcode is required",
        "user identity: 'modality1' was not accepted",
    ]
    assert password not in server.log_path.read_text()


def test_username_identity_names_the_user(
    make_server: Callable[..., StockadeServer], tmp_path: Path
) -> None:
    require_dcmtk("storescu")
    server = make_server(settings={"STOCKADE_DICOM_USER_IDENTITY": "username"})
    server.start()
    server.add_user("ct-room-2", "technologist")
    files = list(write_ct_series(tmp_path / "ct", 1, size=16, patient_id="IDENT2").values())
    assert _store(server, files, "--user", "nobody").returncode != 0
    done = _store(server, files, "--user", "ct-room-2")
    assert done.returncode == 0, done.stdout
    stored = [r for r in server.audit() if r["type"] == "InstanceStored"]
    assert [r["actor"]["user"] for r in stored] == ["ct-room-2"]
