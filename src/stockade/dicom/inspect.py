"""Hidden-payload and structure inspection of received objects (PS3.10 section 7.5).

A DICOM file can be a disguised program (CVE-2019-11687): an executable header in the 128-byte
preamble, the program itself in an opaque element, a ZIP after the data set. PS3.10 7.5 asks
readers to sanitise the preamble and to look for executable content anywhere in the file. This
module finds such things; :mod:`stockade.security` decides what happens to the object.

What is looked at, and the finding each produces (``docs/security.md`` has the full table):

- the preamble (PS3.10 7.1): executable or markup headers;
- values that may hold anything: OB, OW, OD, OF, OL, OV and UN values, every private value
  (PS3.5 7.8), File Meta private information (0002,0102) and Data Set Trailing Padding
  (FFFC,FFFC): executable headers at the start or embedded (PE, ELF, Mach-O, scripts) and
  markup at the start;
- pixel data (native, and each encapsulated fragment, PS3.5 A.4): executable headers at the
  start only, since random pixels may hold any short byte pattern;
- encapsulated documents (0042,0011, PS3.3 C.24.2): PDF active content (JavaScript, launch
  actions, embedded files, also inside Flate streams) and XML entity declarations in CDA;
- structure: group lengths (PS3.5 7.2) that are not a 4-byte UL, private elements without
  their Private Creator (PS3.5 7.8.1), padding that is not blank, bytes after the end of the
  data set.

The walk is the one bounded walk of :func:`~stockade.dicom.parse.scan`; the inspector is its
visitor, so nothing is parsed twice and every offset was already checked against the buffer.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from enum import StrEnum

from stockade.dicom.part10 import PreambleKind

Buffer = bytes | bytearray | memoryview


class Kind(StrEnum):
    """Finding types (stable names: settings, audit records and reports use them)."""

    EXECUTABLE_PREAMBLE = "executable-preamble"
    MARKUP_PREAMBLE = "markup-preamble"
    EXECUTABLE_PAYLOAD = "executable-payload"
    MARKUP_PAYLOAD = "markup-payload"
    ACTIVE_PDF = "active-pdf"
    XML_ENTITY = "xml-entity"
    POLYGLOT_TRAILER = "polyglot-trailer"
    TRAILING_DATA = "trailing-data"
    TRAILING_PADDING = "trailing-padding"
    FILE_META_PRIVATE = "file-meta-private"
    GROUP_LENGTH = "group-length"
    PRIVATE_WITHOUT_CREATOR = "private-without-creator"


@dataclass(frozen=True)
class Finding:
    """One thing found in an object.

    Attributes
    ----------
    kind : Kind
    where : str
        Where it is: ``preamble``, an element tag such as ``(0009,1010)`` (with its nesting
        path when nested), ``file meta (0002,0102)``, ``after the data set``.
    detail : str
        What it is, for people (never the payload itself).
    cut : tuple of int, optional
        Byte range of the scanned data set that removes it (a top-level element), when
        stripping it means cutting those bytes.
    dropped : bool
        True when Stockade never stores this part anyway (the preamble, File Meta, bytes after
        the data set): stripping it costs nothing.
    """

    kind: Kind
    where: str
    detail: str
    cut: tuple[int, int] | None = None
    dropped: bool = False

    @property
    def strippable(self) -> bool:
        """Whether the object can be stored without it."""
        return self.dropped or self.cut is not None


def tag_text(tag: int) -> str:
    """``(gggg,eeee)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# -- executable and markup signatures ------------------------------------------------------

_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
_FAT = b"\xca\xfe\xba\xbe"  # Mach-O universal binary, also a Java class file
#: Embedded headers worth a closer look: DOS/PE, ELF, Mach-O.
_EMBEDDED = re.compile(
    rb"MZ|\x7fELF[\x01\x02][\x01\x02]\x01|\xfe\xed\xfa[\xce\xcf]|[\xce\xcf]\xfa\xed\xfe"
)
#: At most this many candidate headers are examined in one value (each check is O(1)).
MAX_CANDIDATES = 10_000
_MARKUP = re.compile(
    rb"(?i)\s*(<(!doctype|html|head|body|script|svg|iframe|object|embed|\?xml|xml|meta|a\s)"
    rb"|%PDF-)"
)
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def _pe_at(view: memoryview, pos: int) -> bool:
    """A DOS header at *pos* whose ``e_lfanew`` (offset 0x3C) points at ``PE\\0\\0``."""
    if len(view) - pos < 0x40:
        return False
    (lfanew,) = struct.unpack_from("<L", view, pos + 0x3C)
    target = pos + lfanew
    return (
        lfanew >= 0x40 and target + 4 <= len(view) and bytes(view[target : target + 4]) == b"PE\0\0"
    )


