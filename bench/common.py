"""Shared helpers for the benchmarks: paths, ports, managed processes, DCMTK calls.

Every process the benchmarks start runs in its own process group (``start_new_session``) and
is stopped through :class:`Service` or :func:`stop_group`, so that a server's children (the
Stockade DIMSE workers, the per-association children of ``storescp --fork``) are never left
behind, even when a run fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

#: The repository root (``bench/`` lives directly under it).
ROOT = Path(__file__).resolve().parent.parent
#: Git-ignored working area: cached data sets, per-run logs, temporary archives.
WORK = ROOT / "bench" / ".work"

#: The calling AE title of every DCMTK client the benchmarks run.
CALLING_AE = "BENCHSCU"


class BenchError(Exception):
    """A benchmark step failed (server did not start, a check did not pass, ...)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DCMTK tools and Orthanc: ours plus ``TCP_NODELAY=1``.

    Debian's DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY`` is set, which costs up
    to 40 ms per C-STORE on loopback (delayed ACK) and would measure the client, not the
    archive.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


def require_tool(name: str) -> str:
    """Return the path of a command-line tool or raise :class:`BenchError`."""
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} not found (apt-get install dcmtk)")
    return path


def group_alive(pgid: int) -> bool:
    """True while any process of process group *pgid* exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a group we do not own: not ours to stop
        return False
    return True


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """Stop *proc* (SIGTERM, then SIGKILL) and every process left in its process group.

    *proc* must have been started with ``start_new_session=True``, so its pid is its
    process group id. Returns the exit code of *proc* (negative for a signal).
    """
    pgid = proc.pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(10)
    # Children the leader left behind (workers, forked association handlers).
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    return proc.returncode


class Service:
    """A server process in its own process group, its output captured to a log file.

    Use it as a context manager: the process is started on entry and stopped on exit, on
    success, error or interrupt alike.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        grace: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop the process and its group (idempotent); return its exit code."""
        if self.proc is not None and self.exit_code is None:
            self.exit_code = stop_group(self.proc, self.grace)
        return self.exit_code

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the log (for error messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def echo(ae_title: str, port: int, timeout: float = 5.0) -> bool:
    """One C-ECHO with ``echoscu``; True on success."""
    argv = [
        require_tool("echoscu"),
        "-aet",
        CALLING_AE,
        "-aec",
        ae_title,
        "-to",
        "2",
        "-ta",
        "2",
        "-td",
        "2",
        "127.0.0.1",
        str(port),
    ]
    try:
        done = subprocess.run(
            argv,
            env=dcmtk_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def wait_for_echo(service: Service, ae_title: str, port: int, timeout: float) -> float:
    """Poll with C-ECHO until *service* answers; return the seconds it took.

    Raises
    ------
    BenchError
        If the process exits or does not answer within *timeout* seconds.
    """
    start = time.monotonic()
    while True:
        if not service.running():
            raise BenchError(
                f"{service.name} exited during start-up "
                f"(log {service.log_path}):\n{service.log_tail()}"
            )
        if echo(ae_title, port):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise BenchError(
                f"{service.name} did not answer C-ECHO on port {port} within "
                f"{timeout:.0f} s (log {service.log_path}):\n{service.log_tail()}"
            )
        time.sleep(0.2)


def first_line(argv: list[str]) -> str:
    """The first non-empty output line of a command (for version strings), or ``?``."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (done.stdout + done.stderr).decode(errors="replace").splitlines():
        if line.strip():
            return line.strip()
    return "?"


def fsync_probe(folder: Path, count: int = 20, size: int = 512 * 1024) -> float:
    """Median milliseconds to write *size* bytes to a new file in *folder* and fsync it.

    A context figure: an archive that fsyncs every object cannot beat the disk's fsync
    latency over one association, and on a shared or virtual disk that latency varies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    times = []
    path = folder / f"fsync-probe-{os.getpid()}.tmp"
    try:
        for _ in range(count):
            start = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            times.append(time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)
    times.sort()
    return 1000 * times[len(times) // 2]


def stockade_token(env: Mapping[str, str], cwd: Path | None = None) -> str:
    """Create the administrator ``bench`` (a random password) in a running Stockade and
    return a bearer token for its DICOMweb requests."""
    import secrets

    command = [sys.executable, "-m", "stockade.cli"]
    made = subprocess.run(
        [*command, "user", "add", "bench", "--role", "admin", "--password-stdin"],
        input=secrets.token_urlsafe(18),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0 and "exists already" not in made.stderr:
        raise BenchError(f"cannot create the benchmark user: {made.stderr.strip()}")
    token = subprocess.run(
        [*command, "token", "create", "bench", "--expires", "2d"],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if token.returncode != 0:
        raise BenchError(f"cannot create a benchmark token: {token.stderr.strip()}")
    return token.stdout.strip()
