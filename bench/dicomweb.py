"""DICOMweb throughput: Stockade against Orthanc's DICOMweb plugin (``python -m bench.dicomweb``).

Run from the repository root (needs Debian's ``orthanc`` and ``orthanc-dicomweb``)::

    .venv/bin/python -m bench.dicomweb                 # 2,000 instances, 3 runs
    .venv/bin/python -m bench.dicomweb --instances 200 --runs 1
    .venv/bin/python -m bench.dicomweb --runs 0        # series metadata only

Data: the synthetic CT set of :mod:`bench.synthetic` (512 x 512, 16 bits, Explicit VR Little
Endian, about 0.5 MB each; four patients with one study each). Every run starts each
archive empty (a fresh Stockade data folder and SQLite index, or a fresh PostgreSQL schema
with ``--database-url``; a fresh Orthanc) and measures, with httpx as the client:

- STOW-RS, one connection: every instance in ``POST /studies`` requests of ``--batch``
  (default 50) instances each, one after the other; instances/s = N / wall time;
- STOW-RS, four connections: each study's instances on its own connection, the four in
  parallel (on a second fresh archive);
- series metadata (``--metadata``, default 1,000): one series of small CT instances
  (pydicom's CT_small header, 16 x 16 pixels) stored with STOW-RS, then ``GET
  /studies/{uid}/series/{uid}/metadata`` timed once (the first request) and 20 times more
  (median), from sending the request to the last byte of the answer (the JSON is parsed
  and its length checked outside the timed part); then one more instance of that series
  is stored and the next request timed (a series that grows after a viewer opened it);
- WADO-RS: each study retrieved with ``GET /studies/{uid}`` and ``Accept: multipart/related;
  type="application/dicom"`` on one connection, the body streamed and discarded;
  instances/s = N / wall time; the parts are counted.

Request bodies are built in memory before the clock starts. A run counts only if every
request answered 200 and the archive holds N instances afterwards (QIDO-RS
``NumberOfStudyRelatedInstances`` for both), and the WADO-RS responses held N parts.
Figures are medians over ``--runs``; logs are kept in ``bench/.work/dicomweb/<stamp>/``.

Every archive's data folder is kept until the whole benchmark ends, then deleted (when
the disk has room for all of them; otherwise each one goes when its session ends, and
the benchmark says so). Deleting thousands of files just before the next session is
measured would measure the file system instead: ext4 without a journal passes over
inodes freed in the last 30 seconds each time it creates a file, so the first session
after a deletion created its files several times slower, whichever archive it was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.common import WORK, BenchError
from bench.synthetic import generate, warm_cache
from bench.targets import Orthanc, Session, Stockade, Target

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
BOUNDARY = "stockade-bench-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
WADO_ACCEPT = 'multipart/related; type="application/dicom"'


class OrthancDicomWeb(Orthanc):
    """Orthanc with its DICOMweb plugin from Debian under ``/dicom-web``."""

    key = "orthanc"

    @property
    def title(self) -> str:
        return "Orthanc + DICOMweb plugin"

    @staticmethod
    def config(data_dir: Path, dicom_port: int, http_port: int) -> dict[str, object]:
        config = Orthanc.config(data_dir, dicom_port, http_port)
        config["Plugins"] = [PLUGIN]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        return config


#: Headers of every request to the archive under test (set by :func:`base_url`).
HEADERS: dict[str, str] = {}


def base_url(target: Target, session: Session) -> str:
    """The DICOMweb root of a running archive (and its request headers, in HEADERS)."""
    HEADERS.clear()
    HEADERS.update(session.http_headers)
    root = "/dicom-web" if isinstance(target, Orthanc) else "/dicomweb"
    return f"http://127.0.0.1:{session.http_port}{root}"


def multipart_body(files: list[bytes]) -> bytes:
    """A STOW-RS request body of *files* (PS3.18 10.5.1)."""
    parts = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
        for f in files
    )
    return parts + f"--{BOUNDARY}--\r\n".encode()


def bodies(files: list[Path], batch: int) -> list[bytes]:
    """STOW-RS request bodies of *batch* Part 10 files each (PS3.18 10.5.1)."""
    return [
        multipart_body([path.read_bytes() for path in files[start : start + batch]])
        for start in range(0, len(files), batch)
    ]


def stow(url: str, batches: list[bytes]) -> None:
    """POST every batch on one connection; every answer must be 200."""
    with httpx.Client(timeout=600, headers=HEADERS) as client:
        for body in batches:
            response = client.post(
                f"{url}/studies", content=body, headers={"Content-Type": STOW_TYPE}
            )
            if response.status_code != 200:
                raise BenchError(f"STOW-RS answered {response.status_code}: {response.text[:300]}")


def stow_parallel(url: str, per_connection: list[list[bytes]]) -> None:
    """STOW on several connections at once."""
    errors: list[BaseException] = []

    def run(batches: list[bytes]) -> None:
        try:
            stow(url, batches)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in per_connection]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"a STOW connection failed: {errors[0]}")


def study_counts(url: str) -> dict[str, int]:
    """Study UID -> NumberOfStudyRelatedInstances, by QIDO-RS."""
    with httpx.Client(timeout=60, headers=HEADERS) as client:
        response = client.get(
            f"{url}/studies", params={"includefield": "NumberOfStudyRelatedInstances"}
        )
    if response.status_code != 200:
        raise BenchError(f"QIDO-RS answered {response.status_code}")
    out = {}
    for item in response.json():
        uid = item["0020000D"]["Value"][0]
        out[uid] = int(item.get("00201208", {}).get("Value", [0])[0])
    return out


def wado(url: str, studies: list[str]) -> int:
    """Retrieve every study on one connection, streaming; return the number of parts
    (delimiters ``--boundary`` counted in the stream, minus the closing one per study)."""
    parts = 0
    with httpx.Client(timeout=600, headers=HEADERS) as client:
        for study in studies:
            with client.stream(
                "GET", f"{url}/studies/{study}", headers={"Accept": WADO_ACCEPT}
            ) as response:
                if response.status_code != 200:
                    raise BenchError(f"WADO-RS answered {response.status_code}")
                kind = response.headers.get("content-type", "")
                boundary = kind.split("boundary=", 1)[-1].split(";")[0].strip().strip('"')
                if not boundary:
                    raise BenchError(f"WADO-RS answer without a boundary: {kind!r}")
                marker = b"--" + boundary.encode()
                tail = b""
                for chunk in response.iter_bytes(1 << 20):
                    data = tail + chunk
                    parts += data.count(marker)
                    tail = data[-(len(marker) - 1) :]
            parts -= 1  # the close delimiter
    return parts


def run_once(
    target: Target, run_dir: Path, data_files: list[Path], quarters: list[list[Path]], batch: int
) -> dict[str, float]:
    """One run: STOW on one connection + WADO on that archive, STOW on four on another."""
    n = len(data_files)
    one = bodies(data_files, batch)
    four = [bodies(q, batch) for q in quarters]
    result: dict[str, float] = {}
    with target.session(run_dir / "one") as session:
        url = base_url(target, session)
        started = time.perf_counter()
        stow(url, one)
        result["stow1"] = n / (time.perf_counter() - started)
        counts = study_counts(url)
        if sum(counts.values()) != n:
            raise BenchError(f"{target.title} holds {sum(counts.values())} instances, not {n}")
        started = time.perf_counter()
        parts = wado(url, sorted(counts))
        result["wado"] = n / (time.perf_counter() - started)
        if parts != n:
            raise BenchError(f"{target.title}: WADO-RS returned {parts} parts, not {n}")
    del one
    with target.session(run_dir / "four") as session:
        url = base_url(target, session)
        started = time.perf_counter()
        stow_parallel(url, four)
        result["stow4"] = n / (time.perf_counter() - started)
        if sum(study_counts(url).values()) != n:
            raise BenchError(f"{target.title}: not all instances stored over four connections")
    return result


def one_series(count: int) -> tuple[str, str, list[bytes]]:
    """*count* small CT instances of one series (pydicom's CT_small header, 16 x 16 pixels):
    (study UID, series UID, Part 10 files)."""
    from io import BytesIO

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    template.Rows = template.Columns = 16
    template.preamble = bytes(128)
    template.PixelData = bytes(16 * 16 * 2)
    if 0xFFFCFFFC in template:  # Data Set Trailing Padding: Stockade strips it with a warning
        del template[0xFFFCFFFC]
    study, series = generate_uid(), generate_uid()
    out = []
    for number in range(1, count + 1):
        template.StudyInstanceUID, template.SeriesInstanceUID = study, series
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = number
        buffer = BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return study, series, out


def timed_metadata(client: httpx.Client, url: str, expected: int) -> float:
    """Milliseconds from sending ``GET`` *url* to the last byte of its answer, which must
    be 200 and a JSON array of *expected* instances (checked outside the timed part)."""
    started = time.perf_counter()
    response = client.get(url, headers={"Accept": "application/dicom+json"})
    raw = response.content
    elapsed = (time.perf_counter() - started) * 1000
    body = json.loads(raw)
    if response.status_code != 200 or len(body) != expected:
        raise BenchError(f"metadata: {response.status_code}, {len(body)} items")
    return elapsed


def series_metadata(
    target: Target, run_dir: Path, count: int, repeats: int
) -> tuple[float, float, float]:
    """Store one series of *count* instances, then time ``GET .../metadata`` of it: the
    first request (cold: built from the files), the median of *repeats* more (warm), and
    the request after one more instance of the series was stored (grown)."""
    study, series, files = one_series(count + 1)
    files, extra = files[:count], files[count]
    with target.session(run_dir) as session:
        url = base_url(target, session)
        stow(url, [multipart_body(files[start : start + 100]) for start in range(0, count, 100)])
        metadata_url = f"{url}/studies/{study}/series/{series}/metadata"
        times = []
        with httpx.Client(timeout=600, headers=HEADERS) as client:
            for _ in range(repeats + 1):
                times.append(timed_metadata(client, metadata_url, count))
        stow(url, [multipart_body([extra])])
        # a new connection: a server may close one left idle while the instance was stored
        with httpx.Client(timeout=600, headers=HEADERS) as client:
            times.append(timed_metadata(client, metadata_url, count + 1))
    return times[0], statistics.median(times[1:-1]), times[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dicomweb", description=__doc__)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument(
        "--runs", type=int, default=3, help="STOW-RS and WADO-RS runs (0: series metadata only)"
    )
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--targets", default="stockade,orthanc")
    parser.add_argument(
        "--metadata",
        type=int,
        default=1000,
        help="instances of the series whose metadata is timed (0: skip)",
    )
    parser.add_argument(
        "--delete-each-session",
        action="store_true",
        help="delete each archive when its session ends (the method before 2026-12-02 "
        "evening), instead of keeping all until the end",
    )
    args = parser.parse_args(argv)
    data = generate(args.instances)
    warm_cache(data)
    files = list(data.files)
    quarters = [[f for f in files if f.parent == q] for q in data.quarters]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = WORK / "dicomweb" / stamp
    root.mkdir(parents=True)
    keys = args.targets.split(",")
    keep = not args.delete_each_session and keep_until_end(
        root, data.total_bytes, args.runs * 2 * len(keys)
    )
    targets: list[Target] = []
    for key in keys:
        if key == "stockade":
            targets.append(Stockade(60, keep, workers=0, database_url=args.database_url))
        elif key == "orthanc":
            targets.append(OrthancDicomWeb(60, keep))
    try:
        return measure(args, targets, root, files, quarters)
    finally:
        for folder in sorted(root.glob("*/*/data")) + sorted(root.glob("*/data")):
            shutil.rmtree(folder, ignore_errors=True)


#: Room left free on the disk beyond the archives kept until the end.
SPARE_BYTES = 2 << 30


def keep_until_end(root: Path, data_bytes: int, sessions: int) -> bool:
    """True if the disk holds every session's archive (with a margin); else say that each
    is deleted when its session ends, and return False."""
    needed = int(data_bytes * sessions * 1.1) + SPARE_BYTES
    free = shutil.disk_usage(root).free
    if free >= needed:
        return True
    print(
        f"note: {free >> 20} MiB free, {needed >> 20} MiB needed to keep every archive until "
        "the end; each is deleted when its session ends (file creation in the next session "
        "may be slower on ext4 without a journal)",
        flush=True,
    )
    return False


def throughput_table(results: dict[str, list[dict[str, float]]]) -> None:
    """Print the medians of the STOW-RS and WADO-RS runs, and their ratio."""
    print()
    print("| target | STOW-RS, 1 connection | STOW-RS, 4 connections | WADO-RS study retrieve |")
    print("|---|---:|---:|---:|")
    medians = {
        title: {k: statistics.median(r[k] for r in runs) for k in ("stow1", "stow4", "wado")}
        for title, runs in results.items()
    }
    for title, m in medians.items():
        print(f"| {title} | {m['stow1']:.1f}/s | {m['stow4']:.1f}/s | {m['wado']:.1f}/s |")
    titles = list(medians)
    if len(titles) == 2:
        a, b = medians[titles[0]], medians[titles[1]]
        print(
            f"| ratio | {a['stow1'] / b['stow1']:.2f}x | {a['stow4'] / b['stow4']:.2f}x "
            f"| {a['wado'] / b['wado']:.2f}x |"
        )


def measure(
    args: argparse.Namespace,
    targets: list[Target],
    root: Path,
    files: list[Path],
    quarters: list[list[Path]],
) -> int:
    """Run every target *args.runs* times and print the tables."""
    results: dict[str, list[dict[str, float]]] = {t.title: [] for t in targets}
    for run in range(args.runs):
        for target in targets:
            run_dir = root / f"{target.key}-{run + 1}"
            run_dir.mkdir(parents=True)
            figures = run_once(target, run_dir, files, quarters, args.batch)
            results[target.title].append(figures)
            print(
                f"run {run + 1}/{args.runs} {target.title:28} "
                + ", ".join(f"{k} {v:.1f}/s" for k, v in figures.items()),
                flush=True,
            )
    if args.runs:
        throughput_table(results)
    if args.metadata:
        print()
        print(
            f"| target | series metadata, {args.metadata} instances: first "
            "| then (median of 20) | after one more instance |"
        )
        print("|---|---:|---:|---:|")
        for target in targets:
            cold, warm, grown = series_metadata(
                target, root / f"{target.key}-metadata", args.metadata, 20
            )
            print(f"| {target.title} | {cold:.0f} ms | {warm:.1f} ms | {grown:.1f} ms |")
    print(f"\nlogs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
