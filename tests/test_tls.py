"""TLS contexts, the local CA, and the certificate expiry check (threat model SR-5, SR-6).

Handshakes run between two in-process TLS ends over a socket pair (one thread each), so
that the profile is checked on the wire, not only on the context's attributes.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import stat
import threading
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stockade.errors import ConfigError
from stockade.security import certs, tls
from stockade.settings import load

# -- helpers ---------------------------------------------------------------------------------


def write_cert(
    folder: Path,
    name: str,
    *,
    not_before: datetime,
    not_after: datetime,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    client: bool = False,
) -> tuple[Path, Path]:
    """A certificate for *name* (self-signed unless *issuer*) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def local_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA written by ``certs.init``."""
    folder = certs.tls_dir(data_dir)
    cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[BaseException | ssl.SSLSocket, BaseException | ssl.SSLSocket]:
    """Run both ends of a TLS handshake over a socket pair; each result is the connected
    socket or the exception its end raised."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    results: dict[str, BaseException | ssl.SSLSocket] = {}
    opened: list[ssl.SSLSocket] = []

    def serve() -> None:
        try:
            conn = server.wrap_socket(a, server_side=True)
            opened.append(conn)
            results["server"] = conn
            conn.recv(1)  # TLS 1.3: the client's certificate is judged after its Finished
            conn.sendall(b"y")
        except (OSError, ssl.SSLError) as exc:
            results["server"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        conn = client.wrap_socket(b, server_hostname=hostname)
        opened.append(conn)
        results["client"] = conn
        conn.sendall(b"x")
        if conn.recv(1) != b"y":  # an alert from the server, or the end of the connection
            results["client"] = ConnectionResetError("the server ended the connection")
    except (OSError, ssl.SSLError) as exc:
        results["client"] = exc
    finally:
        thread.join(15)
        for end in opened:
            end.close()
        a.close()
        b.close()
    return results["server"], results["client"]


def old_client(version: ssl.TLSVersion, ca: Path) -> ssl.SSLContext:
    """A client that offers only TLS 1.0 or 1.1 (security level 0, so OpenSSL 3 builds it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A data folder with a local CA and server certificate (``stockade certs init``)."""
    data = tmp_path / "data"
    certs.init(data, ["pacs.example.org", "192.0.2.7"])
    return data


# -- the profile -----------------------------------------------------------------------------


def test_server_context_is_the_bcp195_rfc8996_profile(site: Path) -> None:
    folder = certs.tls_dir(site)
    context = tls.server_context(
        str(folder / "server.pem"), str(folder / "server-key.pem"), cert_setting="x"
    )
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode == ssl.CERT_NONE  # no client CA: no mutual TLS
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suite left"
    for cipher in tls12:
        assert cipher["aead"], cipher["name"]
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
    names = {c["name"] for c in tls12}
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in names
    assert "ECDHE-RSA-CHACHA20-POLY1305" in names
    assert not any("CBC" in c["description"] or "SHA1" in c["description"] for c in tls12)


def test_mutual_tls_modes(site: Path) -> None:
    folder = certs.tls_dir(site)
    common = {
        "cert_file": str(folder / "server.pem"),
        "key_file": str(folder / "server-key.pem"),
        "cert_setting": "dicom_tls_cert_file",
        "client_ca_file": str(folder / "ca.pem"),
    }
    assert tls.server_context(**common).verify_mode == ssl.CERT_REQUIRED  # type: ignore[arg-type]
    optional = tls.server_context(**common, require_client_cert=False)  # type: ignore[arg-type]
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_handshakes_tls12_and_13_succeed_old_versions_and_cbc_fail(site: Path) -> None:
    folder = certs.tls_dir(site)
    server = tls.server_context(
        str(folder / "server.pem"), str(folder / "server-key.pem"), cert_setting="x"
    )
    ca = folder / "ca.pem"
    _ok_server, ok_client = handshake(server, tls.client_context(str(ca)))
    assert isinstance(ok_client, ssl.SSLSocket), ok_client
    modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    modern.load_verify_locations(cafile=str(ca))
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    _server, client12 = handshake(server, modern)
    assert isinstance(client12, ssl.SSLSocket), client12
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        refused_server, refused_client = handshake(server, old_client(version, ca))
        assert isinstance(refused_client, ssl.SSLError), version
        assert isinstance(refused_server, ssl.SSLError), version
        assert refused_server.reason == "UNSUPPORTED_PROTOCOL", refused_server
    cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc.load_verify_locations(cafile=str(ca))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA")
    _server, refused = handshake(server, cbc)
    assert isinstance(refused, ssl.SSLError)


def test_mutual_tls_refuses_unknown_and_expired_client_certificates(
    site: Path, tmp_path: Path
) -> None:
    folder = certs.tls_dir(site)
    server = tls.server_context(
        str(folder / "server.pem"),
        str(folder / "server-key.pem"),
        cert_setting="dicom_tls_cert_file",
        client_ca_file=str(folder / "ca.pem"),
    )
    ca = str(folder / "ca.pem")
    good = certs.issue_client(site, "modality1")
    _s, accepted = handshake(server, tls.client_context(ca, str(good.cert), str(good.key)))
    assert isinstance(accepted, ssl.SSLSocket), accepted

    server_end, _c = handshake(server, tls.client_context(ca))
    assert isinstance(server_end, ssl.SSLError)  # no certificate at all
    assert "CERTIFICATE" in tls.handshake_failure(server_end).upper()

    now = datetime.now(UTC)
    expired = write_cert(
        tmp_path,
        "expired",
        not_before=now - timedelta(days=60),
        not_after=now - timedelta(days=1),
        issuer=local_ca(site),
        client=True,
    )
    server_end, _c = handshake(server, tls.client_context(ca, *map(str, expired)))
    assert isinstance(server_end, ssl.SSLCertVerificationError)
    assert "expired" in tls.handshake_failure(server_end)

    other_ca = certs.init(tmp_path / "elsewhere")
    stranger = certs.issue_client(tmp_path / "elsewhere", "stranger")
    assert other_ca.ca != good.ca
    server_end, _c = handshake(
        server, tls.client_context(ca, str(stranger.cert), str(stranger.key))
    )
    assert isinstance(server_end, ssl.SSLCertVerificationError)
    assert "unable to get local issuer" in tls.handshake_failure(server_end)


def test_tls_socket_sends_gathered_buffers(site: Path) -> None:
    folder = certs.tls_dir(site)
    server = tls.server_context(
        str(folder / "server.pem"), str(folder / "server-key.pem"), cert_setting="x"
    )
    a, b = socket.socketpair()
    received = bytearray()

    def serve() -> None:
        with server.wrap_socket(a, server_side=True) as conn:
            while len(received) < 3 * (1 << 20) + 4:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                received.extend(chunk)

    thread = threading.Thread(target=serve)
    thread.start()
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB
    with tls.client_context(str(folder / "ca.pem")).wrap_socket(
        b, server_hostname="localhost"
    ) as conn:
        assert isinstance(conn, tls.DicomTlsSocket)
        views: list[memoryview] = [memoryview(b"ab"), memoryview(big), memoryview(b"cd")]
        sent_total = 0
        while views:  # as Link._send_all does: drop what was sent, send the rest
            sent = conn.sendmsg(views)
            sent_total += sent
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        thread.join(15)
    assert sent_total == len(big) + 4
    assert bytes(received) == b"ab" + big + b"cd"


# -- the local CA ----------------------------------------------------------------------------


def test_certs_init_writes_a_ca_and_a_server_certificate(site: Path) -> None:
    folder = certs.tls_dir(site)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(site.stat().st_mode) == 0o700
    for key in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert server.issuer == ca.subject
    ca.public_key().verify(  # type: ignore[union-attr,call-arg]
        server.signature,
        server.tbs_certificate_bytes,
        ec.ECDSA(server.signature_hash_algorithm),  # type: ignore[arg-type]
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"pacs.example.org", "localhost"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {
        "192.0.2.7",
        "127.0.0.1",
        "::1",
    }
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    days = (server.not_valid_after_utc - datetime.now(UTC)).days
    assert certs.DEFAULT_DAYS - 2 <= days <= certs.DEFAULT_DAYS
    # the pair loads as a server context, and a client trusting ca.pem accepts it by name
    context = tls.server_context(
        str(folder / "server.pem"), str(folder / "server-key.pem"), cert_setting="x"
    )
    _s, client = handshake(context, tls.client_context(str(folder / "ca.pem")), "pacs.example.org")
    assert isinstance(client, ssl.SSLSocket), client
    _s, wrong = handshake(context, tls.client_context(str(folder / "ca.pem")), "other.example")
    assert isinstance(wrong, ssl.SSLCertVerificationError)


def test_certs_init_refuses_to_overwrite_unless_forced(site: Path) -> None:
    folder = certs.tls_dir(site)
    before = (folder / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        certs.init(site)
    assert (folder / "ca.pem").read_bytes() == before
    certs.init(site, force=True, days=30)
    assert (folder / "ca.pem").read_bytes() != before
    assert stat.S_IMODE((folder / "server-key.pem").stat().st_mode) == 0o600


def test_certs_arguments_are_checked(tmp_path: Path, site: Path) -> None:
    with pytest.raises(ConfigError, match="not a host name"):
        certs.init(tmp_path / "a", ["bad host/name"])
    with pytest.raises(ConfigError, match="--days"):
        certs.init(tmp_path / "b", days=0)
    with pytest.raises(ConfigError, match="certs init first"):
        certs.issue_client(tmp_path / "c", "peer")
    with pytest.raises(ConfigError, match="client name"):
        certs.issue_client(site, "../escape")
    issued = certs.issue_client(site, "peer", days=10)
    assert issued.cert.name == "client-peer.pem"
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="exists already"):
        certs.issue_client(site, "peer")


# -- expiry ----------------------------------------------------------------------------------


def test_expired_certificate_refused_naming_the_setting(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    cert, key = write_cert(
        tmp_path, "old", not_before=now - timedelta(days=400), not_after=now - timedelta(days=2)
    )
    with pytest.raises(ConfigError, match=r"^dicom_tls_cert_file: .*expired on"):
        tls.server_context(str(cert), str(key), cert_setting="dicom_tls_cert_file")
    settings = load(
        environ={},
        overrides={
            "data_dir": str(tmp_path / "d"),
            "http_tls_cert_file": str(cert),
            "http_tls_key_file": str(key),
        },
    )
    with pytest.raises(ConfigError, match=r"^http_tls_cert_file: "):
        tls.http_server_context(settings)


def test_not_yet_valid_certificate_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    cert, key = write_cert(
        tmp_path, "future", not_before=now + timedelta(days=3), not_after=now + timedelta(days=90)
    )
    with pytest.raises(ConfigError, match="not valid before"):
        tls.server_context(str(cert), str(key), cert_setting="http_tls_cert_file")


def test_certificate_near_its_end_is_served_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    cert, key = write_cert(
        tmp_path, "soon", not_before=now - timedelta(days=300), not_after=now + timedelta(days=12)
    )
    with caplog.at_level(logging.WARNING, logger="stockade.security.tls"):
        context = tls.server_context(str(cert), str(key), cert_setting="dicom_tls_cert_file")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "expires in 11 days" in warned[0], warned
    assert "dicom_tls_cert_file" in warned[0]
    caplog.clear()
    far = write_cert(
        tmp_path, "far", not_before=now - timedelta(days=1), not_after=now + timedelta(days=31)
    )
    with caplog.at_level(logging.WARNING, logger="stockade.security.tls"):
        tls.server_context(*map(str, far), cert_setting="dicom_tls_cert_file")
    assert not caplog.records


def test_unusable_files_refused_naming_the_setting(tmp_path: Path, site: Path) -> None:
    folder = certs.tls_dir(site)
    with pytest.raises(ConfigError, match=r"^dicom_tls_cert_file: cannot read"):
        tls.server_context(str(tmp_path / "missing.pem"), "", cert_setting="dicom_tls_cert_file")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        tls.server_context(str(tmp_path / "junk.pem"), "", cert_setting="http_tls_cert_file")
    other = write_cert(
        tmp_path,
        "other",
        not_before=datetime.now(UTC) - timedelta(days=1),
        not_after=datetime.now(UTC) + timedelta(days=100),
    )
    with pytest.raises(ConfigError, match="must be an unencrypted PEM key that matches"):
        tls.server_context(
            str(folder / "server.pem"), str(other[1]), cert_setting="dicom_tls_cert_file"
        )
    with pytest.raises(ConfigError, match=r"^dicom_tls_client_ca_file: cannot load"):
        tls.server_context(
            str(folder / "server.pem"),
            str(folder / "server-key.pem"),
            cert_setting="dicom_tls_cert_file",
            client_ca_file=str(tmp_path / "junk.pem"),
            client_ca_setting="dicom_tls_client_ca_file",
        )
