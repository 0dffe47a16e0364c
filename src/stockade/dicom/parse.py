"""Bounded, allocation-free structural walk of an encoded DICOM data set.

Before anything else reads a data set that crossed a trust boundary, :func:`scan` walks its
encoding (PS3.5 section 7) and checks, without copying values:

- every element's value length fits in the bytes that remain of its container (PS3.5 7.1);
- undefined lengths only where PS3.5 7.1.2 allows them (SQ, UN, and encapsulated OB/OW pixel
  data per PS3.5 A.4), each closed by its delimiter (PS3.5 7.5);
- explicit VRs are real VRs (PS3.5 6.2);
- sequence nesting depth and the total element count stay under configured limits;
- top-level tags ascend (PS3.5 7.1).

Bytes after the end of a complete data set (after Pixel Data, or anything that starts with
another format's header where the next element should be, for instance an appended ZIP
archive) are reported as trailing data so the caller can drop them; anything else that does not
parse is an :class:`~stockade.errors.InvalidObject`. An optional :class:`Visitor` sees every
element on the way (the payload inspector uses it; PS3.10 7.5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from pydicom.datadict import dictionary_VR

from stockade.errors import InvalidObject, LimitExceeded

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010

#: VRs whose explicit encoding has 2 reserved bytes and a 32-bit length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: Every VR of PS3.5 Table 6.2-1.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)


@dataclass(frozen=True)
class Limits:
    """Structural limits applied while walking (SR-14)."""

    max_depth: int = 32
    max_elements: int = 500_000


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` found.

    Attributes
    ----------
    values : dict
        For each wanted top-level tag present: ``(vr, start, end)`` of its value in the buffer.
    end : int
        Offset where the data set ends; bytes from here on are trailing data.
    elements : int
        Number of elements seen, nested ones included.
    last_tag : int
        The last top-level tag of the data set.
    """

    values: dict[int, tuple[str, int, int]]
    end: int
    elements: int
    last_tag: int


class Visitor(Protocol):
    """Sees every element of a data set while :func:`scan` walks it (the payload inspector,
    :mod:`stockade.dicom.inspect`, is one). Offsets are into the scanned buffer."""

    def element(self, tag: int, vr: str, header: int, start: int, end: int, depth: int) -> None:
        """An element whose header starts at *header* and whose value (or, for sequences,
        items) spans ``start:end``; *depth* is 0 at the top level, 1 inside an item of a
        top-level sequence, and so on."""

    def item(self, depth: int) -> None:
        """A sequence item begins: the elements that follow at *depth* form a new data set."""

    def fragment(self, start: int, end: int) -> None:
        """One fragment of encapsulated pixel data (PS3.5 A.4) spans ``start:end``."""


#: Headers of other formats that can follow a complete data set to make a polyglot (a ZIP
#: local file header, PE, ELF, PDF, Mach-O): seen where the next top-level element should be,
#: they end the data set (trailing data) instead of making it malformed.
FOREIGN_MAGIC = (
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"MZ",
    b"\x7fELF",
    b"%PDF-",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)


