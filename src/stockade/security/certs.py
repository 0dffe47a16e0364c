"""A local certificate authority for sites without a PKI (``stockade certs``).

``stockade certs init`` writes, under ``<data_dir>/tls/`` (mode 0700):

- ``ca.pem`` and ``ca-key.pem``: a CA (EC P-256, 10 years, path length 0), the file to give
  peers (``+cf ca.pem`` in DCMTK, the trust store of a browser or DICOMweb client);
- ``server.pem`` and ``server-key.pem``: the archive's certificate, signed by that CA, with
  the given host names and addresses and ``localhost``, ``127.0.0.1`` and ``::1`` as subject
  alternative names (RFC 5280 4.2.1.6), usable for TLS servers and clients (it is also
  presented when Stockade connects to a node with TLS).

``stockade certs client NAME`` issues ``client-NAME.pem`` and ``client-NAME-key.pem`` for a
peer's mutual TLS. Private keys are written with mode 0600 and never overwritten without
``force``. Operator-supplied certificates need none of this: point the settings at them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stockade.errors import ConfigError

#: Validity of the local CA.
CA_DAYS = 3650
#: Default validity of the certificates it issues (within what browsers accept, 398 days).
DEFAULT_DAYS = 365
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?")
_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """Files written by :func:`init` or :func:`issue_client`."""

    cert: Path
    key: Path
    ca: Path
    not_after: datetime
    names: tuple[str, ...]


def tls_dir(data_dir: Path) -> Path:
    """Where the local CA and its certificates live."""
    return data_dir / "tls"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write *data* to a new file created with *mode* (no window with wider permissions)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _alt_names(hosts: Sequence[str]) -> tuple[list[x509.GeneralName], tuple[str, ...]]:
    names: list[str] = []
    for host in (*hosts, *_DEFAULT_NAMES):
        if host not in names:
            names.append(host)
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not _HOST.fullmatch(name):
                raise ConfigError(
                    f"--host {name[:64]!r} is not a host name or an IP address"
                ) from None
            general.append(x509.DNSName(name.rstrip(".").lower()))
    return general, tuple(names)


def _builder(
    subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int, now: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _leaf(
    builder: x509.CertificateBuilder,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
) -> x509.Certificate:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _check_days(days: int) -> None:
    if not 1 <= days <= CA_DAYS:
        raise ConfigError(f"--days must be from 1 to {CA_DAYS}")


def init(
    data_dir: Path,
    hosts: Sequence[str] = (),
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: datetime | None = None,
) -> Issued:
    """Create the local CA and the server certificate under ``<data_dir>/tls/``.

    Raises
    ------
    ConfigError
        The files exist already (and not *force*), a host is not a name or address, or
        *days* is out of range.
    """
    _check_days(days)
    folder = tls_dir(data_dir)
    files = [folder / n for n in ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")]
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{existing[0]} exists already; use --force to replace the local CA and the "
            "server certificate (peers must then trust the new ca.pem)"
        )
    alt, names = _alt_names(hosts)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    when = now or datetime.now(UTC)
    ca_key = _key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stockade local CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Stockade CA {when:%Y-%m-%d %H:%M:%S}"),
        ]
    )
    ca_public = ca_key.public_key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - timedelta(minutes=5))
        .not_valid_after(when + timedelta(days=max(CA_DAYS, days)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_public), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _key()
    server = _leaf(
        _builder(names[0], ca_name, server_key.public_key(), days, when).add_extension(
            x509.SubjectAlternativeName(alt), critical=False
        ),
        ca_cert,
        ca_key,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_key(folder / "ca-key.pem", ca_key)
    _write_cert(folder / "ca.pem", ca_cert)
    _write_key(folder / "server-key.pem", server_key)
    _write_cert(folder / "server.pem", server)
    return Issued(
        folder / "server.pem",
        folder / "server-key.pem",
        folder / "ca.pem",
        server.not_valid_after_utc,
        names,
    )


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca-key.pem").read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"no local CA in {folder}; run stockade certs init first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the local CA in {folder}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{folder / 'ca-key.pem'} is not the local CA's key")
    return cert, key


def issue_client(
    data_dir: Path,
    name: str,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: datetime | None = None,
) -> Issued:
    """Issue a client certificate named *name* from the local CA (mutual TLS).

    Raises
    ------
    ConfigError
        No local CA, a bad name, *days* out of range, or the files exist (and not *force*).
    """
    _check_days(days)
    if not _NAME.fullmatch(name):
        raise ConfigError("the client name must be 1 to 64 letters, digits, '-' or '_'")
    folder = tls_dir(data_dir)
    ca_cert, ca_key = _load_ca(folder)
    cert_path, key_path = folder / f"client-{name}.pem", folder / f"client-{name}-key.pem"
    if (cert_path.exists() or key_path.exists()) and not force:
        raise ConfigError(f"{cert_path} exists already; use --force to replace it")
    when = now or datetime.now(UTC)
    key = _key()
    cert = _leaf(
        _builder(name, ca_cert.subject, key.public_key(), days, when),
        ca_cert,
        ca_key,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path, key_path, folder / "ca.pem", cert.not_valid_after_utc, (name,))