def executable_at(view: memoryview, pos: int = 0) -> str | None:
    """Name the executable format whose header starts at *pos*, if any.

    Only strong signatures count: a DOS header with a valid PE offset, a bare PE header, ELF
    with a valid class, data and version byte, Mach-O and universal binaries, ``#!/`` scripts.
    """
    head = bytes(view[pos : pos + 8])
    if head.startswith(b"MZ") and (
        _pe_at(view, pos) or b"This program" in bytes(view[pos : pos + 512])
    ):
        return "PE/DOS executable"
    if head.startswith(b"PE\0\0"):
        return "PE executable header"
    if head.startswith(b"\x7fELF") and len(head) >= 7 and head[4] in (1, 2) and head[5] in (1, 2):
        return "ELF executable"
    if head.startswith(_MACHO):
        return "Mach-O executable"
    if head.startswith(_FAT) and len(head) == 8 and 0 < struct.unpack(">L", head[4:])[0] < 32:
        return "Mach-O universal binary"
    if head.startswith((b"#!/", b"#! /")):
        return "script (#!)"
    return None


def embedded_executable(view: memoryview) -> tuple[int, str] | None:
    """The first executable header anywhere in *view*: (offset, format), at most
    :data:`MAX_CANDIDATES` candidates examined."""
    for n, match in enumerate(_EMBEDDED.finditer(view)):
        if n >= MAX_CANDIDATES:
            break
        found = executable_at(view, match.start())
        if found:
            return match.start(), found
    return None


def markup_at_start(view: memoryview) -> str | None:
    """Name the markup (HTML, XML, SVG, PDF) a value starts with, if any."""
    head = bytes(view[:256])
    for bom in _BOMS:
        if head.startswith(bom):
            head = head[len(bom) :]
            break
    head = head.lstrip(b"\x00")
    match = _MARKUP.match(head)
    if not match:
        return None
    return "PDF document" if match.group(1).startswith(b"%") else "HTML/XML markup"


def payload(view: memoryview, *, anywhere: bool) -> tuple[Kind, str] | None:
    """What an opaque value holds that it should not: an executable at its start (or, with
    *anywhere*, embedded in it), else markup at its start."""
    found = executable_at(view)
    if found:
        return Kind.EXECUTABLE_PAYLOAD, f"{found} at the start of the value"
    if anywhere:
        embedded = embedded_executable(view)
        if embedded:
            return Kind.EXECUTABLE_PAYLOAD, f"{embedded[1]} at byte {embedded[0]} of the value"
    markup = markup_at_start(view)
    if markup:
        return Kind.MARKUP_PAYLOAD, f"{markup} at the start of the value"
    return None


# -- encapsulated documents ----------------------------------------------------------------

#: PDF names that make a document act rather than show (ISO 32000-1 12.6, 7.11.4, 12.7).
ACTIVE_PDF_NAMES = frozenset(
    {"JavaScript", "JS", "Launch", "EmbeddedFile", "EmbeddedFiles", "RichMedia", "XFA"}
    | {"SubmitForm", "ImportData", "GoToE"}
)
_PDF_NAME = re.compile(rb"/([A-Za-z0-9#]{2,40})")
_PDF_HEX = re.compile(rb"#([0-9A-Fa-f]{2})")
_PDF_STREAM = re.compile(rb"stream\r?\n")
#: Flate streams of a PDF are inflated up to this many bytes in all, and this many streams.
MAX_PDF_INFLATED = 64 * 1024 * 1024
MAX_PDF_STREAMS = 10_000
_XML_ENTITY = re.compile(rb"(?i)<!ENTITY|<!DOCTYPE[^>\[]*(SYSTEM|PUBLIC)")


def _pdf_names(data: Buffer) -> set[str]:
    names = set()
    for match in _PDF_NAME.finditer(data):
        raw = _PDF_HEX.sub(lambda m: bytes([int(m.group(1), 16)]), match.group(1))
        names.add(raw.decode("latin-1"))
    return names & ACTIVE_PDF_NAMES


def active_pdf(view: memoryview) -> list[str]:
    """The active-content names of a PDF (names may be hex-escaped, ISO 32000-1 7.3.5, or
    hidden in Flate-compressed object streams, which are inflated with a cap)."""
    found = _pdf_names(view)
    budget = MAX_PDF_INFLATED
    for n, match in enumerate(_PDF_STREAM.finditer(view)):
        if n >= MAX_PDF_STREAMS or budget <= 0:
            break
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(view[match.end() :], budget)
        except zlib.error:
            continue
        budget -= len(out)
        found |= _pdf_names(out)
    return sorted(found)


