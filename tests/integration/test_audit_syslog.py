"""Audit export to a real syslog collector started here: TLS (RFC 5425) and UDP (RFC 5426).

The TLS collector has a certificate signed by a CA made in the test; Stockade checks it
against that CA. With the collector down, records wait in the trail; once it is up, every
record arrives, in order, exactly once (the ``meta sequenceId`` of each message is the
record's sequence number), and each message is a well-formed PS3.15 A.5 audit message.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..test_audit_atna import check_message
from .conftest import HOST, StockadeServer, echoscu, free_port, storescu, write_ct_series

HEADER = re.compile(
    rb'^<85>1 (\S+) (\S+) stockade - IHE\+RFC-3881 \[meta sequenceId="(\d+)"\] \xef\xbb\xbf'
)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Audit Test CA"))
        .issuer_name(_name("Audit Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("collector"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "collector.pem", folder / "collector.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TlsCollector:
    """A syslog-over-TLS receiver (RFC 5425 octet counting) that can be stopped and started."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.port = port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(cert, key)
        self.messages: list[bytes] = []
        self.lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((HOST, self.port))
            listener.listen(8)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            with self.lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._read, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not chunk:
                return
            buffer += chunk
            while True:  # MSG-LEN SP SYSLOG-MSG (RFC 5425 4.3)
                length, space, rest = buffer.partition(b" ")
                if not space or not length.isdigit() or len(rest) < int(length):
                    break
                with self.lock:
                    self.messages.append(rest[: int(length)])
                buffer = rest[int(length) :]

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self.lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(10)
        self._threads = []


def sequence_ids(messages: list[bytes]) -> list[int]:
    """The ``meta sequenceId`` of each message; every message checked on the way."""
    found = []
    for message in messages:
        match = HEADER.match(message)
        assert match, message[:200]
        check_message(message[match.end() :])
        found.append(int(match.group(3)))
    return found


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)  # bounded poll of an observable condition
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_pki(tmp_path)


@pytest.fixture
def tls_server(
    make_server: object, pki: tuple[Path, Path, Path]
) -> Iterator[tuple[StockadeServer, TlsCollector]]:
    ca, cert, key = pki
    collector = TlsCollector(free_port(), cert, key)
    server: StockadeServer = make_server(  # type: ignore[operator]
        settings={
            "STOCKADE_AUDIT_SYSLOG_HOST": HOST,
            "STOCKADE_AUDIT_SYSLOG_PORT": str(collector.port),
            "STOCKADE_AUDIT_SYSLOG_TRANSPORT": "tls",
            "STOCKADE_AUDIT_SYSLOG_CA_FILE": str(ca),
            "STOCKADE_METADATA_WARM_DELAY": "0",
        }
    )
    try:
        yield server, collector
    finally:
        collector.stop()


def last_seq(server: StockadeServer) -> int:
    return max((r["seq"] for r in server.audit()), default=0)


def test_tls_collector_down_then_up_gets_every_record_once(
    tls_server: tuple[StockadeServer, TlsCollector], tmp_path: Path
) -> None:
    server, collector = tls_server
    server.start()  # the collector is not listening yet
    files = write_ct_series(tmp_path / "ct", 3, size=16, patient_id="SYSLOG-1")
    assert storescu(server.port, list(files.values())).returncode == 0
    written = last_seq(server)
    assert written >= 4  # the start and three stores
    cursor = server.data_dir / "audit" / "spool" / "cursor"
    assert not cursor.exists() or int(cursor.read_text()) == 0
    assert collector.messages == []

    collector.start()
    wait_until(lambda: len(collector.messages) >= written, 60, "the spooled records")
    ids = sequence_ids(collector.messages)
    assert ids == list(range(1, written + 1))
    assert int(cursor.read_text()) == written
    assert oct(cursor.stat().st_mode & 0o777) == "0o600"
    stored = [m for m in collector.messages if b'csd-code="110104"' in m]
    assert len(stored) == 3 and all(b'ParticipantObjectID="SYSLOG-1"' in m for m in stored)

    # Down again while records are written; up again: the rest arrive, none twice.
    collector.stop()
    assert echoscu(server.port, aet="STRANGER").returncode == 0  # open loopback: admitted
    more = write_ct_series(tmp_path / "ct2", 2, size=16, seed=5, patient_id="SYSLOG-2")
    assert storescu(server.port, list(more.values())).returncode == 0
    total = last_seq(server)
    assert total == written + 2
    collector.start()
    wait_until(lambda: len(collector.messages) >= total, 60, "the records written while down")
    assert server.stop() == 0
    ids = sequence_ids(collector.messages)
    assert ids[:total] == list(range(1, total + 1))
    assert len(ids) == len(set(ids)), "a record was sent twice"
    problems = server.log_problems()
    assert "audit export" in problems  # the outage was reported


def test_tls_refuses_a_collector_the_ca_did_not_sign(
    make_server: object, pki: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A collector with a certificate from another CA gets nothing."""
    ca, _, _ = pki
    other = tmp_path / "other"
    other.mkdir()
    _, cert, key = make_pki(other)
    collector = TlsCollector(free_port(), cert, key)
    collector.start()
    server: StockadeServer = make_server(  # type: ignore[operator]
        settings={
            "STOCKADE_AUDIT_SYSLOG_HOST": HOST,
            "STOCKADE_AUDIT_SYSLOG_PORT": str(collector.port),
            "STOCKADE_AUDIT_SYSLOG_CA_FILE": str(ca),
            "STOCKADE_METADATA_WARM_DELAY": "0",
        }
    )
    try:
        server.start()
        wait_until(
            lambda: "SSLCertVerificationError" in server.log_problems(), 30, "a refused handshake"
        )
        assert collector.messages == []
        assert server.stop() == 0
    finally:
        collector.stop()


def test_udp_collector_receives_well_formed_messages(make_server: object, tmp_path: Path) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((HOST, 0))
    receiver.settimeout(0.2)
    port = receiver.getsockname()[1]
    server: StockadeServer = make_server(  # type: ignore[operator]
        settings={
            "STOCKADE_AUDIT_SYSLOG_HOST": HOST,
            "STOCKADE_AUDIT_SYSLOG_PORT": str(port),
            "STOCKADE_AUDIT_SYSLOG_TRANSPORT": "udp",
            "STOCKADE_METADATA_WARM_DELAY": "0",
        }
    )
    messages: list[bytes] = []
    try:
        server.start()
        files = write_ct_series(tmp_path / "ct", 2, size=16, patient_id="SYSLOG-UDP")
        assert storescu(server.port, list(files.values())).returncode == 0
        written = last_seq(server)
        deadline = time.monotonic() + 30
        while len(messages) < written and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(receiver.recv(65535))
        assert server.stop() == 0
    finally:
        receiver.close()
    assert sequence_ids(messages) == list(range(1, written + 1))
    assert sum(b'ParticipantObjectID="SYSLOG-UDP"' in m for m in messages) == 2
