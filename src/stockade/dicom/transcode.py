"""Transcoding on retrieve: a stored object re-encoded in a transfer syntax the receiver accepts.

When Stockade sends a stored object (C-GET, C-MOVE; later WADO-RS), the presentation context
accepted by the peer may name another transfer syntax than the stored one (C-MOVE and C-GET,
PS3.4 C.4.2 and C.4.3: the sub-operations use a negotiated presentation context). This
module decides which conversions are possible with the codecs installed and performs them:

* between the uncompressed transfer syntaxes (PS3.5 section 10, Annex A.1-A.3, A.5): a plain
  re-encoding of the data set; Explicit VR Big Endian is read but never produced;
* from an encapsulated one (PS3.5 Annex A.4) to an uncompressed one: a decode of the pixel
  data, also for lossy codestreams (the Lossy Image Compression attribute stays as stored);
* to the lossless encapsulated ones (RLE Lossless, JPEG 2000 Lossless, JPEG-LS Lossless):
  an encode from uncompressed pixel data, or a decode then encode when the stored codestream
  is itself lossless. A lossy codestream is never recompressed, and no lossy target is ever
  produced, so the SOP Instance UID stays: the pixels are those of the stored instance, and
  Lossy Image Compression (PS3.3 C.7.6.1.1.5) keeps telling whether they ever lost data.

Pixel data is decoded and encoded by pydicom (``pydicom.pixels``) and its plugins. Which
conversions exist is asked of pydicom's own availability API once, at import time. The one
GPL codec (pylibjpeg-libjpeg, needed to decode JPEG Baseline, Extended and Lossless Process
14) is optional: without it those stored objects can only be sent as stored.

Threat model SR-13: before any decode, the size of the decoded pixel data is computed from
the header (Rows x Columns x Samples per Pixel x bytes per sample x Number of Frames) and
checked against ``max_pixel_bytes``, and the image size announced by every codestream header
must fit inside what the DICOM header promises, so that a small file cannot make a codec
allocate more than that bound. In the servers the codecs then run in a decoder process with
memory and time limits (``delegate``, :mod:`stockade.dicom.sandbox`), so that a codec that
crashes or runs away costs one request.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import utils as pixel_utils
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID

from stockade.dicom.part10 import read_part10
from stockade.dicom.tables import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    TRANSFER_SYNTAX_BY_UID,
    TRANSFER_SYNTAXES,
)
from stockade.errors import CannotTranscode

__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "JPEG_2000_LOSSLESS",
    "JPEG_LS_LOSSLESS",
    "LOSSLESS_ENCAPSULATED",
    "RLE_LOSSLESS",
    "Delegate",
    "choose",
    "conversions",
    "producible",
    "transcode",
]

DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"

#: Uncompressed targets, in the order of preference of :func:`producible` (PS3.5 A.1-A.5).
_UNCOMPRESSED_TARGETS = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
)
#: Compressed targets Stockade may produce, in order of preference: all lossless (PS3.5 A.4.2,
#: A.4.3, A.4.4). JPEG Lossless Process 14 is missing because no installable encoder exists.
_COMPRESSED_TARGETS = (RLE_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS)

#: Encapsulated transfer syntaxes whose codestream is lossless by definition (PS3.5 8.2,
#: A.4): a decode gives back exactly the pixels that were encoded, so they may be re-encoded
#: into another lossless codestream. JPEG 2000 (.91), HTJ2K (.203) and JPEG-LS near-lossless
#: (.81) may hold lossy codestreams and are treated as lossy.
LOSSLESS_ENCAPSULATED: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14 [Selection Value 1]
        JPEG_LS_LOSSLESS,
        JPEG_2000_LOSSLESS,
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless Only
        "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options, Lossless Only
        RLE_LOSSLESS,
    }
)

_JPEG_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    }
)
_JPEG_2000_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
_EXTENDED_OFFSET_TABLE = (0x7FE00001, 0x7FE00002)


# -- codec availability (asked of pydicom once, at import time) ------------------------------


def _available_plugins(uid: str, *, encoder: bool) -> tuple[str, ...]:
    """Names of pydicom's plugins that can decode (or encode) *uid* here, in pydicom's order."""
    try:
        coder = get_encoder(uid) if encoder else get_decoder(uid)
    except NotImplementedError:  # pydicom has no coder for this transfer syntax at all
        return ()
    if not coder.is_available:
        return ()
    return tuple(str(name) for name in coder.available_plugins)


def _is_native(uid: str) -> bool:
    ts = TRANSFER_SYNTAX_BY_UID.get(uid)
    return ts is not None and not ts.encapsulated


#: Encapsulated transfer syntax -> pydicom decoder plugins available for it.
_DECODERS: dict[str, tuple[str, ...]] = {
    ts.uid: plugins
    for ts in TRANSFER_SYNTAXES
    if ts.encapsulated and (plugins := _available_plugins(ts.uid, encoder=False))
}
#: Compressed target -> pydicom encoder plugins available for it.
_ENCODERS: dict[str, tuple[str, ...]] = {
    uid: plugins
    for uid in _COMPRESSED_TARGETS
    if (plugins := _available_plugins(uid, encoder=True))
}


def _package(plugin: str, uid: str) -> str:
    """The distribution that does the work behind pydicom plugin *plugin* for *uid*."""
    if plugin == "pylibjpeg":
        if uid == RLE_LOSSLESS:
            return "pylibjpeg-rle"
        if uid in _JPEG_2000_FAMILY:
            return "pylibjpeg-openjpeg"
        return "pylibjpeg-libjpeg"
    return {"gdcm": "python-gdcm", "pillow": "Pillow", "pydicom": "pydicom"}.get(plugin, plugin)


# -- the public interface --------------------------------------------------------------------


def producible(stored_ts: str) -> tuple[str, ...]:
    """Transfer syntaxes an object stored in *stored_ts* can be sent in, best first.

    The stored transfer syntax comes first (nothing to do), then Explicit VR Little Endian,
    Implicit VR Little Endian and Deflated Explicit VR Little Endian (PS3.5 A.1, A.2, A.5),
    then the lossless encapsulated ones whose encoder is installed: RLE Lossless (A.4.2),
    JPEG 2000 Lossless (A.4.4) and JPEG-LS Lossless (A.4.3). An encapsulated stored object
    reaches the uncompressed ones only if its decoder is installed, and the compressed ones
    only if its codestream is lossless too: a lossy codestream is never recompressed, and no
    lossy transfer syntax is produced (PS3.3 C.7.6.1.1.5). Explicit VR Big Endian (retired)
    is read, never produced.

    The answer is per transfer syntax; a codec may still refuse one image (RLE holds at most
    16 bits per sample, openjpeg needs 32 x 32 pixels or more, PS3.5 8.2): :func:`transcode`
    then raises :class:`~stockade.errors.CannotTranscode`.

    Parameters
    ----------
    stored_ts : str
        Transfer Syntax UID of the stored object.

    Returns
    -------
    tuple of str
        Transfer Syntax UIDs, the stored one first.
    """
    if stored_ts not in TRANSFER_SYNTAX_BY_UID:
        return (stored_ts,)
    result = [stored_ts]
    if _is_native(stored_ts):
        result += _UNCOMPRESSED_TARGETS
        result += _ENCODERS
    elif stored_ts in _DECODERS:
        result += _UNCOMPRESSED_TARGETS
        if stored_ts in LOSSLESS_ENCAPSULATED:
            result += _ENCODERS
    return tuple(dict.fromkeys(result))


def choose(stored_ts: str, accepted: Iterable[str]) -> str | None:
    """The best transfer syntax among *accepted* that the stored object can be sent in.

    Parameters
    ----------
    stored_ts : str
        Transfer Syntax UID of the stored object.
    accepted : iterable of str
        Transfer Syntax UIDs the peer accepted for the SOP class (PS3.4 C.4.2, C.4.3: the
        accepted presentation contexts of the association that carries the sub-operations).

    Returns
    -------
    str or None
        The first of :func:`producible` (*stored_ts*) that is in *accepted*; ``None`` if none.
    """
    wanted = {uid.strip().rstrip("\x00") for uid in accepted}
    return next((uid for uid in producible(stored_ts) if uid in wanted), None)


def conversions() -> list[tuple[str, str, str]]:
    """Every conversion :func:`transcode` can perform with the codecs installed here.

    For the conformance statement (PS3.2: the transfer syntaxes a retrieve can send).

    Returns
    -------
    list of (str, str, str)
        ``(from transfer syntax name, to transfer syntax name, codec packages)``, for example
        ``("RLE Lossless", "JPEG-LS Lossless Image Compression", "pydicom or pylibjpeg-rle
        (decode), pyjpegls (encode)")``. Alternatives (pydicom tries each plugin in turn) are
        joined by "or"; a plain re-encoding of the data set is done by pydicom.
    """
    rows: list[tuple[str, str, str]] = []
    for source in TRANSFER_SYNTAXES:
        for target in producible(source.uid)[1:]:
            steps: list[str] = []
            if source.deflated:
                steps.append("zlib (inflate)")
            if source.encapsulated:
                steps.append(_alternatives(_DECODERS[source.uid], source.uid) + " (decode)")
            if target in _ENCODERS:
                steps.append(_alternatives(_ENCODERS[target], target) + " (encode)")
            if not any(step.endswith(("(decode)", "(encode)")) for step in steps):
                steps.insert(0, "pydicom")
            if target == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                steps.append("zlib (deflate)")
            rows.append((source.name, TRANSFER_SYNTAX_BY_UID[target].name, ", ".join(steps)))
    return rows


def _alternatives(plugins: tuple[str, ...], uid: str) -> str:
    return " or ".join(dict.fromkeys(_package(plugin, uid) for plugin in plugins))


#: Runs a conversion that needs a codec elsewhere (a decoder process,
#: :mod:`stockade.dicom.sandbox`): ``delegate(part10, target_ts, max_pixel_bytes)`` returns
#: what :func:`transcode` would.
Delegate = Callable[[bytes | bytearray | memoryview, str, int], bytes | memoryview]


def transcode(
    part10: bytes | bytearray | memoryview,
    target_ts: str,
    *,
    max_pixel_bytes: int,
    delegate: Delegate | None = None,
) -> bytes | memoryview:
    """The data set of a stored Part 10 file re-encoded in *target_ts*, as a C-STORE carries it.

    The result has no preamble and no File Meta Information (PS3.7 9.3.1.1: the data set of
    the C-STORE request). When *target_ts* is the stored transfer syntax the stored data set
    bytes are returned as they are, without parsing. Otherwise the data set is re-encoded per
    PS3.5 section 7 for the target; pixel data is decoded and (for an encapsulated target)
    encoded again when the two differ in compression (PS3.5 Annex A.4). Nothing else changes:
    the SOP Instance UID and Lossy Image Compression stay as stored; Photometric
    Interpretation (and Planar Configuration) follow the pixel data written (a lossy
    ``YBR_FULL_422`` JPEG is decoded to ``RGB``, as DICOM toolkits do; a lossless codestream
    is decoded without any colour conversion).

    Parameters
    ----------
    part10 : bytes, bytearray or memoryview
        The stored file: 128-byte preamble, ``DICM``, File Meta Information, data set
        (PS3.10 7.1).
    target_ts : str
        Transfer Syntax UID to encode in; one of :func:`producible` (stored transfer syntax).
    max_pixel_bytes : int
        Largest decoded pixel data, in bytes, that may be produced by a decode or handed to
        an encoder (threat model SR-13). Checked from the header values before any decode.
    delegate : callable, optional
        Where a conversion that needs a codec runs, once every check above has passed here
        (threat model SR-13: :class:`stockade.dicom.sandbox.DecodePool`). Without it the
        codecs run in this process.

    Returns
    -------
    bytes or memoryview
        The encoded data set (``bytes`` without *delegate*).

    Raises
    ------
    CannotTranscode
        The target is not producible from the stored transfer syntax, a codec is missing, the
        pixel data would be larger than *max_pixel_bytes*, a codestream announces a larger
        image than the header, the image attributes needed are missing or invalid, or the
        codec failed.
    InvalidObject
        *part10* is not a Part 10 file (from :func:`stockade.dicom.part10.read_part10`).
    """
    info = read_part10(part10)
    stored_ts = info.transfer_syntax
    if target_ts == stored_ts:
        return bytes(memoryview(part10)[info.dataset_offset :])
    target = TRANSFER_SYNTAX_BY_UID.get(target_ts)
    if target is None or target_ts not in producible(stored_ts):
        raise CannotTranscode(_why_not(stored_ts, target_ts))

    ds = _read(part10)
    stored = TRANSFER_SYNTAX_BY_UID[stored_ts]
    has_pixels = _PIXEL_DATA in ds
    if target.encapsulated and (_FLOAT_PIXEL_DATA in ds or _DOUBLE_FLOAT_PIXEL_DATA in ds):
        raise CannotTranscode(
            f"float pixel data cannot be encoded in {target.name} (PS3.5 A.4: only Pixel "
            "Data (7FE0,0010) is encapsulated)"
        )
    codec = has_pixels and (stored.encapsulated or target.encapsulated)
    if codec:
        _check_pixel_size(ds, max_pixel_bytes)
        if stored.encapsulated:
            _check_codestreams(ds, stored_ts)
        if delegate is not None:
            del ds
            return delegate(part10, target_ts, max_pixel_bytes)
    if not stored.little_endian:
        _to_little_endian(ds)
    if codec:
        if stored.encapsulated:
            _decompress(ds, stored_ts)
        if target.encapsulated:
            _compress(ds, target_ts)
    return _encode(ds, target_ts)


# -- steps -----------------------------------------------------------------------------------


def _why_not(stored_ts: str, target_ts: str) -> str:
    """A sentence saying why *target_ts* is not producible from *stored_ts*."""
    stored = TRANSFER_SYNTAX_BY_UID.get(stored_ts)
    target = TRANSFER_SYNTAX_BY_UID.get(target_ts)
    if stored is None:
        return f"the stored transfer syntax {stored_ts} is not one Stockade knows"
    if target is None:
        return f"the transfer syntax {target_ts} is not one Stockade knows"
    if target.uid == EXPLICIT_VR_BIG_ENDIAN:
        return "Explicit VR Big Endian (retired) is never produced"
    if target.encapsulated and target.uid not in _COMPRESSED_TARGETS:
        return f"Stockade does not produce {target.name} (only lossless compression is made)"
    if stored.encapsulated and stored.uid not in _DECODERS:
        return f"no decoder for {stored.name} is installed"
    if stored.encapsulated and target.encapsulated and stored.uid not in LOSSLESS_ENCAPSULATED:
        return f"{stored.name} may be lossy and is never recompressed (PS3.3 C.7.6.1.1.5)"
    if target.encapsulated and target.uid not in _ENCODERS:
        return f"no encoder for {target.name} is installed"
    return f"{stored.name} cannot be converted to {target.name}"  # pragma: no cover


def _read(part10: bytes | bytearray | memoryview) -> FileDataset:
    """Parse the stored file with pydicom (the bytes were checked at ingest, PS3.10 7.1)."""
    try:
        return dcmread(BytesIO(part10))
    except (InvalidDicomError, ValueError, EOFError, OSError, struct.error) as exc:
        raise CannotTranscode(f"the stored object could not be parsed: {_one_line(exc)}") from exc


def _header_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer Image Pixel module attribute (PS3.3 C.7.6.3), validated as positive."""
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError) as exc:  # pydicom converts IS and US values on access
        raise CannotTranscode(f"{keyword} is not a number: {_one_line(exc)}") from exc
    if value is None or value == "":
        if default is None:
            raise CannotTranscode(f"{keyword} is missing; the pixel data cannot be decoded")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise CannotTranscode(f"{keyword} {value!r} is not a number") from exc
    if number <= 0:
        raise CannotTranscode(f"{keyword} {number} is not a positive number")
    return number


