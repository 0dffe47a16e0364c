"""Run the atheris fuzz targets with the project's libFuzzer options; exit non-zero on a crash.

::

    .venv/bin/python fuzz/run.py --seconds 600              # both targets, 600 s each
    .venv/bin/python fuzz/run.py ingest --seconds 600
    .venv/bin/python fuzz/run.py multipart --runs 3000 --seed 1

Each target starts from its seed corpus (``fuzz/corpus/<target>``, read only) and keeps what
it learns in ``<workdir>/corpus-<target>`` (default workdir ``fuzz/work``, not committed), so a
second run continues where the first stopped. Crash, timeout and out-of-memory inputs are
written to the workdir as ``crash-*``, ``timeout-*`` and ``oom-*``; move one to
``fuzz/regressions/`` and add a test in ``tests/test_fuzz_regressions.py`` after fixing it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("ingest", "multipart")
#: libFuzzer options every run uses: a hang is an input that takes 10 s, memory is capped.
COMMON = ("-timeout=10", "-rss_limit_mb=1024", "-max_len=16384", "-print_final_stats=1")
FINDINGS = ("crash-*", "timeout-*", "oom-*", "leak-*", "slow-unit-*")


def findings(workdir: Path, target: str) -> list[Path]:
    """Inputs the fuzzer wrote for *target* after a failure."""
    folder = workdir / f"artifacts-{target}"
    return sorted(p for pattern in FINDINGS for p in folder.glob(pattern))


def command(target: str, workdir: Path, extra: list[str]) -> list[str]:
    """The command line that runs *target* (corpora and artifacts under *workdir*)."""
    corpus = workdir / f"corpus-{target}"
    artifacts = workdir / f"artifacts-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        str(HERE / f"{target}_target.py"),
        str(corpus),
        str(HERE / "corpus" / target),
        *COMMON,
        f"-artifact_prefix={artifacts}/",
        *extra,
    ]


def run(target: str, workdir: Path, extra: list[str]) -> int:
    """Run one target; return its exit status (non-zero also when it left a finding)."""
    with tempfile.TemporaryDirectory(prefix="stockade-fuzz-") as scratch:
        env = dict(os.environ, STOCKADE_FUZZ_WORKDIR=scratch)
        status = subprocess.call(command(target, workdir, extra), env=env)
    found = findings(workdir, target)
    for path in found:
        print(f"{target}: finding {path}", file=sys.stderr)
    return status or (1 if found else 0)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen targets one after the other."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, help="time per target (-max_total_time)")
    parser.add_argument("--runs", type=int, help="inputs per target (-runs)")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (-seed)")
    parser.add_argument("--workdir", type=Path, default=HERE / "work")
    args, extra = parser.parse_known_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target {sorted(unknown)[0]!r}; choose from {', '.join(TARGETS)}")
    if args.seconds is not None:
        extra.append(f"-max_total_time={args.seconds}")
    if args.runs is not None:
        extra.append(f"-runs={args.runs}")
    if args.seed is not None:
        extra.append(f"-seed={args.seed}")
    status = 0
    for target in args.targets or TARGETS:
        status = run(target, args.workdir, extra) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
