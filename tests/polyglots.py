"""Polyglots and hidden payloads built for the tests (threat model T-20), never downloaded.

Each builder returns inert bytes with the right headers: enough for a loader or a browser to
recognise the format, nothing that runs.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.dicomfactory import bare, make_dataset, part10

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
ENCAPSULATED_CDA = "1.2.840.10008.5.1.4.1.1.104.2"


def pe_image(size: int = 512) -> bytes:
    """A DOS header whose e_lfanew (0x3C) points at a PE header, then padding."""
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    dos[0x3C:0x40] = struct.pack("<L", 0x80)
    dos[0x40 : 0x40 + 39] = b"This program cannot be run in DOS mode."
    pe = b"PE\0\0" + struct.pack("<HH", 0x8664, 1) + bytes(16)
    return bytes(dos + pe).ljust(size, b"\0")


def elf_image(size: int = 256) -> bytes:
    """An ELF64 little-endian header."""
    return (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 0x3E)).ljust(size, b"\0")


PREAMBLES: dict[str, bytes] = {
    "pe": pe_image()[:128],
    "elf": elf_image(128),
    "macho": (b"\xcf\xfa\xed\xfe" + struct.pack("<L", 0x01000007)).ljust(128, b"\0"),
    "script": b"#!/bin/sh\necho owned\nexit 0\n".ljust(128, b"\n"),
    "html": b"<html><script>alert(document.cookie)</script></html>".ljust(128, b" "),
    "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".ljust(128, b" "),
}
"""Preambles of other formats, with the finding each must raise."""

PREAMBLE_KIND = {
    "pe": "executable-preamble",
    "elf": "executable-preamble",
    "macho": "executable-preamble",
    "script": "executable-preamble",
    "html": "markup-preamble",
    "pdf": "markup-preamble",
}

TIFF_PREAMBLE = b"II*\x00\x08\x00\x00\x00".ljust(128, b"\0")


def private_pe() -> Dataset:
    """A PE hidden in a private OB element (with its Private Creator)."""
    ds = make_dataset()
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, "OB", pe_image(4096))
    return ds


def nested_pe() -> Dataset:
    """A PE in a private OB element inside a sequence item (cannot be cut out)."""
    ds = make_dataset()
    item = Dataset()
    item.add_new(0x00290010, "LO", "ACME 1.0")
    item.add_new(0x00291001, "OB", b"\x00" * 64 + pe_image(2048))
    ds.add_new(0x00081115, "SQ", [item])  # Referenced Series Sequence
    return ds


def padding_pe() -> Dataset:
    """A PE in Data Set Trailing Padding (FFFC,FFFC)."""
    ds = make_dataset()
    ds.add_new(0xFFFCFFFC, "OB", pe_image(1024))
    return ds


def proof_of_concept() -> tuple[Dataset, bytes]:
    """The published PE/DICOM shape: a bogus group length (0009,0000) with VR OB holding
    the PE header and program, encoded by hand (writers drop group lengths)."""
    ds = make_dataset()
    raw = bare(ds)
    value = b"PE\0\0" + pe_image(4096)[4:]
    element = b"\x09\x00\x00\x00OB\x00\x00" + struct.pack("<L", len(value)) + value
    at = raw.index(b"\x10\x00\x10\x00PN")  # before Patient's Name, the first of group 0010
    return ds, raw[:at] + element + raw[at:]


def as_file(ds: Dataset, raw: bytes) -> bytes:
    """A Part 10 file (Explicit VR Little Endian) around an encoded data set *raw*."""
    whole = part10(ds)
    return whole[: len(whole) - len(bare(ds))] + raw


def active_pdf(hidden: bool = False) -> Dataset:
    """An Encapsulated PDF whose catalog runs JavaScript (plainly, or hex-escaped inside a
    Flate-compressed object stream when *hidden*)."""
    if hidden:
        obj = b"<< /Type /Catalog /OpenAction << /S /J#61vaScript /JS (app.alert(1)) >> >>"
        stream = zlib.compress(obj)
        pdf = (
            b"%PDF-1.5\n1 0 obj << /Type /ObjStm /Filter /FlateDecode /Length "
            + str(len(stream)).encode()
            + b" >>\nstream\n"
            + stream
            + b"\nendstream endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
        )
    else:
        pdf = (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog /OpenAction << /S /JavaScript "
            b"/JS (app.alert(1)) >> >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
        )
    return _document(ENCAPSULATED_PDF, "application/pdf", pdf)


def harmless_pdf() -> Dataset:
    """An Encapsulated PDF with nothing active in it."""
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n%%EOF\n"
    return _document(ENCAPSULATED_PDF, "application/pdf", pdf)


def cda_with_entity() -> Dataset:
    """An Encapsulated CDA declaring an external entity (XXE)."""
    xml = (
        b'<?xml version="1.0"?>\n<!DOCTYPE doc [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        b'<ClinicalDocument xmlns="urn:hl7-org:v3">&xxe;</ClinicalDocument>\n'
    )
    return _document(ENCAPSULATED_CDA, "text/XML", xml)


def _document(sop_class: str, mime: str, body: bytes) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-1"
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = mime
    ds.EncapsulatedDocument = body if len(body) % 2 == 0 else body + b"\n"
    return ds


def zip_appended(ds: Dataset | None = None) -> bytes:
    """A Part 10 file with a ZIP archive after the data set (a DICOM/ZIP polyglot)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("payload.exe", pe_image(2048))
    return part10(ds or make_dataset()) + buf.getvalue()


def meta_elf(ds: Dataset | None = None) -> bytes:
    """A Part 10 file whose File Meta Private Information (0002,0102) holds an ELF."""
    ds = ds or make_dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.PrivateInformationCreatorUID = "1.2.3.4"
    meta.PrivateInformation = elf_image(512)
    ds.file_meta = meta
    ds.preamble = bytes(128)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _encoded(build: Callable[[], Dataset]) -> Callable[[], tuple[Dataset, bytes]]:
    def encode() -> tuple[Dataset, bytes]:
        ds = build()
        return ds, bare(ds)

    return encode


DATASET_PAYLOADS: dict[str, tuple[Callable[[], tuple[Dataset, bytes]], str]] = {
    "private-pe": (_encoded(private_pe), "executable-payload"),
    "nested-pe": (_encoded(nested_pe), "executable-payload"),
    "padding-pe": (_encoded(padding_pe), "executable-payload"),
    "proof-of-concept": (proof_of_concept, "executable-payload"),
    "active-pdf": (_encoded(active_pdf), "active-pdf"),
    "hidden-active-pdf": (_encoded(lambda: active_pdf(hidden=True)), "active-pdf"),
    "cda-entity": (_encoded(cda_with_entity), "xml-entity"),
}
"""Data sets (and their Explicit VR Little Endian encoding) that carry a payload on any
transport (C-STORE has no preamble), with the finding each must raise."""
