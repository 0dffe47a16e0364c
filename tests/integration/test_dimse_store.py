"""DIMSE black-box tests: DCMTK's echoscu and storescu against ``stockade serve``.

The archive is a separate process; these tests only use its network port, its command line,
its index (read-only, to count) and its data folder (read-only, to compare bytes).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.config import disable_value_validation
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts

from .conftest import (
    HOST,
    StockadeServer,
    assert_index_matches_storage,
    assert_verify_intact,
    clean_env,
    dataset_offset,
    debug_responses,
    echoscu,
    free_port,
    require_dcmtk,
    stops_cleanly,
    store_responses,
    storescu,
    storescu_args,
    write_ct_series,
)

pytestmark = pytest.mark.dcmtk

MakeServer = Callable[..., StockadeServer]

#: storescu option that proposes a transfer syntax (plus the uncompressed ones as fallback).
#: With ``-R`` storescu proposes, for each SOP class it is about to send, that syntax in a
#: context of its own, so every file goes over the wire in its own transfer syntax.
PROPOSE: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2": ("-xi",),  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": ("-xe",),  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ("-xb",),  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99": ("-xd",),  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50": ("-xy",),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": ("-xx",),  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.70": ("-xs",),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": ("-xt",),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": ("-xu",),  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": ("-xv",),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": ("-xw",),  # JPEG 2000
    "1.2.840.10008.1.2.5": ("-xr",),  # RLE Lossless
}
DEFLATED = "1.2.840.10008.1.2.1.99"
#: Compressed (and otherwise unusual) syntaxes the corpus must cover.
MUST_COVER = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    DEFLATED: "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
#: The storage SOP classes of the standard (as pynetdicom lists them for a Storage SCP).
STORAGE_CLASSES = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
#: PS3.5 9.1: digits and dots, no leading zero in a multi-digit component, at most 64 chars.
VALID_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
#: pydicom warnings that mean the file is structurally broken, not merely odd.
STRUCTURAL_WARNINGS = ("End of file reached", "Expected explicit VR", "Expected implicit VR")


def _valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and VALID_UID.fullmatch(text) is not None


# -- the pydicom corpus ----------------------------------------------------------------------


@dataclass
class Corpus:
    """Test files chosen from pydicom's (and pydicom-data's) test data, copied to a folder."""

    files: dict[str, Path]  # SOP Instance UID -> copied file
    syntax: dict[str, str]  # SOP Instance UID -> transfer syntax of the file
    excluded: dict[str, str] = field(default_factory=dict)  # file name -> why

    def groups(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = collections.defaultdict(list)
        for uid, path in sorted(self.files.items(), key=lambda kv: kv[1].name):
            out[self.syntax[uid]].append(path)
        return dict(out)


def _candidate(path: Path) -> tuple[str, str] | str:
    """(SOP Instance UID, transfer syntax) of a file fit to send, or why it is not.

    The rules, in order:

    1. a DICOM Part 10 file (preamble + ``DICM``): storescu sends files;
    2. pydicom reads the whole data set without a structural warning (truncated data, or a
       data set encoded otherwise than its meta header says): those files are broken on
       purpose;
    3. SOP Class UID is a storage SOP class of the standard (not a DICOMDIR, not retired);
    4. SOP Class, SOP Instance, Study Instance, Series Instance and Transfer Syntax UIDs are
       present and valid per PS3.5 9.1 (every composite object needs all of them);
    5. SOP Class and SOP Instance UID are encoded as UI (storescu cannot find them under an
       explicit VR UN and skips the file);
    6. a transfer syntax that storescu can propose (:data:`PROPOSE`).
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return f"unreadable: {exc}"
    if head[128:132] != b"DICM":
        return "not a Part 10 file"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
            # As read, before pydicom replaces an explicit UN by the dictionary's VR:
            raw_vrs = {
                tag: ds.get_item(tag).VR if tag in ds else None for tag in (0x00080016, 0x00080018)
            }
            ds.walk(lambda _ds, _elem: None)  # decode everything (deferred sequences too)
        except Exception as exc:
            return f"pydicom cannot read it: {exc}"
    broken = [
        str(w.message) for w in caught if any(s in str(w.message) for s in STRUCTURAL_WARNINGS)
    ]
    if broken:
        return f"structurally broken: {broken[0][:80]}"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in STORAGE_CLASSES:
        return f"not a storage SOP class: {sop_class or 'none'}"
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    for keyword, value in (
        ("SOPInstanceUID", ds.get("SOPInstanceUID")),
        ("StudyInstanceUID", ds.get("StudyInstanceUID")),
        ("SeriesInstanceUID", ds.get("SeriesInstanceUID")),
        ("TransferSyntaxUID", ts),
    ):
        if not _valid_uid(value):
            return f"{keyword} missing or invalid: {str(value)[:70]!r}"
    for tag, vr in raw_vrs.items():
        if vr not in (None, "UI"):  # None: implicit VR
            return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) encoded as {vr}"
    if ts not in PROPOSE:
        return f"transfer syntax {ts} cannot be proposed by storescu"
    return str(ds.SOPInstanceUID), ts