def xml_entities(view: memoryview) -> bool:
    """Whether an XML document declares entities or an external DTD (the XXE vector)."""
    head = bytes(view[:2])
    if head in (b"\xff\xfe", b"\xfe\xff"):
        limit = min(len(view), 64 * 1024 * 1024) & ~1
        text = bytes(view[2:limit]).decode(
            "utf-16-le" if head == b"\xff\xfe" else "utf-16-be", "replace"
        )
        return _XML_ENTITY.search(text.encode("utf-8", "replace")) is not None
    return _XML_ENTITY.search(view) is not None


# -- the walk ------------------------------------------------------------------------------

ENCAPSULATED_DOCUMENT = 0x00420011
PIXEL_DATA = 0x7FE00010
TRAILING_PADDING = 0xFFFCFFFC
FILE_META_PRIVATE = 0x00020102
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_US_TAGS = {0x00280002: "samples", 0x00280010: "rows", 0x00280011: "columns", 0x00280100: "bits"}
NUMBER_OF_FRAMES = 0x00280008
PHOTOMETRIC_INTERPRETATION = 0x00280004


class Inspector:
    """The :class:`~stockade.dicom.parse.Visitor` that looks at every element of a data set.

    Parameters
    ----------
    buf : bytes-like
        The buffer :func:`~stockade.dicom.parse.scan` walks.
    little_endian : bool
        Byte order of the data set (to read the pixel description).
    """

    def __init__(self, buf: Buffer, *, little_endian: bool = True) -> None:
        self.view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        self.little = little_endian
        self.findings: list[Finding] = []
        #: Private Creator blocks (group, block) of the data set at each depth (PS3.5 7.8.1).
        self._creators: list[set[tuple[int, int]]] = [set()]
        self._path: list[str] = []
        #: Top-level pixel description: rows, columns, samples, bits, frames.
        self.pixels: dict[str, int] = {}
        self.pixel_data: tuple[str, int, int] | None = None
        self.encapsulated = False
        self.photometric = ""

    # Visitor protocol ---------------------------------------------------------------------

    def item(self, depth: int) -> None:
        """A new item data set at *depth*: its private creators start afresh."""
        del self._creators[depth:]
        while len(self._creators) <= depth:
            self._creators.append(set())

    def fragment(self, start: int, end: int) -> None:
        """An encapsulated pixel data fragment: only its start is checked."""
        self.encapsulated = True
        found = executable_at(self.view[start:end])
        if found:
            self._add(Kind.EXECUTABLE_PAYLOAD, "(7FE0,0010) fragment", f"{found} at its start")

    def element(self, tag: int, vr: str, header: int, start: int, end: int, depth: int) -> None:
        """Check one element (see the module docstring for what is checked)."""
        while len(self._creators) <= depth:
            self._creators.append(set())
        group, elem = tag >> 16, tag & 0xFFFF
        where = tag_text(tag) if depth == 0 else f"{tag_text(tag)} at depth {depth}"
        cut = (header, end) if depth == 0 else None
        if depth == 0:
            self._describe(tag, vr, start, end)
        value = self.view[start:end]
        if elem == 0 and group not in (0x0000, 0x0002) and (vr != "UL" or end - start != 4):
            # A well-formed retired group length is harmless; one of another shape is the
            # carrier element of the PE/DICOM proof of concept.
            self._add(
                Kind.GROUP_LENGTH,
                where,
                f"group length (PS3.5 7.2) with VR {vr} and {end - start} bytes",
                cut,
            )
        private = bool(group & 1)
        if private:
            block = (group, elem >> 8)
            if 0x0010 <= elem <= 0x00FF:
                self._creators[depth].add((group, elem))
            elif elem < 0x0010 and elem != 0:
                self._add(Kind.PRIVATE_WITHOUT_CREATOR, where, "reserved private element", cut)
            elif elem >= 0x1000 and block not in self._creators[depth]:
                self._add(
                    Kind.PRIVATE_WITHOUT_CREATOR,
                    where,
                    f"private element without a Private Creator ({group:04X},00{elem >> 8:02X})",
                    cut,
                )
        if vr == "SQ":
            return
        if tag == PIXEL_DATA and depth == 0:
            self.pixel_data = (vr, start, end)
            if not self.encapsulated:  # fragments were visited before their element
                found = executable_at(value)
                if found:
                    self._add(Kind.EXECUTABLE_PAYLOAD, where, f"{found} at its start", cut)
            return
        if tag == ENCAPSULATED_DOCUMENT:
            self._document(value, where, cut)
            return
        if tag == TRAILING_PADDING and bytes(value).strip(b"\x00 "):
            self._add(
                Kind.TRAILING_PADDING, where, f"{end - start} bytes of padding, not all blank", cut
            )
        if private or vr in _BINARY_VRS or tag == TRAILING_PADDING:
            hit = payload(value, anywhere=True)
            if hit:
                self._add(hit[0], where, hit[1], cut)

    # helpers ------------------------------------------------------------------------------

    def _add(self, kind: Kind, where: str, detail: str, cut: tuple[int, int] | None = None) -> None:
        self.findings.append(Finding(kind, where, detail, cut))

    def _describe(self, tag: int, vr: str, start: int, end: int) -> None:
        name = _US_TAGS.get(tag)
        if name and end - start == 2:
            (self.pixels[name],) = struct.unpack_from(
                "<H" if self.little else ">H", self.view, start
            )
        elif tag == PHOTOMETRIC_INTERPRETATION and end - start <= 16:
            self.photometric = (
                bytes(self.view[start:end]).strip(b" \x00").decode("ascii", "replace")
            )
        elif tag == NUMBER_OF_FRAMES and end - start <= 16:
            text = bytes(self.view[start:end]).strip(b" \x00")
            if text.isdigit():
                self.pixels["frames"] = int(text)

    def _document(self, value: memoryview, where: str, cut: tuple[int, int] | None) -> None:
        head = bytes(value[:1024]).lstrip(b" \t\r\n\x00")
        if head.startswith(b"%PDF") or b"%PDF-" in head:
            names = active_pdf(value)
            if names:
                self._add(
                    Kind.ACTIVE_PDF,
                    where,
                    "PDF with active content: /" + ", /".join(names),
                )
            return
        if xml_entities(value):
            self._add(Kind.XML_ENTITY, where, "XML document declares entities or an external DTD")
            return
        hit = payload(value, anywhere=True)
        if hit and hit[0] is Kind.EXECUTABLE_PAYLOAD:
            self._add(Kind.EXECUTABLE_PAYLOAD, where, f"{hit[1]} (an encapsulated document)")

    # results ------------------------------------------------------------------------------

    def decoded_size(self) -> int | None:
        """Bytes the pixel data decodes to: Rows x Columns x Samples per Pixel x Bits
        Allocated x Number of Frames / 8 (PS3.3 C.7.6.3, PS3.5 8.1.1); None without pixels."""
        if self.pixel_data is None:
            return None
        return self._size(self.pixels.get("samples", 1))

    def native_size(self) -> int | None:
        """Bytes native (uncompressed) pixel data must hold: as :meth:`decoded_size`, but
        YBR_FULL_422 stores two samples per pixel (PS3.3 C.7.6.3.1.2)."""
        if self.pixel_data is None:
            return None
        samples = self.pixels.get("samples", 1)
        if self.photometric.startswith("YBR_") and "422" in self.photometric:
            samples = min(samples, 2)
        return self._size(samples)

    def _size(self, samples: int) -> int:
        p = self.pixels
        bits = p.get("rows", 0) * p.get("columns", 0) * samples * p.get("bits", 8)
        return (bits * max(p.get("frames", 1), 1) + 7) // 8


