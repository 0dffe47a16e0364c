"""DICOM JSON (PS3.18 F.2) straight from the encoded value of common elements.

Building the metadata of a series converts every element of every instance; pydicom's
conversion (a :class:`~pydicom.dataelem.DataElement` per element, then ``to_json_dict``)
costs about 30 microseconds per element, several milliseconds per instance. This module
converts the raw value of the plain cases directly, with the same result as pydicom (a
test compares both on pydicom's whole test file collection):

- text of the default repertoire (AE, AS, CS, DA, DT, TM, UI), and of SH, LO and PN in
  the data set's character set when it is the default, ISO_IR 100 (Latin-1) or ISO_IR 192
  (UTF-8): PS3.5 6.2, the value split on backslashes (PS3.5 6.4), its padding removed;
- integer and decimal strings (IS, DS) as JSON numbers (PS3.18 F.2.3);
- binary numbers (US, SS, UL, SL, FL, FD, SV, UV) in little endian;
- binary values (OB, OW, OD, OF, OL, OV): ``InlineBinary`` up to the bulk data
  threshold, else a ``BulkDataURI`` (whose address the caller writes).

Anything else (sequences, other VRs (UN among them: pydicom gives a known attribute its
dictionary VR), other character sets, big endian, private elements
in implicit VR, a value with an empty component, spaces inside, or bytes that do not
decode) returns ``None``, and the caller lets pydicom convert that element.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

#: Binary values longer than this (bytes) are bulk data (PS3.18 F.2.6 leaves the choice).
BULK_THRESHOLD = 1024
#: Binary value representations (PS3.5 6.2) whose large values are bulk data.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
#: Pixel data attributes: always bulk data, whatever their size.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

#: Specific Character Set values (PS3.3 C.12.1.1.2) whose text this module decodes.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_DEFAULT_REPERTOIRE = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI"})
_CHARSET_TEXT = frozenset({"SH", "LO", "PN"})
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_NUMBERS = {
    "US": "H",
    "SS": "h",
    "UL": "I",
    "SL": "i",
    "FL": "f",
    "FD": "d",
    "SV": "q",
    "UV": "Q",
}
#: Characters of a decimal string (PS3.5 6.2, DS): what remains after deleting them
#: must be nothing (float() alone would also take "nan", "inf", "1_0" and spaces).
_DS_CHARS = str.maketrans("", "", "0123456789+-.eE")


def _integer(text: str) -> bool:
    """Whether *text* is an integer string (PS3.5 6.2, IS: an optional sign and digits)."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    return 0 < len(digits) <= 12 and digits.isdigit() and digits.isascii()


def text_codec(ds: Dataset) -> str | None:
    """The codec of *ds*'s Specific Character Set, if this module handles it."""
    value = ds.get("SpecificCharacterSet", "")
    if not isinstance(value, str):
        return None  # several values: code extensions (PS3.5 6.1.2.5)
    return _CODECS.get(value.strip())


def _components(raw: bytes, codec: str) -> list[str] | None:
    """The values of a text element, or None when one is empty or holds outer spaces."""
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        return None
    text = text.rstrip(" \x00")
    if not text:
        return []
    parts = text.split("\\")
    for part in parts:
        if not part or part[0] == " " or part[-1] == " " or "\x00" in part:
            return None
    return parts


def element(raw: RawDataElement, codec: str, *, top_level: bool) -> dict[str, Any] | None:
    """The DICOM JSON object of *raw*, or None when pydicom has to convert it."""
    if not raw.is_little_endian:
        return None
    vr = raw.VR
    if vr is None:
        if raw.tag & 0x10000:  # private: its VR depends on its creator
            return None
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    value = raw.value
    if value is None:
        value = b""
    if not isinstance(value, bytes):
        return None
    if vr in _BINARY:
        if not value:
            return {"vr": vr}
        if (top_level and raw.tag in PIXEL_TAGS) or len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": ""}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    fmt = _NUMBERS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if len(value) % size:
            return None
        if not value:
            return {"vr": vr}
        numbers = list(struct.unpack(f"<{len(value) // size}{fmt}", value))
        if vr in ("FL", "FD"):
            numbers = [float(n) for n in numbers]
            if not all(math.isfinite(n) for n in numbers):
                return None  # NaN and infinities: JSON has no number for them
        return {"vr": vr, "Value": numbers}
    if vr in _DEFAULT_REPERTOIRE:
        parts = _components(value, "ascii")
    elif vr in _CHARSET_TEXT:
        parts = _components(value, codec)
    elif vr in ("IS", "DS"):
        parts = _components(value, "ascii")
        if parts is None:
            return None
        if not parts:
            return {"vr": vr}
        if vr == "IS":
            if not all(_integer(p) for p in parts):
                return None
            return {"vr": vr, "Value": [int(p) for p in parts]}
        if any(p.translate(_DS_CHARS) for p in parts):
            return None
        try:
            decimals = [float(p) for p in parts]
        except ValueError:  # "1e", "+-1", "..."
            return None
        if not all(math.isfinite(n) for n in decimals):
            return None  # "1e999"
        return {"vr": vr, "Value": decimals}
    else:
        return None
    if parts is None:
        return None
    if not parts:
        return {"vr": vr}
    if vr == "PN":
        if any("=" in p for p in parts):
            return None
        return {"vr": vr, "Value": [{"Alphabetic": p} for p in parts]}
    return {"vr": vr, "Value": parts}
