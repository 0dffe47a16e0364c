"""The direct DICOM JSON conversion (web/fastjson.py) gives what pydicom's conversion gives,
on every test file pydicom and pydicom-data ship, and on values made to be awkward."""

from __future__ import annotations

import base64
import warnings
from io import BytesIO
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from stockade.web import metadata

PREFIX = "/studies/1/series/2/instances/3/bulkdata/"


def _slow_top(ds: Dataset) -> dict[str, Any]:
    original = metadata.fastjson.text_codec
    try:
        metadata.fastjson.text_codec = lambda _ds: None  # type: ignore[assignment]
        return metadata.dataset_json(ds, PREFIX)
    finally:
        metadata.fastjson.text_codec = original  # type: ignore[assignment]


def both(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    warnings.simplefilter("ignore")  # as in test_same_json_as_pydicom
    fast = metadata.dataset_json(dcmread(BytesIO(data), force=True), PREFIX)
    slow = _slow_top(dcmread(BytesIO(data), force=True))
    return fast, slow


def _files() -> list[str]:
    """pydicom's own test files and those of the pydicom-data package (on disk, no
    download)."""
    import importlib.metadata
    from pathlib import Path

    import pydicom.data

    bundled = Path(pydicom.data.__file__).parent / "test_files"
    out = [str(p) for p in bundled.rglob("*.dcm")]
    extra = importlib.metadata.distribution("pydicom-data")
    out += [str(extra.locate_file(f)) for f in extra.files or () if str(f).endswith(".dcm")]
    return sorted(out)


FILES = _files()


def test_there_are_many_files_to_compare() -> None:
    assert len(FILES) > 100


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_same_json_as_pydicom(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    # pydicom warns about invalid values (a UID too long, ...) and converts them anyway,
    # as the server does; the direct conversion does not check them at all.
    warnings.simplefilter("ignore")
    try:
        slow = _slow_top(dcmread(BytesIO(data), force=True))
    except Exception as exc:  # a file pydicom cannot read: neither can we
        with pytest.raises(type(exc)):
            metadata.dataset_json(dcmread(BytesIO(data), force=True), PREFIX)
        return
    assert metadata.dataset_json(dcmread(BytesIO(data), force=True), PREFIX) == slow


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return buffer.getvalue()


AWKWARD: list[tuple[str, str, Any]] = [
    ("PatientName", "PN", "Doe^John\\Roe^Jane"),
    ("PatientName", "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("PatientName", "PN", ""),
    ("ImageType", "CS", "ORIGINAL\\\\AXIAL"),
    ("ImageType", "CS", " LEADING\\TRAILING "),
    ("StudyDescription", "LO", "Café <b>bold</b> \\ back"),
    ("SliceThickness", "DS", "1.25"),
    ("PixelSpacing", "DS", "0.5\\ 0.5"),
    ("PixelSpacing", "DS", "1e3\\-.5"),
    ("WindowCenter", "DS", "40\\\\400"),
    ("InstanceNumber", "IS", "+12"),
    ("InstanceNumber", "IS", " 7"),
    ("InstanceNumber", "IS", "+-7"),
    ("SliceThickness", "DS", "1e"),
    ("SliceThickness", "DS", "1_0"),
    ("Rows", "US", 512),
    ("ReferencedFrameNumber", "IS", "1\\2\\3"),
    ("PatientComments", "LT", "line one\\still one"),
    ("PatientAge", "AS", "045Y"),
    ("StudyTime", "TM", "101010.123456 "),
]


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize(("keyword", "vr", "value"), AWKWARD, ids=lambda v: str(v)[:20])
def test_awkward_values_match_pydicom(keyword: str, vr: str, value: Any, implicit: bool) -> None:
    for charset in (None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87"):
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = "1.2.3.4"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ds.add_new(keyword, vr, value)
                data = encode(ds, implicit)
        except (UnicodeError, LookupError, ValueError, UserWarning):
            continue  # not encodable in that character set
        fast, slow = both(data)
        assert fast == slow, (charset, fast, slow)


def test_binary_values_inline_or_bulk() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.add_new(0x00291010, "OB", b"\x01\x02" * 10)  # small: inline
    ds.add_new(0x00420011, "OB", b"%PDF" + bytes(2000))  # large: bulk data
    ds.Rows = ds.Columns = 4
    ds.add_new("PixelData", "OW", bytes(32))  # pixel data: always bulk data
    fast, slow = both(encode(ds))
    assert fast == slow
    assert fast["00420011"]["BulkDataURI"] == PREFIX + "00420011"
    assert fast["7FE00010"]["BulkDataURI"] == PREFIX + "7FE00010"
    assert fast["00291010"]["InlineBinary"] == base64.b64encode(b"\x01\x02" * 10).decode()


def test_values_that_are_not_finite_numbers_are_sent_as_null() -> None:
    """A DS of "nan" or "1e999" and FL/FD values holding NaN or infinity have no JSON
    number: they go out as null (the DICOM JSON empty value), and the answer stays strict
    JSON, whichever conversion made it."""
    import json

    for implicit in (False, True):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = "1.2.3.4"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the DS values
            ds.add_new("SliceThickness", "DS", "nan")
            ds.add_new("PixelSpacing", "DS", "1e999\\0.5")
            ds.add_new("WindowCenter", "DS", "-inf\\40")
        ds.add_new(0x00189087, "FD", [float("nan"), 2.5])
        ds.add_new(0x00186028, "FD", 1.5)
        ds.add_new(0x0018605A, "FL", [float("inf"), 0.25])
        fast, slow = both(encode(ds, implicit))
        assert fast == slow
        text = json.dumps(fast, allow_nan=False)  # strict: raises on NaN or Infinity
        back = json.loads(text)
        assert back["00180050"]["Value"] == [None]
        assert back["00280030"]["Value"] == [None, 0.5]
        assert back["00281050"]["Value"] == [None, 40.0]
        assert back["00189087"]["Value"] == [None, 2.5]
        assert back["00186028"]["Value"] == [1.5]  # a finite value is untouched
        assert back["0018605A"]["Value"] == [None, 0.25]
