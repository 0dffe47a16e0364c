"""C-GET and C-MOVE throughput: Stockade against Orthanc (``python -m bench.retrieve``).

Run from the repository root::

    .venv/bin/python -m bench.retrieve                           # 1,000 instances, 5 runs
    .venv/bin/python -m bench.retrieve --instances 100 --runs 1  # quick check
    .venv/bin/python -m bench.retrieve --runs 3 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

One synthetic CT study (the slices of :mod:`bench.synthetic`: 512 x 512, 16 bits, Explicit
VR Little Endian, about 0.5 MB each; one patient, one study, :data:`SERIES` series) is
loaded with one ``storescu`` association into each archive: a fresh Stockade (SQLite index,
or a fresh PostgreSQL schema with ``--database-url``) and a fresh Orthanc, both running side
by side for the whole session. Stockade admits any calling AE only while no node is
configured, so the study is loaded first; then the peers are added with ``stockade node
add`` (nodes are read live from the index, the server keeps running). Orthanc is started
with ``DicomAlwaysAllowGet``/``DicomAlwaysAllowMove`` and the destination as a modality.

Each measured run retrieves the whole study (Study Root, STUDY level):

- C-GET: ``getscu`` receives the instances on its own association;
- C-MOVE: ``movescu`` asks the archive to send them to a DCMTK ``storescp`` (AE ``DEST``)
  that runs for the whole session and serves both archives.

Client settings, the same for both archives: DCMTK defaults (maximum receive PDU 16,384
bytes, uncompressed transfer syntaxes proposed, so every instance goes as stored), with
``TCP_NODELAY=1``; received instances are written bit-preserving (``+B``) into a folder on
tmpfs (``/dev/shm``), or discarded with ``--sink ignore``. getscu logs at INFO and movescu
at DEBUG (the only level at which it prints the final counts), with timestamps.

The figure is N / wall time of the ``getscu`` or ``movescu`` process (start to exit). A run
counts only if the client exited with 0, the final response was Success with N completed
sub-operations, and the receiver got N instances (files in a tmpfs folder, or with
``--sink ignore`` the receiver's own count). Runs are interleaved (run 1 of each target
and operation, then run 2, ...); the table gives medians. One unmeasured warm-up retrieve
per target and operation comes first. Logs are kept in ``bench/.work/retrieve/<stamp>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.common import (
    CALLING_AE,
    ROOT,
    WORK,
    BenchError,
    Service,
    dcmtk_env,
    first_line,
    free_port,
    require_tool,
    stop_group,
    wait_for_echo,
)
from bench.cpu import CpuMeter, group_cpu, wait_until_quiet
from bench.ingest import machine
from bench.synthetic import SLICE_THICKNESS, _instance, _phantom, _uid
from bench.targets import Orthanc, Session, Stockade, Target, _admin_engine

#: Bump when the generated content changes, to invalidate cached studies.
GENERATOR_VERSION = 1
#: Series in the study.
SERIES = 4
#: AE titles of the clients and of the C-MOVE destination.
GET_AE, MOVE_AE, DEST_AE = "GETSCU", "MOVESCU", "DEST"
OPERATIONS = ("C-GET", "C-MOVE")
#: DCMTK log lines that report a problem.
DCMTK_PROBLEM = re.compile(r"^[EWF]: |^\S+ (ERROR|WARN|FATAL): ")
#: getscu and movescu log through this log4cplus layout: each line has a timestamp, so a
#: stall shows as a gap between two lines (see :func:`_largest_gap`).
LOG_LAYOUT = "%D{%H:%M:%S.%q} %p: %m%n"
STAMPED = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ")
#: A line that ends one sub-operation, for locating a gap.
SUBOP_DONE = re.compile(r"Sending C-STORE Response|Received Move Response|Received Final Move")
#: getscu -v: "I:   Number of Completed Suboperations : 1000"
GET_COMPLETED = re.compile(r"Number of Completed Suboperations\s*:\s*(\d+)")
GET_FINAL = re.compile(r"Received C-GET Response \((\w+)\)")
#: movescu -d dumps every response; the final one follows "Received Final Move Response".
MOVE_FINAL = re.compile(r"Received Final Move Response")
MOVE_COMPLETED = re.compile(r"Completed Suboperations\s*:\s*(\d+)")
MOVE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
#: storescp -v, one line per C-STORE-RQ received.
DEST_RECEIVED = re.compile(r"Received Store Request")


# -- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One synthetic CT study on disk."""

    root: Path
    uid: str
    files: tuple[Path, ...]
    total_bytes: int

    @property
    def count(self) -> int:
        """Number of instances."""
        return len(self.files)


