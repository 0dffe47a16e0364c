"""Write the seed corpora of the fuzz targets (``fuzz/corpus/ingest``, ``fuzz/corpus/multipart``).

Ingest seeds are files of pydicom's own test data, re-encoded small: every binary value
(pixel data, overlays, private blobs) is cut to a few bytes, encapsulated pixel data keeps
one short fragment, so each seed is a couple of KB and still covers its transfer syntax, its
sequences and its private elements. A few hostile seeds (executable preamble, trailing ZIP,
undefined lengths, C-STORE data sets in each transfer syntax) follow. Multipart seeds are
small ``multipart/related`` bodies in the input format of ``fuzz/multipart_target.py``.

The output is deterministic: run ``.venv/bin/python fuzz/make_corpus.py`` and commit it.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from pydicom import config, dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

HERE = Path(__file__).resolve().parent
INGEST = HERE / "corpus" / "ingest"
MULTIPART = HERE / "corpus" / "multipart"

config.settings.writing_validation_mode = config.IGNORE
config.settings.reading_validation_mode = config.IGNORE

#: pydicom test files (bundled with pydicom) and the seed name each becomes.
SOURCES = {
    "CT_small.dcm": "ct-explicit-le",
    "MR_small_implicit.dcm": "mr-implicit-le",
    "MR_small_bigendian.dcm": "mr-explicit-be",
    "image_dfl.dcm": "deflated",
    "JPEG2000.dcm": "jpeg2000",
    "SC_rgb_rle.dcm": "rle",
    "SC_rgb_jpeg_dcmtk.dcm": "jpeg-baseline",
    "rtplan.dcm": "rtplan-sequences",
    "rtstruct.dcm": "rtstruct-sequences",
    "reportsi.dcm": "sr-nested",
    "priv_SQ.dcm": "private-sequence",
    "nested_priv_SQ.dcm": "nested-private-sequence",
    "UN_sequence.dcm": "un-sequence",
}
#: Longest binary value kept in a seed.
MAX_BINARY = 48
#: Longest sequence kept (items).
MAX_ITEMS = 2
PE_PREAMBLE = b"MZ\x90\x00" + bytes(56) + struct.pack("<L", 0x80) + bytes(64)
#: Index of each transfer syntax in stockade.dicom.tables.TRANSFER_SYNTAXES (C-STORE seeds).
DIMSE_SYNTAX = {
    ImplicitVRLittleEndian: 0,
    ExplicitVRLittleEndian: 1,
    DeflatedExplicitVRLittleEndian: 2,
    ExplicitVRBigEndian: 3,
}


def _trim(ds: Dataset) -> None:
    """Cut binary values and long sequences, recursively."""
    for elem in list(ds):
        if elem.VR == "SQ":
            del elem.value[MAX_ITEMS:]
            for item in elem.value:
                _trim(item)
        elif elem.tag == 0x7FE00010 and elem.is_undefined_length:
            first = next((f for f in generate_fragments(elem.value) if f), b"\xff\xd9")
            first = first[:MAX_BINARY]
            ds[elem.tag] = DataElement(elem.tag, elem.VR, encapsulate([first]))
            ds[elem.tag].is_undefined_length = True
        elif elem.tag == 0x7FE00010 and "Rows" in ds:
            # Native pixel data: a 2 x 2 image, so that it still matches its description.
            ds.Rows = ds.Columns = 2
            per_pixel = ds.get("SamplesPerPixel", 1) * ds.get("BitsAllocated", 16) // 8
            elem.value = elem.value[: 4 * per_pixel].ljust(4 * per_pixel, b"\x00")
        elif isinstance(elem.value, bytes) and len(elem.value) > MAX_BINARY:
            elem.value = elem.value[:MAX_BINARY]
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = 1


def _meta(ds: Dataset, ts: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"))
    meta.MediaStorageSOPInstanceUID = UID(ds.get("SOPInstanceUID", "1.2.826.0.1.3680043.2.1143.1"))
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.2.1143.107.104.103.115")
    return meta


def _part10(ds: Dataset, ts: str, preamble: bytes = bytes(128)) -> bytes:
    ds.file_meta = _meta(ds, ts)
    ds.preamble = preamble
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _bare(ds: Dataset, ts: str) -> bytes:
    """The data set alone in *ts*, as C-STORE carries it."""
    out = DicomBytesIO()
    out.is_little_endian = ts != ExplicitVRBigEndian
    out.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(out, ds)
    raw = bytes(out.getvalue())
    if ts == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = deflater.compress(raw) + deflater.flush()
    return raw


#: pydicom's character set test files: Specific Character Set with code extensions.
CHARSETS = {
    "chrH31.dcm": "charset-iso2022-jp",
    "chrKoreanMulti.dcm": "charset-iso2022-kr",
    "chrI2.dcm": "charset-iso2022-jp-2",
    "chrX2.dcm": "charset-gb18030",
    "chrArab.dcm": "charset-arabic",
}


def _load(name: str) -> tuple[Dataset, str]:
    path = get_testdata_file(name) if name not in CHARSETS else _charset_file(name)
    if path is None:
        raise SystemExit(f"pydicom test file {name} not found")
    ds = dcmread(path, force=True)
    ts = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or ImplicitVRLittleEndian)
    _trim(ds)
    if "SOPClassUID" not in ds:  # so that the seed can get through the whole pipeline
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1143.{len(name)}.{sum(name.encode())}"
        ds.StudyInstanceUID = ds.SOPInstanceUID + ".1"
        ds.SeriesInstanceUID = ds.SOPInstanceUID + ".2"
    return ds, ts


def _charset_file(name: str) -> str | None:
    found = get_charset_files(name)
    return found[0] if found else None


def _nested(depth: int) -> Dataset:
    """A data set whose sequences nest *depth* deep, alternating defined and undefined lengths."""
    inner = Dataset()
    inner.CodeValue = "X"
    for level in range(depth):
        outer = Dataset()
        outer.CodeValue = str(level)
        elem = DataElement(0x00400260, "SQ", Sequence([inner]), is_undefined_length=level % 2 == 0)
        inner.is_undefined_length_sequence_item = level % 2 == 1
        outer.add(elem)
        inner = outer
    return inner


def _undefined_lengths(ds: Dataset) -> Dataset:
    """A copy whose sequences and items all have undefined lengths (PS3.5 7.5.2)."""
    copy = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            items = Sequence([_undefined_lengths(item) for item in elem.value])
            for item in items:
                item.is_undefined_length_sequence_item = True
            new = DataElement(elem.tag, "SQ", items, is_undefined_length=True)
            copy.add(new)
        else:
            copy.add(elem)
    return copy


def ingest_seeds() -> dict[str, bytes]:
    """The ingest corpus: file name to bytes."""
    seeds: dict[str, bytes] = {}
    for source, name in SOURCES.items():
        ds, ts = _load(source)
        seeds[f"{name}.dcm"] = _part10(ds, ts)
    ct, _ts = _load("CT_small.dcm")
    seeds["pe-preamble.dcm"] = _part10(ct, ExplicitVRLittleEndian, PE_PREAMBLE)
    zip_tail = b"PK\x05\x06" + bytes(18)  # an empty ZIP archive after the pixel data
    seeds["trailing-zip.dcm"] = _part10(ct, ExplicitVRLittleEndian) + zip_tail
    plan, _ts = _load("rtplan.dcm")
    seeds["undefined-lengths.dcm"] = _part10(_undefined_lengths(plan), ExplicitVRLittleEndian)
    seeds.update(_payload_seeds())
    for source, name in CHARSETS.items():
        ds, ts = _load(source)
        seeds[f"{name}.dcm"] = _part10(ds, ts)
    deep = _nested(8)  # at the target's max_depth (8): one more level crosses it
    deep.SOPClassUID = ct.SOPClassUID
    deep.SOPInstanceUID = ct.SOPInstanceUID + ".7"
    deep.StudyInstanceUID = ct.StudyInstanceUID
    deep.SeriesInstanceUID = ct.SeriesInstanceUID
    seeds["nested-8-deep.dcm"] = _part10(deep, ExplicitVRLittleEndian)
    many = Dataset()
    many.SOPClassUID = ct.SOPClassUID
    many.SOPInstanceUID = ct.SOPInstanceUID + ".8"
    many.StudyInstanceUID = ct.StudyInstanceUID
    many.SeriesInstanceUID = ct.SeriesInstanceUID
    item = Dataset()
    for group in range(0x0011, 0x0019, 2):  # 4 x 245 empty elements in one item
        block = item.private_block(group, "STOCKADE MANY", create=True)
        for offset in range(245):
            block.add_new(offset, "UN", b"")
    item.is_undefined_length_sequence_item = True
    many.add(DataElement(0x00081140, "SQ", Sequence([item]), is_undefined_length=True))
    # 994 elements in all, under the target's max_elements (1000): zeros inserted into the
    # item (8 zero bytes are an empty implicit VR element) cross it.
    seeds["many-elements.dcm"] = _part10(many, ImplicitVRLittleEndian)
    del ct.file_meta
    for ts, index in DIMSE_SYNTAX.items():
        name = {0: "implicit-le", 1: "explicit-le", 2: "deflated", 3: "explicit-be"}[index]
        seeds[f"cstore-{name}.bin"] = bytes([index]) + _bare(ct, ts)
    return seeds


def _payload_seeds() -> dict[str, bytes]:
    """Hidden payloads of the threat model (SR-20), one per finding type of the inspector."""
    pe = b"MZ" + bytes(58) + struct.pack("<L", 64) + b"PE\x00\x00" + bytes(28)
    elf = b"\x7fELF\x02\x01\x01" + bytes(57)
    out: dict[str, bytes] = {}
    ds = _small_image(1)
    ds.private_block(0x0009, "STOCKADE SEED", create=True).add_new(0x10, "OB", pe)
    out["payload-private-pe.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    ds = _small_image(2)
    ds.add_new(0x00091010, "LO", "no creator")
    ds.add_new(0x00090000, "UL", 18)
    out["private-without-creator-group-length.dcm"] = _part10(ds, ImplicitVRLittleEndian)
    ds = _small_image(3)
    ds.add_new(0xFFFCFFFC, "OB", pe)
    out["trailing-padding-pe.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    ds = _small_image(4)
    ds.file_meta = _meta(ds, ExplicitVRLittleEndian)
    ds.file_meta.PrivateInformationCreatorUID = UID("1.2.826.0.1.3680043.2.1143.9")
    ds.file_meta.PrivateInformation = elf
    ds.preamble = bytes(128)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out["file-meta-private-elf.dcm"] = buf.getvalue()
    ds = _small_image(5)
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj << /OpenAction << /JavaScript (x) >> >>\n%%EOF\n"
    out["pdf-javascript.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    ds = _small_image(6)
    ds.add_new(0x00420011, "OB", b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'f'>]>")
    out["xml-entity.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    ds = _small_image(7)
    ds.PixelData = encapsulate([pe])  # an executable as the first pixel data fragment
    ds["PixelData"].is_undefined_length = True
    out["fragment-pe.dcm"] = _part10(ds, JPEGBaseline8Bit)
    ds = _small_image(8)
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    hidden = zlib.compress(b"<< /Type /Action /S /JavaScript /JS (app.alert(1)) >>")
    ds.EncapsulatedDocument = (
        b"%PDF-1.5\n1 0 obj << /Length "
        + str(len(hidden)).encode()
        + b" /Filter /FlateDecode >>\nstream\n"
        + hidden
        + b"\nendstream\nendobj\n%%EOF\n"
    )
    out["pdf-flate-javascript.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    ds = _small_image(9)
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.2"  # Encapsulated CDA Storage
    ds.MIMETypeOfEncapsulatedDocument = "text/XML"
    ds.EncapsulatedDocument = b"<ClinicalDocument/>\n" + elf
    out["document-elf.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    ds = _small_image(10)
    item = Dataset()
    item.private_block(0x0009, "STOCKADE SEED", create=True).add_new(
        0x10, "OB", b"\xcf\xfa\xed\xfe" + bytes(28)
    )
    item.private_block(0x0011, "STOCKADE SEED", create=True).add_new(0x10, "OB", b"#!/bin/sh\n")
    ds.ReferencedImageSequence = Sequence([item])
    out["nested-macho-script.dcm"] = _part10(ds, ExplicitVRLittleEndian)
    return out


def _small_image(number: int) -> Dataset:
    """A small CT image with fixed UIDs (its own SOP Instance UID per *number*)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1143.7.1.{number}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1143.7.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1143.7.3"
    ds.PatientName = "Seed^Payload"
    ds.PatientID = "SEED-1"
    ds.Modality = "CT"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(4)
    return ds


