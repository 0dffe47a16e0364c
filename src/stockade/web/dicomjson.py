"""DICOM JSON (PS3.18 Annex F) for values that come from the index.

QIDO-RS answers are built from index rows (keyword -> text or number), never by opening
files; this module gives each value its VR and JSON form (PS3.18 F.2.2): person names as
``Alphabetic``/``Ideographic``/``Phonetic`` groups, IS as numbers, multi-valued text split
on backslashes, and an attribute without a value as its VR alone.
"""

from __future__ import annotations

import math
from typing import Any

from stockade.query import KEYS

JSON_MEDIA_TYPE = "application/dicom+json"
#: Tags of attributes the QIDO-RS answer adds beyond the index (PS3.18 10.6.3.3).
RETRIEVE_URL = 0x00081190


def tag_hex(tag: int) -> str:
    """The DICOM JSON key of a tag: eight upper-case hex digits (PS3.18 F.2.1)."""
    return f"{tag:08X}"


def _person_name(value: str) -> dict[str, str]:
    groups = value.split("=")
    out = {}
    for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False):
        if group:
            out[name] = group
    return out


def attribute(vr: str, value: str | int | None) -> dict[str, Any]:
    """One attribute object: ``{"vr": ..., "Value": [...]}`` (PS3.18 F.2.2)."""
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        items: list[Any] = [_person_name(str(v)) for v in str(value).split("\\")]
    elif vr in ("IS", "US", "UL", "SS", "SL"):
        items = [int(v) for v in str(value).split("\\") if str(v).strip()]
    elif vr in ("DS", "FL", "FD"):
        numbers = [float(v) for v in str(value).split("\\") if str(v).strip()]
        items = [n if math.isfinite(n) else None for n in numbers]  # JSON has no NaN
    else:
        items = str(value).split("\\")
    return {"vr": vr, "Value": items}


def row_to_json(row: dict[str, str | int | None]) -> dict[str, Any]:
    """An index row (keyword -> value) as a DICOM JSON object, tags in ascending order."""
    out: dict[str, Any] = {}
    for keyword, value in sorted(row.items(), key=lambda item: KEYS[item[0]].tag):
        key = KEYS[keyword]
        out[tag_hex(key.tag)] = attribute(key.vr, value)
    return out
