"""C-STORE ingest benchmark: Stockade against Orthanc (and storescp as a floor).

Run from the repository root::

    .venv/bin/python -m bench.ingest                      # 2,000 instances, 3 runs, SQLite
    .venv/bin/python -m bench.ingest --count 200 --runs 1 # quick check
    .venv/bin/python -m bench.ingest --database-url postgresql+psycopg://postgres@127.0.0.1/postgres

For each target and load, every run starts the archive on a fresh, empty data folder, sends
the synthetic CT set (:mod:`bench.synthetic`) with DCMTK ``storescu`` -- one association
carrying every instance, or four concurrent associations carrying a quarter each -- and times
from the start of the first ``storescu`` to the exit of the last. A run only counts if every
``storescu`` exited with 0 and the archive then holds every instance (``stockade verify``,
Orthanc's ``/statistics``, the files written by storescp). The table gives medians over the
runs. Logs of each run (server, storescu, verify) are kept under ``bench/.work/runs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    CALLING_AE,
    WORK,
    BenchError,
    dcmtk_env,
    first_line,
    fsync_probe,
    require_tool,
    stop_group,
)
from bench.cpu import CpuMeter, wait_until_quiet
from bench.synthetic import QUARTERS, DataSet, generate, warm_cache
from bench.targets import Orthanc, Session, Stockade, StoreScp, Target

#: storescu log lines that report a problem (DCMTK prefixes them with the level).
STORESCU_PROBLEM = re.compile(r"^[EWF]: ")


@dataclass
class Run:
    """One measured run of one load against one fresh archive."""

    run: int
    seconds: float = 0.0
    instances: int = 0
    bytes: int = 0
    stored: int | None = None
    ok: bool = False
    problem: str | None = None
    storescu_exit_codes: list[int] = field(default_factory=list)
    storescu_problem_lines: int = 0
    server_exit_code: int | None = None
    server_problem_lines: int = 0
    #: CPU seconds during the timed window: the archive (its process group, plus PostgreSQL
    #: when it is the index), the storescu clients, and every other process ("foreign").
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    #: Part of server_cpu_s used by a separate database server (PostgreSQL processes).
    database_cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0
    #: CPU seconds the hypervisor withheld from this machine during the window.
    steal_cpu_s: float = 0.0
    #: Other processes kept more than --max-foreign cores busy on average during the window.
    disturbed: bool = False
    run_dir: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def instances_per_s(self) -> float:
        """Instances per second of wall time."""
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6 bytes of Part 10 files) per second of wall time."""
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def server_ms_per_instance(self) -> float:
        """CPU milliseconds the archive spent per instance (all its processes and threads)."""
        return 1000 * self.server_cpu_s / self.instances if self.instances else 0.0

    @property
    def foreign_cores(self) -> float:
        """Average number of cores that other processes kept busy during the window."""
        return self.foreign_cpu_s / self.seconds if self.seconds else 0.0


@dataclass
class Result:
    """All runs of one load against one target."""

    target: str
    title: str
    associations: int
    runs: list[Run] = field(default_factory=list)
    #: Attempts that were repeated because other processes disturbed them.
    discarded: list[Run] = field(default_factory=list)

    def good(self) -> list[Run]:
        """The runs that passed every check."""
        return [r for r in self.runs if r.ok]

    @property
    def median_instances_per_s(self) -> float | None:
        """Median instances/s over the good runs (None if there are none)."""
        good = self.good()
        return statistics.median(r.instances_per_s for r in good) if good else None

    @property
    def median_mb_per_s(self) -> float | None:
        """Median MB/s over the good runs (None if there are none)."""
        good = self.good()
        return statistics.median(r.mb_per_s for r in good) if good else None

    @property
    def median_server_ms(self) -> float | None:
        """Median archive CPU milliseconds per instance over the good runs."""
        good = self.good()
        return statistics.median(r.server_ms_per_instance for r in good) if good else None


# -- sending ------------------------------------------------------------------------------


def _groups(data: DataSet, associations: int) -> list[tuple[list[Path], int, int]]:
    """Split the quarters over *associations* senders: (folders, files, bytes) each."""
    per = QUARTERS // associations
    out = []
    for i in range(associations):
        qs = range(i * per, (i + 1) * per)
        out.append(
            (
                [data.quarters[q] for q in qs],
                sum(data.quarter_files[q] for q in qs),
                sum(data.quarter_bytes[q] for q in qs),
            )
        )
    return out


