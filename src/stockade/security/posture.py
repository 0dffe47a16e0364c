"""Secure start and the security posture report (``stockade check``).

:func:`secure_start` runs in ``stockade serve`` before any socket is bound and refuses a
set-up that would expose the archive (threat model SR-3, SR-4): a plain listener beyond
loopback without ``allow_plain_beyond_loopback``, HTTP beyond loopback without any user, no
DIMSE listener at all; it also builds the TLS contexts, so an unreadable, mismatched,
expired or not yet valid certificate stops the start (SR-6).

:func:`assess` builds the report of ``stockade check``: every listener and whether it is
encrypted, the certificates and their days to expiry, weak or risky settings, nodes that
may talk in clear, and the permissions of the data folder, the quarantine and the key
files. Each finding is ``critical``, ``warning`` or ``info``; ``stockade check`` exits 1 on
any critical finding.

Whether a user exists is asked through :func:`archive_has_users`, which calls
``stockade.auth.users.any_user(settings)``; without that module (a build without user
accounts) the answer is "no users", so HTTP beyond loopback is refused.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stockade.errors import ConfigError
from stockade.index.base import Node
from stockade.security.tls import (
    EXPIRY_WARNING_DAYS,
    CertificateInfo,
    certificate_info,
    client_context,
    dicom_server_context,
    http_server_context,
)
from stockade.settings import GiB, Settings, cors_origins, is_loopback

CRITICAL = "critical"
WARNING = "warning"
INFO = "info"
_ORDER = {CRITICAL: 0, WARNING: 1, INFO: 2}


def archive_has_users(settings: Settings) -> bool:
    """Whether the archive has at least one user (``stockade.auth.users.any_user``).

    Without the user accounts module the answer is False: no users, so nothing may listen
    for HTTP beyond loopback.
    """
    try:
        from stockade.auth.users import any_user
    except ModuleNotFoundError as exc:
        if exc.name in {"stockade.auth", "stockade.auth.users"}:
            return False
        raise
    return bool(any_user(settings))


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def secure_start(settings: Settings, has_users: Callable[[], bool] | None = None) -> None:
    """Refuse to serve an exposed set-up; check every certificate and key (SR-3, SR-4, SR-6).

    Parameters
    ----------
    settings : Settings
        The settings ``stockade serve`` runs with.
    has_users : callable, optional
        Whether a user exists; default :func:`archive_has_users`. Asked only when HTTP
        listens beyond loopback.

    Raises
    ------
    ConfigError
        With a message that names the setting to change.
    """
    allow = settings.allow_plain_beyond_loopback
    if not settings.dicom_plain and not settings.dicom_tls:
        raise ConfigError(
            "no DIMSE listener: dicom_plain is off and DICOM TLS is not configured (set "
            "dicom_tls_cert_file and dicom_tls_key_file, or dicom_plain = true)"
        )
    if settings.dicom_plain and not settings.dicom_on_loopback and not allow:
        raise ConfigError(
            f"dicom_host {settings.dicom_host} is not a loopback address and the plain DIMSE "
            f"listener (dicom_plain, port {settings.dicom_port}) would carry patient data "
            "unencrypted: set dicom_tls_cert_file and dicom_tls_key_file (stockade certs "
            "init) and dicom_plain = false, or dicom_host = 127.0.0.1, or, on a trusted "
            "network only, allow_plain_beyond_loopback = true"
        )
    if settings.http_enabled and not is_loopback(settings.http_host):
        if not settings.http_tls and not allow:
            raise ConfigError(
                f"http_host {settings.http_host} is not a loopback address and HTTPS is not "
                "configured: set http_tls_cert_file and http_tls_key_file (stockade certs "
                "init), or http_host = 127.0.0.1, or, behind a TLS-terminating proxy only, "
                "allow_plain_beyond_loopback = true"
            )
        if not (has_users or (lambda: archive_has_users(settings)))():
            raise ConfigError(
                f"http_host {settings.http_host} is not a loopback address and no user "
                "exists, so anyone who reaches the port could use it: create a user first "
                "(stockade user add NAME --role admin), or set http_host = 127.0.0.1"
            )
    if settings.dicom_tls:
        dicom_server_context(settings)
        client_context(
            settings.dicom_tls_peer_ca_file,
            settings.dicom_tls_cert_file,
            settings.dicom_tls_key_file,
        )
    if settings.http_enabled and settings.http_tls:
        http_server_context(settings)


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    severity: str
    topic: str
    message: str
    setting: str | None = None


@dataclass(frozen=True)
class Listener:
    """A socket ``stockade serve`` listens on with these settings."""

    name: str
    host: str
    port: int
    encrypted: bool
    loopback: bool
    detail: str = ""


@dataclass
class Report:
    """The security posture: listeners, certificates and findings."""

    listeners: list[Listener] = field(default_factory=list)
    certificates: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, topic: str, message: str, setting: str | None = None) -> None:
        """Record a finding."""
        self.findings.append(Finding(severity, topic, message, setting))

    @property
    def critical(self) -> bool:
        """True when any finding is critical (``stockade check`` exits 1)."""
        return any(f.severity == CRITICAL for f in self.findings)

    def sorted_findings(self) -> list[Finding]:
        """Findings, the most severe first."""
        return sorted(self.findings, key=lambda f: _ORDER[f.severity])

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready report."""
        return {
            "listeners": [asdict(x) for x in self.listeners],
            "certificates": self.certificates,
            "findings": [asdict(f) for f in self.sorted_findings()],
            "critical": self.critical,
        }