def _manifest_path(count: int) -> Path:
    return WORK / "data" / f"retrieve-ct-{count}.json"


def _load_study(count: int) -> Study | None:
    """The cached study of *count* instances if it is complete and unchanged, else None."""
    manifest = _manifest_path(count)
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("version") != GENERATOR_VERSION or info.get("count") != count:
        return None
    root = manifest.with_suffix("")
    files = []
    for rel, size in info["files"]:
        path = root / rel
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
        files.append(path)
    return Study(root, info["study_uid"], tuple(files), sum(s for _r, s in info["files"]))


def study(count: int) -> Study:
    """The cached single-study set of *count* instances, generated first if needed.

    The slices of :mod:`bench.synthetic` (its instance builder and phantom), but one
    patient and one study split into :data:`SERIES` series, with UIDs of their own (derived
    deterministically, so a regenerated set is the same set). The manifest is written last.
    """
    cached = _load_study(count)
    if cached is not None:
        return cached
    if count < 1:
        raise ValueError("count must be at least 1")
    manifest = _manifest_path(count)
    root = manifest.with_suffix("")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    staging.mkdir(parents=True)
    print(f"generating a {count}-instance CT study in {root} ...", flush=True)
    rng = np.random.default_rng(20240102)
    study_uid = _uid("retrieve", "study", count)
    per_series = -(-count // SERIES)
    entries: list[tuple[str, int]] = []
    for i in range(count):
        series, number = divmod(i, per_series)
        z = i * SLICE_THICKNESS
        ds = _instance(1, series + 1, number + 1, z, _phantom(rng, z))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = _uid("retrieve", "series", count, series)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(
            "retrieve", "instance", count, i
        )
        ds.AccessionNumber = "BENCHRETR"
        ds.PatientID = "BENCH-RETRIEVE"
        rel = f"CT_{series + 1:02d}_{number + 1:04d}.dcm"
        ds.save_as(staging / rel, enforce_file_format=True)
        entries.append((rel, (staging / rel).stat().st_size))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    manifest.write_text(
        json.dumps(
            {"version": GENERATOR_VERSION, "count": count, "study_uid": study_uid, "files": entries}
        ),
        encoding="utf-8",
    )
    loaded = _load_study(count)
    assert loaded is not None
    return loaded


def warm_cache(data: Study) -> None:
    """Read every file once so that loading does not read from disk."""
    for path in data.files:
        with path.open("rb") as fh:
            while fh.read(1 << 20):
                pass


# -- targets ------------------------------------------------------------------------------


class RetrieveOrthanc(Orthanc):
    """Orthanc as in the ingest benchmark, plus C-GET/C-MOVE from any AE and the
    C-MOVE destination as a modality."""

    def __init__(self, startup_timeout: float, keep_data: bool, dest_port: int) -> None:
        super().__init__(startup_timeout, keep_data)
        self.dest_port = dest_port

    def describe(self) -> dict[str, str]:
        """Orthanc's version and settings, with the retrieve options."""
        info = super().describe()
        info["retrieve"] = (
            "DicomAlwaysAllowGet=true, DicomAlwaysAllowMove=true, DicomModalities "
            f'{{"dest": ["{DEST_AE}", "127.0.0.1", <port>]}}, SynchronousCMove=true (default)'
        )
        return info

    def config(self, data_dir: Path, dicom_port: int, http_port: int) -> dict[str, object]:  # type: ignore[override]
        """The ingest benchmark's configuration plus the retrieve options."""
        config = Orthanc.config(data_dir, dicom_port, http_port)
        config["DicomAlwaysAllowGet"] = True
        config["DicomAlwaysAllowMove"] = True
        config["DicomModalities"] = {"dest": [DEST_AE, "127.0.0.1", self.dest_port]}
        return config


def configure_stockade(session: Session, dest_port: int, log_path: Path) -> None:
    """Add the benchmark's peers with ``stockade node add`` in the server's environment."""
    nodes = [
        (GET_AE, GET_AE, 104, "echo,find,get"),
        (MOVE_AE, MOVE_AE, 104, "echo,find,move"),
        (DEST_AE, DEST_AE, dest_port, "echo"),
        (CALLING_AE, CALLING_AE, 104, "echo"),  # the readiness C-ECHO of bench.common
    ]
    with log_path.open("ab") as log:
        for name, ae, port, allow in nodes:
            argv = [sys.executable, "-m", "stockade.cli", "node", "add", name, "--ae", ae]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--allow", allow]
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            done = subprocess.run(
                argv,
                env=session.service.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise BenchError(f"stockade node add {name} failed (log {log_path})")


def _stockade_count(session: Session) -> int:
    """Instances in Stockade's index, read with SQLAlchemy while the server runs."""
    from sqlalchemy import text

    env = session.service.env
    url = env.get("STOCKADE_DATABASE_URL") or (
        f"sqlite:///{Path(env['STOCKADE_DATA_DIR']) / 'index.sqlite3'}"
    )
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM instances")).scalar() or 0)
    finally:
        engine.dispose()


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Run:
    """One retrieve of the whole study from one archive."""

    target: str
    operation: str
    run: int
    warmup: bool = False
    #: A disturbed attempt that was repeated (kept in the JSON, not in the table).
    discarded: bool = False
    seconds: float = 0.0
    instances: int = 0
    bytes: int = 0
    exit_code: int | None = None
    final_status: str = ""
    completed: int | None = None
    received: int | None = None
    ok: bool = False
    problem: str | None = None
    client_problem_lines: int = 0
    server_problem_lines: int = 0
    server_cpu_s: float = 0.0
    database_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    dest_cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0
    steal_cpu_s: float = 0.0
    disturbed: bool = False
    log: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def instances_per_s(self) -> float:
        """Instances per second of wall time."""
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6 bytes of the stored Part 10 files) per second of wall time."""
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def server_ms_per_instance(self) -> float:
        """CPU milliseconds the archive spent per instance."""
        return 1000 * self.server_cpu_s / self.instances if self.instances else 0.0

    @property
    def foreign_cores(self) -> float:
        """Average number of cores that other processes kept busy during the window."""
        return self.foreign_cpu_s / self.seconds if self.seconds else 0.0


@dataclass
class Archive:
    """A loaded archive under test."""

    target: Target
    session: Session
    run_dir: Path
    load_seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.target.key

    def server_problems(self, start: int) -> list[str]:
        """Problem lines the server logged after byte offset *start* of its log."""
        return _new_lines(self.session.service.log_path, start, self.target.log_problem)


class Dest:
    """The C-MOVE destination: ``storescp`` for the whole session, one association at a
    time, writing into a tmpfs folder (emptied before each run) or discarding the data."""

    def __init__(self, folder: Path, log_path: Path, *, ignore: bool, timeout: float) -> None:
        self.folder = folder
        self.port = free_port()
        self.ignore = ignore
        argv = [require_tool("storescp"), "-v", "-aet", DEST_AE]
        argv += ["--ignore"] if ignore else ["+B", "-od", str(folder)]
        argv.append(str(self.port))
        folder.mkdir(parents=True, exist_ok=True)
        self.service = Service("storescp DEST", argv, dcmtk_env(), log_path)
        self.timeout = timeout

    def __enter__(self) -> Dest:
        self.service.__enter__()
        wait_for_echo(self.service, DEST_AE, self.port, self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()

    def clear(self) -> None:
        """Remove what an earlier run left in the output folder."""
        for path in self.folder.iterdir():
            path.unlink()

    def files(self) -> int:
        """Files in the output folder."""
        return sum(1 for p in self.folder.iterdir() if p.is_file())


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _new_lines(path: Path, start: int, pattern: re.Pattern[str]) -> list[str]:
    """Lines matching *pattern* written to *path* after byte offset *start*."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if pattern.search(line)]


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Block until *proc* exits; kill its process group at the deadline. True if killed.

    ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which would round every
    measurement up to the next poll; a blocking ``waitpid`` returns when the client exits.
    """
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    return fired.is_set()


def log_config(folder: Path, level: str) -> Path:
    """A DCMTK (log4cplus) configuration: *level* and above to stdout, timestamped."""
    path = folder / f"dcmtk-{level.lower()}.cfg"
    path.write_text(
        f"log4cplus.rootLogger = {level}, console\n"
        "log4cplus.appender.console = log4cplus::ConsoleAppender\n"
        "log4cplus.appender.console.layout = log4cplus::PatternLayout\n"
        f"log4cplus.appender.console.layout.ConversionPattern = {LOG_LAYOUT}\n",
        encoding="ascii",
    )
    return path


def _client_argv(
    operation: str,
    archive: Archive,
    data: Study,
    out: Path | None,
    *,
    ignore: bool,
    log_configs: dict[str, Path],
) -> list[str]:
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={data.uid}"]
    called = ["-aec", archive.session.ae_title]
    if operation == "C-GET":
        # INFO (= -v): one line per C-STORE and the final counts.
        logging = ["-lc", str(log_configs["INFO"])]
        sink = ["--ignore"] if ignore else ["+B", "-od", str(out)]
        return [require_tool("getscu"), *logging, "-S", "-aet", GET_AE, *called, *keys, *sink]
    return [
        require_tool("movescu"),
        # DEBUG (= -d): the only level at which movescu prints the final response's counts.
        "-lc",
        str(log_configs["DEBUG"]),
        "-S",
        "-aet",
        MOVE_AE,
        *called,
        "-aem",
        DEST_AE,
        *keys,
    ]


def _largest_gap(text: str) -> tuple[float, int]:
    """The longest silence in a timestamped client log (ms) and the sub-operations done
    before it."""
    last: float | None = None
    done = 0
    gap, at = 0.0, 0
    for line in text.splitlines():
        match = STAMPED.match(line)
        if match is None:
            continue
        h, m, sec, ms = map(int, match.groups())
        now = ((h * 60 + m) * 60 + sec) * 1000.0 + ms
        if last is not None and now - last > gap:
            gap, at = now - last, done
        last = now
        if SUBOP_DONE.search(line):
            done += 1
    return gap, at


def _parse_client(operation: str, text: str) -> tuple[str, int | None]:
    """(final status, completed sub-operations) from getscu -v / movescu -d output."""
    if operation == "C-GET":
        finals = GET_FINAL.findall(text)
        status = finals[-1] if finals else "none"
        counts = GET_COMPLETED.findall(text)
        return status, int(counts[-1]) if counts else None
    parts = MOVE_FINAL.split(text)
    if len(parts) < 2:
        return "none", None
    final = parts[-1]
    codes = MOVE_STATUS.findall(final)
    counts = MOVE_COMPLETED.findall(final)
    status = {"0000": "Success"}.get(codes[0], f"0x{codes[0]}") if codes else "none"
    return status, int(counts[0]) if counts else None


def retrieve_once(
    archive: Archive,
    operation: str,
    data: Study,
    dest: Dest,
    *,
    run: Run,
    run_dir: Path,
    scratch: Path,
    ignore: bool,
    timeout: float,
    log_configs: dict[str, Path],
) -> None:
    """One timed getscu or movescu of the whole study; fills in *run*, raises BenchError."""
    run.instances, run.bytes = data.count, data.total_bytes
    out = scratch / f"{archive.key}-{run.run}{'-warmup' if run.warmup else ''}"
    if operation == "C-GET" and not ignore:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    if operation == "C-MOVE" and not ignore:
        dest.clear()
    argv = [
        *_client_argv(operation, archive, data, out, ignore=ignore, log_configs=log_configs),
        "127.0.0.1",
        str(archive.session.port),
    ]
    tag = "get" if operation == "C-GET" else "move"
    log_path = run_dir / f"{archive.key}-{tag}-{run.run}{'-warmup' if run.warmup else ''}.log"
    run.log = str(log_path)
    server_log = archive.session.service.log_path
    server_start, dest_start = _log_size(server_log), _log_size(dest.service.log_path)
    assert archive.session.service.proc is not None and dest.service.proc is not None
    meter = CpuMeter(archive.session.service.proc.pid, archive.session.database_process)
    dest_pgid = dest.service.proc.pid
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        dest_before = group_cpu(dest_pgid)[0]
        meter.start()
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            env=dcmtk_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        killed = _wait(proc, timeout)
        run.seconds = time.perf_counter() - start
        use = meter.stop()
        run.dest_cpu_s = group_cpu(dest_pgid)[0] - dest_before if operation == "C-MOVE" else 0.0
        stop_group(proc, grace=5)
    if killed:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s (killed)")
    run.server_cpu_s, run.database_cpu_s = use.server + use.database, use.database
    run.client_cpu_s, run.steal_cpu_s = use.clients, use.steal
    run.foreign_cpu_s = max(0.0, use.foreign - run.dest_cpu_s)
    run.exit_code = proc.returncode
    text = log_path.read_text(encoding="utf-8", errors="replace")
    run.final_status, run.completed = _parse_client(operation, text)
    run.client_problem_lines = sum(1 for line in text.splitlines() if DCMTK_PROBLEM.match(line))
    gap, at = _largest_gap(text)
    run.notes["largest_client_log_gap_ms"] = f"{gap:.0f}"
    run.notes["largest_gap_after_subops"] = str(at)
    problems = archive.server_problems(server_start)
    run.server_problem_lines = len(problems)
    if problems:
        run.notes["first_server_problem"] = problems[0][:300]
    if operation == "C-GET":
        run.received = run.completed if ignore else sum(1 for p in out.iterdir() if p.is_file())
        shutil.rmtree(out, ignore_errors=True)
    else:
        stored = len(_new_lines(dest.service.log_path, dest_start, DEST_RECEIVED))
        run.received = stored if ignore else dest.files()
        run.notes["dest_store_requests"] = str(stored)
        if not ignore:
            dest.clear()
    if run.exit_code != 0:
        raise BenchError(f"{argv[0]} exit code {run.exit_code} (log {log_path})")
    if run.final_status != "Success" or run.completed != data.count:
        raise BenchError(
            f"final response {run.final_status} with {run.completed} completed "
            f"sub-operations, expected Success with {data.count} (log {log_path})"
        )
    if run.received != data.count:
        raise BenchError(f"the receiver got {run.received} instances, expected {data.count}")
    run.ok = True


# -- session ------------------------------------------------------------------------------


def load(archive: Archive, data: Study, timeout: float) -> None:
    """Send the study to the archive over one storescu association and check it is there."""
    argv = [
        require_tool("storescu"),
        "-aet",
        CALLING_AE,
        "-aec",
        archive.session.ae_title,
        "+sd",
        "+r",
        "127.0.0.1",
        str(archive.session.port),
        str(data.root),
    ]
    log_path = archive.run_dir / "load-storescu.log"
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            env=dcmtk_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        killed = _wait(proc, timeout)
        archive.load_seconds = time.perf_counter() - start
        stop_group(proc, grace=5)
    if killed:
        raise BenchError(f"loading did not finish within {timeout:.0f} s (killed)")
    if proc.returncode != 0:
        raise BenchError(f"storescu exit code {proc.returncode} while loading (log {log_path})")
    session = archive.session
    held = session.count_running() if session.count_running else _stockade_count(session)
    if held != data.count:
        raise BenchError(f"{archive.target.title} holds {held} instances after loading")
    archive.session.notes["loaded_count"] = str(held)


def _transcode_note() -> str:
    if (ROOT / "src" / "stockade" / "dicom" / "transcode.py").exists():
        return "src/stockade/dicom/transcode.py"
    return "MISSING: stand-in from PYTHONPATH=" + os.environ.get("PYTHONPATH", "")


# -- reporting ----------------------------------------------------------------------------


def _median(runs: list[Run], attr: str) -> float | None:
    good = [getattr(r, attr) for r in runs if r.ok]
    return statistics.median(good) if good else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def table(runs: list[Run], titles: dict[str, str]) -> str:
    """Median instances/s per target and operation, and Stockade / Orthanc."""
    lines = [
        "| target | operation | instances/s (median) | MB/s (median) | vs Orthanc "
        "| runs (instances/s) | server CPU ms/instance |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    measured = [r for r in runs if not r.warmup and not r.discarded]
    for key, title in titles.items():
        for op in OPERATIONS:
            mine = [r for r in measured if r.target == key and r.operation == op]
            base = _median(
                [r for r in measured if r.target == "orthanc" and r.operation == op],
                "instances_per_s",
            )
            median = _median(mine, "instances_per_s")
            ratio = ""
            if key != "orthanc" and base and median is not None:
                ratio = f"**{median / base:.2f}x**"
            cells = ", ".join(
                ("FAILED" if not r.ok else f"{r.instances_per_s:.1f}")
                + ("*" if r.disturbed else "")
                for r in mine
            )
            lines.append(
                f"| {title} | {op} | {_fmt(median)} | "
                f"{_fmt(_median(mine, 'mb_per_s'))} | {ratio} | {cells} | "
                f"{_fmt(_median(mine, 'server_ms_per_instance'), 2)} |"
            )
    if any(r.disturbed for r in measured):
        lines.append("")
        lines.append("\\* other processes kept the CPUs busy during this run (see the JSON)")
    return "\n".join(lines)


def paired(runs: list[Run], titles: dict[str, str]) -> str:
    """Stockade / Orthanc run by run (run i of both ran a few seconds apart)."""
    measured = {(r.target, r.operation, r.run): r for r in runs if not r.warmup and not r.discarded}
    lines = []
    for key, title in titles.items():
        if key == "orthanc":
            continue
        for op in OPERATIONS:
            ratios = []
            for (k, o, n), mine in sorted(measured.items()):
                base = measured.get(("orthanc", op, n))
                if k != key or o != op or base is None:
                    continue
                ok = mine.ok and base.ok and base.instances_per_s
                ratios.append(f"{mine.instances_per_s / base.instances_per_s:.2f}" if ok else "-")
            if ratios:
                lines.append(f"{title} / Orthanc, {op}, run by run: {', '.join(ratios)}")
    return "\n".join(lines)


def _run_json(run: Run) -> dict[str, object]:
    item = asdict(run)
    item["instances_per_s"] = run.instances_per_s
    item["mb_per_s"] = run.mb_per_s
    item["server_ms_per_instance"] = run.server_ms_per_instance
    item["foreign_cores"] = run.foreign_cores
    return item


# -- main ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.retrieve",
        description="C-GET and C-MOVE throughput: Stockade against Orthanc.",
    )
    add = parser.add_argument
    add("--instances", type=int, default=1000, help="instances in the study (default 1000)")
    add("--runs", type=int, default=5, help="measured runs per target and operation (default 5)")
    add(
        "--database-url",
        help="bench Stockade on this PostgreSQL index (SQLAlchemy URL); a fresh schema, "
        "dropped afterwards",
    )
    add("--json", type=Path, help="also write the results to this JSON file")
    add(
        "--targets",
        default="stockade,orthanc",
        help="comma-separated: stockade, orthanc (default both)",
    )
    add(
        "--sink",
        choices=["tmpfs", "ignore"],
        default="tmpfs",
        help="tmpfs: getscu and storescp write each instance (+B) into a folder under "
        "/dev/shm, counted after the run (default); ignore: both discard the data (--ignore)",
    )
    add("--warmups", type=int, default=1, help="unmeasured retrieves first (default 1)")
    add(
        "--stockade-workers",
        type=int,
        default=0,
        help="STOCKADE_DICOM_WORKERS (default 0: one per core)",
    )
    add("--timeout", type=float, default=900, help="seconds one retrieve may take")
    add("--startup-timeout", type=float, default=60, help="seconds a server may take to start")
    add(
        "--max-foreign",
        type=float,
        default=0.2,
        help="a run during which other processes kept more cores busy is disturbed",
    )
    add(
        "--retry-disturbed",
        type=int,
        default=1,
        help="repeat a disturbed run up to this many times (default 1; the last one counts)",
    )
    add(
        "--quiet-wait",
        type=float,
        default=30,
        help="before each run wait up to this many seconds for a quiet machine (default 30)",
    )
    add("--keep-data", action="store_true", help="keep the archives' data folders")
    return parser


def _terminate(signum: int, _frame: object) -> None:
    """Turn SIGTERM/SIGHUP into an exception, so that every started server is stopped."""
    raise SystemExit(128 + signum)


def _attempt(
    archive: Archive,
    operation: str,
    data: Study,
    dest: Dest,
    *,
    number: int,
    warmup: bool,
    session_dir: Path,
    scratch: Path,
    args: argparse.Namespace,
    log_configs: dict[str, Path],
) -> Run:
    """One attempt, after waiting for a quiet machine; never raises BenchError."""
    run = Run(archive.key, operation, number, warmup=warmup)
    if args.quiet_wait > 0 and not warmup:
        waited, busy = wait_until_quiet(args.max_foreign, args.quiet_wait)
        run.notes["quiet_wait_s"] = f"{waited:.1f}"
        run.notes["busy_cores_before"] = f"{busy:.2f}"
    try:
        retrieve_once(
            archive,
            operation,
            data,
            dest,
            run=run,
            run_dir=session_dir,
            scratch=scratch,
            ignore=args.sink == "ignore",
            timeout=args.timeout,
            log_configs=log_configs,
        )
    except BenchError as exc:
        run.problem = str(exc)
    run.disturbed = run.foreign_cores > args.max_foreign
    label = "warm-up" if warmup else f"run {number}/{args.runs}"
    status = "ok" if run.ok else f"FAILED: {run.problem}"
    print(
        f"{label} {archive.target.title:<22} {operation}: {run.instances} in "
        f"{run.seconds:.2f} s = {run.instances_per_s:.1f}/s, {run.mb_per_s:.1f} MB/s, "
        f"server CPU {run.server_ms_per_instance:.2f} ms/inst, client "
        f"{run.client_cpu_s:.2f} s, dest {run.dest_cpu_s:.2f} s, others "
        f"{run.foreign_cores:.2f} cores{' (DISTURBED)' if run.disturbed else ''}, steal "
        f"{run.steal_cpu_s / run.seconds if run.seconds else 0:.2f} cores, log problems: "
        f"server {run.server_problem_lines}, client {run.client_problem_lines}; longest "
        f"client log gap {run.notes.get('largest_client_log_gap_ms', '?')} ms; {status}",
        flush=True,
    )
    return run


def _targets(args: argparse.Namespace, dest_port: int) -> list[Target]:
    targets: list[Target] = []
    for name in (n.strip() for n in args.targets.split(",") if n.strip()):
        if name == "stockade":
            targets.append(
                Stockade(
                    args.startup_timeout,
                    args.keep_data,
                    workers=args.stockade_workers,
                    database_url=args.database_url,
                )
            )
        elif name == "orthanc":
            if Orthanc.available():
                targets.append(RetrieveOrthanc(args.startup_timeout, args.keep_data, dest_port))
            else:
                print("Orthanc is not installed: skipped", file=sys.stderr)
        else:
            raise SystemExit(f"unknown target {name!r}")
    return targets


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A private folder on tmpfs for what the clients receive, removed at the end."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else WORK / "tmp"
    folder = base / f"stockade-bench-retrieve-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 0 when every run passed its checks."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.instances < 1 or args.runs < 1 or args.warmups < 0:
        raise SystemExit("--instances and --runs must be at least 1, --warmups at least 0")
    for tool in ("storescu", "echoscu", "getscu", "movescu", "storescp"):
        require_tool(tool)
    data = study(args.instances)
    warm_cache(data)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    session_dir = WORK / "retrieve" / stamp
    session_dir.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    runs: list[Run] = []
    log_configs = {level: log_config(session_dir, level) for level in ("INFO", "DEBUG")}
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(_scratch())
        dest = stack.enter_context(
            Dest(
                scratch / "dest",
                session_dir / "dest-storescp.log",
                ignore=args.sink == "ignore",
                timeout=args.startup_timeout,
            )
        )
        targets = _targets(args, dest.port)
        meta: dict[str, object] = {
            "started": stamp,
            "command": " ".join([".venv/bin/python", "-m", "bench.retrieve", *given]),
            "machine": machine(),
            "getscu": first_line([require_tool("getscu"), "--version"]),
            "data": {
                "instances": data.count,
                "bytes": data.total_bytes,
                "series": SERIES,
                "study_uid": data.uid,
                "root": str(data.root),
            },
            "sink": args.sink,
            "runs": args.runs,
            "warmups": args.warmups,
            "stockade_transcode": _transcode_note(),
            "targets": {t.key: t.describe() for t in targets},
        }
        print(json.dumps(meta, indent=2), flush=True)
        archives: list[Archive] = []
        for target in targets:
            run_dir = session_dir / target.key
            run_dir.mkdir(parents=True, exist_ok=True)
            session = stack.enter_context(target.session(run_dir))
            archive = Archive(target, session, run_dir)
            load(archive, data, args.timeout)
            if target.key == "stockade":
                configure_stockade(session, dest.port, run_dir / "nodes.log")
            print(
                f"loaded {data.count} instances into {target.title} in "
                f"{archive.load_seconds:.1f} s ({data.count / archive.load_seconds:.1f}/s); "
                f"held: {session.notes['loaded_count']}",
                flush=True,
            )
            archives.append(archive)
        meta["sessions"] = {
            a.key: {**a.session.notes, "load_s": f"{a.load_seconds:.2f}"} for a in archives
        }

        def attempt(archive: Archive, op: str, number: int, warmup: bool) -> Run:
            return _attempt(
                archive,
                op,
                data,
                dest,
                number=number,
                warmup=warmup,
                session_dir=session_dir,
                scratch=scratch,
                args=args,
                log_configs=log_configs,
            )

        for number in range(1, args.warmups + 1):
            for archive in archives:
                for op in OPERATIONS:
                    runs.append(attempt(archive, op, number, warmup=True))
        # Interleaved: run i of every target and operation, then run i + 1.
        for number in range(1, args.runs + 1):
            for archive in archives:
                for op in OPERATIONS:
                    for retry in range(args.retry_disturbed + 1):
                        run = attempt(archive, op, number, warmup=False)
                        if not run.disturbed or retry == args.retry_disturbed:
                            break
                        run.discarded = True
                        runs.append(run)
                    runs.append(run)
        for archive in archives:
            archive.session.notes["server_exit_code"] = str(archive.session.service.stop())
        titles = {a.key: a.target.title for a in archives}
    print()
    result = table(runs, titles)
    print(result)
    by_run = paired(runs, titles)
    print(f"\n{by_run}")
    print(f"\nlogs: {session_dir}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {**meta, "table": result, "paired": by_run, "runs": [_run_json(r) for r in runs]}
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")
        print(f"results: {args.json}")
    return 1 if any(not r.ok for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
