"""DIMSE command sets (PS3.7 section 9.3 and Annex E): bounded decode and encode.

A command set is group 0000 in Implicit VR Little Endian. Only the elements of PS3.7 Table
E.1-1 that Stockade uses are decoded; others are skipped by length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import IntEnum

from stockade.errors import InvalidObject

#: The largest command set accepted; real ones are a few hundred bytes.
MAX_COMMAND_LENGTH = 64 * 1024


class Tag(IntEnum):
    """Command elements (PS3.7 Table E.1-1)."""

    GROUP_LENGTH = 0x00000000
    AFFECTED_SOP_CLASS_UID = 0x00000002
    REQUESTED_SOP_CLASS_UID = 0x00000003
    COMMAND_FIELD = 0x00000100
    MESSAGE_ID = 0x00000110
    MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
    MOVE_DESTINATION = 0x00000600
    PRIORITY = 0x00000700
    COMMAND_DATA_SET_TYPE = 0x00000800
    STATUS = 0x00000900
    OFFENDING_ELEMENT = 0x00000901
    ERROR_COMMENT = 0x00000902
    ERROR_ID = 0x00000903
    AFFECTED_SOP_INSTANCE_UID = 0x00001000
    REQUESTED_SOP_INSTANCE_UID = 0x00001001
    REMAINING_SUBOPERATIONS = 0x00001020
    COMPLETED_SUBOPERATIONS = 0x00001021
    FAILED_SUBOPERATIONS = 0x00001022
    WARNING_SUBOPERATIONS = 0x00001023
    MOVE_ORIGINATOR_AE_TITLE = 0x00001030
    MOVE_ORIGINATOR_MESSAGE_ID = 0x00001031


class Command(IntEnum):
    """Command Field values (PS3.7 Table E.1-1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    C_CANCEL_RQ = 0x0FFF


#: Command Data Set Type value meaning "no data set" (PS3.7 E.1).
NO_DATASET = 0x0101

_US = {
    Tag.COMMAND_FIELD,
    Tag.MESSAGE_ID,
    Tag.MESSAGE_ID_BEING_RESPONDED_TO,
    Tag.PRIORITY,
    Tag.COMMAND_DATA_SET_TYPE,
    Tag.STATUS,
    Tag.ERROR_ID,
    Tag.REMAINING_SUBOPERATIONS,
    Tag.COMPLETED_SUBOPERATIONS,
    Tag.FAILED_SUBOPERATIONS,
    Tag.WARNING_SUBOPERATIONS,
    Tag.MOVE_ORIGINATOR_MESSAGE_ID,
}
_TEXT = {
    Tag.AFFECTED_SOP_CLASS_UID,
    Tag.REQUESTED_SOP_CLASS_UID,
    Tag.MOVE_DESTINATION,
    Tag.ERROR_COMMENT,
    Tag.AFFECTED_SOP_INSTANCE_UID,
    Tag.REQUESTED_SOP_INSTANCE_UID,
    Tag.MOVE_ORIGINATOR_AE_TITLE,
}
_UI = {
    Tag.AFFECTED_SOP_CLASS_UID,
    Tag.REQUESTED_SOP_CLASS_UID,
    Tag.AFFECTED_SOP_INSTANCE_UID,
    Tag.REQUESTED_SOP_INSTANCE_UID,
}


def decode(data: bytes | bytearray) -> dict[int, int | str]:
    """Decode a command set; unknown elements are skipped.

    Text values are decoded as ASCII with replacement (never trusted further than that).

    Raises
    ------
    InvalidObject
        Truncated, too long, or not group 0000.
    """
    if len(data) > MAX_COMMAND_LENGTH:
        raise InvalidObject("command set longer than 64 KiB")
    out: dict[int, int | str] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise InvalidObject("truncated command set (PS3.7 9.3)")
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if group != 0 or length > end - pos:
            raise InvalidObject("malformed command set (PS3.7 9.3)")
        tag = elem
        value = bytes(data[pos : pos + length])
        pos += length
        if tag in _US and length == 2:
            out[tag] = struct.unpack("<H", value)[0]
        elif tag in _TEXT:
            text = value.decode("ascii", "replace")
            out[tag] = text.rstrip("\x00 ") if tag in _UI else text.strip(" \x00")
    if Tag.COMMAND_FIELD not in out:
        raise InvalidObject("command set has no Command Field (0000,0100)")
    return out


def _pad(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def encode(elements: Iterable[tuple[int, int | str]]) -> bytes:
    """Encode a command set, adding Command Group Length (0000,0000)."""
    body = bytearray()
    for tag, value in sorted(elements, key=lambda item: item[0]):
        if tag in _US:
            raw = struct.pack("<H", int(value))
        elif tag in _UI:
            raw = _pad(str(value).encode("ascii", "replace"), b"\x00")
        elif tag in _TEXT:
            raw = _pad(str(value).encode("ascii", "replace"), b" ")
        else:
            raise ValueError(f"cannot encode command element {tag:#06x}")
        body += struct.pack("<HHL", 0, tag, len(raw)) + raw
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + bytes(body)


def error_comment(reason: str) -> str:
    """Clip a reason to an Error Comment (0000,0902): LO, at most 64 printable characters."""
    text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in reason)
    return text if len(text) <= 64 else text[:61] + "..."