def _listeners(settings: Settings, report: Report) -> None:
    dicom_loop = settings.dicom_on_loopback
    if settings.dicom_plain:
        report.listeners.append(
            Listener("DIMSE", settings.dicom_host, settings.dicom_port, False, dicom_loop)
        )
    if settings.dicom_tls:
        if settings.dicom_tls_client_ca_file:
            mutual = (
                "mutual TLS required"
                if settings.dicom_tls_require_client_cert
                else "mutual TLS optional"
            )
        else:
            mutual = "no client certificates"
        report.listeners.append(
            Listener(
                "DICOM TLS", settings.dicom_host, settings.dicom_tls_port, True, dicom_loop, mutual
            )
        )
    if settings.http_enabled:
        name = "HTTPS" if settings.http_tls else "HTTP"
        report.listeners.append(
            Listener(
                name,
                settings.http_host,
                settings.http_port,
                settings.http_tls,
                is_loopback(settings.http_host),
                "DICOMweb under /dicomweb",
            )
        )


def _plain_listeners(settings: Settings, report: Report, has_users: bool) -> None:
    allow = settings.allow_plain_beyond_loopback
    for listener in report.listeners:
        where = _where(listener.host, listener.port)
        if listener.encrypted or listener.loopback:
            continue
        setting = "dicom_plain" if listener.name == "DIMSE" else "http_tls_cert_file"
        if not allow:
            report.add(
                CRITICAL,
                "listener",
                f"{listener.name} listens on {where}, beyond loopback, without TLS: "
                "stockade serve refuses this (anyone on the network could read and send "
                "patient data in clear)",
                setting,
            )
        else:
            report.add(
                WARNING,
                "listener",
                f"{listener.name} listens on {where}, beyond loopback, without TLS "
                "(allowed by allow_plain_beyond_loopback): patient data travels in clear",
                "allow_plain_beyond_loopback",
            )
    if settings.http_enabled:
        if not is_loopback(settings.http_host) and not has_users:
            report.add(
                CRITICAL,
                "users",
                f"HTTP listens on {settings.http_host}, beyond loopback, and no user exists: "
                "stockade serve refuses this; create a user first",
                "http_host",
            )
        elif not has_users:
            report.add(
                INFO,
                "users",
                "no user exists yet; HTTP is on loopback, so only this machine can reach it",
            )
    if settings.dicom_plain and settings.dicom_tls and not settings.dicom_on_loopback and allow:
        report.add(
            INFO,
            "listener",
            "both plain DIMSE and DICOM TLS listen beyond loopback; nodes marked --tls are "
            "admitted over TLS only",
        )