def _multipart(
    boundary: bytes,
    parts: list[tuple[bytes, bytes]],
    *,
    chunk: int = 7,
    profile: int = 0,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    padding: bytes = b"",
) -> bytes:
    """One multipart seed: chunk-size byte, limits byte, boundary line, then the body."""
    body = preamble + (b"\r\n" if preamble else b"")
    for headers, data in parts:
        body += b"--" + boundary + padding + b"\r\n" + headers + b"\r\n" + data + b"\r\n"
    body += b"--" + boundary + b"--" + epilogue
    return bytes([chunk, profile]) + boundary + b"\r\n" + body


def multipart_seeds(dicom: bytes) -> dict[str, bytes]:
    """The multipart corpus: file name to bytes (*dicom* is a small Part 10 file)."""
    ct = b"Content-Type: application/dicom\r\n"
    folded = b"Content-Type: application/dicom;\r\n\ttransfer-syntax=1.2.840.10008.1.2.1\r\n"
    tricky = b"\r\n--b0UNd\r\n-" + b"--b0UNd-ar" + b"\r\r\n\n--"
    return {
        "one-part.bin": _multipart(b"b0UNd-ary", [(ct, dicom)]),
        "two-parts.bin": _multipart(b"XyZ", [(ct, dicom[:200]), (ct, dicom[200:400])], chunk=1),
        "preamble-epilogue.bin": _multipart(
            b"b0UNd-ary", [(ct, b"abc")], preamble=b"ignored", epilogue=b"\r\nafter", chunk=3
        ),
        "padding.bin": _multipart(b"b", [(ct, b"x")], padding=b" \t ", chunk=2),
        "no-headers.bin": _multipart(b"b0UNd-ary", [(b"", b"no headers")], chunk=5),
        "folded-headers.bin": _multipart(
            b"'()+_,-./:=? end",
            [(folded, b"")],
        ),
        "tricky-body.bin": _multipart(b"b0UNd-ary", [(ct, tricky), (ct, tricky[::-1])], chunk=4),
        "other-type-large.bin": _multipart(
            b"b0UNd-ary",
            [(b"Content-Type: application/json\r\n", b"{}" * 40), (ct, b"z" * 300)],
            profile=1,
        ),
    }


def main() -> None:
    """Write both corpora (existing files of the same names are replaced)."""
    INGEST.mkdir(parents=True, exist_ok=True)
    MULTIPART.mkdir(parents=True, exist_ok=True)
    seeds = ingest_seeds()
    for name, data in seeds.items():
        (INGEST / name).write_bytes(data)
    for name, data in multipart_seeds(seeds["rtplan-sequences.dcm"][:600]).items():
        (MULTIPART / name).write_bytes(data)
    sizes = sum(len(d) for d in seeds.values())
    print(f"{len(seeds)} ingest seeds ({sizes} bytes) in {INGEST}")


if __name__ == "__main__":
    main()
