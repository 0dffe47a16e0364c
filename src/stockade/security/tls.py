"""TLS contexts for DICOM TLS and HTTPS, and the certificate expiry check.

Every listener and every outgoing DICOM TLS connection uses a context built here, to one
profile: the DICOM "BCP 195 RFC 8996" TLS profile (PS3.15 Annex B), that is RFC 8996 (no
TLS 1.0 or 1.1) and RFC 9325 (BCP 195): TLS 1.2 or later; with TLS 1.2, only ephemeral
ECDH key exchange and AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3 with the suites
the library offers (all AEAD, RFC 8446 9.1); no TLS compression (RFC 9325 3.3), no
renegotiation (RFC 9325 3.5). Mutual TLS asks clients for a certificate signed by the
configured client CA (``CERT_REQUIRED``, or ``CERT_OPTIONAL`` when not required); OpenSSL
refuses an expired, not yet valid or unknown client certificate during the handshake.

A server certificate is checked at start: expired or not yet valid refuses to serve
(:class:`~stockade.errors.ConfigError` naming the setting), within
:data:`EXPIRY_WARNING_DAYS` days of its end a warning is logged (threat model SR-6).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from stockade.errors import ConfigError
from stockade.settings import Settings

log = logging.getLogger(__name__)

#: TLS 1.2 cipher suites allowed: ECDHE key exchange with an AEAD cipher (RFC 9325 4.2).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
#: A certificate ending within this many days is warned about (threat model SR-6).
EXPIRY_WARNING_DAYS = 30


class DicomTlsSocket(ssl.SSLSocket):
    """An :class:`ssl.SSLSocket` that also offers ``sendmsg`` for gathered buffers.

    The DIMSE loop (:class:`~stockade.dimse.association.Link`) sends a data set as a list
    of buffers with ``sendmsg``; ``SSLSocket`` has no ``sendmsg``, so the buffers are
    joined up to :attr:`GATHER` bytes per call and written with ``sendall`` (TLS copies
    them into records anyway). The number of bytes sent is returned as ``sendmsg`` does.
    """

    #: Most bytes joined into one write.
    GATHER = 1 << 20

    def sendmsg(self, buffers: Iterable[Any], *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        """Send *buffers* in order (ancillary data is not supported over TLS)."""
        if args or kwargs:
            raise NotImplementedError("ancillary data cannot be sent over TLS")
        parts = []
        size = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            parts.append(view)
            size += len(view)
            if size >= self.GATHER:
                break
        data = b"".join(parts)
        self.sendall(data)
        return len(data)


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the profile shared by every context (module docstring)."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.sslsocket_class = DicomTlsSocket
    return context


@dataclass(frozen=True)
class CertificateInfo:
    """What ``stockade check`` and the start-up check tell about a certificate."""

    path: str
    setting: str
    subject: str
    not_before: datetime
    not_after: datetime

    def days_left(self, now: datetime | None = None) -> int:
        """Whole days until the certificate ends (negative once it has)."""
        delta = self.not_after - (now or datetime.now(UTC))
        return int(delta.total_seconds() // 86400)

    def expired(self, now: datetime | None = None) -> bool:
        """True once the certificate has ended."""
        return (now or datetime.now(UTC)) >= self.not_after

    def not_yet_valid(self, now: datetime | None = None) -> bool:
        """True before the certificate's start."""
        return (now or datetime.now(UTC)) < self.not_before