@dataclass(frozen=True)
class _Geometry:
    """The Image Pixel module values that size the decoded pixel data (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples: int
    bytes_per_sample: int
    frames: int

    @property
    def decoded_bytes(self) -> int:
        return self.rows * self.columns * self.samples * self.bytes_per_sample * self.frames


def _geometry(ds: Dataset) -> _Geometry:
    bits_allocated = _header_int(ds, "BitsAllocated")
    return _Geometry(
        rows=_header_int(ds, "Rows"),
        columns=_header_int(ds, "Columns"),
        samples=_header_int(ds, "SamplesPerPixel", 1),
        # A decoded sample takes whole bytes (Bits Allocated 1 or 12 still take 1 or 2).
        bytes_per_sample=math.ceil(bits_allocated / 8),
        frames=_header_int(ds, "NumberOfFrames", 1),
    )


def _check_pixel_size(ds: Dataset, max_pixel_bytes: int) -> None:
    """Refuse pixel data whose decoded size would exceed the bound, before decoding (SR-13)."""
    size = _geometry(ds).decoded_bytes
    if size > max_pixel_bytes:
        raise CannotTranscode(
            f"the decoded pixel data would take {size} bytes (Rows x Columns x Samples per "
            f"Pixel x Bits Allocated/8 x Number of Frames), over the limit of "
            f"{max_pixel_bytes} bytes"
        )


def _fragments(value: bytes) -> Iterator[memoryview]:
    """The fragments of encapsulated pixel data, Basic Offset Table excluded (PS3.5 A.4)."""
    view = memoryview(value)
    pos = 0
    first = True
    while pos + 8 <= len(view):
        tag, length = struct.unpack_from("<LL", view, pos)
        if tag == 0xE0DDFFFE:  # Sequence Delimitation Item (group FFFE read as one LE long)
            return
        if tag != 0xE000FFFE or length == 0xFFFFFFFF:
            raise CannotTranscode("the encapsulated pixel data is malformed (PS3.5 A.4)")
        pos += 8
        if not first:
            yield view[pos : pos + length]
        first = False
        pos += length


_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC)}) | {
    0xCD,
    0xCE,
    0xCF,
    0xF7,  # JPEG-LS SOF55 (ISO/IEC 14495-1)
}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_size(data: memoryview) -> tuple[int, int, int, int] | None:
    """(columns, rows, components, precision) from a JPEG or JPEG-LS frame header.

    Walks the marker segments from SOI (ISO/IEC 10918-1 B.2, 14495-1 C.2) to the first SOFn;
    ``None`` if the header cannot be read before the scan starts.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # SOS or EOI before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF:
            if pos + 10 > len(data):
                return None
            precision = data[pos + 4]
            rows, columns = struct.unpack_from(">HH", data, pos + 5)
            return columns, rows, data[pos + 9], precision
        pos += 2 + length
    return None


