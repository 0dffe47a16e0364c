"""The bounded structural walk (dicom/parse.py): lengths, nesting, counts, trailing data."""

from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from stockade.dicom.parse import Limits, Scan, scan
from stockade.errors import InvalidObject, LimitExceeded
from tests.dicomfactory import bare, make_dataset

LIMITS = Limits(max_depth=8, max_elements=1000)
SOP_UID_TAG = 0x00080018


def _scan(data: bytes, limits: Limits = LIMITS, implicit: bool = False) -> Scan:
    return scan(
        data,
        implicit_vr=implicit,
        little_endian=True,
        wanted=frozenset({SOP_UID_TAG}),
        limits=limits,
    )


@pytest.mark.parametrize("implicit", [False, True])
def test_finds_values_without_copying(implicit: bool) -> None:
    ds = make_dataset()
    data = bare(ds, implicit=implicit)
    found = _scan(data, implicit=implicit)
    _vr, start, end = found.values[SOP_UID_TAG]  # type: ignore[attr-defined]
    assert data[start:end].rstrip(b"\0").decode() == ds.SOPInstanceUID
    assert found.end == len(data)  # type: ignore[attr-defined]


def test_huge_declared_length_is_refused_without_allocation() -> None:
    # (0010,0010) LO... use an OB with a 32-bit length of 0x7FFFFFF0 in a tiny buffer.
    data = struct.pack("<HH2sHL", 0x0009, 0x0010, b"OB", 0, 0x7FFFFFF0) + b"x" * 1000
    with pytest.raises(InvalidObject, match="declares 2147483632 bytes but only 1000 remain"):
        _scan(data)


def test_truncated_pixel_data_is_malformed_not_trailing() -> None:
    data = bare(make_dataset())
    with pytest.raises(InvalidObject, match="remain"):
        _scan(data[:-10])


def test_bytes_after_pixel_data_are_trailing() -> None:
    data = bare(make_dataset())
    found = _scan(data + b"PK\x03\x04" + b"\x00" * 40)
    assert found.end == len(data)  # type: ignore[attr-defined]


def test_garbage_before_pixel_data_is_malformed() -> None:
    ds = make_dataset()
    del ds.PixelData
    with pytest.raises(InvalidObject, match="malformed"):
        _scan(bare(ds) + b"XY\x03\x04garbage-garbage")


@pytest.mark.parametrize("magic", [b"PK\x03\x04", b"\x7fELF\x02\x01\x01", b"%PDF-1.7"])
def test_another_format_after_a_data_set_is_trailing_data(magic: bytes) -> None:
    ds = make_dataset()
    del ds.PixelData
    body = bare(ds)
    found = _scan(body + magic + b"garbage-garbage")
    assert found.end == len(body)


def _nested(depth: int) -> Dataset:
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    return inner


def test_nesting_depth_is_capped() -> None:
    assert _scan(bare(_nested(8)))
    with pytest.raises(LimitExceeded, match="nested deeper than 8"):
        _scan(bare(_nested(9)))


def test_undefined_length_sequences_are_walked() -> None:
    ds = _nested(3)
    ds["ContentSequence"].is_undefined_length = True
    ds.ContentSequence[0]["ContentSequence"].is_undefined_length = True
    data = bare(ds)
    assert b"\xff\xff\xff\xff" in data
    assert _scan(data).end == len(data)  # type: ignore[attr-defined]
    with pytest.raises(InvalidObject):
        _scan(data[:-8])  # sequence delimiter missing


def test_element_count_is_capped() -> None:
    ds = Dataset()
    for i in range(50):
        ds.add_new(0x00091000 + i, "LO", "v")
    ds.add_new(0x00090010, "LO", "CREATOR")
    with pytest.raises(LimitExceeded, match="more than 20 elements"):
        _scan(bare(ds), Limits(max_depth=8, max_elements=20))


def test_out_of_order_tags_are_malformed() -> None:
    a = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 2) + b"AB"
    b = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 2) + b"1\0"
    with pytest.raises(InvalidObject, match="out of order"):
        _scan(a + b)


def test_bad_vr_is_malformed() -> None:
    with pytest.raises(InvalidObject, match="no valid VR"):
        _scan(struct.pack("<HH2sH", 0x0010, 0x0020, b"ZZ", 2) + b"AB")


def test_empty_is_malformed() -> None:
    with pytest.raises(InvalidObject, match="empty"):
        _scan(b"")
