"""The attributes Stockade indexes, and their decoding from raw element values.

The table below is what Patient Root and Study Root C-FIND (PS3.4 C.6.1.1 and C.6.2.1) and
QIDO-RS (PS3.18 10.6.1.2) need at each level. Values are decoded from the bytes found by
:func:`stockade.dicom.parse.scan`, honouring Specific Character Set (PS3.5 6.1.2.3).
"""

from __future__ import annotations

import struct
import threading
import warnings
from dataclasses import dataclass
from enum import StrEnum

from pydicom.charset import convert_encodings, decode_bytes, python_encoding


class Level(StrEnum):
    """Query/retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclass(frozen=True)
class Indexed:
    """One indexed attribute: its tag, keyword, level, VR and the longest value kept."""

    tag: int
    keyword: str
    level: Level
    vr: str
    max_chars: int = 64


_P, _ST, _SE, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE
INDEXED: tuple[Indexed, ...] = (
    Indexed(0x00100020, "PatientID", _P, "LO"),
    Indexed(0x00100021, "IssuerOfPatientID", _P, "LO"),
    Indexed(0x00100010, "PatientName", _P, "PN", 324),
    Indexed(0x00100030, "PatientBirthDate", _P, "DA", 8),
    Indexed(0x00100040, "PatientSex", _P, "CS", 16),
    Indexed(0x0020000D, "StudyInstanceUID", _ST, "UI"),
    Indexed(0x00080020, "StudyDate", _ST, "DA", 8),
    Indexed(0x00080030, "StudyTime", _ST, "TM", 16),
    Indexed(0x00080050, "AccessionNumber", _ST, "SH", 16),
    Indexed(0x00200010, "StudyID", _ST, "SH", 16),
    Indexed(0x00081030, "StudyDescription", _ST, "LO"),
    Indexed(0x00080090, "ReferringPhysicianName", _ST, "PN", 324),
    Indexed(0x0020000E, "SeriesInstanceUID", _SE, "UI"),
    Indexed(0x00080060, "Modality", _SE, "CS", 16),
    Indexed(0x00200011, "SeriesNumber", _SE, "IS"),
    Indexed(0x0008103E, "SeriesDescription", _SE, "LO"),
    Indexed(0x00180015, "BodyPartExamined", _SE, "CS", 16),
    Indexed(0x00080021, "SeriesDate", _SE, "DA", 8),
    Indexed(0x00080031, "SeriesTime", _SE, "TM", 16),
    Indexed(0x00080018, "SOPInstanceUID", _I, "UI"),
    Indexed(0x00080016, "SOPClassUID", _I, "UI"),
    Indexed(0x00200013, "InstanceNumber", _I, "IS"),
    Indexed(0x00280010, "Rows", _I, "US"),
    Indexed(0x00280011, "Columns", _I, "US"),
    Indexed(0x00280008, "NumberOfFrames", _I, "IS"),
)
SPECIFIC_CHARACTER_SET = 0x00080005
BY_TAG: dict[int, Indexed] = {a.tag: a for a in INDEXED}
WANTED_TAGS: frozenset[int] = frozenset(BY_TAG) | {SPECIFIC_CHARACTER_SET}

_SIMPLE_CODECS = {"ascii", "iso8859", "latin_1", "iso-8859-1", "utf_8", "UTF8", "utf-8"}
_KNOWN_CODECS = frozenset(python_encoding.values()) | _SIMPLE_CODECS
_charset_lock = threading.Lock()


def _encodings(raw: bytes | None) -> list[str]:
    if not raw:
        return ["iso8859"]
    terms = [t.strip() for t in raw.decode("ascii", "replace").split("\\")]
    try:
        with _charset_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = convert_encodings(terms or [""])
    except (LookupError, ValueError):  # a NUL in a term makes codecs.lookup raise ValueError
        return ["iso8859"]
    # pydicom also takes any Python codec name ("hex", "idna", "undefined", ...), whose
    # decoders raise on arbitrary bytes: only the codecs of DICOM's defined terms are used.
    return [e if e in _KNOWN_CODECS else "iso8859" for e in found]


def _decode_text(raw: bytes, encodings: list[str], vr: str) -> str:
    if len(encodings) == 1 and encodings[0] in _SIMPLE_CODECS:
        codec = "utf-8" if encodings[0] in {"utf_8", "UTF8", "utf-8"} else "latin-1"
        return raw.decode(codec, "replace")
    delimiters = {0x5E, 0x3D} if vr == "PN" else set()  # "^" and "=" (PS3.5 6.2)
    with _charset_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(decode_bytes(raw, encodings, delimiters))


def _integer(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if -(2**31) <= value < 2**31 else None


def extract(
    buf: bytes | bytearray | memoryview,
    found: dict[int, tuple[str, int, int]],
    *,
    little_endian: bool,
) -> dict[str, str | int | None]:
    """Decode the indexed attributes present in a scanned data set.

    Text is stripped of padding and clipped to the column size; numbers that do not parse
    become None (the object is still stored: the index is not the place to reject it).
    """
    charset = found.get(SPECIFIC_CHARACTER_SET)
    encodings = _encodings(bytes(buf[charset[1] : charset[2]]) if charset else None)
    out: dict[str, str | int | None] = {}
    for tag, (_vr, start, end) in found.items():
        attr = BY_TAG.get(tag)
        if attr is None:
            continue
        # UIDs are kept whole so that validation sees exactly what was sent (PS3.5 9.1);
        # other values are read up to a bound and clipped to their column.
        limit = end if attr.vr == "UI" else min(end, start + 4 * attr.max_chars + 16)
        raw = bytes(buf[start:limit])
        if attr.vr == "US":
            out[attr.keyword] = (
                struct.unpack("<H" if little_endian else ">H", raw[:2])[0]
                if len(raw) >= 2
                else None
            )
            continue
        if attr.vr in ("UI", "CS", "DA", "TM", "IS", "SH", "AE"):
            text = raw.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")
        else:
            text = _decode_text(raw, encodings, attr.vr).strip(" \x00")
        if attr.vr == "IS":
            out[attr.keyword] = _integer(text.split("\\")[0]) if text else None
        elif attr.vr == "UI":
            out[attr.keyword] = text or None
        else:
            out[attr.keyword] = text[: attr.max_chars] if text else None
    return out
