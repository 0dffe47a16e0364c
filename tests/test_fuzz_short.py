"""A short coverage-guided fuzz run of each atheris target (``fuzz/``) in the test suite.

Each target runs in a subprocess from its seed corpus for a fixed number of inputs with a
fixed seed (``fuzz/run.py``); the run must end normally and leave no crash, timeout or
out-of-memory input behind. The long run is ``make fuzz`` (see ``docs/fuzzing.md``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"ingest": 3000, "multipart": 3000}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", sorted(RUNS))
def test_short_fuzz_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "run.py"),
            target,
            f"--runs={RUNS[target]}",
            "--seed=1",
            f"--workdir={tmp_path}",
            "-max_total_time=60",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    log = result.stderr[-4000:]
    findings = sorted(p.name for p in tmp_path.glob("artifacts-*/*"))
    assert result.returncode == 0, log
    assert findings == [], log
    assert f"Done {RUNS[target]} runs" in result.stderr, log
    # The run learnt something: it did more than replay its seeds.
    assert any((tmp_path / f"corpus-{target}").iterdir()), log