def certificate_info(path: str, setting: str) -> CertificateInfo:
    """Read the first certificate of the PEM file *path* (the leaf of a chain).

    Raises
    ------
    ConfigError
        The file cannot be read or holds no PEM certificate; names *setting*.
    """
    try:
        data = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificates(data)[0]
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, IndexError):
        raise ConfigError(f"{setting}: {path} holds no PEM certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string()
    return CertificateInfo(
        path, setting, subject, cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def check_certificate(
    path: str, setting: str, *, now: datetime | None = None, warn: bool = True
) -> CertificateInfo:
    """Refuse a server certificate that has expired or is not valid yet; warn near its end.

    Raises
    ------
    ConfigError
        Expired or not yet valid (threat model SR-6), naming *setting*; or unreadable.
    """
    info = certificate_info(path, setting)
    when = now or datetime.now(UTC)
    if info.expired(when):
        raise ConfigError(
            f"{setting}: the certificate {path} ({info.subject}) expired on "
            f"{info.not_after:%Y-%m-%d}; renew it (stockade certs init --force for the "
            "local CA) before serving"
        )
    if info.not_yet_valid(when):
        raise ConfigError(
            f"{setting}: the certificate {path} ({info.subject}) is not valid before "
            f"{info.not_before:%Y-%m-%d %H:%M} UTC (check the clock)"
        )
    days = info.days_left(when)
    if warn and days < EXPIRY_WARNING_DAYS:
        log.warning(
            "%s: the certificate %s (%s) expires in %d day%s, on %s; renew it",
            setting,
            path,
            info.subject,
            days,
            "" if days == 1 else "s",
            f"{info.not_after:%Y-%m-%d}",
        )
    return info


def _load_chain(context: ssl.SSLContext, cert: str, key: str, setting: str) -> None:
    try:
        context.load_cert_chain(cert, key or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{setting}: no such file {exc.filename}") from None
    except PermissionError as exc:
        raise ConfigError(f"{setting}: cannot read {exc.filename}") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise ConfigError(
            f"{setting}: cannot use the certificate {cert} with its key ({reason}); the key "
            "must be an unencrypted PEM key that matches the certificate"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: str, setting: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{setting}: cannot load {ca_file} ({reason})") from None


def server_context(
    cert_file: str,
    key_file: str,
    *,
    cert_setting: str,
    client_ca_file: str = "",
    require_client_cert: bool = True,
    client_ca_setting: str = "",
    now: datetime | None = None,
    warn: bool = True,
) -> ssl.SSLContext:
    """A server context with *cert_file* (checked for expiry), the profile of this module,
    and mutual TLS when *client_ca_file* is given.

    Raises
    ------
    ConfigError
        A file cannot be used, or the certificate has expired or is not valid yet; the
        message names the setting to change.
    """
    check_certificate(cert_file, cert_setting, now=now, warn=warn)
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, cert_file, key_file, cert_setting)
    if client_ca_file:
        _load_ca(context, client_ca_file, client_ca_setting)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def dicom_server_context(settings: Settings, *, warn: bool = True) -> ssl.SSLContext:
    """The context of the DICOM TLS listener (``dicom_tls_*`` settings); *warn*: log a
    warning when the certificate ends within :data:`EXPIRY_WARNING_DAYS` days."""
    return server_context(
        settings.dicom_tls_cert_file,
        settings.dicom_tls_key_file,
        cert_setting="dicom_tls_cert_file",
        client_ca_file=settings.dicom_tls_client_ca_file,
        require_client_cert=settings.dicom_tls_require_client_cert,
        client_ca_setting="dicom_tls_client_ca_file",
        warn=warn,
    )


def http_server_context(settings: Settings, *, warn: bool = True) -> ssl.SSLContext:
    """The context of HTTPS (``http_tls_*`` settings), offering HTTP/1.1 by ALPN."""
    context = server_context(
        settings.http_tls_cert_file,
        settings.http_tls_key_file,
        cert_setting="http_tls_cert_file",
        warn=warn,
    )
    context.set_alpn_protocols(["http/1.1"])
    return context


def client_context(
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    *,
    ca_setting: str = "dicom_tls_peer_ca_file",
    cert_setting: str = "dicom_tls_cert_file",
) -> ssl.SSLContext:
    """A client context: the peer's certificate and host name checked against *ca_file*
    (the system's trust store when empty), our certificate presented when given.

    Raises
    ------
    ConfigError
        A file cannot be used.
    """
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_file:
        _load_ca(context, ca_file, ca_setting)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file:
        _load_chain(context, cert_file, key_file, cert_setting)
    return context


def dicom_client_context(settings: Settings) -> ssl.SSLContext:
    """The context of associations Stockade opens to nodes marked ``tls``: the node's
    certificate checked against ``dicom_tls_peer_ca_file``, ours
    (``dicom_tls_cert_file``) presented for mutual TLS."""
    return client_context(
        settings.dicom_tls_peer_ca_file,
        settings.dicom_tls_cert_file,
        settings.dicom_tls_key_file,
    )


def handshake_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake, fit for a log line and an audit record (the
    OpenSSL reason and verification message; never key material)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {exc.verify_message or exc.reason or 'certificate'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc.__class__.__name__}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake not completed within dicom_acse_timeout"
    return f"TLS handshake failed: {exc.__class__.__name__}"