def _certificates(settings: Settings, report: Report, now: datetime) -> None:
    files: list[tuple[str, str]] = []
    if settings.dicom_tls:
        files.append((settings.dicom_tls_cert_file, "dicom_tls_cert_file"))
    if settings.http_enabled and settings.http_tls:
        files.append((settings.http_tls_cert_file, "http_tls_cert_file"))
    for ca, setting in (
        (settings.dicom_tls_client_ca_file, "dicom_tls_client_ca_file"),
        (settings.dicom_tls_peer_ca_file, "dicom_tls_peer_ca_file"),
    ):
        if ca:
            files.append((ca, setting))
    for path, setting in files:
        try:
            info: CertificateInfo = certificate_info(path, setting)
        except ConfigError as exc:
            report.add(CRITICAL, "certificate", exc.reason, setting)
            continue
        days = info.days_left(now)
        report.certificates.append(
            {
                "setting": setting,
                "path": path,
                "subject": info.subject,
                "not_after": info.not_after.isoformat(),
                "days_left": days,
            }
        )
        is_ca = setting.endswith("_ca_file")
        if info.expired(now):
            report.add(
                CRITICAL if not is_ca else WARNING,
                "certificate",
                f"{path} ({info.subject}) expired on {info.not_after:%Y-%m-%d}"
                + ("" if is_ca else ": stockade serve refuses to start"),
                setting,
            )
        elif info.not_yet_valid(now):
            report.add(
                CRITICAL,
                "certificate",
                f"{path} ({info.subject}) is not valid before {info.not_before:%Y-%m-%d}",
                setting,
            )
        elif days < EXPIRY_WARNING_DAYS:
            report.add(
                WARNING,
                "certificate",
                f"{path} ({info.subject}) expires in {days} days, on {info.not_after:%Y-%m-%d}",
                setting,
            )
        else:
            report.add(INFO, "certificate", f"{path} ({info.subject}): {days} days left", setting)
    # The key and the chain must also load together (a mismatch refuses to start).
    if any(f.severity == CRITICAL and f.topic == "certificate" for f in report.findings):
        return
    try:
        if settings.dicom_tls:
            dicom_server_context(settings)
        if settings.http_enabled and settings.http_tls:
            http_server_context(settings)
    except ConfigError as exc:
        report.add(CRITICAL, "certificate", exc.reason)


def _settings(settings: Settings, report: Report) -> None:
    origins = cors_origins(settings.http_cors_origins)
    if origins:
        report.add(
            WARNING,
            "settings",
            f"browsers on {', '.join(origins)} may call DICOMweb (CORS); keep this list short",
            "http_cors_origins",
        )
    if settings.allow_replace:
        report.add(
            WARNING,
            "settings",
            "a different object may replace a stored one with the same SOP Instance UID",
            "allow_replace",
        )
    if settings.decode_in_process:
        report.add(
            WARNING,
            "settings",
            "compressed pixel data is decoded in the server process, without limits",
            "decode_in_process",
        )
    if settings.dicom_tls and not settings.dicom_tls_client_ca_file:
        report.add(
            INFO,
            "settings",
            "the DICOM TLS listener does not ask for client certificates (no mutual TLS); "
            "peers are admitted by AE title and address",
            "dicom_tls_client_ca_file",
        )
    elif settings.dicom_tls and not settings.dicom_tls_require_client_cert:
        report.add(
            WARNING,
            "settings",
            "mutual TLS is optional: a client without a certificate is admitted by AE title "
            "and address",
            "dicom_tls_require_client_cert",
        )
    for name, value, ceiling in (
        ("max_object_size", settings.max_object_size, 4 * GiB),
        ("http_max_body_size", settings.http_max_body_size, 16 * GiB),
        ("max_decoded_size", settings.max_decoded_size, 4 * GiB),
        ("max_inflated_size", settings.max_inflated_size, 4 * GiB),
    ):
        if value > ceiling:
            report.add(
                WARNING,
                "settings",
                f"{name} is {value} bytes, above {ceiling}: one request may cost that much "
                "disk or memory",
                name,
            )
    if settings.max_associations * max(1, settings.worker_count) > 1024:
        report.add(
            WARNING,
            "settings",
            "more than 1024 concurrent associations are allowed in all",
            "max_associations",
        )


