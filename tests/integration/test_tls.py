"""DICOM TLS and HTTPS against a running ``stockade serve`` (threat model SR-4, SR-5, SR-6).

The certificates come from ``stockade certs init`` and ``stockade certs client``; the
expired client certificate and the one from an unknown CA are made here with
``cryptography``. DCMTK's ``echoscu`` and ``storescu`` are the peers (``+tls key cert``,
``+cf ca.pem``); Python ``ssl`` clients that offer only TLS 1.0 or 1.1 (OpenSSL security
level 0, so that the client itself can offer them) show that the server refuses them.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .conftest import (
    AE_TITLE,
    DCMTK_TIMEOUTS,
    HOST,
    StockadeServer,
    clean_env,
    free_port,
    require_dcmtk,
    stops_cleanly,
    write_ct_series,
)

pytestmark = pytest.mark.dcmtk


def tls_dir(server: StockadeServer) -> Path:
    return server.data_dir / "tls"


def tls_server(
    make_server: Callable[..., StockadeServer], *, mutual: bool, name: str = "stockade"
) -> StockadeServer:
    """A server with plain DIMSE (loopback), DICOM TLS and HTTPS, certificates from
    ``stockade certs init`` (and mutual TLS required when *mutual*); not started."""
    require_dcmtk("echoscu", "storescu")
    server = make_server(name=name)
    configure_tls(server, mutual=mutual)
    return server


def configure_tls(server: StockadeServer, *, mutual: bool) -> None:
    """Give *server* (not started) DICOM TLS and HTTPS with ``stockade certs init``."""
    folder = server.data_dir / "tls"
    server.settings.update(
        {
            "STOCKADE_DICOM_TLS_PORT": str(free_port()),
            "STOCKADE_DICOM_TLS_CERT_FILE": str(folder / "server.pem"),
            "STOCKADE_DICOM_TLS_KEY_FILE": str(folder / "server-key.pem"),
            "STOCKADE_HTTP_TLS_CERT_FILE": str(folder / "server.pem"),
            "STOCKADE_HTTP_TLS_KEY_FILE": str(folder / "server-key.pem"),
        }
    )
    if mutual:
        server.settings["STOCKADE_DICOM_TLS_CLIENT_CA_FILE"] = str(folder / "ca.pem")
    made = server.cli("certs", "init")
    assert made.returncode == 0, made.stderr
    assert "dicom_tls_cert_file = " in made.stdout


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StockadeServer]:
    """One running server with mutual DICOM TLS and HTTPS, shared by the tests that neither
    reconfigure it nor add a node (a node would close plain DIMSE to other AE titles); they
    compare with what it held before them. It must stop cleanly after them."""
    require_dcmtk("echoscu", "storescu")
    server = StockadeServer(tmp_path_factory.mktemp("tls-mutual"))
    configure_tls(server, mutual=True)
    server.start()
    with stops_cleanly(server):
        log = server.log_path.read_text()
        assert f"DICOM TLS listening on {HOST}:{tls_port(server)}" in log
        yield server


def tls_port(server: StockadeServer) -> int:
    return int(server.settings["STOCKADE_DICOM_TLS_PORT"])


def dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (TCP_NODELAY=1 in its environment); output in ``stdout``."""
    return subprocess.run(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )


def echo_tls(server: StockadeServer, *tls_args: str) -> subprocess.CompletedProcess[str]:
    """echoscu over DICOM TLS with *tls_args* (``+tls key cert`` or ``+tla``)."""
    return dcmtk(
        "echoscu",
        "-v",
        "-aet",
        "TLSSCU",
        "-aec",
        AE_TITLE,
        *DCMTK_TIMEOUTS,
        *tls_args,
        "+cf",
        str(tls_dir(server) / "ca.pem"),
        HOST,
        str(tls_port(server)),
    )


