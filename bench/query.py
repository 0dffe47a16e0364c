"""C-FIND latency of Stockade on a large synthetic index (``python -m bench.query``).

The index is filled straight through the index's own writer (``SqlIndex.record_many``,
500 instances per transaction): C-FIND reads only the index, so no blobs are written. Then
``stockade serve`` runs on it and a minimal C-FIND SCU (:class:`FindClient`) on one
association, reused for every query, sends each study-level query ``--repeats`` times; the
figure is the median wall time from sending the C-FIND-RQ to receiving its final response,
with the number of matches checked against what the generator made.

The same queries are then sent as QIDO-RS study searches (``GET /dicomweb/studies`` on
one kept-alive connection, httpx) to the same server.

With ``--orthanc`` the same synthetic archive (same patients, names, dates and hierarchy;
fresh UIDs) is written as small Part 10 files without pixel data, stored into Debian's
Orthanc with DCMTK ``storescu``, and the same queries are timed against it with the same
client.

With ``--study-list`` the QIDO-RS requests of the web application's study list are timed
too: pages of 25 (``limit=26``) with the study description, the counts and the modalities
as ``includefield``, newest first (``orderby=-StudyDate,-StudyTime``) or by patient name,
unfiltered (the first page and one deep in the list) and with the
filters below. ``--instances-per-series 1`` makes 100,000 studies out of 200,000
instances.

Queries (Study Root, STUDY level), as in docs/benchmarks.md:

- ``PatientID``: one patient's ID, exact;
- ``PatientName`` wildcard: ``NAME43*`` (patients 43 and 430-439);
- ``StudyDate`` range: one month.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_FIND_RQ
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from bench.common import (
    WORK,
    BenchError,
    Service,
    dcmtk_env,
    free_port,
    require_tool,
    stockade_token,
    wait_for_echo,
)
from bench.targets import _fresh_schema
from stockade.index.base import InstanceRecord
from stockade.index.sql import SqlIndex

STUDIES_PER_PATIENT, SERIES_PER_STUDY, INSTANCES_PER_SERIES = 2, 2, 5
PER_PATIENT = STUDIES_PER_PATIENT * SERIES_PER_STUDY * INSTANCES_PER_SERIES
FIRST_DAY = date(2020, 1, 1)
DAYS = 5 * 365


def study_date(patient: int, study: int) -> str:
    """Dates spread evenly over five years."""
    day = (patient * 7919 + study * 104729) % DAYS
    return (FIRST_DAY + timedelta(days=day)).strftime("%Y%m%d")


def records(patients: int, per_series: int = INSTANCES_PER_SERIES) -> Iterator[InstanceRecord]:
    """The synthetic archive, instance by instance."""
    now = datetime.now(UTC)
    for p in range(patients):
        for s in range(STUDIES_PER_PATIENT):
            study = generate_uid()
            for _se in range(SERIES_PER_STUDY):
                series = generate_uid()
                for i in range(per_series):
                    sop = generate_uid()
                    yield InstanceRecord(
                        attributes={
                            "SOPInstanceUID": sop,
                            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                            "SeriesInstanceUID": series,
                            "StudyInstanceUID": study,
                            "PatientID": f"PID{p:06d}",
                            "PatientName": f"NAME{p}^GIVEN{p % 97}",
                            "StudyDate": study_date(p, s),
                            "Modality": "CT",
                            "InstanceNumber": i + 1,
                        },
                        sha256=f"{p:016x}{s:016x}{i:032x}",
                        blob_key="sha256/00/" + "0" * 64,
                        size=1,
                        transfer_syntax="1.2.840.10008.1.2.1",
                        preamble="none",
                        trailing_bytes=0,
                        origin="import",
                        sender_ae=None,
                        sender_address=None,
                        received_at=now,
                    )


def fill(url: str, instances: int, per_series: int = INSTANCES_PER_SERIES) -> float:
    """Fill an empty index; return the seconds it took."""
    index = SqlIndex(url)
    index.migrate()
    started = time.monotonic()
    batch: list[InstanceRecord] = []
    per_patient = STUDIES_PER_PATIENT * SERIES_PER_STUDY * per_series
    for record in records(instances // per_patient, per_series):
        batch.append(record)
        if len(batch) == 500:
            index.record_many(batch)
            batch = []
    if batch:
        index.record_many(batch)
    index.close()
    return time.monotonic() - started


def expected_named(patients: int, prefix: str = "43") -> int:
    """Studies of patients whose number starts with *prefix* (``NAME43*``)."""
    return STUDIES_PER_PATIENT * sum(1 for p in range(patients) if str(p).startswith(prefix))


def queries(patients: int) -> list[tuple[str, dict[str, str], int]]:
    """(name, keys, expected number of matching studies)."""
    dates = [study_date(p, s) for p in range(patients) for s in range(STUDIES_PER_PATIENT)]
    # one month, or fewer days when a month holds more than a few hundred studies
    for low, high in (("20230101", "20230131"), ("20230101", "20230107"), ("20230101", "20230101")):
        in_month = sum(1 for d in dates if low <= d <= high)
        if in_month <= 500:
            break
    # a prefix that matches a few hundred studies at most (a C-FIND over the cap is refused)
    prefix = next(p for p in ("43", "432", "4321", "43210") if expected_named(patients, p) <= 500)
    named = expected_named(patients, prefix)
    return [
        ("PatientID, exact", {"PatientID": f"PID{patients // 2:06d}"}, STUDIES_PER_PATIENT),
        (f"PatientName NAME{prefix}*", {"PatientName": f"NAME{prefix}*"}, named),
        (f"StudyDate {low}-{high}", {"StudyDate": f"{low}-{high}"}, in_month),
    ]


class FindClient:
    """A minimal C-FIND SCU on one reused association: each query goes out in one write and
    the responses are only counted, so the figure is the archive's, not a client library's.
    PDUs are encoded with pynetdicom's encoders (PS3.8 9.3)."""

    def __init__(self, port: int, called_ae: str = "STOCKADE") -> None:
        request = A_ASSOCIATE()
        request.application_context_name = "1.2.840.10008.3.1.1.1"
        request.calling_ae_title = "BENCHSCU"
        request.called_ae_title = called_ae
        context = build_context(
            StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian]
        )
        context.context_id = 1
        request.presentation_context_definition_list = [context]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 256 * 1024
        request.user_information = [max_length]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(request)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(pdu.encode())
        if self._pdu()[0] != 0x02:
            raise BenchError("association refused")
        self.message_id = 0

    def _exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise BenchError("archive closed the association")
            data += chunk
        return bytes(data)

    def _pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBL", self._exact(6))
        return pdu_type, self._exact(length)

    def find(self, identifier: bytes) -> int:
        """Send one C-FIND-RQ; return the number of pending responses before success."""
        self.message_id += 1
        primitive = C_FIND()
        primitive.MessageID = self.message_id
        primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        primitive.Priority = 2
        primitive.Identifier = BytesIO(identifier)
        message = C_FIND_RQ()
        message.primitive_to_message(primitive)
        out = b""
        for item in message.encode_msg(1, 256 * 1024):
            pdu = P_DATA_TF()
            pdu.from_primitive(item)
            out += pdu.encode()
        self.sock.sendall(out)
        pending = 0
        while True:
            pdu_type, body = self._pdu()
            if pdu_type != 0x04:
                raise BenchError(f"unexpected PDU {pdu_type:#04x}")
            pos = 0
            while pos < len(body):
                (length,) = struct.unpack_from(">L", body, pos)
                header = body[pos + 5]
                if header & 0x01 and header & 0x02:  # a complete command fragment
                    command = body[pos + 6 : pos + 4 + length]
                    status = _status(command)
                    if status in (0xFF00, 0xFF01):
                        pending += 1
                    elif status == 0x0000:
                        return pending
                    else:
                        raise BenchError(f"C-FIND failed with status {status:#06x}")
                pos += 4 + length

    def close(self) -> None:
        self.sock.sendall(struct.pack(">BBLL", 0x05, 0, 4, 0))
        with contextlib.suppress(BenchError, OSError):
            self._pdu()
        self.sock.close()


