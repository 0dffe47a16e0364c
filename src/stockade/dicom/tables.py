"""Facts of the standard that Stockade relies on, as data.

The DICOM conformance statement (``docs/conformance/dicom.md``) is written from these tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom.presentation import AllStoragePresentationContexts


@dataclass(frozen=True)
class TransferSyntax:
    """One transfer syntax (PS3.5 section 10 and Annex A; UIDs from PS3.6 Table A-1)."""

    uid: str
    name: str
    implicit_vr: bool = False
    little_endian: bool = True
    deflated: bool = False
    encapsulated: bool = False
    retired: bool = False


_TS = TransferSyntax
#: Transfer syntaxes accepted for storage and stored as received.
TRANSFER_SYNTAXES: tuple[TransferSyntax, ...] = (
    _TS("1.2.840.10008.1.2", "Implicit VR Little Endian", implicit_vr=True),
    _TS("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    _TS("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian", deflated=True),
    _TS("1.2.840.10008.1.2.2", "Explicit VR Big Endian", little_endian=False, retired=True),
    _TS("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)", encapsulated=True),
    _TS("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)", encapsulated=True),
    _TS(
        "1.2.840.10008.1.2.4.57", "JPEG Lossless, Non-Hierarchical (Process 14)", encapsulated=True
    ),
    _TS(
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        encapsulated=True,
    ),
    _TS("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless Image Compression", encapsulated=True),
    _TS(
        "1.2.840.10008.1.2.4.81",
        "JPEG-LS Lossy (Near-Lossless) Image Compression",
        encapsulated=True,
    ),
    _TS("1.2.840.10008.1.2.4.90", "JPEG 2000 Image Compression (Lossless Only)", encapsulated=True),
    _TS("1.2.840.10008.1.2.4.91", "JPEG 2000 Image Compression", encapsulated=True),
    _TS(
        "1.2.840.10008.1.2.4.201",
        "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
        encapsulated=True,
    ),
    _TS(
        "1.2.840.10008.1.2.4.202",
        "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)",
        encapsulated=True,
    ),
    _TS(
        "1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000 Image Compression", encapsulated=True
    ),
    _TS("1.2.840.10008.1.2.5", "RLE Lossless", encapsulated=True),
    _TS("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level", encapsulated=True),
    _TS("1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264 High Profile / Level 4.1", encapsulated=True),
    _TS(
        "1.2.840.10008.1.2.4.103",
        "MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1",
        encapsulated=True,
    ),
)
TRANSFER_SYNTAX_BY_UID: dict[str, TransferSyntax] = {ts.uid: ts for ts in TRANSFER_SYNTAXES}

#: Explicit VR Little Endian, the transfer syntax of File Meta Information (PS3.10 7.1).
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

#: Verification SOP Class (PS3.4 Annex A).
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: Every Storage SOP Class (PS3.4 Annex B.5) that the toolkit knows, accepted by default.
STORAGE_SOP_CLASSES: dict[str, str] = {
    str(cx.abstract_syntax): str(getattr(cx.abstract_syntax, "name", ""))
    for cx in AllStoragePresentationContexts
}


#: Compressed pixel media types (PS3.18 Table 8.7.3-5) and the transfer syntaxes they carry:
#: WADO-RS frames and bulk data, STOW-RS bulk Pixel Data.
PIXEL_MEDIA_TYPES: dict[str, frozenset[str]] = {
    "image/jpeg": frozenset(
        {
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70",
        }
    ),
    "image/jls": frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}),
    "image/jp2": frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}),
    "image/jpx": frozenset({"1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"}),
    "image/jphc": frozenset(
        {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
    ),
    "image/dicom-rle": frozenset({"1.2.840.10008.1.2.5"}),
}
