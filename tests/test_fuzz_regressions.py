"""Inputs the fuzzers once crashed on: each now succeeds or fails with a StockadeError.

Files under ``fuzz/regressions/`` are kept as the fuzzer wrote them. Their name says which
target found them; an ``ingest-`` file is fed the way ``fuzz/ingest_target.py`` feeds it (a
Part 10 file, or a C-STORE data set after a transfer-syntax byte).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.archive import Archive
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.attributes import WANTED_TAGS, extract
from stockade.dicom.parse import Limits, scan
from stockade.dicom.tables import TRANSFER_SYNTAXES
from stockade.errors import StockadeError
from stockade.index.sql import SqlIndex
from stockade.ingest import Origin
from stockade.settings import load
from stockade.storage.filesystem import FilesystemBlobStore
from stockade.web.multipart import MalformedMultipart, MultipartParser
from tests.dicomfactory import make_dataset, part10

REGRESSIONS = Path(__file__).resolve().parent.parent / "fuzz" / "regressions"
IMPORT = Origin(via="import")
DIMSE = Origin(via="dimse", ae_title="FUZZSCU", address="127.0.0.1")


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> Iterator[Archive]:
    """A prepared archive on SQLite (parser regressions do not depend on the database)."""
    settings = load(
        environ={},
        overrides={
            "data_dir": str(tmp_path / "data"),
            "database_url": f"sqlite:///{tmp_path / 'index.sqlite3'}",
        },
    )
    arch = Archive(
        settings,
        FilesystemBlobStore(settings.data_dir),
        SqlIndex(settings.index_url),
        MemoryAuditSink(),
    )
    arch.prepare()
    try:
        yield arch
    finally:
        arch.close()


def _files(prefix: str) -> list[Path]:
    return sorted(REGRESSIONS.glob(f"{prefix}-*"))


def test_regression_folder_is_not_empty() -> None:
    assert _files("ingest")


@pytest.mark.parametrize("path", _files("ingest"), ids=lambda p: p.name)
def test_ingest_regression(sqlite_archive: Archive, path: Path) -> None:
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        try:
            sqlite_archive.store_file(data, IMPORT)
        except StockadeError:
            pass
        return
    ts = TRANSFER_SYNTAXES[data[0] % len(TRANSFER_SYNTAXES)]
    dataset = data[1:]
    if not ts.deflated:
        try:
            found = scan(
                dataset,
                implicit_vr=ts.implicit_vr,
                little_endian=ts.little_endian,
                wanted=WANTED_TAGS,
                limits=Limits(),
            )
        except StockadeError:
            pass
        else:
            extract(dataset, found.values, little_endian=ts.little_endian)
    try:
        sqlite_archive.ingest.from_dimse(
            dataset,
            ts.uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid="1.2.3.4",
            origin=DIMSE,
        )
    except StockadeError:
        pass


# Found by the ingest target: pydicom's charset conversion accepts any Python codec name
# and raised ValueError on a NUL; codecs such as "hex" or "undefined" then raised on decode.
@pytest.mark.parametrize(
    "charset",
    [b"ISO_IR\x00100", b"hex       ", b"undefined ", b"idna      ", b"rot13     ", b"base64    "],
)
def test_specific_character_set_that_is_no_dicom_term(
    sqlite_archive: Archive, charset: bytes
) -> None:
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Doe^J\xe4ne")
    data = part10(ds)
    assert data.count(b"ISO_IR 100") == 1 and len(charset) == len(b"ISO_IR 100")
    result = sqlite_archive.store_file(data.replace(b"ISO_IR 100", charset), IMPORT)
    assert result.sop_instance_uid == ds.SOPInstanceUID
    inst = sqlite_archive.find_instance(ds.SOPInstanceUID)
    assert inst is not None
    # Unknown terms fall back to the default repertoire, decoded leniently.
    found = scan(
        data,
        implicit_vr=False,
        little_endian=True,
        wanted=WANTED_TAGS,
        limits=Limits(),
        start=read_offset(data),
    )
    attrs = extract(data.replace(b"ISO_IR 100", charset), found.values, little_endian=True)
    assert attrs["PatientName"] == "Doe^J\xe4ne"


def test_specific_character_set_defined_terms_still_decode() -> None:
    ds = make_dataset(SpecificCharacterSet="ISO_IR 192", PatientName="Doe^J\u00e4ne")
    data = part10(ds)
    found = scan(
        data,
        implicit_vr=False,
        little_endian=True,
        wanted=WANTED_TAGS,
        limits=Limits(),
        start=read_offset(data),
    )
    assert extract(data, found.values, little_endian=True)["PatientName"] == "Doe^J\u00e4ne"


def read_offset(data: bytes) -> int:
    """Offset of the data set in a Part 10 file."""
    from stockade.dicom.part10 import read_part10

    return read_part10(data).dataset_offset


# Found by tests/test_fuzz_properties.py: transport padding after a delimiter longer than the
# header bound was accepted when its CRLF came in the same chunk and refused otherwise.
@pytest.mark.parametrize("padding", [127, 128, 129, 300])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_delimiter_padding_is_bounded_whatever_the_chunking(padding: int, chunk: int) -> None:
    body = b"--b" + b" " * padding + b"\r\n\r\nabc\r\n--b--"
    parser = MultipartParser(b"b", max_part_size=1024, max_header_size=128)
    try:
        parts = []
        for at in range(0, len(body), chunk):
            parts += parser.feed(body[at : at + chunk])
        parser.close()
    except MalformedMultipart:
        assert padding > 128
    else:
        assert padding <= 128
        assert [bytes(p.body) for p in parts] == [b"abc"]
