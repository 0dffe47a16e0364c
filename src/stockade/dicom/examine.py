"""Examine a received data set or Part 10 file: bounded parse plus payload inspection.

One function for the ingest pipeline and for ``stockade scan``, so that what the scanner
reports is exactly what ingest would find:

1. deflated data sets (PS3.5 A.5) are inflated with a cap, never in one go;
2. the bounded structural walk of :func:`~stockade.dicom.parse.scan` runs with the
   :class:`~stockade.dicom.inspect.Inspector` as its visitor;
3. the bytes after the data set, the preamble and File Meta private information are
   inspected too (PS3.10 7.1, 7.5);
4. the pixel description is checked against the decode limit and, for native pixel data,
   against the bytes present (PS3.5 8.1.1), before anything could decode it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from stockade.dicom.inspect import (
    Finding,
    Inspector,
    Kind,
    inspect_meta_private,
    inspect_preamble,
    inspect_trailing,
)
from stockade.dicom.parse import Limits, Scan, scan
from stockade.dicom.part10 import Part10, PreambleKind, classify_preamble
from stockade.dicom.tables import TRANSFER_SYNTAX_BY_UID, TransferSyntax
from stockade.errors import InvalidAttribute, InvalidObject, LimitExceeded, ObjectTooLarge

Buffer = bytes | bytearray | memoryview


#: Most bytes one inflation step produces (the output grows by steps, never past the cap).
INFLATE_STEP = 16 * 1024 * 1024


def inflate(data: Buffer, cap: int) -> tuple[bytearray, bytes]:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5) with a size cap.

    Inflation goes by steps of :data:`INFLATE_STEP` bytes into one growing buffer and stops
    past *cap* bytes: a deflate bomb costs at most about *cap* bytes of memory. Returns the
    inflated bytes and the bytes after the end of the deflate stream (one NUL that pads the
    stream to an even length, PS3.5 A.5, is not counted).

    Raises
    ------
    ObjectTooLarge
        It inflates past *cap*.
    InvalidObject
        It does not inflate, or is truncated.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: Buffer = data
    try:
        while not inflater.eof and len(out) <= cap:
            piece = inflater.decompress(pending, min(INFLATE_STEP, cap + 1 - len(out)))
            out += piece
            pending = inflater.unconsumed_tail
            if not piece and not pending:
                break
    except zlib.error as exc:
        raise InvalidObject(f"deflated data set does not inflate: {exc}") from None
    if len(out) > cap:
        raise ObjectTooLarge(f"deflated data set inflates past max_inflated_size ({cap} bytes)")
    if not inflater.eof:
        raise InvalidObject("deflated data set is truncated")
    unused = inflater.unused_data
    return out, b"" if unused == b"\x00" else unused


@dataclass(frozen=True)
class Examined:
    """What :func:`examine` found.

    Attributes
    ----------
    ts : TransferSyntax
    parsed : bytes-like
        The data set as walked (inflated when it was deflated).
    after_stream : bytes
        Bytes after the end of a deflate stream.
    found : Scan
    inspector : Inspector
    findings : list of Finding
        The caller's findings (preamble, File Meta), then the data set's, then the trailing
        bytes'.
    """

    ts: TransferSyntax
    parsed: Buffer
    after_stream: bytes
    found: Scan
    inspector: Inspector
    findings: list[Finding]

    @property
    def trailing(self) -> int:
        """Bytes after the end of the data set (never stored)."""
        return len(self.parsed) - self.found.end + len(self.after_stream)

    def kept(self, received: Buffer, cuts: list[tuple[int, int]]) -> Buffer:
        """The data set to keep: *received* without the byte ranges *cuts* (of the parsed
        data set, ascending, not overlapping) and without trailing bytes; deflated again
        when it arrived deflated. *received* itself when nothing is removed."""
        if not cuts and not self.trailing:
            return received
        if not cuts and not self.ts.deflated:
            return memoryview(received)[: self.found.end]
        view = memoryview(self.parsed)
        pieces, pos = [], 0
        for start, end in cuts:
            pieces.append(view[pos:start])
            pos = end
        pieces.append(view[pos : self.found.end])
        if self.ts.deflated:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            return b"".join(compressor.compress(p) for p in pieces) + compressor.flush()
        return b"".join(pieces)


def examine(
    dataset: Buffer,
    ts_uid: str,
    *,
    limits: Limits,
    inflate_cap: int,
    wanted: frozenset[int],
    findings: list[Finding] | None = None,
    tiff: bool = False,
) -> Examined:
    """Walk and inspect an encoded data set (steps 1-3 of the module docstring).

    *tiff*: the file has a TIFF preamble (a dual-format file), so its Data Set Trailing
    Padding holds TIFF structures and is not a finding (payloads in it still are).

    Raises
    ------
    InvalidObject
        Unsupported transfer syntax, malformed or truncated data set.
    LimitExceeded, ObjectTooLarge
        A structural or inflation limit was passed.
    """
    ts = TRANSFER_SYNTAX_BY_UID.get(ts_uid)
    if ts is None:
        raise InvalidObject(f"transfer syntax {ts_uid[:64]} is not supported")
    parsed: Buffer = dataset
    after_stream = b""
    if ts.deflated:
        parsed, after_stream = inflate(dataset, inflate_cap)
    inspector = Inspector(parsed, little_endian=ts.little_endian)
    found = scan(
        parsed,
        implicit_vr=ts.implicit_vr,
        little_endian=ts.little_endian,
        wanted=wanted,
        limits=limits,
        visitor=inspector,
    )
    result = list(findings or ())
    result += [f for f in inspector.findings if not (tiff and f.kind is Kind.TRAILING_PADDING)]
    result += inspect_trailing(memoryview(parsed)[found.end :])
    result += inspect_trailing(memoryview(after_stream))
    return Examined(ts, parsed, after_stream, found, inspector, result)


def file_findings(data: Buffer, part10: Part10) -> tuple[PreambleKind, list[Finding]]:
    """Classify a Part 10 file's preamble and inspect its File Meta private information."""
    kind = classify_preamble(part10.preamble)
    found = inspect_preamble(kind)
    if part10.private_information is not None:
        start, end = part10.private_information
        found += inspect_meta_private(memoryview(data)[start:end])
    return kind, found


def check_pixels(inspector: Inspector, max_decoded_size: int) -> None:
    """Check the pixel description before anything decodes it (SR-13; step 4).

    Raises
    ------
    LimitExceeded
        Rows x Columns x Samples per Pixel x Bits Allocated x Number of Frames is over
        *max_decoded_size*.
    InvalidAttribute
        Native pixel data holds fewer bytes than its description needs (PS3.5 8.1.1).
    """
    size = inspector.decoded_size()
    if size is None:
        return
    p = inspector.pixels
    if size > max_decoded_size:
        raise LimitExceeded(
            f"pixel data would decode to {size} bytes (Rows {p.get('rows', 0)} x Columns "
            f"{p.get('columns', 0)} x Samples {p.get('samples', 1)} x Bits Allocated "
            f"{p.get('bits', 8)} x Frames {p.get('frames', 1)}), over max_decoded_size "
            f"({max_decoded_size})"
        )
    native = inspector.native_size()
    if inspector.pixel_data is not None and native is not None and not inspector.encapsulated:
        _vr, start, end = inspector.pixel_data
        if end - start < native:
            raise InvalidAttribute(
                f"native Pixel Data (7FE0,0010) holds {end - start} bytes but Rows, Columns, "
                f"Samples per Pixel, Bits Allocated and Number of Frames need {native} "
                "(PS3.5 8.1.1)"
            )