def client_cert(
    folder: Path,
    name: str,
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    expired: bool = False,
) -> tuple[Path, Path]:
    """A client certificate and key signed by *signer* (a fresh CA of its own when None)."""
    now = datetime.now(UTC)
    if signer is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unknown CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        signer = (ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = (
        (now - timedelta(days=40), now - timedelta(days=2))
        if expired
        else (now - timedelta(days=1), now + timedelta(days=30))
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(signer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer[1], hashes.SHA256())
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
    return cert_path, key_path


def local_ca(server: StockadeServer) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    folder = tls_dir(server)
    cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def rejections(server: StockadeServer, at_least: int = 0) -> list[str]:
    """Reasons of the AssociationRejected audit records so far; waits (bounded) until there
    are *at_least* (a client sees its handshake fail before the server has audited it)."""
    deadline = time.monotonic() + 20
    while True:
        found = [r["reason"] for r in server.audit() if r["type"] == "AssociationRejected"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def python_client(
    ca: Path,
    version: ssl.TLSVersion | None = None,
    cert: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    """A Python TLS client trusting *ca*, offering only *version* when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
            context.minimum_version = version
            context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
    return context


def handshake(context: ssl.SSLContext, port: int) -> str:
    """Connect and complete a handshake with the server on *port*; the TLS version."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        return str(conn.version())


# -- DCMTK over DICOM TLS --------------------------------------------------------------------


def test_echoscu_and_storescu_over_mutual_tls(mutual: StockadeServer, tmp_path: Path) -> None:
    server = mutual
    issued = server.cli("certs", "client", "modality")
    assert issued.returncode == 0, issued.stderr
    key, cert = tls_dir(server) / "client-modality-key.pem", tls_dir(server) / "client-modality.pem"
    held = {row.sop_uid for row in server.rows()}  # the module's server is shared

    echoed = echo_tls(server, "+tls", str(key), str(cert))
    assert echoed.returncode == 0, echoed.stdout
    assert "Received Echo Response (Success)" in echoed.stdout

    files = write_ct_series(tmp_path / "ct", 3)
    stored = dcmtk(
        "storescu",
        "-v",
        "-aet",
        "TLSSCU",
        "-aec",
        AE_TITLE,
        *DCMTK_TIMEOUTS,
        "+tls",
        str(key),
        str(cert),
        "+cf",
        str(tls_dir(server) / "ca.pem"),
        HOST,
        str(tls_port(server)),
        *(str(p) for p in files.values()),
    )
    assert stored.returncode == 0, stored.stdout
    assert stored.stdout.count("Received Store Response (Success)") == 3, stored.stdout
    assert {row.sop_uid for row in server.rows()} == held | set(files)

    # no client certificate (anonymous TLS) under mutual TLS: refused and audited
    before = len(rejections(server))
    anonymous = echo_tls(server, "+tla")
    assert anonymous.returncode != 0, anonymous.stdout
    assert "Received Echo Response" not in anonymous.stdout
    reasons = rejections(server, before + 1)[before:]
    assert len(reasons) == 1 and reasons[0].startswith("TLS handshake failed"), reasons


def test_expired_and_unknown_client_certificates_are_refused(
    mutual: StockadeServer, tmp_path: Path
) -> None:
    server = mutual
    expired = client_cert(tmp_path, "expired", local_ca(server), expired=True)
    stranger = client_cert(tmp_path, "stranger", None)
    valid = client_cert(tmp_path, "valid", local_ca(server))
    before = len(rejections(server))  # the module's server is shared
    for cert, key in (expired, stranger):
        refused = echo_tls(server, "+tls", str(key), str(cert))
        assert refused.returncode != 0, refused.stdout
        assert "Received Echo Response" not in refused.stdout
    reasons = rejections(server, before + 2)[before:]
    assert len(reasons) == 2, reasons
    assert "certificate has expired" in reasons[0]
    assert "unable to get local issuer certificate" in reasons[1]
    assert all("PRIVATE KEY" not in r for r in reasons)
    # a valid certificate from the same CA is still served
    accepted = echo_tls(server, "+tls", str(valid[1]), str(valid[0]))
    assert accepted.returncode == 0, accepted.stdout


# -- protocol versions -----------------------------------------------------------------------


def test_tls_1_0_and_1_1_refused_on_dicom_tls_and_https(
    mutual: StockadeServer, tmp_path: Path
) -> None:
    server = mutual
    ca = tls_dir(server) / "ca.pem"
    client = client_cert(tmp_path, "peer", local_ca(server))
    for port, cert in ((tls_port(server), client), (server.http_port, None)):
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with pytest.raises(ssl.SSLError) as refused:
                handshake(python_client(ca, version, cert), port)
            assert "PROTOCOL" in str(refused.value).upper(), (port, version, refused.value)
        # the same client offering TLS 1.2 (AEAD only) is served; a CBC suite is not
        assert handshake(python_client(ca, ssl.TLSVersion.TLSv1_2, cert), port) == "TLSv1.2"
        cbc = python_client(ca, ssl.TLSVersion.TLSv1_2, cert)
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")
        with pytest.raises(ssl.SSLError):
            handshake(cbc, port)
        assert handshake(python_client(ca, None, cert), port) == "TLSv1.3"


# -- HTTPS -----------------------------------------------------------------------------------


def test_dicomweb_over_https_carries_hsts(mutual: StockadeServer, tmp_path: Path) -> None:
    """HTTPS (mutual TLS is asked of DICOM TLS peers only, not of HTTP clients)."""
    server = mutual
    ca = ssl.create_default_context(cafile=str(tls_dir(server) / "ca.pem"))
    files = write_ct_series(tmp_path / "ct", 2)
    base = f"https://localhost:{server.http_port}/dicomweb"
    log = server.log_path.read_text()
    assert f"DICOMweb on https://{HOST}:{server.http_port}/dicomweb" in log
    with open(next(iter(files.values())), "rb") as fh:
        body = fh.read()
    boundary = "stockadeboundary"
    payload = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with httpx.Client(verify=ca, headers=server.auth, timeout=30) as client:
        listed = client.get(f"{base}/studies", headers={"Accept": "application/dicom+json"})
        assert listed.status_code == 200, listed.text
        before = len(listed.json())  # the module's server is shared
        stored = client.post(
            f"{base}/studies",
            content=payload,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        assert stored.status_code == 200, stored.text
        found = client.get(f"{base}/studies", headers={"Accept": "application/dicom+json"})
    assert found.status_code == 200, found.text
    assert len(found.json()) == before + 1
    assert found.extensions["http_version"] == b"HTTP/1.1"
    for response in (stored, found):
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    # an unauthenticated request is refused over HTTPS too, with the same headers
    refused = httpx.get(f"{base}/studies", verify=ca, timeout=30)
    assert refused.status_code == 401
    assert refused.headers["strict-transport-security"] == "max-age=31536000"
    # a client that does not trust the local CA cannot talk to it
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{base}/studies", timeout=30)


# -- Stockade as a TLS requestor -------------------------------------------------------------


def test_stockade_send_to_a_node_over_dicom_tls(
    make_server: Callable[..., StockadeServer], tmp_path: Path
) -> None:
    receiver = tls_server(make_server, mutual=False, name="receiver")
    receiver.start()
    sender = make_server(name="sender")
    sender.settings["STOCKADE_DICOM_TLS_PEER_CA_FILE"] = str(tls_dir(receiver) / "ca.pem")
    files = write_ct_series(tmp_path / "ct", 2)
    imported = sender.cli("import", str(tmp_path / "ct"))
    assert imported.returncode == 0, imported.stderr
    study = sender.query("SELECT study_uid FROM studies")[0][0]
    for name, flag in (("plainb", []), ("tlsb", ["--tls"])):
        port = receiver.port if not flag else tls_port(receiver)
        added = sender.cli(
            "node", "add", name, "--ae", AE_TITLE, "--host", HOST, "--port", str(port), *flag
        )
        assert added.returncode == 0, added.stderr
    listed = sender.cli("node", "list")
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()}
    assert rows["tlsb"][-1] == "tls" and rows["plainb"][-1] == "echo,store", listed.stdout
    sent = sender.cli("send", "tlsb", "--study", study)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert {row.sop_uid for row in receiver.rows()} == set(files)
    # the receiver's CA is the only one trusted: a node with another certificate fails
    sender.settings["STOCKADE_DICOM_TLS_PEER_CA_FILE"] = str(tls_dir(sender) / "ca.pem")
    made = sender.cli("certs", "init")
    assert made.returncode == 0, made.stderr
    refused = sender.cli("send", "tlsb", "--study", study)
    assert refused.returncode != 0
    assert "TLS handshake failed: unable to get local issuer certificate" in refused.stderr
    assert receiver.stop() == 0


# -- secure start ----------------------------------------------------------------------------


def test_plain_dimse_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    env = clean_env(
        {
            "STOCKADE_DATA_DIR": str(tmp_path / "data"),
            "STOCKADE_DICOM_HOST": "0.0.0.0",
            "STOCKADE_DICOM_PORT": str(free_port()),
            "STOCKADE_HTTP_PORT": str(free_port()),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "dicom_host 0.0.0.0 is not a loopback address" in done.stderr
    assert "dicom_plain" in done.stderr and "allow_plain_beyond_loopback" in done.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 1, checked.stderr
    report = json.loads(checked.stdout)
    assert report["critical"] is True
    assert any(
        f["severity"] == "critical" and f["setting"] == "dicom_plain" for f in report["findings"]
    )


def test_a_node_bound_to_its_client_certificate(
    make_server: Callable[..., StockadeServer],
) -> None:
    server = tls_server(make_server, mutual=True)
    for name in ("modality", "other"):
        assert server.cli("certs", "client", name).returncode == 0
    folder = tls_dir(server)
    pem = (folder / "client-modality.pem").read_bytes()
    fingerprint = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
    server.start()  # before the node exists (the start-up echo comes from an unknown AE)
    added = server.cli(
        "node", "add", "ct1", "--ae", "TLSSCU", "--host", HOST, "--port", "104",
        "--allow", "echo", "--tls", "--cert-sha256", fingerprint.upper(),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    own = echo_tls(
        server, "+tls", str(folder / "client-modality-key.pem"), str(folder / "client-modality.pem")
    )
    assert own.returncode == 0, own.stdout
    before = len(rejections(server))
    # another certificate of the same CA: the handshake succeeds, the association does not
    other = echo_tls(
        server, "+tls", str(folder / "client-other-key.pem"), str(folder / "client-other.pem")
    )
    assert other.returncode != 0 and "Association Rejected" in other.stdout, other.stdout
    assert rejections(server, before + 1)[before:] == [
        "node ct1 presented another client certificate than the one bound to its AE title"
    ]
    bad = server.cli(
        "node", "add", "ct2", "--ae", "CT2", "--host", HOST, "--port", "104",
        "--cert-sha256", "00" * 32,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs a DICOM TLS node" in bad.stderr
    assert server.stop() == 0
