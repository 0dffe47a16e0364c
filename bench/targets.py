"""The archives the ingest benchmark sends to: Stockade, Orthanc and a plain storescp.

Each :class:`Target` opens a :class:`Session` on a fresh, empty archive in a run folder,
waits until it answers C-ECHO, and stops it (with its whole process group) when the session
ends, on error too. A session says how to count what the archive stored: while it runs
(Orthanc's REST API) or after it stopped (``stockade verify``, files written by storescp).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import (
    ROOT,
    BenchError,
    Service,
    dcmtk_env,
    first_line,
    free_port,
    require_tool,
    stockade_token,
    wait_for_echo,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

ORTHANC = "/usr/sbin/Orthanc"
VERIFIED = re.compile(r"verified (\d+) instances: all intact")


@dataclass
class Session:
    """A running archive: where to send, and how to count what it stored."""

    ae_title: str
    port: int
    service: Service
    #: Counts stored instances while the archive runs (None: count after it stopped).
    count_running: Callable[[], int] | None = None
    #: Counts stored instances after the archive stopped.
    count_stopped: Callable[[], int] | None = None
    #: Process name of a separate database server the archive uses (its CPU counts as ours).
    database_process: str | None = None
    #: Things worth reporting about this session (settings in force, start-up time, ...).
    notes: dict[str, str] = field(default_factory=dict)
    #: The HTTP port, where the archive serves one (DICOMweb, REST).
    http_port: int | None = None
    #: Headers every HTTP request needs (Stockade's Authorization).
    http_headers: dict[str, str] = field(default_factory=dict)


class Target(ABC):
    """An archive under test."""

    #: Short name used on the command line and in run folder names.
    key: str
    #: Regular expression matching a warning or error line in the server log.
    log_problem: re.Pattern[str]
    #: Exit codes that count as a clean stop after SIGTERM.
    clean_exit: tuple[int, ...] = (0,)

    def __init__(self, startup_timeout: float, keep_data: bool) -> None:
        self.startup_timeout = startup_timeout
        self.keep_data = keep_data

    @property
    @abstractmethod
    def title(self) -> str:
        """The name shown in the results table."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Version and configuration of this target, for the report."""

    @abstractmethod
    def session(self, run_dir: Path) -> contextlib.AbstractContextManager[Session]:
        """Start a fresh, empty archive with its data in *run_dir*; stop it at the end."""

    def _drop_data(self, data_dir: Path) -> None:
        if not self.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


# -- Stockade -----------------------------------------------------------------------------


class Stockade(Target):
    """``python -m stockade.cli serve`` from this checkout, SQLite or PostgreSQL index."""

    key = "stockade"
    log_problem = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
    ae = "STOCKADE"

    def __init__(
        self,
        startup_timeout: float,
        keep_data: bool,
        *,
        workers: int,
        database_url: str | None,
        syslog: str | None = None,
    ) -> None:
        super().__init__(startup_timeout, keep_data)
        self.workers = workers
        self.database_url = database_url
        #: Export the audit trail to a collector run by the benchmark: "udp" or "tls".
        self.syslog = syslog
        if syslog:
            self.key = f"stockade-syslog-{syslog}"

    @property
    def title(self) -> str:
        index = "PostgreSQL" if self.database_url else "SQLite"
        return f"Stockade ({index}, syslog {self.syslog})" if self.syslog else f"Stockade ({index})"

    def describe(self) -> dict[str, str]:
        """Stockade version, git revision of the checkout, index and workers."""
        from stockade import __version__

        revision = first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
        info = {
            "version": f"stockade {__version__} (git {revision})",
            "index": "PostgreSQL"
            if self.database_url
            else "SQLite (WAL; every commit fdatasynced before the answer)",
            "dicom_workers": str(self.workers),
        }
        changed = _git_changes()
        if changed:
            info["uncommitted_changes"] = changed
        if self.database_url:
            info["postgresql"] = _postgres_version(self.database_url)
        return info

    @staticmethod
    def _env(extra: dict[str, str]) -> dict[str, str]:
        # Stockade refuses unknown STOCKADE_* variables: start from a clean slate.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        env["TCP_NODELAY"] = "1"
        env.update(extra)
        return env

    @contextlib.contextmanager
    def session(self, run_dir: Path) -> Iterator[Session]:
        """Serve a fresh data folder (and a fresh PostgreSQL schema when configured)."""
        data_dir = run_dir / "data"
        with contextlib.ExitStack() as stack:
            stack.callback(self._drop_data, data_dir)
            port, http_port = free_port(), free_port()
            settings = {
                "STOCKADE_DATA_DIR": str(data_dir),
                "STOCKADE_DICOM_PORT": str(port),
                "STOCKADE_HTTP_PORT": str(http_port),
                "STOCKADE_DICOM_WORKERS": str(self.workers),
            }
            if self.database_url:
                settings["STOCKADE_DATABASE_URL"] = stack.enter_context(
                    _fresh_schema(self.database_url)
                )
            collector = None
            if self.syslog:
                collector = stack.enter_context(SyslogCollector(self.syslog, run_dir))
                settings.update(collector.settings())
            env = self._env(settings)
            service = stack.enter_context(
                Service(
                    "stockade",
                    [sys.executable, "-m", "stockade.cli", "serve"],
                    env,
                    run_dir / "server.log",
                    cwd=ROOT,
                )
            )
            started = wait_for_echo(service, self.ae, port, self.startup_timeout)
            # The working tree may change while a long benchmark runs: note what was served.
            notes = {
                "startup_s": f"{started:.1f}",
                "revision": first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
                "src_changes": _git_changes() or "none",
            }
            match = re.search(r"\((\d+) workers?\)", service.log_tail(50))
            if match:
                notes["workers_running"] = match.group(1)

            def verify() -> int:
                return _stockade_verify(env, run_dir / "verify.log")

            session = Session(
                self.ae,
                port,
                service,
                count_stopped=verify,
                database_process="postgres" if self.database_url else None,
                notes=notes,
                http_port=http_port,
                http_headers={"Authorization": f"Bearer {stockade_token(env, ROOT)}"},
            )
            if collector is not None:
                session.notes["syslog"] = f"{self.syslog} collector on 127.0.0.1:{collector.port}"
            yield session
            if collector is not None:
                print(
                    f"syslog collector ({self.syslog}): {collector.count} messages received",
                    flush=True,
                )