_SOC_SIZ = b"\xff\x4f\xff\x51"


def _j2k_size(data: memoryview) -> tuple[int, int, int, int] | None:
    """(columns, rows, components, largest precision) from a JPEG 2000 SIZ marker segment.

    ISO/IEC 15444-1 A.5.1 (also HTJ2K, 15444-15); the codestream may sit in a JP2 box.
    """
    start = bytes(data[:65536]).find(_SOC_SIZ)
    if start < 0:
        return None
    pos = start + 4
    if pos + 38 > len(data):
        return None
    _lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">HHLLLL", data, pos)
    (csiz,) = struct.unpack_from(">H", data, pos + 36)
    if pos + 38 + 3 * csiz > len(data) or csiz == 0:
        return None
    precision = max((data[pos + 38 + 3 * i] & 0x7F) + 1 for i in range(csiz))
    return max(xsiz - xosiz, 0), max(ysiz - yosiz, 0), csiz, precision


_SIGNATURES = (b"\xff\xd8", _SOC_SIZ, b"\x00\x00\x00\x0cjP  ")


def _check_codestreams(ds: Dataset, stored_ts: str) -> None:
    """Refuse codestreams that announce a larger image than the DICOM header (SR-13).

    A codec sizes its output from the codestream header, not from Rows and Columns; every
    fragment that starts a codestream is checked so that the bound of
    :func:`_check_pixel_size` holds for what the codec allocates. RLE decoders size their
    output from the DICOM header (PS3.5 Annex G), so RLE needs no check.
    """
    if stored_ts in _JPEG_FAMILY:
        reader = _jpeg_size
    elif stored_ts in _JPEG_2000_FAMILY:
        reader = _j2k_size
    else:
        return
    geometry = _geometry(ds)
    value = ds[_PIXEL_DATA].value
    if not isinstance(value, bytes):
        raise CannotTranscode("the stored pixel data is not encapsulated (PS3.5 A.4)")
    for fragment in _fragments(value):
        if not bytes(fragment[:12]).startswith(_SIGNATURES):
            continue  # a continuation fragment of a frame
        size = reader(fragment)
        if size is None:
            raise CannotTranscode("a codestream header in the pixel data cannot be read")
        columns, rows, components, precision = size
        # A height of 0 leaves it to a DNL marker after the scan (ISO/IEC 10918-1 B.2.5).
        if (
            columns > geometry.columns
            or rows > geometry.rows
            or rows == 0
            or components > geometry.samples
            or math.ceil(precision / 8) > geometry.bytes_per_sample
        ):
            raise CannotTranscode(
                f"a codestream announces {columns} x {rows} x {components} samples of "
                f"{precision} bits, more than the header's {geometry.columns} x "
                f"{geometry.rows} x {geometry.samples} of {8 * geometry.bytes_per_sample} bits"
            )


