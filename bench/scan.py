"""Benchmark ``stockade scan``: files and megabytes per second over a folder of DICOM files.

Two sets: the synthetic CT series of the ingest benchmark (0.5 MB per file, read from the page
cache after a first warm-up run), and many small files (a copy of each synthetic header with a
4 x 4 image, about 2 KB each) to show the per-file cost that dominates a CD or an old
archive of hundreds of thousands of files.

    .venv/bin/python -m bench.scan [--count 2000] [--small 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from bench.common import WORK
from bench.synthetic import generate


def _small_set(source: list[Path], count: int) -> Path:
    root = WORK / "data" / f"scan-small-{count}"
    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    template = pydicom.dcmread(source[0])
    template.Rows = template.Columns = 4
    template.PixelData = bytes(32)
    for i in range(count):
        folder = root / f"d{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        template.SOPInstanceUID = f"{template.SeriesInstanceUID}.{i + 1}"
        template.save_as(folder / f"{i:06d}.dcm", enforce_file_format=True)
    marker.touch()
    return root


def _run(folder: Path) -> tuple[float, int, int]:
    """Seconds, files and bytes of one ``stockade scan --json`` over *folder*."""
    files = [p for p in folder.rglob("*.dcm")]
    size = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "scan", str(folder), "--json", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise SystemExit(f"scan failed: {result.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, len(files), size


def main() -> None:
    """Run the benchmark and print medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="synthetic CT instances")
    parser.add_argument("--small", type=int, default=20000, help="small files")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    data = generate(args.count)
    small = _small_set(list(data.files), args.small)
    for label, folder in (("synthetic CT (0.5 MB files)", data.root), ("small files", small)):
        _run(folder)  # warm the page cache
        runs = [_run(folder) for _ in range(args.runs)]
        seconds = statistics.median(r[0] for r in runs)
        files, size = runs[0][1], runs[0][2]
        print(
            f"{label}: {files} files, {size / 1e6:.0f} MB: median {seconds:.2f} s, "
            f"{files / seconds:.0f} files/s, {size / 1e6 / seconds:.0f} MB/s "
            f"(runs: {', '.join(f'{r[0]:.2f}' for r in runs)})"
        )


if __name__ == "__main__":
    main()