def select_corpus(dest: Path) -> Corpus:
    """Apply :func:`_candidate` to every test file and keep one file per SOP Instance UID.

    The test data holds the same instance in several transfer syntaxes; two different
    objects with one SOP Instance UID are a conflict, not two stores. Of the copies the one
    whose transfer syntax is rarest in the corpus is kept (then the first by name), so that
    the compressed syntaxes are covered.
    """
    copies: dict[str, list[tuple[str, Path]]] = collections.defaultdict(list)
    excluded = {}
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        found = _candidate(path)
        if isinstance(found, str):
            excluded[path.name] = found
            continue
        copies[found[0]].append((found[1], path))
    frequency = collections.Counter(ts for paths in copies.values() for ts, _ in paths)
    dest.mkdir(parents=True)
    corpus = Corpus({}, {}, excluded)
    for uid, paths in copies.items():
        ts, source = min(paths, key=lambda tp: (frequency[tp[0]], tp[1].name))
        for _ts, other in paths:
            if other != source:
                excluded[other.name] = f"same SOP Instance UID as {source.name}"
        target = dest / f"{len(corpus.files):03d}_{source.name}"
        shutil.copyfile(source, target)
        corpus.files[uid] = target
        corpus.syntax[uid] = ts
    return corpus


@pytest.fixture(scope="session")
def pydicom_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    corpus = select_corpus(tmp_path_factory.mktemp("corpus") / "files")
    missing = {name for uid, name in MUST_COVER.items() if uid not in set(corpus.syntax.values())}
    assert not missing, f"the test corpus lacks {sorted(missing)} (is pydicom-data installed?)"
    assert len(corpus.files) >= 100, f"only {len(corpus.files)} usable test files"
    return corpus


def send_corpus(port: int, corpus: Corpus) -> tuple[dict[str, str], str]:
    """Send every corpus file in its own transfer syntax: one storescu run per syntax."""
    responses: dict[str, str] = {}
    outputs = []
    for ts, paths in corpus.groups().items():
        result = storescu(port, paths, *PROPOSE[ts])
        responses.update(store_responses(result.stdout))
        outputs.append(
            f"$ storescu {' '.join(PROPOSE[ts])} ({len(paths)} files) -> "
            f"{result.returncode}\n{result.stdout}"
        )
    return responses, "\n".join(outputs)


def assert_all_success(corpus: Corpus, responses: dict[str, str], output: str) -> None:
    sent = {str(p) for p in corpus.files.values()}
    failed = {f: s for f, s in responses.items() if s != "Success"}
    unanswered = sent - set(responses)
    assert not failed and not unanswered, (
        f"{len(failed)} stores failed: {dict(list(failed.items())[:10])}; "
        f"{len(unanswered)} without a response: {sorted(unanswered)[:10]}\n{output[-3000:]}"
    )


@pytest.fixture(scope="session")
def wire_reference(
    tmp_path_factory: pytest.TempPathFactory, pydicom_corpus: Corpus
) -> dict[str, bytes]:
    """SOP Instance UID -> the data set bytes storescu actually sends for each corpus file.

    storescu decodes each file and encodes it again for the network (lengths, group lengths
    and padding may change), so the bytes on the wire are not the file's. DCMTK's storescp
    in bit-preserving mode (``+B``) writes what it received verbatim; the archive must store
    exactly those bytes.
    """
    require_dcmtk("storescp", "storescu", "echoscu")
    out = tmp_path_factory.mktemp("storescp")
    port = free_port()
    log = (out.parent / "storescp.log").open("wb")
    proc = subprocess.Popen(
        ["storescp", "+B", "+xa", "-od", str(out), "-aet", "STOCKADE", str(port)],
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while echoscu(port).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)  # readiness polling only
        responses, output = send_corpus(port, pydicom_corpus)
        assert_all_success(pydicom_corpus, responses, output)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    reference = {}
    for path in out.iterdir():
        raw = path.read_bytes()
        uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        reference[uid] = raw[dataset_offset(raw) :]
    assert set(reference) == set(pydicom_corpus.files)
    return reference