def _decompress(ds: FileDataset, stored_ts: str) -> None:
    """Decode encapsulated pixel data in place to native pixel data (PS3.5 A.4 to 8.1.1).

    A lossy codestream is decoded to RGB when it holds YCbCr (``as_rgb``), the usual decoded
    form of JPEG; a lossless one is decoded as it was encoded. pydicom sets Photometric
    Interpretation, Planar Configuration and Number of Frames to match the decoded data.
    """
    as_rgb = stored_ts not in LOSSLESS_ENCAPSULATED
    try:
        pixel_utils.decompress(ds, as_rgb=as_rgb, generate_instance_uid=False)
    except Exception as exc:  # the codec plugins raise anything; re-raised as CannotTranscode
        raise CannotTranscode(
            f"decoding the {_name(stored_ts)} pixel data failed: {_one_line(exc)}"
        ) from exc
    # The Extended Offset Table describes encapsulated frames only (PS3.3 C.7.6.3).
    for tag in _EXTENDED_OFFSET_TABLE:
        if tag in ds:
            del ds[tag]


def _compress(ds: FileDataset, target_ts: str) -> None:
    """Encode native pixel data in place into a lossless encapsulated form (PS3.5 A.4).

    pydicom's encoders read a native buffer as if its samples were interleaved; pixel data
    stored colour-by-plane (Planar Configuration 1, PS3.3 C.7.6.3.1.3) is handed to them as
    an array instead, and written interleaved (Planar Configuration 0).
    """
    try:
        if ds.get("SamplesPerPixel", 1) > 1 and ds.get("PlanarConfiguration") == 1:
            decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
            options: dict[str, Any] = {"as_rgb": False}  # pydicom types **kwargs wrongly
            array, _ = decoder.as_array(ds, **options)
            ds.PlanarConfiguration = 0
            pixel_utils.compress(ds, target_ts, array, generate_instance_uid=False)
        else:
            pixel_utils.compress(ds, target_ts, generate_instance_uid=False)
    except Exception as exc:  # the codec plugins raise anything; re-raised as CannotTranscode
        raise CannotTranscode(
            f"encoding the pixel data as {_name(target_ts)} failed: {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    """The message of a codec's exception on one line (they span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _name(uid: str) -> str:
    ts = TRANSFER_SYNTAX_BY_UID.get(uid)
    return ts.name if ts else uid


# Byte-swap widths of the binary VRs in Explicit VR Big Endian (PS3.5 7.3, Table 6.2-1).
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap(value: bytes, width: int, what: str) -> bytes:
    if width == 1:
        return value
    if len(value) % width:
        raise CannotTranscode(f"{what} has a length that is not a multiple of {width}")
    return np.frombuffer(value, dtype=f"u{width}").byteswap().tobytes()


def _to_little_endian(ds: Dataset) -> None:
    """Turn a data set read from Explicit VR Big Endian into one that writes as little endian.

    pydicom re-encodes numbers and text itself but copies the bytes of OW, OF, OL, OD and
    OV values (PS3.5 7.3): those are swapped here, in nested sequences too. Pixel Data is
    swapped per sample as pydicom reads it (Bits Allocated 16, 32, 64), and per 16-bit word
    when 8-bit or 1-bit data was encoded as OW. UN values cannot be swapped (their structure
    is unknown) and are copied.
    """
    bits_allocated = ds.get("BitsAllocated")
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _to_little_endian(item)
            continue
        width = _SWAP_WIDTH.get(elem.VR)
        if elem.tag == _PIXEL_DATA and isinstance(bits_allocated, int) and bits_allocated > 8:
            width = bits_allocated // 8 if bits_allocated in (16, 32, 64) else width
        if width is None or not elem.value:
            continue
        elem.value = _swap(elem.value, width, f"{elem.keyword or elem.tag} ({elem.VR})")
    if isinstance(ds, FileDataset):
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)


def _encode(ds: Dataset, target_ts: str) -> bytes:
    """Encode the data set (no File Meta) in *target_ts* (PS3.5 section 7, A.1-A.5)."""
    target = TRANSFER_SYNTAX_BY_UID[target_ts]
    if _PIXEL_DATA in ds:
        # Native pixel data has a defined length, encapsulated an undefined one (PS3.5 A.4).
        ds[_PIXEL_DATA].is_undefined_length = target.encapsulated
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = target.implicit_vr
    try:
        write_dataset(fp, ds)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise CannotTranscode(
            f"the data set cannot be encoded in {target.name}: {_one_line(exc)}"
        ) from exc
    encoded = fp.getvalue()
    if not target.deflated:
        return encoded
    # PS3.5 A.5: the whole data set, deflated (RFC 1951, no zlib header), padded to even.
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(encoded) + compressor.flush()
    return deflated + b"\x00" if len(deflated) % 2 else deflated
