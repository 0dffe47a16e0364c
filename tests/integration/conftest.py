"""Black-box harness: Stockade runs as a real process, peers are the DCMTK command-line tools.

Nothing here imports ``stockade``. The server is started as ``python -m stockade.cli serve``
with ``STOCKADE_*`` variables, in its own session so that a crash test can SIGKILL the whole
process group (parent and DIMSE workers). The index is read with SQLAlchemy and the data
folder with plain file operations, to compare what the archive says with what it holds.

Waiting is always a bounded poll of an observable condition (echoscu answers, a row count
reached, a process group gone); nothing sleeps for luck.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

try:  # tests/conftest.py, imported by pytest under its rootdir-relative name
    from conftest import require_tool
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.conftest import require_tool

AE_TITLE = "STOCKADE"
HOST = "127.0.0.1"
#: Upper bound for the server to answer C-ECHO after start (it migrates the index first).
READY_TIMEOUT = 30.0
#: Upper bound for a graceful stop (the server waits up to 10 s for running associations).
STOP_TIMEOUT = 30.0
#: DCMTK network timeouts, so that a wedged peer ends a tool instead of the test run.
DCMTK_TIMEOUTS = ("-to", "10", "-ta", "10", "-td", "60")


# -- processes and tools ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without inherited Stockade settings, with TCP_NODELAY=1.

    ``STOCKADE_TEST_*`` variables stay (the server must tolerate them); any other inherited
    ``STOCKADE_*`` variable would change the server under test, so it is removed.
    TCP_NODELAY=1 turns Nagle off in Debian's DCMTK (otherwise 40 ms per C-STORE).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STOCKADE_") or k.startswith("STOCKADE_TEST_")
    }
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


def echoscu(
    port: int, *, aet: str = "ECHOSCU", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run echoscu against the archive; stdout and stderr together in ``stdout``."""
    return subprocess.run(
        ["echoscu", "-v", "-aet", aet, "-aec", AE_TITLE, *DCMTK_TIMEOUTS, HOST, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )


def storescu_args(
    port: int,
    paths: Sequence[Path | str],
    *options: str,
    aet: str = "STORESCU",
    verbosity: str = "-v",
) -> list[str]:
    """Command line of a storescu run: required contexts only, no halt on a failed store."""
    return [
        "storescu",
        verbosity,
        "-aet",
        aet,
        "-aec",
        AE_TITLE,
        *DCMTK_TIMEOUTS,
        "-R",
        "-nh",
        *options,
        HOST,
        str(port),
        *(str(p) for p in paths),
    ]


def storescu(
    port: int,
    paths: Sequence[Path | str],
    *options: str,
    aet: str = "STORESCU",
    verbosity: str = "-v",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run storescu to completion; stdout and stderr together in ``stdout``."""
    return subprocess.run(
        storescu_args(port, paths, *options, aet=aet, verbosity=verbosity),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")


def store_responses(output: str) -> dict[str, str]:
    """Map each file storescu (``-v``) sent to the status text of its C-STORE response.

    A file whose response never came (association aborted, server killed) is absent.
    """
    out: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        if m := _SENDING.match(line):
            current = m.group(1)
        elif (m := _RESPONSE.match(line)) and current is not None:
            out[current] = m.group(1)
            current = None
    return out


@dataclass(frozen=True)
class DebugResponse:
    """Status and Error Comment of one C-STORE response, from storescu ``-d`` output."""

    status: int
    error_comment: str | None


_STATUS = re.compile(r"^D: DIMSE Status\s*: 0x([0-9a-fA-F]{4})")
_COMMENT = re.compile(r"^D: \(0000,0902\) LO \[(.*)\]")


def debug_responses(output: str) -> list[DebugResponse]:
    """Every C-STORE response status (and its Error Comment) in storescu ``-d`` output."""
    found: list[DebugResponse] = []  # the comment follows its status in the dump
    for line in output.splitlines():
        if m := _STATUS.match(line):
            found.append(DebugResponse(int(m.group(1), 16), None))
        elif (m := _COMMENT.match(line)) and found:
            found[-1] = DebugResponse(found[-1].status, m.group(1))
    return found


def require_dcmtk(*names: str) -> None:
    """Skip (a failure in CI) unless every named DCMTK tool is installed."""
    for name in names:
        require_tool(name)


# -- the server ------------------------------------------------------------------------------


@dataclass
class Row:
    """One row of the instances table, the columns these tests check."""

    sop_uid: str
    blob_key: str
    sha256: str
    size: int
    trailing_bytes: int


#: ``stockade user add NAME --role ROLE --password-stdin`` then ``stockade token create NAME``
#: in one process (see :meth:`StockadeServer.user`).
_USER_COMMANDS = """
import sys
from stockade.cli import main
name, role = sys.argv[1:3]
added = main(["user", "add", name, "--role", role, "--password-stdin"])
sys.exit(added or main(["token", "create", name, "--expires", "1d"]))
"""


@dataclass
class StockadeServer:
    """A Stockade data folder and index, and the ``serve`` process running on them."""

    root: Path
    db_url: str | None = None
    workers: int = 1
    #: HTTP worker processes (``STOCKADE_HTTP_WORKERS``). One unless a test needs more:
    #: every worker imports Stockade at start, on a small machine that is most of a start.
    http_workers: int = 1
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # extra STOCKADE_* variables

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL."""
        return f"http://{HOST}:{self.http_port}/dicomweb"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def index_url(self) -> str:
        """Where the index is: the given URL, or Stockade's default SQLite file."""
        return self.db_url or f"sqlite:///{self.data_dir / 'index.sqlite3'}"

    @property
    def log_path(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    def env(self, log_level: str = "INFO") -> dict[str, str]:
        extra = {
            "STOCKADE_DATA_DIR": str(self.data_dir),
            "STOCKADE_DICOM_PORT": str(self.port),
            "STOCKADE_HTTP_PORT": str(self.http_port),
            "STOCKADE_DICOM_WORKERS": str(self.workers),
            "STOCKADE_HTTP_WORKERS": str(self.http_workers),
            "STOCKADE_LOG_LEVEL": log_level,
        }
        if self.db_url:
            extra["STOCKADE_DATABASE_URL"] = self.db_url
        extra.update(self.settings)
        return clean_env(extra)

    # life cycle

    def start(self) -> None:
        """Start ``serve`` in a new session and wait (bounded) until C-ECHO succeeds."""
        assert self.proc is None, "server already running"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stockade.cli", "serve"],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                pytest.fail(f"stockade serve exited with {code} during start\n{self.log_tail()}")
            result = echoscu(self.port)
            if result.returncode == 0:
                return
            if (
                "Association Rejected" in result.stdout
                and self.settings.get("STOCKADE_DICOM_USER_IDENTITY", "off") != "off"
            ):
                return  # it answers, and refuses an echo without a user identity
            last = result.stdout
            time.sleep(0.1)  # readiness polling only
        self.kill()
        pytest.fail(
            f"stockade serve did not answer C-ECHO within {READY_TIMEOUT} s\n"
            f"last echoscu: {last}\n{self.log_tail()}"
        )

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # session leader: its pid is the process group id

    def group_pids(self) -> set[int]:
        """Live processes of the server's process group (parent and workers)."""
        pgid = self.pgid
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        pids.add(int(entry.name))
        return pids

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return True
            if not self.group_pids():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> int:
        """SIGTERM to the server (the parent); wait for every process of its group; exit code."""
        assert self.proc is not None, "server not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"stockade serve ignored SIGTERM for {STOP_TIMEOUT} s\n{self.log_tail()}")
        gone = self._wait_group_gone(STOP_TIMEOUT)
        leftover = set() if gone else self.group_pids()
        if not gone:
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc = None
        assert gone, f"worker processes {leftover} outlived the server\n{self.log_tail()}"
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: no cleanup runs anywhere)."""
        assert self.proc is not None, "server not running"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)
        assert self._wait_group_gone(STOP_TIMEOUT), "SIGKILLed processes did not go away"
        self.proc = None

    def log_problems(self) -> str:
        """WARNING and ERROR lines of every server log so far (for failure messages)."""
        found = []
        for number in range(1, self.starts + 1):
            path = self.root / f"server-{number}.log"
            if path.exists():
                found += [
                    f"[start {number}] {line}"
                    for line in path.read_text().splitlines()
                    if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
                ]
        return "server warnings and errors:\n" + ("\n".join(found[-30:]) or "(none)")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text_ = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log (tail):\n" + "\n".join(text_.splitlines()[-lines:])

    # command line

    def cli(
        self, *args: str, timeout: float = 180, cwd: Path | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m stockade.cli ARGS`` on this data folder and index."""
        return subprocess.run(
            [sys.executable, "-m", "stockade.cli", *args],
            env=self.env("WARNING"),
            stdin=subprocess.DEVNULL if input is None else None,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or self.root,
            check=False,
        )

    # DICOMweb clients, authenticated as an administrator by a bearer token

    _token: str | None = None
    #: Passwords and tokens made for this server (none may reach a log or the database).
    secrets: list[str] = field(default_factory=list)

    def add_user(self, name: str, role: str, password: str | None = None) -> None:
        """Create a user with ``stockade user add`` (a random password unless given)."""
        import secrets

        password = password or secrets.token_urlsafe(18)
        made = self.cli("user", "add", name, "--role", role, "--password-stdin", input=password)
        assert made.returncode == 0, made.stderr
        self.secrets.append(password)

    def user(self, name: str, role: str, password: str | None = None) -> str:
        """Create a user with ``stockade user add`` (a random password unless given); return
        an API token for it from ``stockade token create``.

        Both commands go through the command line's ``main`` in one Python process: each
        process imports Stockade first (about a second here), and this runs for every server
        that a test talks to over HTTP."""
        import secrets

        password = password or secrets.token_urlsafe(18)
        self.secrets.append(password)
        done = subprocess.run(
            [sys.executable, "-c", _USER_COMMANDS, name, role],
            env=self.env("WARNING"),
            input=password,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=self.root,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines and lines[0] == f"created {name} ({role})", done.stdout
        token = lines[-1].strip()
        self.secrets.append(token)
        return token

    def assert_no_secret_written(self) -> None:
        """No password or token this harness made is in the server's logs or its index
        database files (threat model SR-7): checked when a server's tests are done (at the
        end of a test, or of the module that shares it)."""
        places = [*self.root.glob("server-*.log"), *self.data_dir.glob("index.sqlite3*")]
        for path in places:
            data = path.read_bytes()
            for secret in self.secrets:
                assert secret.encode() not in data, f"a password or token is in {path.name}"

    @property
    def token(self) -> str:
        """A bearer token of the administrator ``tester`` (created on first use)."""
        if self._token is None:
            self._token = self.user("tester", "admin")
        return self._token

    @property
    def auth(self) -> dict[str, str]:
        """The Authorization header of :attr:`token`."""
        return {"Authorization": f"Bearer {self.token}"}

    def web(self) -> Any:
        """A dicomweb-client session on this server, authenticated."""
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.dicomweb, headers=self.auth)

    def http(self, **kwargs: Any) -> Any:
        """An httpx client with the Authorization header set."""
        import httpx

        headers = {**self.auth, **kwargs.pop("headers", {})}
        return httpx.Client(headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        """``httpx.get`` with the Authorization header."""
        import httpx

        return httpx.get(url, headers={**self.auth, **kwargs.pop("headers", {})}, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        """``httpx.post`` with the Authorization header."""
        import httpx

        return httpx.post(url, headers={**self.auth, **kwargs.pop("headers", {})}, **kwargs)

    def verify(self) -> subprocess.CompletedProcess[str]:
        return self.cli("verify")

    def add_nodes(self, *nodes: tuple[str, str, int, str]) -> None:
        """``stockade node add`` each (name, AE title, port, allowed services) on loopback."""
        for name, ae, port, allow in nodes:
            done = self.cli(
                "node",
                "add",
                name,
                "--ae",
                ae,
                "--host",
                HOST,
                "--port",
                str(port),
                "--allow",
                allow,
            )
            assert done.returncode == 0, done.stderr

    # what the archive holds

    def query(self, sql: str) -> list[Any]:
        engine = create_engine(self.index_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql)))
        finally:
            engine.dispose()

    def rows(self) -> list[Row]:
        return [
            Row(*r)
            for r in self.query(
                "SELECT sop_uid, blob_key, sha256, size, trailing_bytes FROM instances"
            )
        ]

    def count(self) -> int:
        return int(self.query("SELECT count(*) FROM instances")[0][0])

    def wait_for_count(
        self, at_least: int, timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> int:
        """Poll the index (bounded) until it holds *at_least* instances; return the count."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline and alive():
            with contextlib.suppress(OperationalError):  # e.g. the schema is being created
                seen = self.count()
            if seen >= at_least:
                return seen
            time.sleep(0.01)
        return seen

    def blob_files(self) -> dict[str, Path]:
        """Every file under blobs/, keyed by its path relative to blobs/ (the storage key)."""
        base = self.data_dir / "blobs"
        if not base.exists():
            return {}
        return {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}

    def staging_tmp_files(self) -> list[Path]:
        """Staged objects left behind (the empty spare files a live process keeps ready
        are not objects)."""
        staging = self.data_dir / "staging"
        if not staging.exists():
            return []
        return sorted(p for p in staging.rglob("*.tmp") if p.stat().st_size > 0)

    def audit(self) -> list[dict[str, Any]]:
        """Every audit record, oldest first, read from the trail in the index (a record is
        committed before the operation it describes answers)."""
        with contextlib.suppress(OperationalError, ProgrammingError):  # no trail yet
            return [
                json.loads(r[0]) for r in self.query("SELECT record FROM audit_record ORDER BY seq")
            ]
        return []


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., StockadeServer]]:
    """Factory of servers in tmp_path; anything still running at teardown is killed."""
    servers: list[StockadeServer] = []

    def factory(
        db_url: str | None = None,
        workers: int = 1,
        name: str = "stockade",
        settings: dict[str, str] | None = None,
        http_workers: int = 1,
    ) -> StockadeServer:
        root = tmp_path / name
        root.mkdir()
        server = StockadeServer(
            root,
            db_url=db_url,
            workers=workers,
            http_workers=http_workers,
            settings=settings or {},
        )
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server.proc is not None:
            with contextlib.suppress(Exception):
                server.kill()
    for server in servers:
        server.assert_no_secret_written()


@contextlib.contextmanager
def stops_cleanly(server: StockadeServer) -> Iterator[StockadeServer]:
    """Yield a running shared *server*; afterwards it must stop with 0 (killed if anything
    failed), and no password or token the harness made may be in its logs or index."""
    try:
        yield server
        assert server.stop() == 0, server.log_tail()
    finally:
        if server.proc is not None:
            server.kill()
        server.assert_no_secret_written()


# -- checks ----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def assert_verify_intact(server: StockadeServer, expected: int) -> None:
    """``stockade verify`` exits 0 and reports *expected* instances, all intact."""
    result = server.verify()
    assert result.returncode == 0, f"verify failed:\n{result.stdout}\n{result.stderr}"
    assert f"verified {expected} instances: all intact" in result.stdout, result.stdout


def assert_index_matches_storage(server: StockadeServer) -> list[Row]:
    """Check index against blobs directly, not through ``verify``; return the rows.

    Every row has its blob at ``blobs/<blob_key>`` with the recorded size and SHA-256, the
    key is ``sha256/ab/<sha256>``, the file is Part 10 with a zero preamble, and every
    file under ``blobs/`` is referenced by a row.
    """
    rows = server.rows()
    files = server.blob_files()
    problems = []
    for row in rows:
        h = row.sha256
        if row.blob_key != f"sha256/{h[:2]}/{h}":
            problems.append(f"{row.sop_uid}: key {row.blob_key} is not derived from {h}")
        path = files.get(row.blob_key)
        if path is None:
            problems.append(f"{row.sop_uid}: blob {row.blob_key} missing")
            continue
        if path.stat().st_size != row.size or sha256_file(path) != h:
            problems.append(f"{row.sop_uid}: blob {row.blob_key} differs from its row")
        with path.open("rb") as fh:
            if fh.read(132) != bytes(128) + b"DICM":
                problems.append(f"{row.blob_key}: no zero preamble + DICM")
    orphans = set(files) - {row.blob_key for row in rows}
    problems += [f"blob {key} is not referenced by any row" for key in sorted(orphans)]
    assert not problems, "\n".join(problems[:20])
    assert len({row.sop_uid for row in rows}) == len(rows)
    return rows


# -- synthetic objects -----------------------------------------------------------------------


def ct_dataset(
    sop_uid: str,
    study_uid: str,
    series_uid: str,
    *,
    size: int,
    number: int,
    rng: np.random.Generator,
    patient_id: str,
) -> Dataset:
    """A small but complete CT Image Storage data set with random 12-bit pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = f"Test^{patient_id}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_ct_series(
    folder: Path,
    count: int,
    *,
    size: int = 64,
    seed: int = 0,
    patient_id: str = "P1",
    series_count: int = 1,
) -> dict[str, Path]:
    """Write *count* CT files (one study) into *folder*; return SOP Instance UID -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study = generate_uid()
    series = [generate_uid() for _ in range(series_count)]
    out = {}
    for i in range(count):
        sop = generate_uid()
        ds = ct_dataset(
            sop,
            study,
            series[i % series_count],
            size=size,
            number=i + 1,
            rng=rng,
            patient_id=patient_id,
        )
        path = folder / f"ct{i:04d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path, enforce_file_format=True)
        out[sop] = path
    return out


def dataset_offset(raw: bytes) -> int:
    """Offset of the data set in a Part 10 file: after preamble, DICM and group 0002.

    Walks the File Meta Information element by element (always Explicit VR Little Endian,
    PS3.10 7.1) rather than trusting its group length.
    """
    assert raw[128:132] == b"DICM", "not a Part 10 file"
    pos = 132
    while pos + 8 <= len(raw) and int.from_bytes(raw[pos : pos + 2], "little") == 0x0002:
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            pos += 12 + int.from_bytes(raw[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(raw[pos + 6 : pos + 8], "little")
    return pos


# -- a raw DIMSE peer (for what DCMTK cannot be made to send) --------------------------------


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Read one PDU (PS3.8 9.3): its type and body."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "server closed the connection"
        header += chunk
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "server closed the connection"
        body += chunk
    return pdu_type, body


def message_pdus(message: Any) -> bytes:
    """A pynetdicom DIMSE message (with its primitive set) as P-DATA-TF PDUs, context 1."""
    from pynetdicom.pdu import P_DATA_TF

    out = b""
    for item in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(item)
        out += pdu.encode()
    return out


def raw_associate(
    port: int, abstract_syntax: str, transfer_syntax: str, calling_ae: str
) -> socket.socket:
    """Open an association with one presentation context (id 1), encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = calling_ae
    request.called_ae_title = AE_TITLE
    context = build_context(abstract_syntax, [transfer_syntax])
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    request.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(pdu.encode())
    pdu_type, _ = recv_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted (PDU type {pdu_type:#04x})"
    return sock


@contextlib.contextmanager
def storescp(ae: str, out: Path, port: int | None = None) -> Iterator[int]:
    """A DCMTK ``storescp`` answering as *ae* and writing into *out*; yields its port once
    it answers a C-ECHO, and stops it afterwards (its output in ``out/../storescp.log``)."""
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    with (out.parent / "storescp.log").open("w") as log:
        proc = subprocess.Popen(
            ["storescp", "-v", "-aet", ae, "-od", str(out), "-ta", "10", "-td", "60", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),  # TCP_NODELAY=1
        )
        try:
            deadline = time.monotonic() + 30
            while (
                subprocess.run(
                    ["echoscu", "-aec", ae, "127.0.0.1", str(port)],
                    capture_output=True,
                    env=clean_env(),
                    timeout=10,
                    check=False,
                ).returncode
                != 0
            ):
                assert proc.poll() is None and time.monotonic() < deadline, "no storescp"
                time.sleep(0.05)  # readiness polling only
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


from .browser import browser  # noqa: E402, F401  (the fixture of the browser tests)