def inspect_preamble(kind: PreambleKind) -> list[Finding]:
    """Findings of a classified preamble (PS3.10 7.5)."""
    if kind is PreambleKind.EXECUTABLE:
        return [Finding(Kind.EXECUTABLE_PREAMBLE, "preamble", "executable header", dropped=True)]
    if kind is PreambleKind.MARKUP:
        return [Finding(Kind.MARKUP_PREAMBLE, "preamble", "HTML/XML/PDF header", dropped=True)]
    return []


def inspect_trailing(view: memoryview) -> list[Finding]:
    """Findings of the bytes after the end of the data set (never stored)."""
    if not len(view):
        return []
    where = "after the data set"
    head = bytes(view[:8])
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or b"PK\x05\x06" in bytes(view[-65557:]):
        what = "a ZIP archive"
    elif found := executable_at(view):
        what = f"a {found}"
    elif head.startswith(b"%PDF"):
        what = "a PDF document"
    elif markup_at_start(view):
        what = "markup"
    elif embedded := embedded_executable(view):
        what = f"a {embedded[1]} at byte {embedded[0]}"
    else:
        return [Finding(Kind.TRAILING_DATA, where, f"{len(view)} bytes", dropped=True)]
    return [
        Finding(Kind.POLYGLOT_TRAILER, where, f"{len(view)} bytes holding {what}", dropped=True)
    ]


def inspect_meta_private(value: memoryview) -> list[Finding]:
    """Findings of File Meta Private Information (0002,0102), never stored (PS3.10 7.1)."""
    where = "file meta (0002,0102)"
    findings = [Finding(Kind.FILE_META_PRIVATE, where, f"{len(value)} bytes", dropped=True)]
    hit = payload(value, anywhere=True)
    if hit:
        findings.append(Finding(hit[0], where, hit[1], dropped=True))
    return findings