class SyslogCollector:
    """An audit record repository on loopback for the benchmark: counts RFC 5424 messages
    received over UDP (RFC 5426) or TLS (RFC 5425, octet counting; a CA and a certificate
    for 127.0.0.1 are made for the run with ``cryptography``)."""

    def __init__(self, transport: str, run_dir: Path) -> None:
        import socket

        self.transport = transport
        self.folder = run_dir / "syslog"
        self.count = 0
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.stopping = False

    def settings(self) -> dict[str, str]:
        """The STOCKADE_* variables that point Stockade at this collector."""
        out = {
            "STOCKADE_AUDIT_SYSLOG_HOST": "127.0.0.1",
            "STOCKADE_AUDIT_SYSLOG_PORT": str(self.port),
            "STOCKADE_AUDIT_SYSLOG_TRANSPORT": self.transport,
        }
        if self.transport == "tls":
            out["STOCKADE_AUDIT_SYSLOG_CA_FILE"] = str(self.folder / "ca.pem")
        return out

    def __enter__(self) -> SyslogCollector:
        import threading

        if self.transport == "tls":
            self._certificates()
            self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        import socket

        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _serve(self) -> None:
        import ssl
        import threading

        if self.transport == "udp":
            while not self.stopping:
                try:
                    self.sock.recv(65535)
                except OSError:
                    return
                self.count += 1
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.folder / "cert.pem", self.folder / "key.pem")
        while not self.stopping:
            try:
                raw, _ = self.sock.accept()
                conn = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                if self.stopping:
                    return
                continue
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: object) -> None:
        buffer = b""
        while True:
            try:
                chunk = conn.recv(1 << 16)  # type: ignore[attr-defined]
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while True:  # MSG-LEN SP SYSLOG-MSG
                length, space, rest = buffer.partition(b" ")
                if not space or not length.isdigit() or len(rest) < int(length):
                    break
                buffer = rest[int(length) :]
                self.count += 1

    def _certificates(self) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key, key = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        (self.folder / "ca.pem").write_bytes(ca.public_bytes(pem))
        (self.folder / "cert.pem").write_bytes(cert.public_bytes(pem))
        (self.folder / "key.pem").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