def send(
    data: DataSet, session: Session, associations: int, *, run_dir: Path, run: Run, timeout: float
) -> None:
    """Run *associations* concurrent storescu processes; fill in time, counts and codes."""
    storescu = require_tool("storescu")
    groups = _groups(data, associations)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    assert session.service.proc is not None
    meter = CpuMeter(session.service.proc.pid, session.database_process)
    try:
        meter.start()
        start = time.perf_counter()
        for i, (folders, _files, _bytes) in enumerate(groups, 1):
            argv = [
                storescu,
                "-aet",
                CALLING_AE,
                "-aec",
                session.ae_title,
                "+sd",
                "+r",
                "127.0.0.1",
                str(session.port),
                *map(str, folders),
            ]
            log = (run_dir / f"storescu-{i}.log").open("wb")
            logs.append(log)
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            procs.append(
                subprocess.Popen(
                    argv,
                    env=dcmtk_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        deadline = start + timeout
        for proc in procs:
            remaining = deadline - time.perf_counter()
            try:
                proc.wait(max(remaining, 0.01))
            except subprocess.TimeoutExpired:
                raise BenchError(f"storescu did not finish within {timeout:.0f} s") from None
        run.seconds = time.perf_counter() - start
        use = meter.stop()
        run.server_cpu_s, run.database_cpu_s = use.server + use.database, use.database
        run.client_cpu_s = use.clients
        run.foreign_cpu_s, run.steal_cpu_s = use.foreign, use.steal
    finally:
        for proc in procs:
            stop_group(proc, grace=5)
        for log in logs:
            log.close()
    run.instances = sum(files for _f, files, _b in groups)
    run.bytes = sum(size for _f, _n, size in groups)
    run.storescu_exit_codes = [int(p.returncode) for p in procs]
    run.storescu_problem_lines = sum(
        len(_matching_lines(run_dir / f"storescu-{i}.log", STORESCU_PROBLEM))
        for i in range(1, len(procs) + 1)
    )


def _matching_lines(path: Path, pattern: re.Pattern[str]) -> list[str]:
    """The lines of a log file that match *pattern* (none if the file is missing)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return [line.rstrip() for line in fh if pattern.search(line)]
    except OSError:
        return []


def measure(
    target: Target, data: DataSet, associations: int, *, run_dir: Path, run: Run, timeout: float
) -> None:
    """One run: fresh archive, send, stop, check; raises :class:`BenchError` on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run.run_dir = str(run_dir)
    with target.session(run_dir) as session:
        run.notes.update(session.notes)
        send(data, session, associations, run_dir=run_dir, run=run, timeout=timeout)
        if session.count_running is not None:
            run.stored = session.count_running()
        run.server_exit_code = session.service.stop()
        if session.count_stopped is not None:
            run.stored = session.count_stopped()
    problems = _matching_lines(run_dir / "server.log", target.log_problem)
    run.server_problem_lines = len(problems)
    if problems:
        run.notes["first_server_problem"] = problems[0][:300]
    if any(run.storescu_exit_codes):
        # storescu stops at the first C-STORE the archive refuses (it is not run with -nh).
        hint = run.notes.get("first_server_problem", "")
        raise BenchError(
            f"storescu exit codes {run.storescu_exit_codes} (logs in {run_dir})"
            + (f"; server log: {hint}" if hint else "")
        )
    if run.stored != run.instances:
        raise BenchError(f"sent {run.instances} instances but the archive holds {run.stored}")
    if run.server_exit_code is not None and run.server_exit_code not in target.clean_exit:
        raise BenchError(f"server exited with code {run.server_exit_code} after SIGTERM")
    run.ok = True


def _settle() -> None:
    """Flush dirty pages of the previous run so that they do not slow the next one."""
    os.sync()
    time.sleep(1.0)


# -- reporting ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """Cores, CPU model, kernel, Python and DCMTK versions."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "storescu": first_line([require_tool("storescu"), "--version"]),
        "fsync_512k_ms_median": f"{fsync_probe(WORK / 'tmp', count=50):.1f}",
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def _run_cell(run: Run) -> str:
    if not run.ok:
        return "FAILED"
    return f"{run.instances_per_s:.1f}" + ("*" if run.disturbed else "")


def table(results: list[Result]) -> str:
    """The results as a Markdown table, with each target's ratio to Orthanc per load."""
    orthanc = {r.associations: r.median_instances_per_s for r in results if r.target == "orthanc"}
    lines = [
        "| target | associations | instances/s (median) | MB/s (median) | vs Orthanc "
        "| runs (instances/s) | server CPU ms/instance |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for res in results:
        runs = ", ".join(_run_cell(r) for r in res.runs)
        base = orthanc.get(res.associations)
        median = res.median_instances_per_s
        ratio = ""
        if base and median is not None and res.target != "orthanc":
            ratio = f"{median / base:.2f}x"
        lines.append(
            f"| {res.title} | {res.associations} | {_fmt(median)} | "
            f"{_fmt(res.median_mb_per_s)} | {ratio} | {runs} | {_fmt(res.median_server_ms)} |"
        )
    if any(r.disturbed for res in results for r in res.runs):
        lines.append("")
        lines.append("\\* other processes kept the CPUs busy during this run (see the JSON)")
    return "\n".join(lines)


def _run_json(run: Run) -> dict[str, object]:
    item = asdict(run)
    item["instances_per_s"] = run.instances_per_s
    item["mb_per_s"] = run.mb_per_s
    item["server_ms_per_instance"] = run.server_ms_per_instance
    item["foreign_cores"] = run.foreign_cores
    return item


def _as_json(results: list[Result], meta: dict[str, object]) -> dict[str, object]:
    out: list[dict[str, object]] = [
        {
            "target": res.target,
            "title": res.title,
            "associations": res.associations,
            "median_instances_per_s": res.median_instances_per_s,
            "median_mb_per_s": res.median_mb_per_s,
            "median_server_ms_per_instance": res.median_server_ms,
            "runs": [_run_json(r) for r in res.runs],
            "discarded_disturbed_attempts": [_run_json(r) for r in res.discarded],
        }
        for res in results
    ]
    return {**meta, "results": out}


# -- main ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="C-STORE ingest benchmark: Stockade against Orthanc (and storescp).",
    )
    add = parser.add_argument
    add("--count", type=int, default=2000, help="instances in the synthetic CT set (default 2000)")
    add("--runs", type=int, default=3, help="runs per target and load; medians are reported")
    add(
        "--associations",
        type=int,
        nargs="+",
        default=[1, 4],
        choices=[1, 2, 4],
        help="loads: concurrent associations sharing the set (default: 1 4)",
    )
    add(
        "--targets",
        default="stockade,orthanc",
        help="comma-separated: stockade, orthanc, storescp (default stockade,orthanc; "
        "orthanc is skipped if it is not installed)",
    )
    add(
        "--storescp",
        action="store_true",
        help="also measure DCMTK storescp writing plain files (a floor reference)",
    )
    add(
        "--stockade-workers",
        type=int,
        default=0,
        help="STOCKADE_DICOM_WORKERS for the server (default 0: one per core)",
    )
    add(
        "--database-url",
        help="bench Stockade on this PostgreSQL index (SQLAlchemy URL, e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres); each run gets a fresh "
        "schema, dropped afterwards",
    )
    add(
        "--syslog",
        choices=["udp", "tls"],
        help="also measure Stockade exporting its audit trail to a syslog collector run by "
        "the benchmark on loopback (RFC 5426 UDP or RFC 5425 TLS), beside Stockade without",
    )
    add("--json", type=Path, help="also write the results to this JSON file")
    add("--timeout", type=float, default=900, help="seconds one load may take (default 900)")
    add(
        "--startup-timeout",
        type=float,
        default=60,
        help="seconds a server may take to answer C-ECHO (default 60)",
    )
    add(
        "--max-foreign",
        type=float,
        default=0.2,
        help="a run during which other processes kept more cores than this busy on average "
        "is disturbed (default 0.2)",
    )
    add(
        "--retry-disturbed",
        type=int,
        default=2,
        help="repeat a disturbed run up to this many times (default 2); the last attempt counts",
    )
    add(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many seconds until fewer than --max-foreign "
        "cores are busy (default 60; 0: do not wait)",
    )
    add(
        "--keep-data",
        action="store_true",
        help="keep each run's archive folder (default: delete it after the run)",
    )
    return parser


def _targets(args: argparse.Namespace) -> list[Target]:
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if args.storescp and "storescp" not in names:
        names.append("storescp")
    targets: list[Target] = []
    for name in names:
        if name == "stockade":
            targets.append(
                Stockade(
                    args.startup_timeout,
                    args.keep_data,
                    workers=args.stockade_workers,
                    database_url=args.database_url,
                )
            )
            if args.syslog:
                targets.append(
                    Stockade(
                        args.startup_timeout,
                        args.keep_data,
                        workers=args.stockade_workers,
                        database_url=args.database_url,
                        syslog=args.syslog,
                    )
                )
        elif name == "orthanc":
            if Orthanc.available():
                targets.append(Orthanc(args.startup_timeout, args.keep_data))
            else:
                print("Orthanc is not installed: skipped", file=sys.stderr)
        elif name == "storescp":
            targets.append(StoreScp(args.startup_timeout, args.keep_data))
        else:
            raise SystemExit(f"unknown target {name!r}")
    return targets


def _terminate(signum: int, _frame: object) -> None:
    """Turn SIGTERM/SIGHUP into an exception, so that every started server is stopped."""
    raise SystemExit(128 + signum)


def _attempt(
    target: Target,
    data: DataSet,
    associations: int,
    *,
    run_dir: Path,
    number: int,
    args: argparse.Namespace,
) -> Run:
    """One attempt at one run, after waiting for a quiet machine; never raises BenchError."""
    run = Run(run=number)
    if args.quiet_wait > 0:
        waited, busy = wait_until_quiet(args.max_foreign, args.quiet_wait)
        run.notes["quiet_wait_s"] = f"{waited:.1f}"
        run.notes["busy_cores_before"] = f"{busy:.2f}"
    run.notes["fsync_ms_before"] = f"{fsync_probe(WORK / 'tmp'):.1f}"
    try:
        measure(target, data, associations, run_dir=run_dir, run=run, timeout=args.timeout)
    except BenchError as exc:
        run.problem = str(exc)
    run.disturbed = run.foreign_cores > args.max_foreign
    status = "ok" if run.ok else f"FAILED: {run.problem}"
    print(
        f"run {number}/{args.runs} {target.title:<22} {associations} assoc: "
        f"{run.instances} in {run.seconds:.2f} s = {run.instances_per_s:.1f}/s, "
        f"{run.mb_per_s:.1f} MB/s, server CPU {run.server_ms_per_instance:.1f} ms/inst, "
        f"others {run.foreign_cores:.2f} cores{' (DISTURBED)' if run.disturbed else ''}, "
        f"steal {run.steal_cpu_s / run.seconds if run.seconds else 0:.2f} cores, "
        f"fsync {run.notes.get('fsync_ms_before', '?')} ms, "
        f"log problems: server {run.server_problem_lines}, storescu "
        f"{run.storescu_problem_lines}; {status}",
        flush=True,
    )
    _settle()
    return run


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 0 when every run passed its checks."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.count < QUARTERS or args.runs < 1:
        raise SystemExit(f"--count must be at least {QUARTERS} and --runs at least 1")
    require_tool("storescu")
    require_tool("echoscu")
    targets = _targets(args)
    data = generate(args.count)
    warm_cache(data)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    session_dir = WORK / "runs" / stamp
    session_dir.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    meta: dict[str, object] = {
        "started": stamp,
        "command": " ".join([".venv/bin/python", "-m", "bench.ingest", *given]),
        "machine": machine(),
        "data": {"instances": data.count, "bytes": data.total_bytes, "root": str(data.root)},
        "runs": args.runs,
        "targets": {t.key: t.describe() for t in targets},
    }
    print(json.dumps(meta, indent=2), flush=True)
    results = [Result(t.key, t.title, n) for t in targets for n in args.associations]
    by_key = {(r.target, r.associations): r for r in results}
    # Runs are interleaved (run 1 of every target and load, then run 2, ...) so that a slow
    # phase of the machine does not fall on one target only.
    for number in range(1, args.runs + 1):
        for target in targets:
            for associations in args.associations:
                result = by_key[(target.key, associations)]
                for attempt in range(args.retry_disturbed + 1):
                    name = f"{target.key}-{associations}assoc-run{number}"
                    run_dir = session_dir / (name if attempt == 0 else f"{name}-retry{attempt}")
                    run = _attempt(
                        target, data, associations, run_dir=run_dir, number=number, args=args
                    )
                    if not run.disturbed or attempt == args.retry_disturbed:
                        break
                    result.discarded.append(run)
                result.runs.append(run)
    print()
    print(table(results))
    print(f"\nlogs: {session_dir}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_as_json(results, meta), indent=2), encoding="utf-8")
        print(f"results: {args.json}")
    failed = [r for res in results for r in res.runs if not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