class _Malformed(Exception):
    def __init__(self, message: str, pos: int, *, overrun: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.overrun = overrun


@lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str:
    if tag >> 16 & 1:  # private group: VR unknown (PS3.5 6.2.2)
        return "UN"
    if tag & 0xFFFF == 0:  # group length (PS3.5 7.2)
        return "UL"
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(
        self, buf: bytes | bytearray | memoryview, limits: Limits, visitor: Visitor | None
    ) -> None:
        self.buf = buf
        self.limits = limits
        self.count = 0
        self.visitor = visitor

    # Each method returns the offset just after what it consumed.

    def header(self, pos: int, end: int, implicit: bool, little: bool) -> tuple[int, str, int, int]:
        """Read one element header at *pos*: (tag, vr, length, value_offset)."""
        buf = self.buf
        if end - pos < 8:
            raise _Malformed(f"{end - pos} stray bytes at offset {pos}", pos)
        if little:
            group, elem = struct.unpack_from("<HH", buf, pos)
        else:
            group, elem = struct.unpack_from(">HH", buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:  # item and delimiters: always implicit, 32-bit length (PS3.5 7.5)
            (length,) = struct.unpack_from("<L" if little else ">L", buf, pos + 4)
            return tag, "", length, pos + 8
        if implicit:
            (length,) = struct.unpack_from("<L" if little else ">L", buf, pos + 4)
            return tag, _implicit_vr(tag), length, pos + 8
        vr_bytes = bytes(buf[pos + 4 : pos + 6])
        if vr_bytes not in _VRS:
            raise _Malformed(
                f"element {_tag_text(tag)} at offset {pos} has no valid VR "
                f"({vr_bytes!r}, PS3.5 6.2)",
                pos,
            )
        if vr_bytes in _LONG_VRS:
            if end - pos < 12:
                raise _Malformed(
                    f"truncated header of {_tag_text(tag)} at offset {pos}", pos, overrun=True
                )
            (length,) = struct.unpack_from("<L" if little else ">L", buf, pos + 8)
            return tag, vr_bytes.decode(), length, pos + 12
        (length,) = struct.unpack_from("<H" if little else ">H", buf, pos + 6)
        return tag, vr_bytes.decode(), length, pos + 8

    def bump(self, pos: int) -> None:
        self.count += 1
        if self.count > self.limits.max_elements:
            raise LimitExceeded(
                f"data set has more than {self.limits.max_elements} elements "
                f"(limit max_elements, at offset {pos})"
            )

    def element(
        self, pos: int, end: int, implicit: bool, little: bool, depth: int
    ) -> tuple[int, str, int, int]:
        """Walk one element; return (tag, vr, value_start, next_offset)."""
        tag, vr, length, start = self.header(pos, end, implicit, little)
        self.bump(pos)
        result = self._element(tag, vr, length, start, pos, end, implicit, little, depth)
        if self.visitor is not None:
            self.visitor.element(tag, result[1], pos, start, result[3], depth)
        return result

    def _element(
        self,
        tag: int,
        vr: str,
        length: int,
        start: int,
        pos: int,
        end: int,
        implicit: bool,
        little: bool,
        depth: int,
    ) -> tuple[int, str, int, int]:
        if tag >> 16 == 0xFFFE:
            raise _Malformed(f"unexpected item or delimiter {_tag_text(tag)} at offset {pos}", pos)
        if length == UNDEFINED_LENGTH:
            if vr == "SQ" or (implicit and vr not in ("OB", "OW")):
                return (
                    tag,
                    "SQ",
                    start,
                    self.sequence(start, end, None, implicit, little, depth + 1),
                )
            if vr == "UN":  # PS3.5 6.2.2: UN of undefined length holds implicit VR LE items
                return tag, vr, start, self.sequence(start, end, None, True, True, depth + 1)
            if vr in ("OB", "OW") and not implicit:
                return tag, vr, start, self.fragments(start, end)
            raise _Malformed(
                f"element {_tag_text(tag)} ({vr}) at offset {pos} has an undefined length, "
                "which PS3.5 7.1.2 allows only for SQ, UN and encapsulated pixel data",
                pos,
            )
        value_end = start + length
        if value_end > end:
            raise _Malformed(
                f"element {_tag_text(tag)} at offset {pos} declares {length} bytes but only "
                f"{max(end - start, 0)} remain (PS3.5 7.1)",
                pos,
                overrun=True,
            )
        if vr == "SQ":
            self.sequence(start, value_end, value_end, implicit, little, depth + 1)
        return tag, vr, start, value_end

    def sequence(
        self,
        pos: int,
        end: int,
        defined_end: int | None,
        implicit: bool,
        little: bool,
        depth: int,
    ) -> int:
        """Walk sequence items (PS3.5 7.5); return the offset after the sequence."""
        if depth > self.limits.max_depth:
            raise LimitExceeded(
                f"sequences nested deeper than {self.limits.max_depth} at offset {pos} "
                "(limit max_nesting_depth)"
            )
        while True:
            if defined_end is not None and pos == defined_end:
                return pos
            tag, _vr, length, start = self.header(pos, end, implicit, little)
            self.bump(pos)
            if tag == SEQUENCE_DELIMITER and defined_end is None:
                return start
            if tag != ITEM:
                raise _Malformed(f"expected an item at offset {pos}, found {_tag_text(tag)}", pos)
            if self.visitor is not None:
                self.visitor.item(depth)
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(start, end, None, implicit, little, depth)
            else:
                item_end = start + length
                if item_end > end:
                    raise _Malformed(
                        f"item at offset {pos} declares {length} bytes but only "
                        f"{end - start} remain (PS3.5 7.5)",
                        pos,
                        overrun=True,
                    )
                self.dataset(start, item_end, item_end, implicit, little, depth)
                pos = item_end

    def dataset(
        self,
        pos: int,
        end: int,
        defined_end: int | None,
        implicit: bool,
        little: bool,
        depth: int,
    ) -> int:
        """Walk a nested data set (an item's content); return the offset after it."""
        while True:
            if defined_end is not None and pos >= defined_end:
                return pos
            if defined_end is None and end - pos >= 8:
                tag = self.peek_tag(pos, little)
                if tag == ITEM_DELIMITER:
                    self.bump(pos)
                    return pos + 8
            _tag, _vr, _start, pos = self.element(pos, end, implicit, little, depth)

    def peek_tag(self, pos: int, little: bool) -> int:
        group, elem = struct.unpack_from("<HH" if little else ">HH", self.buf, pos)
        return int(group) << 16 | int(elem)

    def fragments(self, pos: int, end: int) -> int:
        """Walk encapsulated pixel data fragments (PS3.5 A.4); return the offset after."""
        while True:
            tag, _vr, length, start = self.header(pos, end, True, True)
            self.bump(pos)
            if tag == SEQUENCE_DELIMITER:
                return start
            if tag != ITEM or length == UNDEFINED_LENGTH:
                raise _Malformed(f"bad pixel data fragment at offset {pos} (PS3.5 A.4)", pos)
            if start + length > end:
                raise _Malformed(
                    f"pixel data fragment at offset {pos} declares {length} bytes but only "
                    f"{end - start} remain (PS3.5 A.4)",
                    pos,
                    overrun=True,
                )
            if self.visitor is not None:
                self.visitor.fragment(start, start + length)
            pos = start + length


def _foreign(buf: bytes | bytearray | memoryview, pos: int) -> bool:
    head = bytes(buf[pos : pos + 8])
    if not head.startswith(FOREIGN_MAGIC):
        return False
    if head.startswith(b"MZ"):  # a DOS header: believable only with its PE offset in range
        return len(buf) - pos >= 64
    return True


def scan(
    buf: bytes | bytearray | memoryview,
    *,
    implicit_vr: bool,
    little_endian: bool,
    wanted: frozenset[int],
    limits: Limits,
    start: int = 0,
    visitor: Visitor | None = None,
) -> Scan:
    """Walk the top level of a data set encoded in *buf* from *start* to the end.

    Parameters
    ----------
    buf : bytes-like
        The encoded data set (PS3.5 section 7), as received.
    implicit_vr, little_endian : bool
        The encoding, from the transfer syntax (PS3.5 section 10).
    wanted : frozenset of int
        Top-level tags whose value offsets to return.
    limits : Limits
        Nesting depth and element count caps.
    start : int
        Offset of the first element.
    visitor : Visitor, optional
        Told of every element, item and pixel data fragment as the walk meets them.

    Returns
    -------
    Scan

    Raises
    ------
    InvalidObject
        The data set is empty, truncated or malformed before its end.
    LimitExceeded
        A structural limit was exceeded.
    """
    walker = _Walker(buf, limits, visitor)
    end = len(buf)
    pos = start
    last_tag = -1
    values: dict[int, tuple[str, int, int]] = {}
    while pos < end:
        if last_tag >= 0 and _foreign(buf, pos):
            # Another format's header where the next element should be: a polyglot's tail.
            return Scan(values, pos, walker.count, last_tag)
        try:
            tag, vr, value_start, next_pos = walker.element(pos, end, implicit_vr, little_endian, 0)
            if tag <= last_tag:
                raise _Malformed(
                    f"element {_tag_text(tag)} at offset {pos} is out of order after "
                    f"{_tag_text(last_tag)} (PS3.5 7.1)",
                    pos,
                )
        except _Malformed as exc:
            if last_tag >= PIXEL_DATA:
                # A complete data set ended with its pixel data; what follows is not DICOM.
                return Scan(values, pos, walker.count, last_tag)
            raise InvalidObject(f"malformed data set: {exc.message}") from None
        if tag in wanted:
            values[tag] = (vr, value_start, next_pos)
        last_tag = tag
        pos = next_pos
    if last_tag < 0:
        raise InvalidObject("the data set is empty")
    return Scan(values, pos, walker.count, last_tag)
