"""Coverage-guided fuzz target (atheris) for the ingest parser and the ingest pipeline.

Each input is one of two things:

- a Part 10 file (``DICM`` at offset 128): the preamble is classified, the File Meta
  Information read (:func:`~stockade.dicom.part10.read_part10`), the data set scanned
  (:func:`~stockade.dicom.parse.scan`) and decoded (:func:`~stockade.dicom.attributes.extract`),
  then the whole file goes through ``Ingest.from_file``;
- anything else: a C-STORE data set without preamble. Its first byte selects the transfer
  syntax (index into :data:`~stockade.dicom.tables.TRANSFER_SYNTAXES`), the rest is the data
  set, scanned and decoded directly, then stored through ``Ingest.from_dimse``, both with the
  data set in memory and staged while it arrives (``Ingest.receive``).

The archive is a real one (filesystem blob store, SQLite index) in a temporary folder,
replaced by a fresh one every few thousand inputs so the disk use stays small. Inputs
of even length go to an archive with the default screening policy for hidden payloads
(PS3.10 7.5), inputs of odd length to one that strips every finding.

A crash is any exception other than a :class:`~stockade.errors.StockadeError`, a broken
invariant of what the parser returned (offsets outside the buffer), a hang (libFuzzer's
``-timeout``) or memory past ``-rss_limit_mb``. Run it (see ``fuzz/README.md``)::

    .venv/bin/python fuzz/ingest_target.py fuzz/corpus/ingest -max_total_time=600
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import atheris

# pydicom's modules that Stockade calls (character set decoding of attacker-chosen escape
# sequences, the data dictionary) are guided too; atheris includes whole top-level packages.
with atheris.instrument_imports(include=["stockade", "pydicom"]):
    from stockade.archive import Archive
    from stockade.audit.sink import MemoryAuditSink
    from stockade.dicom.attributes import WANTED_TAGS, extract
    from stockade.dicom.inspect import Kind
    from stockade.dicom.parse import Limits, Scan, scan
    from stockade.dicom.part10 import PREFIX, classify_preamble, read_part10
    from stockade.dicom.tables import TRANSFER_SYNTAX_BY_UID, TRANSFER_SYNTAXES
    from stockade.errors import StockadeError
    from stockade.index.sql import SqlIndex
    from stockade.ingest import Origin
    from stockade.settings import load
    from stockade.storage.filesystem import FilesystemBlobStore

#: Smaller than the defaults, so that inputs of a few KB can reach them (same code paths).
LIMITS = Limits(max_depth=8, max_elements=1000)
#: Largest inflated data set the harness itself reads (to learn a C-STORE's UIDs).
INFLATE_CAP = 1 << 20
#: A fresh archive after this many inputs (stored and quarantined objects stay few).
RESET_AFTER = 2000
#: Used when a data set's own UIDs cannot be read (the pipeline then refuses it).
FALLBACK_CLASS = "1.2.840.10008.5.1.4.1.1.2"
FALLBACK_INSTANCE = "1.2.3.4"
FILE_ORIGIN = Origin(via="import")
STRIP_ALL = ",".join(f"{kind.value}=strip" for kind in Kind)
DIMSE_ORIGIN = Origin(via="dimse", ae_title="FUZZSCU", address="127.0.0.1")


class _Harness:
    """A real archive in a temporary folder, rebuilt now and then."""

    def __init__(self, root: Path, screening_actions: str = "") -> None:
        self.root = root
        self.screening_actions = screening_actions
        self.inputs = 0
        self.archive, self.folder = self._build()

    def _build(self) -> tuple[Archive, Path]:
        """A prepared archive in a new folder under the root, and that folder."""
        folder = Path(tempfile.mkdtemp(prefix="archive-", dir=self.root))
        settings = load(
            environ={},
            overrides={
                "data_dir": str(folder / "data"),
                "database_url": f"sqlite:///{folder / 'index.sqlite3'}",
                "max_object_size": 8 * 1024 * 1024,
                "max_nesting_depth": LIMITS.max_depth,
                "max_elements": LIMITS.max_elements,
                "screening_actions": self.screening_actions,
            },
        )
        store = FilesystemBlobStore(settings.data_dir)
        archive = Archive(settings, store, SqlIndex(settings.index_url), MemoryAuditSink())
        try:
            archive.prepare()
        except BaseException:
            archive.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return archive, folder

    def count(self) -> None:
        """Note one input; replace the archive once it has seen :data:`RESET_AFTER`."""
        self.inputs += 1
        if self.inputs < RESET_AFTER:
            return
        self.inputs = 0
        try:
            fresh, folder = self._build()
        except Exception as exc:  # noqa: BLE001 - the harness, not the code under test
            # Building runs the index migrations from the source tree; if they cannot run
            # now (the tree is being edited), keep fuzzing on the archive we have.
            print(f"ingest target: archive not replaced ({exc!r})", file=sys.stderr)
            return
        self.archive.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.archive, self.folder = fresh, folder

    def clear_audit(self) -> None:
        """Drop the audit events kept in memory (one per object)."""
        sink = self.archive.audit_sink
        if isinstance(sink, MemoryAuditSink):
            sink.events.clear()


class InvariantBroken(Exception):
    """A parser returned something impossible (a crash for the fuzzer)."""


def require(condition: bool, what: str) -> None:
    """Raise :class:`InvariantBroken` unless *condition* holds (unlike assert, never skipped)."""
    if not condition:
        raise InvariantBroken(what)


def _check_scan(found: Scan, size: int, start: int) -> None:
    """Invariants of a successful scan: every offset lies inside the buffer, in order."""
    require(start <= found.end <= size, f"scan end {found.end} outside {start}..{size}")
    require(found.elements >= 1, "a successful scan saw no element")
    for tag, (_vr, value_start, value_end) in found.values.items():
        require(tag in WANTED_TAGS, f"scan returned unwanted tag {tag:08X}")
        require(
            start <= value_start <= value_end <= found.end,
            f"value of {tag:08X} at {value_start}..{value_end} outside {start}..{found.end}",
        )


def _parse(buf: bytes | memoryview, ts_uid: str, start: int = 0) -> dict[str, str | int | None]:
    """Scan and decode a data set directly; StockadeError propagates."""
    ts = TRANSFER_SYNTAX_BY_UID.get(ts_uid)
    if ts is None:
        return {}
    if ts.deflated:  # PS3.5 A.5: the pipeline inflates with its own cap; this one is ours
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            buf = inflater.decompress(buf[start:], INFLATE_CAP)
        except zlib.error:
            return {}
        start = 0
    found = scan(
        buf,
        implicit_vr=ts.implicit_vr,
        little_endian=ts.little_endian,
        wanted=WANTED_TAGS,
        limits=LIMITS,
        start=start,
    )
    _check_scan(found, len(buf), start)
    return extract(buf, found.values, little_endian=ts.little_endian)


def _uid(attrs: dict[str, str | int | None], keyword: str, fallback: str) -> str:
    value = attrs.get(keyword)
    return value if isinstance(value, str) else fallback


def one_part10(harness: _Harness, data: bytes) -> None:
    """Run a Part 10 file through every layer."""
    classify_preamble(data[:128])
    try:
        part10 = read_part10(data)
        require(132 < part10.dataset_offset <= len(data), "data set offset outside the file")
        _parse(data, part10.transfer_syntax, part10.dataset_offset)
    except StockadeError:
        pass
    try:
        harness.archive.store_file(data, FILE_ORIGIN)
    except StockadeError:
        pass


def one_dimse(harness: _Harness, data: bytes) -> None:
    """Run a C-STORE data set (first byte: transfer syntax) through every layer."""
    ts_uid = TRANSFER_SYNTAXES[data[0] % len(TRANSFER_SYNTAXES)].uid
    dataset = data[1:]
    try:
        attrs = _parse(dataset, ts_uid)
    except StockadeError:
        attrs = {}
    sop_class = _uid(attrs, "SOPClassUID", FALLBACK_CLASS)
    sop_instance = _uid(attrs, "SOPInstanceUID", FALLBACK_INSTANCE)
    ingest = harness.archive.ingest
    for streamed in (False, True):
        receiving = None
        if streamed:
            receiving = ingest.receive(
                ts_uid, sop_class_uid=sop_class, sop_instance_uid=sop_instance, origin=DIMSE_ORIGIN
            )
            if receiving is None:
                return
            half = len(dataset) // 2
            receiving.write(dataset[:half])
            receiving.write(dataset[half:])
        try:
            ingest.from_dimse(
                dataset,
                ts_uid,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                origin=DIMSE_ORIGIN,
                receiving=receiving,
            )
        except StockadeError:
            continue


def input_function() -> Callable[[bytes], None]:
    """The function libFuzzer calls with each input (an archive in a fresh folder behind it)."""
    logging.disable(logging.CRITICAL)  # a warning per odd object is noise here
    root = Path(os.environ.get("STOCKADE_FUZZ_WORKDIR") or tempfile.mkdtemp(prefix="stk-fuzz-"))
    # Default screening policy (quarantine, reject, alert), and one that strips every finding
    # so that the stripped copy is built; the input's length picks one, as mutations do.
    harnesses = (_Harness(root), _Harness(root, STRIP_ALL))

    def test_one_input(data: bytes) -> None:
        if not data:
            return
        harness = harnesses[len(data) % 2]
        if data[128:132] == PREFIX:
            one_part10(harness, data)
        else:
            one_dimse(harness, data)
        harness.clear_audit()
        harness.count()

    return test_one_input


def main(argv: list[str]) -> None:
    """Start libFuzzer on this target (arguments as for any libFuzzer binary)."""
    atheris.Setup(argv, input_function())
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