def _elements(ds: Dataset) -> list[tuple[Any, Any]]:
    """Element tags and values, recursively, without group lengths and trailing padding."""
    out: list[tuple[Any, Any]] = []
    for elem in ds:
        if elem.tag.element == 0 or elem.tag == 0xFFFCFFFC:
            continue
        if elem.VR == "SQ":
            out.append((elem.tag, [_elements(item) for item in elem.value]))
        else:
            out.append((elem.tag, elem.value))
    return out


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _content(path: Path) -> list[tuple[Any, Any]]:
    """What a file says, element by element (values decoded, odd ones tolerated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _elements(pydicom.dcmread(path))


# -- tests -----------------------------------------------------------------------------------


def test_store_pydicom_corpus_then_restart(
    make_server: MakeServer, db_url: str, pydicom_corpus: Corpus, wire_reference: dict[str, bytes]
) -> None:
    """Every usable pydicom test file is stored byte for byte, and survives a restart."""
    require_dcmtk("storescu", "echoscu")
    corpus = pydicom_corpus
    expected = len(corpus.files)
    server = make_server(db_url)
    server.start()

    echo = echoscu(server.port)
    assert echo.returncode == 0 and "Received Echo Response (Success)" in echo.stdout, echo.stdout

    responses, output = send_corpus(server.port, corpus)
    assert_all_success(corpus, responses, output)
    rows = assert_index_matches_storage(server)
    assert {r.sop_uid for r in rows} == set(corpus.files)
    assert len(server.blob_files()) == expected

    mismatches = []
    for row in rows:
        blob = (server.data_dir / "blobs" / row.blob_key).read_bytes()
        stored = blob[dataset_offset(blob) :]
        wire = wire_reference[row.sop_uid]
        ts = corpus.syntax[row.sop_uid]
        # The one tolerated difference: the NUL that pads an odd-length deflate stream to
        # an even length may be dropped, and is then recorded as a trailing byte.
        tail = wire[len(stored) :] if wire.startswith(stored) else None
        if not (stored == wire and row.trailing_bytes == 0) and not (
            ts == DEFLATED and tail == b"\x00" and row.trailing_bytes == 1
        ):
            mismatches.append(
                f"{corpus.files[row.sop_uid].name}: stored {len(stored)} bytes, "
                f"received {len(wire)}, trailing_bytes={row.trailing_bytes}"
            )
            continue
        if _content(server.data_dir / "blobs" / row.blob_key) != _content(
            corpus.files[row.sop_uid]
        ):
            mismatches.append(f"{corpus.files[row.sop_uid].name}: elements differ from file")
    assert not mismatches, "\n".join(mismatches)

    assert_verify_intact(server, expected)

    blobs_before = {k: p.stat().st_mtime_ns for k, p in server.blob_files().items()}
    assert server.stop() == 0
    server.start()
    assert server.count() == expected
    assert_verify_intact(server, expected)
    assert_index_matches_storage(server)

    responses, output = send_corpus(server.port, corpus)
    assert_all_success(corpus, responses, output)
    assert server.count() == expected
    assert {k: p.stat().st_mtime_ns for k, p in server.blob_files().items()} == blobs_before
    assert server.staging_tmp_files() == []
    results = collections.Counter(
        r["result"] for r in server.audit() if r["type"] == "InstanceStored"
    )
    assert results == {"stored": expected, "duplicate": expected}
    assert_verify_intact(server, expected)
    assert server.stop() == 0


HOSTILE_UIDS = {
    "path-traversal": "../../x",
    "65-characters": "1." + "2" * 63,
}


@pytest.fixture(scope="module")
def uid_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StockadeServer]:
    """One server for the hostile UIDs (compared with what it held before each); it must
    stop with 0 after them."""
    require_dcmtk("storescu", "echoscu")
    server = StockadeServer(tmp_path_factory.mktemp("hostile-uid"))
    server.start()
    with stops_cleanly(server):
        yield server


@pytest.mark.parametrize("sop_uid", HOSTILE_UIDS.values(), ids=HOSTILE_UIDS.keys())
def test_hostile_sop_instance_uid_is_refused(
    uid_server: StockadeServer, tmp_path: Path, sop_uid: str
) -> None:
    """An invalid SOP Instance UID gets a failure status with a comment; nothing is written."""
    assert len(HOSTILE_UIDS["65-characters"]) == 65
    server = uid_server
    held = {r.sop_uid for r in server.rows()}  # the module's server is shared
    blobs = set(server.blob_files())
    valid = write_ct_series(tmp_path / "valid", 1, size=16, patient_id="VALID")
    template = _read(next(iter(valid.values())))
    hostile = tmp_path / "hostile" / "hostile.dcm"
    hostile.parent.mkdir()
    with disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template.SOPInstanceUID = sop_uid
        template.file_meta.MediaStorageSOPInstanceUID = sop_uid
        template.save_as(hostile, enforce_file_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = pydicom.dcmread(hostile)
        assert written.SOPInstanceUID == written.file_meta.MediaStorageSOPInstanceUID == sop_uid

    started = time.monotonic()
    result = storescu(server.port, [hostile], verbosity="-d")
    elapsed = time.monotonic() - started
    responses = debug_responses(result.stdout)
    assert len(responses) == 1, result.stdout[-3000:]
    status, comment = responses[0].status, responses[0].error_comment
    assert 0xC000 <= status <= 0xCFFF or status == 0xA900, (
        f"C-STORE of SOP Instance UID {sop_uid!r} answered status 0x{status:04X} "
        f"(expected a failure, Cxxx or A900); instances now: {[r.sop_uid for r in server.rows()]}"
    )
    assert comment and "UID" in comment, f"no useful Error Comment: {comment!r}"
    assert elapsed < 5, f"the failure took {elapsed:.1f} s"

    assert server.count() == len(held)
    assert set(server.blob_files()) == blobs
    assert not (server.data_dir.parent.parent / "x").exists()
    for folder in (tmp_path, server.root):
        assert [p for p in folder.rglob("*") if p.name == "x"] == []

    echo = echoscu(server.port)
    assert echo.returncode == 0, echo.stdout
    good = storescu(server.port, list(valid.values()))
    assert set(store_responses(good.stdout).values()) == {"Success"}, good.stdout
    assert {r.sop_uid for r in server.rows()} == held | set(valid)


def test_peer_policy(make_server: MakeServer, db_url: str, tmp_path: Path) -> None:
    """Once a node is configured only (AE title, host) of nodes may associate."""
    require_dcmtk("storescu", "echoscu")
    server = make_server(db_url)
    server.start()
    assert echoscu(server.port, aet="BADSCU").returncode == 0  # no node yet: loopback is open

    added = server.cli(
        "node",
        "add",
        "good",
        "--ae",
        "GOODSCU",
        "--host",
        HOST,
        "--port",
        "104",
        "--allow",
        "echo,store",
    )
    assert added.returncode == 0, added.stderr
    added = server.cli(
        "node",
        "add",
        "echoer",
        "--ae",
        "ECHOONLY",
        "--host",
        HOST,
        "--port",
        "104",
        "--allow",
        "echo",
    )
    assert added.returncode == 0, added.stderr
    listed = server.cli("node", "list")
    assert listed.returncode == 0
    assert [line.split() for line in listed.stdout.splitlines()] == [
        ["echoer", "ECHOONLY", HOST, "104", "echo"],
        ["good", "GOODSCU", HOST, "104", "echo,store"],
    ]

    assert echoscu(server.port, aet="GOODSCU").returncode == 0
    bad = echoscu(server.port, aet="BADSCU")
    assert bad.returncode != 0
    assert "Association Rejected" in bad.stdout, bad.stdout
    rejected = [r for r in server.audit() if r["type"] == "AssociationRejected"]
    assert [(r["actor"]["ae_title"], r["actor"]["address"]) for r in rejected] == [("BADSCU", HOST)]

    files = write_ct_series(tmp_path / "ct", 2, size=16, patient_id="PEER")
    refused = storescu(server.port, list(files.values()), aet="BADSCU")
    assert store_responses(refused.stdout) == {}
    assert "Association Rejected" in refused.stdout
    not_allowed = storescu(server.port, list(files.values()), aet="ECHOONLY", verbosity="-d")
    assert [r.status for r in debug_responses(not_allowed.stdout)] == [0x0124, 0x0124]
    assert server.count() == 0
    stored = storescu(server.port, list(files.values()), aet="GOODSCU")
    assert list(store_responses(stored.stdout).values()) == ["Success", "Success"]
    assert {r.sop_uid for r in server.rows()} == set(files)

    for name in ("good", "echoer"):
        assert server.cli("node", "remove", name).returncode == 0
    assert server.cli("node", "list").stdout.strip() == ""
    assert echoscu(server.port, aet="BADSCU").returncode == 0  # open again: no nodes
    assert server.stop() == 0


def test_two_workers_concurrent_storescu(
    make_server: MakeServer, db_url: str, tmp_path: Path
) -> None:
    """Two worker processes, four concurrent associations, 160 objects: all stored."""
    require_dcmtk("storescu")
    server = make_server(db_url, workers=2)
    server.start()
    batches = [
        write_ct_series(
            tmp_path / f"batch{i}", 40, size=64, seed=i, patient_id=f"CONC{i % 2}", series_count=2
        )
        for i in range(4)
    ]
    logs = [(tmp_path / f"storescu{i}.log").open("w+") for i in range(4)]
    procs = [
        subprocess.Popen(
            storescu_args(server.port, list(batch.values())),
            env=clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for batch, log in zip(batches, logs, strict=True)
    ]
    try:
        codes = [proc.wait(120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = {}
    for batch, output, code in zip(batches, outputs, codes, strict=True):
        responses = store_responses(output)
        assert code == 0 and len(responses) == len(batch), output[-2000:]
        failed |= {f: status for f, status in responses.items() if status != "Success"}
    expected = {uid for batch in batches for uid in batch}
    assert not failed, f"failed C-STOREs: {failed}\n{server.log_problems()}"
    assert {r.sop_uid for r in assert_index_matches_storage(server)} == expected
    counts = server.query(
        "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
        " (SELECT count(*) FROM series)"
    )[0]
    assert tuple(counts) == (2, 4, 8)
    assert_verify_intact(server, len(expected))
    assert server.stop() == 0


#: Associations whose first C-STORE is released at the same instant, per round.
SIMULTANEOUS = 3
#: Fresh servers tried (it is the first store of a server process that is at stake).
ROUNDS = 5


def _simultaneous_first_stores(port: int, datasets: list[Dataset]) -> list[int | None]:
    """Open one association per data set, then send all C-STOREs at once; their statuses."""
    ae = AE(ae_title="SIMULSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assocs = [ae.associate(HOST, port, ae_title="STOCKADE") for _ in datasets]
    statuses: list[int | None] = [None] * len(datasets)
    barrier = threading.Barrier(len(datasets), timeout=30)

    def send(i: int) -> None:
        barrier.wait()
        statuses[i] = getattr(assocs[i].send_c_store(datasets[i]), "Status", None)

    try:
        assert all(a.is_established for a in assocs), "an association was not accepted"
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(datasets))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for assoc in assocs:
            if assoc.is_established:
                assoc.release()
        ae.shutdown()
    return statuses


def test_simultaneous_first_stores_of_a_fresh_server(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """C-STOREs that reach a just-started server process together must all be stored.

    Found with the two-worker test above: the first stores of a process race to set up its
    staging area. To hit that window on purpose, a few associations are opened first and
    their C-STORE requests released together (pynetdicom and a barrier, which storescu
    cannot do); this is tried on up to five freshly started servers.
    """
    require_dcmtk("echoscu")
    files = list(write_ct_series(tmp_path / "ct", SIMULTANEOUS * ROUNDS, size=16).values())
    datasets = [_read(path) for path in files]
    for round_ in range(ROUNDS):
        server = make_server(name=f"round{round_}")
        server.start()
        batch = datasets[round_ * SIMULTANEOUS : (round_ + 1) * SIMULTANEOUS]
        statuses = _simultaneous_first_stores(server.port, batch)
        areas = sorted(p.name for p in (server.data_dir / "staging").iterdir())
        assert statuses == [0] * SIMULTANEOUS, (
            f"round {round_ + 1}: statuses {[hex(s) if s is not None else s for s in statuses]}"
            f"; staging areas of this one process: {areas}\n{server.log_problems()}"
        )
        assert {r.sop_uid for r in assert_index_matches_storage(server)} == {
            str(ds.SOPInstanceUID) for ds in batch
        }
        assert server.stop() == 0
