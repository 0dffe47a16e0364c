"""Secure start and ``stockade check`` (threat model SR-3, SR-4, SR-6).

The CLI runs in-process (``stockade.cli.main``) with settings from ``STOCKADE_*`` variables
set for the test; the posture itself is also checked directly with :func:`assess`.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stockade.cli import main
from stockade.errors import ConfigError
from stockade.index.base import Node
from stockade.security import certs, posture
from stockade.security.posture import CRITICAL, INFO, WARNING, assess, secure_start
from stockade.settings import Settings, load
from tests.test_tls import write_cert


def settings_for(data_dir: Path, **values: Any) -> Settings:
    """Defaults (the loopback set-up of ``make run``) with *values* changed."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return load(environ={}, overrides={"data_dir": str(data_dir), **values})


def messages(report: posture.Report, severity: str) -> list[str]:
    return [f.message for f in report.findings if f.severity == severity]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """STOCKADE_* variables for an in-process ``stockade`` on a fresh data folder."""
    for name in [k for k in os.environ if k.startswith("STOCKADE_")]:
        if not name.startswith("STOCKADE_TEST_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    monkeypatch.setenv("STOCKADE_DATA_DIR", str(data))
    monkeypatch.setenv("STOCKADE_LOG_LEVEL", "ERROR")
    return data


# -- stockade check --------------------------------------------------------------------------


def test_default_loopback_setup_has_no_critical_finding(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check"]) == 0
    shown = capsys.readouterr().out
    assert "DIMSE      127.0.0.1:11112" in shown and "NOT encrypted, loopback only" in shown
    assert "HTTP       127.0.0.1:8080" in shown
    assert "0 critical" in shown and "no critical finding" in shown
    assert main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["critical"] is False
    assert [x["name"] for x in report["listeners"]] == ["DIMSE", "HTTP"]
    assert all(not x["encrypted"] and x["loopback"] for x in report["listeners"])
    assert not [f for f in report["findings"] if f["severity"] == CRITICAL]


def test_plain_dimse_on_all_interfaces_is_critical(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STOCKADE_DICOM_HOST", "0.0.0.0")
    assert main(["check"]) == 1
    shown = capsys.readouterr().out
    assert (
        "CRITICAL listener: DIMSE listens on 0.0.0.0:11112, beyond loopback, without TLS" in shown
    )
    assert "[setting: dicom_plain]" in shown
    assert "not safe to serve" in shown
    assert main(["check", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    critical = [f for f in report["findings"] if f["severity"] == CRITICAL]
    assert [(f["topic"], f["setting"]) for f in critical] == [("listener", "dicom_plain")]
    assert report["listeners"][0] == {
        "name": "DIMSE",
        "host": "0.0.0.0",
        "port": 11112,
        "encrypted": False,
        "loopback": False,
        "detail": "",
    }


def test_check_lists_nodes_in_clear_when_plain_is_allowed(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "add", "ct1", "--ae", "CT1", "--host", "192.0.2.5", "--port", "104"]) == 0
    assert (
        main(
            ["node", "add", "mr1", "--ae", "MR1", "--host", "192.0.2.6", "--port", "2762", "--tls"]
        )
        == 0
    )
    capsys.readouterr()
    monkeypatch.setenv("STOCKADE_DICOM_HOST", "0.0.0.0")
    monkeypatch.setenv("STOCKADE_ALLOW_PLAIN_BEYOND_LOOPBACK", "true")
    assert main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    warnings = [f["message"] for f in report["findings"] if f["severity"] == WARNING]
    assert any("allowed by allow_plain_beyond_loopback" in m for m in warnings), warnings
    assert any(m.startswith("node ct1 (CT1 at 192.0.2.5:104) talks plain DIMSE") for m in warnings)
    assert not any("mr1" in m for m in warnings)  # marked --tls


# -- assess ----------------------------------------------------------------------------------


def test_certificates_and_their_expiry_are_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    issued = certs.init(data)
    now = datetime.now(UTC)
    soon = write_cert(
        tmp_path, "soon", not_before=now - timedelta(days=300), not_after=now + timedelta(days=10)
    )
    s = settings_for(
        data,
        dicom_tls_cert_file=str(issued.cert),
        dicom_tls_key_file=str(issued.key),
        dicom_tls_client_ca_file=str(issued.ca),
        http_tls_cert_file=str(soon[0]),
        http_tls_key_file=str(soon[1]),
    )
    report = assess(s, nodes=[], has_users=True)
    assert not report.critical, report.findings
    assert [(x.name, x.encrypted, x.detail) for x in report.listeners] == [
        ("DIMSE", False, ""),
        ("DICOM TLS", True, "mutual TLS required"),
        ("HTTPS", True, "DICOMweb under /dicomweb"),
    ]
    by_setting = {c["setting"]: c for c in report.certificates}
    assert by_setting["dicom_tls_cert_file"]["days_left"] >= certs.DEFAULT_DAYS - 2
    assert by_setting["http_tls_cert_file"]["days_left"] == 9
    assert any("expires in 9 days" in m for m in messages(report, WARNING))
    # expired: critical, the same message serve would refuse with
    old = write_cert(
        tmp_path, "old", not_before=now - timedelta(days=300), not_after=now - timedelta(days=1)
    )
    expired = assess(
        settings_for(data, http_tls_cert_file=str(old[0]), http_tls_key_file=str(old[1])),
        nodes=[],
        has_users=True,
    )
    assert expired.critical
    assert any("expired on" in m for m in messages(expired, CRITICAL))


def test_weak_settings_and_permissions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    issued = certs.init(data)
    issued.key.chmod(0o644)
    s = settings_for(
        data,
        dicom_tls_cert_file=str(issued.cert),
        dicom_tls_key_file=str(issued.key),
        http_cors_origins="https://viewer.example.org",
        allow_replace=True,
        max_object_size=8 << 30,
    )
    data.chmod(0o777)
    (data / "quarantine").mkdir(mode=0o755)
    report = assess(s, nodes=[Node("ct", "CT", "127.0.0.1", 104)], has_users=False)
    critical = messages(report, CRITICAL)
    assert any(m.startswith(f"{data} is writable by everyone") for m in critical), critical
    assert any(f"private key {issued.key} is readable by other users" in m for m in critical)
    warned = messages(report, WARNING)
    assert any("viewer.example.org" in m for m in warned)
    assert any("replace a stored one" in m for m in warned)
    assert any(m.startswith("max_object_size is") for m in warned)
    assert any("quarantine is open to other users" in m for m in warned)
    assert any("does not ask for client certificates" in m for m in messages(report, INFO))
    data.chmod(0o700)
    issued.key.chmod(0o600)
    fixed = assess(s, nodes=[], has_users=False)
    assert not fixed.critical, fixed.findings


def test_http_beyond_loopback_without_users_is_critical(tmp_path: Path) -> None:
    data = tmp_path / "data"
    issued = certs.init(data)
    s = settings_for(
        data,
        http_host="0.0.0.0",
        http_tls_cert_file=str(issued.cert),
        http_tls_key_file=str(issued.key),
    )
    assert any(
        "no user exists" in m for m in messages(assess(s, nodes=[], has_users=False), CRITICAL)
    )
    assert not assess(s, nodes=[], has_users=True).critical


# -- secure start ----------------------------------------------------------------------------


def test_secure_start_accepts_the_loopback_defaults(tmp_path: Path) -> None:
    secure_start(settings_for(tmp_path / "d"), has_users=lambda: False)


def test_secure_start_refuses_plain_dimse_beyond_loopback(tmp_path: Path) -> None:
    s = settings_for(tmp_path / "d", dicom_host="0.0.0.0")
    with pytest.raises(ConfigError) as refused:
        secure_start(s, has_users=lambda: True)
    reason = refused.value.reason
    assert reason.startswith("dicom_host 0.0.0.0 is not a loopback address")
    for setting in ("dicom_plain", "dicom_tls_cert_file", "allow_plain_beyond_loopback"):
        assert setting in reason
    allowed = settings_for(
        tmp_path / "d",
        dicom_host="0.0.0.0",
        allow_plain_beyond_loopback=True,
    )
    secure_start(allowed, has_users=lambda: True)


def test_secure_start_refuses_http_beyond_loopback_without_tls_or_users(tmp_path: Path) -> None:
    data = tmp_path / "d"
    plain = settings_for(data, http_host="0.0.0.0")
    with pytest.raises(ConfigError, match="not a loopback address and HTTPS is not configured"):
        secure_start(plain, has_users=lambda: True)
    issued = certs.init(data)
    https = settings_for(
        data,
        http_host="0.0.0.0",
        http_tls_cert_file=str(issued.cert),
        http_tls_key_file=str(issued.key),
    )
    with pytest.raises(ConfigError, match="no user exists") as refused:
        secure_start(https, has_users=lambda: False)
    assert "http_host" in refused.value.reason
    secure_start(https, has_users=lambda: True)


def test_secure_start_needs_a_dimse_listener_and_a_usable_certificate(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with pytest.raises(ConfigError, match="no DIMSE listener"):
        secure_start(settings_for(data, dicom_plain=False))
    now = datetime.now(UTC)
    old = write_cert(
        tmp_path, "old", not_before=now - timedelta(days=90), not_after=now - timedelta(hours=1)
    )
    expired = settings_for(
        data, dicom_tls_cert_file=str(old[0]), dicom_tls_key_file=str(old[1]), dicom_plain=False
    )
    with pytest.raises(ConfigError, match=r"^dicom_tls_cert_file: .* expired on"):
        secure_start(expired)


def test_without_the_user_module_there_are_no_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "stockade.auth.users", None)
    assert posture.archive_has_users(settings_for(tmp_path / "d")) is False