def _status(command: bytes) -> int:
    """Status (0000,0900) of an Implicit VR Little Endian command set."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, pos)
        if (group, element) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    raise BenchError("response without a status")


def identifier(keys: dict[str, str]) -> bytes:
    """A study-level identifier in Implicit VR Little Endian."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = ""
    ds.PatientID = ""
    ds.StudyDate = ""
    for key, value in keys.items():
        setattr(ds, key, value)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return bytes(buf.getvalue())


def measure(
    port: int, keys: dict[str, str], repeats: int, called_ae: str = "STOCKADE"
) -> tuple[float, int]:
    """Median milliseconds per C-FIND over one reused association, and the matches."""
    client = FindClient(port, called_ae)
    times, matches = [], 0
    try:
        encoded = identifier(keys)
        for _ in range(repeats + 2):  # two warm-up queries
            started = time.perf_counter()
            matches = client.find(encoded)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
    return statistics.median(times[2:]), matches


#: What the study list of the web application asks with every search (``studies.js``).
STUDY_LIST = {
    "fuzzymatching": "false",
    "includefield": ["00081030", "00201206", "00201208", "00080061"],
    "limit": "26",
    "orderby": "-StudyDate,-StudyTime",
}


def study_list_queries(patients: int) -> list[tuple[str, dict[str, object], int]]:
    """(name, parameters, expected results) of study-list pages."""
    studies = patients * STUDIES_PER_PATIENT
    deep = max(0, studies // 2 - 26)
    out: list[tuple[str, dict[str, object], int]] = [
        ("list, first page", dict(STUDY_LIST), min(26, studies)),
        (f"list, offset {deep:,}", {**STUDY_LIST, "offset": str(deep)}, min(26, studies - deep)),
        ("list by patient name", {**STUDY_LIST, "orderby": "PatientName"}, min(26, studies)),
    ]
    for name, keys, expected in queries(patients):
        out.append((f"list, {name}", {**STUDY_LIST, **keys}, min(26, expected)))
    return out


def measure_qido(
    http_port: int, keys: Mapping[str, object], repeats: int, headers: dict[str, str]
) -> tuple[float, int]:
    """Median milliseconds per QIDO-RS study search on one kept-alive HTTP connection (the
    same keys as the C-FIND; the default return keys), and the number of results."""
    import httpx

    url = f"http://127.0.0.1:{http_port}/dicomweb/studies"
    times, matches = [], 0
    with httpx.Client(timeout=60, headers=headers) as client:
        for _ in range(repeats + 2):  # two warm-up requests
            started = time.perf_counter()
            response = client.get(url, params=keys)  # type: ignore[arg-type]
            body = response.json()
            times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise BenchError(f"QIDO-RS answered {response.status_code}: {body}")
            matches = len(body)
    return statistics.median(times[2:]), matches


def write_files(folder: Path, instances: int) -> int:
    """The synthetic archive as Part 10 files without pixel data (for Orthanc)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    count = 0
    for record in records(instances // PER_PATIENT):
        ds = Dataset()
        for keyword, value in record.attributes.items():
            setattr(ds, keyword, value)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(folder / f"{count:07d}.dcm", enforce_file_format=True)
        count += 1
    return count


def run_orthanc(folder: Path, instances: int, repeats: int) -> bool:
    """Store the synthetic archive into Orthanc and time the same queries against it."""
    from bench.targets import ORTHANC, Orthanc

    if not Orthanc.available():
        raise BenchError(f"{ORTHANC} is not installed (apt-get install orthanc)")
    patients = instances // PER_PATIENT
    source = folder / "files"
    started = time.monotonic()
    written = write_files(source, instances)
    print(f"wrote {written} files for Orthanc in {time.monotonic() - started:.1f} s")
    data = folder / "orthanc"
    data.mkdir()
    dicom_port, http_port = free_port(), free_port()
    config = Orthanc.config(data, dicom_port, http_port)
    config["DicomAlwaysAllowFind"] = True
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    with Service(
        "orthanc", [ORTHANC, str(config_path)], dcmtk_env(), folder / "orthanc.log"
    ) as svc:
        wait_for_echo(svc, "ORTHANC", dicom_port, 60)
        started = time.monotonic()
        done = subprocess.run(
            [
                require_tool("storescu"),
                "-aec",
                "ORTHANC",
                "+sd",
                "+r",
                "-nh",
                "127.0.0.1",
                str(dicom_port),
                str(source),
            ],
            env=dcmtk_env(),
            capture_output=True,
            timeout=3600,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"storescu into Orthanc failed: {done.stderr[-500:]!r}")
        print(f"stored {written} instances into Orthanc in {time.monotonic() - started:.1f} s")
        print("| query (Orthanc) | matches | median ms |")
        print("|---|---:|---:|")
        ok = True
        for name, keys, expected in queries(patients):
            median, matches = measure(dicom_port, keys, repeats, "ORTHANC")
            flag = "" if matches == expected else f" (expected {expected})"
            ok = ok and matches == expected
            print(f"| {name} | {matches}{flag} | {median:.1f} |")
    shutil.rmtree(source, ignore_errors=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (a fresh schema)")
    parser.add_argument(
        "--orthanc", action="store_true", help="also time the same queries against Orthanc"
    )
    parser.add_argument(
        "--study-list", action="store_true", help="also time the web study list's requests"
    )
    parser.add_argument(
        "--instances-per-series",
        type=int,
        default=INSTANCES_PER_SERIES,
        help="instances in each series (1: 100,000 studies from 200,000 instances)",
    )
    args = parser.parse_args(argv)
    per_patient = STUDIES_PER_PATIENT * SERIES_PER_STUDY * args.instances_per_series
    patients = args.instances // per_patient
    folder = WORK / "query" / ("postgresql" if args.database_url else "sqlite")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if args.database_url:
            url = stack.enter_context(_fresh_schema(args.database_url))
        else:
            url = f"sqlite:///{folder / 'index.sqlite3'}"
        seconds = fill(url, args.instances, args.instances_per_series)
        where = url.split("?")[0]
        print(f"filled {patients * per_patient} instances in {seconds:.1f} s ({where})")
        port, http_port = free_port(), free_port()
        env = {
            "STOCKADE_DATA_DIR": str(folder / "data"),
            "STOCKADE_DATABASE_URL": url,
            "STOCKADE_DICOM_PORT": str(port),
            "STOCKADE_HTTP_PORT": str(http_port),
            "STOCKADE_LOG_LEVEL": "WARNING",
        }
        service = stack.enter_context(
            Service(
                "stockade",
                [sys.executable, "-m", "stockade.cli", "serve"],
                {**os.environ, **env},
                folder / "server.log",
            )
        )
        wait_for_echo(service, "STOCKADE", port, 60)
        auth = {"Authorization": f"Bearer {stockade_token({**os.environ, **env})}"}
        print("| query | matches | median ms |")
        print("|---|---:|---:|")
        ok = True
        for name, keys, expected in queries(patients):
            median, matches = measure(port, keys, args.repeats)
            flag = "" if matches == expected else f" (expected {expected})"
            ok = ok and matches == expected
            print(f"| {name} | {matches}{flag} | {median:.1f} |")
        print("| query (QIDO-RS) | matches | median ms |")
        print("|---|---:|---:|")
        for name, keys, expected in queries(patients):
            median, matches = measure_qido(http_port, keys, args.repeats, auth)
            flag = "" if matches == expected else f" (expected {expected})"
            ok = ok and matches == expected
            print(f"| {name} | {matches}{flag} | {median:.1f} |")
        if args.study_list:
            studies = patients * STUDIES_PER_PATIENT
            print(f"| study list ({studies:,} studies) | results | median ms |")
            print("|---|---:|---:|")
            for name, params, expected in study_list_queries(patients):
                median, matches = measure_qido(http_port, params, args.repeats, auth)
                flag = "" if matches == expected else f" (expected {expected})"
                ok = ok and matches == expected
                print(f"| {name} | {matches}{flag} | {median:.1f} |")
    if args.orthanc:
        ok = run_orthanc(folder, args.instances, args.repeats) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