def _git_changes() -> str:
    """Files under src/ that differ from the commit, and a hash of the diff.

    The code measured is the working tree, which may hold uncommitted work: the hash tells
    two measurements of different code apart.
    """
    try:
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            timeout=20,
            check=False,
        )
        diff = subprocess.run(
            ["git", "-C", str(ROOT), "diff", "HEAD", "--", "src"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    files = [line[3:] for line in status.stdout.decode(errors="replace").splitlines()]
    if not files:
        return ""
    digest = hashlib.sha256(diff.stdout).hexdigest()[:12]
    return f"{', '.join(files)} (diff sha256 {digest})"


def _stockade_verify(env: dict[str, str], log_path: Path) -> int:
    """Run ``stockade verify`` on the archive; return the number of intact instances."""
    done = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "verify"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=1800,
        check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    log_path.write_text(output, encoding="utf-8")
    match = VERIFIED.search(output)
    if done.returncode != 0 or match is None:
        raise BenchError(
            f"stockade verify failed (exit {done.returncode}, log {log_path}): "
            f"{output.strip()[-500:]}"
        )
    return int(match.group(1))


def _admin_engine(url: str) -> Engine:
    """An autocommit engine for schema management (SQLAlchemy is imported only if needed)."""
    from sqlalchemy import create_engine

    return create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _postgres_version(url: str) -> str:
    from sqlalchemy import text

    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar())
            settings = {
                name: str(conn.execute(text(f"SHOW {name}")).scalar())
                for name in ("fsync", "synchronous_commit")
            }
    finally:
        engine.dispose()
    return f"PostgreSQL {version} (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


@contextlib.contextmanager
def _fresh_schema(url: str) -> Iterator[str]:
    """Create an empty schema, yield the URL that makes it the search path, drop it after."""
    from sqlalchemy import text

    schema = f"stockade_bench_{secrets.token_hex(4)}"
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        try:
            with engine.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            engine.dispose()


# -- Orthanc ------------------------------------------------------------------------------


class Orthanc(Target):
    """Debian's Orthanc with its default durability settings and no plugins."""

    key = "orthanc"
    # Orthanc logs its normal start-up and shut-down messages at level W: count errors only.
    log_problem = re.compile(r"^E\d{4} ")
    ae = "ORTHANC"

    @staticmethod
    def available() -> bool:
        """True if the Orthanc binary is installed."""
        return os.access(ORTHANC, os.X_OK)

    @property
    def title(self) -> str:
        return "Orthanc"

    def describe(self) -> dict[str, str]:
        """Orthanc's version and the settings the benchmark relies on."""
        return {
            "version": first_line([ORTHANC, "--version"]),
            "storage": "SyncStorageArea=true (default: fsync per stored file), "
            "StorageCompression=false",
            "index": "built-in SQLite (Orthanc sets WAL, synchronous=NORMAL)",
            "dicom": "DicomThreadsCount=4, MaximumPduLength=16384 (defaults)",
        }

    @staticmethod
    def config(data_dir: Path, dicom_port: int, http_port: int) -> dict[str, object]:
        """The configuration file: loopback only, any calling AE may store, no plugins."""
        return {
            "Name": "stockade-bench",
            "StorageDirectory": str(data_dir / "storage"),
            "IndexDirectory": str(data_dir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            # Durability and throughput settings are left at their defaults
            # (SyncStorageArea true, DicomThreadsCount 4, MaximumPduLength 16384).
        }

    @contextlib.contextmanager
    def session(self, run_dir: Path) -> Iterator[Session]:
        """Run Orthanc on a fresh storage and index folder."""
        data_dir = run_dir / "data"
        with contextlib.ExitStack() as stack:
            stack.callback(self._drop_data, data_dir)
            data_dir.mkdir(parents=True)
            dicom_port, http_port = free_port(), free_port()
            config_path = run_dir / "orthanc.json"
            config_path.write_text(
                json.dumps(self.config(data_dir, dicom_port, http_port), indent=2), encoding="utf-8"
            )
            service = stack.enter_context(
                Service("orthanc", [ORTHANC, str(config_path)], dcmtk_env(), run_dir / "server.log")
            )
            started = wait_for_echo(service, self.ae, dicom_port, self.startup_timeout)

            def count() -> int:
                value = _http_json(http_port, "/statistics").get("CountInstances")
                if not isinstance(value, int):
                    raise BenchError(f"Orthanc /statistics: no CountInstances ({value!r})")
                return value

            if count() != 0:
                raise BenchError("a fresh Orthanc does not report 0 instances")
            yield Session(
                self.ae,
                dicom_port,
                service,
                count_running=count,
                notes={"startup_s": f"{started:.1f}"},
                http_port=http_port,
            )


def _http_json(port: int, path: str) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise BenchError(f"GET {url} failed: {exc}") from exc
    if not isinstance(data, dict):
        raise BenchError(f"GET {url}: unexpected answer {data!r:.200}")
    return data


# -- storescp -----------------------------------------------------------------------------


class StoreScp(Target):
    """DCMTK ``storescp --fork +B``: writes each object to a plain file (no fsync, no index).

    A floor reference for what the network path and the client cost, not an archive.
    """

    key = "storescp"
    log_problem = re.compile(r"^[EWF]: ")
    ae = "STORESCP"
    clean_exit = (0, -signal.SIGTERM)  # storescp does not handle SIGTERM

    @property
    def title(self) -> str:
        return "storescp (plain files)"

    def describe(self) -> dict[str, str]:
        """storescp's version and mode."""
        return {
            "version": first_line([require_tool("storescp"), "--version"]),
            "mode": "--fork +B (bit-preserving), no fsync, no index",
        }

    @contextlib.contextmanager
    def session(self, run_dir: Path) -> Iterator[Session]:
        """Run storescp writing into an empty folder."""
        out = run_dir / "data"
        with contextlib.ExitStack() as stack:
            stack.callback(self._drop_data, out)
            out.mkdir(parents=True)
            port = free_port()
            argv = [
                require_tool("storescp"),
                "--fork",
                "-aet",
                self.ae,
                "-od",
                str(out),
                "+B",
                str(port),
            ]
            service = stack.enter_context(
                Service("storescp", argv, dcmtk_env(), run_dir / "server.log")
            )
            started = wait_for_echo(service, self.ae, port, self.startup_timeout)

            def count() -> int:
                return sum(1 for p in out.iterdir() if p.is_file())

            yield Session(
                self.ae, port, service, count_stopped=count, notes={"startup_s": f"{started:.1f}"}
            )
