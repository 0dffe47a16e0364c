"""DICOM Part 10 files: preamble classification, File Meta Information read and write.

PS3.10 section 7.1: a file is a 128-byte preamble, the prefix ``DICM``, the File Meta
Information (group 0002, always Explicit VR Little Endian), then the data set. PS3.10 7.5 (and
CVE-2019-11687) is why Stockade never keeps a preamble it was given: every file it writes has
128 zero bytes there, and what the original held is classified and recorded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from stockade.dicom.parse import Limits, scan
from stockade.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, uid_problem
from stockade.errors import InvalidAttribute, InvalidObject

PREAMBLE_LENGTH = 128
PREFIX = b"DICM"
ZERO_PREAMBLE = bytes(PREAMBLE_LENGTH)
#: File Meta Information larger than this is not believable (it holds a handful of UIDs).
MAX_META_LENGTH = 64 * 1024

TRANSFER_SYNTAX_UID = 0x00020010
MEDIA_SOP_CLASS_UID = 0x00020002
MEDIA_SOP_INSTANCE_UID = 0x00020003
PRIVATE_INFORMATION = 0x00020102


class PreambleKind(StrEnum):
    """What a received preamble held (threat model, SR-20)."""

    NONE = "none"  # no preamble on the wire (DIMSE)
    ZERO = "zero"
    TIFF = "tiff"
    EXECUTABLE = "executable"
    MARKUP = "markup"
    OTHER = "other"


_EXECUTABLE_MAGIC = (
    b"MZ",  # DOS/PE (the CVE-2019-11687 proof of concept)
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",  # Mach-O
    b"\xca\xfe\xba\xbe",  # Mach-O universal / Java class
    b"#!",  # script
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def classify_preamble(preamble: bytes) -> PreambleKind:
    """Classify the 128-byte preamble of a Part 10 file (PS3.10 7.1, 7.5).

    TIFF headers are the one legitimate non-zero use (dual-format whole-slide images);
    executable headers (PE, ELF, Mach-O, scripts) and markup (HTML, XML, PDF) are the polyglot
    tells described in the threat model.
    """
    if preamble == ZERO_PREAMBLE:
        return PreambleKind.ZERO
    if preamble.startswith(_TIFF_MAGIC):
        return PreambleKind.TIFF
    if preamble.startswith(_EXECUTABLE_MAGIC):
        return PreambleKind.EXECUTABLE
    text = preamble.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"<", b"%PDF")):
        return PreambleKind.MARKUP
    return PreambleKind.OTHER


@dataclass(frozen=True)
class Part10:
    """A Part 10 file split into its parts."""

    preamble: bytes
    transfer_syntax: str
    media_sop_class_uid: str | None
    media_sop_instance_uid: str | None
    dataset_offset: int
    #: Offsets of the value of Private Information (0002,0102), if present (never stored).
    private_information: tuple[int, int] | None = None


def _text(raw: bytes | bytearray | memoryview) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


def read_part10(data: bytes | bytearray | memoryview) -> Part10:
    """Split a Part 10 file into preamble, File Meta Information and data set offset.

    Raises
    ------
    InvalidObject
        No ``DICM`` prefix, or File Meta Information that does not parse.
    InvalidAttribute
        The Transfer Syntax UID is missing or invalid.
    """
    if len(data) < PREAMBLE_LENGTH + 4 or bytes(data[128:132]) != PREFIX:
        raise InvalidObject("not a DICOM Part 10 file (no 'DICM' prefix after the preamble)")
    pos = PREAMBLE_LENGTH + 4
    # Walk group 0002 only: find where it ends by reading element headers (explicit VR LE).
    meta_end = pos
    limit = min(len(data), pos + MAX_META_LENGTH)
    while meta_end + 8 <= len(data):
        (group,) = struct.unpack_from("<H", data, meta_end)
        if group != 0x0002:
            break
        vr = bytes(data[meta_end + 4 : meta_end + 6])
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            if meta_end + 12 > len(data):
                break
            (length,) = struct.unpack_from("<L", data, meta_end + 8)
            meta_end += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, meta_end + 6)
            meta_end += 8 + length
        if meta_end > limit:
            raise InvalidObject("File Meta Information is longer than 64 KiB or truncated")
    if meta_end == pos:
        raise InvalidObject("the file has no File Meta Information (PS3.10 7.1)")
    found = scan(
        memoryview(data)[:meta_end],
        implicit_vr=False,
        little_endian=True,
        start=pos,
        wanted=frozenset(
            {TRANSFER_SYNTAX_UID, MEDIA_SOP_CLASS_UID, MEDIA_SOP_INSTANCE_UID, PRIVATE_INFORMATION}
        ),
        limits=Limits(max_depth=2, max_elements=64),
    )
    private = found.values.pop(PRIVATE_INFORMATION, None)
    values = {tag: _text(data[s:e]) for tag, (_vr, s, e) in found.values.items()}
    ts = values.get(TRANSFER_SYNTAX_UID)
    problem = uid_problem(ts)
    if problem:
        raise InvalidAttribute(f"Transfer Syntax UID (0002,0010) {problem}")
    return Part10(
        preamble=bytes(data[:PREAMBLE_LENGTH]),
        transfer_syntax=str(ts),
        media_sop_class_uid=values.get(MEDIA_SOP_CLASS_UID),
        media_sop_instance_uid=values.get(MEDIA_SOP_INSTANCE_UID),
        dataset_offset=meta_end,
        private_information=private[1:] if private else None,
    )


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr in (b"OB", b"OW", b"UN", b"UT"):
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_value(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str | None,
    preamble: bytes | None = None,
) -> bytes:
    """Build the zero preamble, ``DICM`` and a fresh File Meta Information (PS3.10 7.1).

    Stockade always writes its own meta group: nothing a sender put in group 0002 (private
    information (0002,0102), say) is kept. The UIDs must already be validated. *preamble*
    replaces the zeros only for a TIFF header kept by the whole-slide opt-in
    (``keep_tiff_preamble``).
    """
    if preamble is not None and (
        len(preamble) != PREAMBLE_LENGTH or classify_preamble(preamble) is not PreambleKind.TIFF
    ):
        raise ValueError("only a 128-byte TIFF preamble can be kept")
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _uid_value(sop_class_uid)),
            _element(0x00020003, b"UI", _uid_value(sop_instance_uid)),
            _element(0x00020010, b"UI", _uid_value(transfer_syntax)),
            _element(0x00020012, b"UI", _uid_value(IMPLEMENTATION_CLASS_UID)),
            _element(0x00020013, b"SH", _text_value(IMPLEMENTATION_VERSION_NAME)),
            _element(0x00020016, b"AE", _text_value(source_ae)) if source_ae else b"",
        )
    )
    group_length = _element(0x00020000, b"UL", struct.pack("<L", len(body)))
    return (preamble or ZERO_PREAMBLE) + PREFIX + group_length + body