def _nodes(settings: Settings, report: Report, nodes: Sequence[Node] | None) -> None:
    if nodes is None:
        report.add(INFO, "nodes", "the configured nodes could not be read (index unavailable)")
        return
    plain_open = settings.dicom_plain and (
        not settings.dicom_on_loopback and settings.allow_plain_beyond_loopback
    )
    if not nodes:
        if settings.dicom_on_loopback:
            report.add(
                INFO,
                "nodes",
                "no node is configured: any AE title on this machine may associate (loopback only)",
            )
        else:
            report.add(
                INFO,
                "nodes",
                "no node is configured: every association from another machine is refused",
            )
        return
    for node in nodes:
        if node.tls:
            continue
        clear = f"node {node.name} ({node.ae_title} at {node.host}:{node.port}) talks plain DIMSE"
        if plain_open:
            report.add(
                WARNING, "nodes", f"{clear}: its data crosses the network in clear", "dicom_plain"
            )
        elif not is_loopback(node.host):
            report.add(
                INFO,
                "nodes",
                f"{clear}: sending to it (C-MOVE, stockade send) is unencrypted; mark it "
                "--tls if it supports DICOM TLS",
            )


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _permissions(settings: Settings, report: Report) -> None:
    data = settings.data_dir
    mode = _mode(data)
    if mode is None:
        report.add(INFO, "permissions", f"{data} does not exist yet (made mode 0700 at start)")
    elif mode & 0o002:
        report.add(
            CRITICAL,
            "permissions",
            f"{data} is writable by everyone (mode {mode:04o}); chmod 700 {data}",
            "data_dir",
        )
    elif mode & 0o077:
        report.add(
            WARNING,
            "permissions",
            f"{data} is open to other users (mode {mode:04o}, 0700 expected); chmod 700 {data}",
            "data_dir",
        )
    quarantine = data / "quarantine"
    mode = _mode(quarantine)
    if mode is not None and mode & 0o077:
        report.add(
            WARNING,
            "permissions",
            f"{quarantine} is open to other users (mode {mode:04o}, 0700 expected)",
        )
    keys: list[tuple[str, str]] = []
    if settings.dicom_tls:
        keys.append(
            (settings.dicom_tls_key_file or settings.dicom_tls_cert_file, "dicom_tls_key_file")
        )
    if settings.http_enabled and settings.http_tls:
        keys.append(
            (settings.http_tls_key_file or settings.http_tls_cert_file, "http_tls_key_file")
        )
    if settings.audit_syslog_key_file:
        keys.append((settings.audit_syslog_key_file, "audit_syslog_key_file"))
    for path, setting in keys:
        mode = _mode(Path(path))
        if mode is None:
            report.add(CRITICAL, "permissions", f"{setting}: {path} cannot be read", setting)
        elif mode & 0o077:
            report.add(
                CRITICAL if mode & 0o004 else WARNING,
                "permissions",
                f"private key {path} is readable by other users (mode {mode:04o}, 0600 "
                f"expected); chmod 600 {path}",
                setting,
            )
    ca_key = data / "tls" / "ca-key.pem"
    mode = _mode(ca_key)
    if mode is not None and mode & 0o077:
        report.add(
            CRITICAL if mode & 0o004 else WARNING,
            "permissions",
            f"the local CA's key {ca_key} is readable by other users (mode {mode:04o}); "
            f"chmod 600 {ca_key}",
        )


def assess(
    settings: Settings,
    *,
    nodes: Sequence[Node] | None,
    has_users: bool,
    now: datetime | None = None,
) -> Report:
    """The security posture of *settings* with these *nodes* and users.

    Parameters
    ----------
    settings : Settings
        The settings ``stockade serve`` would run with.
    nodes : sequence of Node or None
        The configured nodes (None: the index could not be read).
    has_users : bool
        Whether at least one user exists.
    now : datetime, optional
        The time certificates are judged at (default: now).
    """
    when = now or datetime.now(UTC)
    report = Report()
    _listeners(settings, report)
    if not settings.dicom_plain and not settings.dicom_tls:
        report.add(
            CRITICAL,
            "listener",
            "no DIMSE listener: dicom_plain is off and DICOM TLS is not configured",
            "dicom_plain",
        )
    _plain_listeners(settings, report, has_users)
    _certificates(settings, report, when)
    _settings(settings, report)
    _nodes(settings, report, nodes)
    _permissions(settings, report)
    return report
