"""DICOM JSON as the Native DICOM Model (PS3.19 A.1) for ``application/dicom+xml`` answers.

QIDO-RS (PS3.18 10.6.3) and WADO-RS metadata (PS3.18 10.4.1.1.2) may be answered as
``multipart/related; type="application/dicom+xml"`` (PS3.18 8.7.3.2): one body part per
match or instance, each a ``NativeDicomModel`` document. Stockade builds its answers as DICOM
JSON (PS3.18 Annex F) first, from the index or the per-series metadata cache, and this module
converts that JSON (PS3.18 F.3 gives the correspondence between the two encodings); nothing
is read from the stored files again.

Each data set becomes (PS3.19 A.1.5, A.1.6)::

    <?xml version="1.0" encoding="UTF-8"?>
    <NativeDicomModel xml:space="preserve">
      <DicomAttribute tag="00100010" vr="PN" keyword="PatientName">
        <PersonName number="1">
          <Alphabetic><FamilyName>Doe</FamilyName><GivenName>Jane</GivenName></Alphabetic>
        </PersonName>
      </DicomAttribute>
      ...

- The root declares no namespace (the A.1.6 schema's default namespace is left out, so
  that plain XPath such as ``//DicomAttribute[@tag="00100010"]`` works).
- Attributes are in ascending tag order; Group Length (gggg,0000) attributes are left out
  (PS3.19 A.1.1). ``keyword`` is the PS3.6 keyword from pydicom's data dictionary, and is
  absent for a tag the dictionary does not know and for private tags (PS3.6 gives them no
  keyword). A private attribute (odd group, element xx10-xxFF) carries ``privateCreator``
  when its Private Creator Data Element (gggg,00xx) is in the same data set or item.
- ``Value`` holds each value as text, ``number`` counting from 1; an empty value of a
  multi-valued attribute (JSON ``null``) is an empty ``Value``. Numbers are written as
  Python writes them (``7``, ``0.5``, ``1e-05``).
- ``PersonName`` holds each name with its ``Alphabetic``, ``Ideographic`` and ``Phonetic``
  groups, each split on ``^`` into ``FamilyName``, ``GivenName``, ``MiddleName``,
  ``NamePrefix`` and ``NameSuffix``; empty components are left out, and components beyond
  the fifth (which PS3.5 6.2 does not allow) are kept in ``NameSuffix`` joined by ``^``.
- Sequences have one ``Item`` per item, ``number`` counting from 1.
- ``InlineBinary`` keeps the Base64 text of the JSON; ``BulkDataURI`` becomes
  ``<BulkData uri="..."/>`` with the URI unchanged.
- A VR that is not one of PS3.5 Table 6.2-1 (pydicom's undecided ``"OB or OW"`` and the
  like) is written as ``UN``.

Values are hostile: every value is escaped where it is written (about twice as fast as
building an :mod:`xml.etree.ElementTree` tree, which matters for a 1,000-instance series):
``&``, ``<`` and ``>`` always, ``"`` in attribute values, a carriage return as ``&#13;``
(and tab and line feed in attribute values as ``&#9;`` and ``&#10;``) so that the
parser's end-of-line and attribute-value normalization cannot change them; element and
attribute names are constants, tags are checked hex digits and VRs one of :data:`VRS`.
Characters that XML 1.0 cannot carry at all (C0 controls other than tab, line feed and
carriage return, e.g. the form feed LT/ST/UT allow and ESC; lone surrogates; U+FFFE and
U+FFFF) have no representation in the Native DICOM Model, and PS3.19 says nothing about
them: each is replaced by U+FFFD REPLACEMENT CHARACTER, and :attr:`XmlDocument.replaced`
counts them so that the answer can say so in a ``Warning`` header. The JSON answer carries
the same values exactly.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydicom.datadict import keyword_for_tag

from stockade.web.dicomjson import JSON_MEDIA_TYPE

if TYPE_CHECKING:  # types only: wado imports this module
    from stockade.web.wado import MediaRange

__all__ = [
    "MULTIPART_XML",
    "XML_MEDIA_TYPE",
    "XmlDocument",
    "multipart",
    "negotiate",
    "replaced_warning",
    "to_xml",
]

XML_MEDIA_TYPE = "application/dicom+xml"
#: The media type of the answer (PS3.18 8.7.3.2), without its boundary.
MULTIPART_XML = f'multipart/related; type="{XML_MEDIA_TYPE}"'

#: Value representations of PS3.5 Table 6.2-1.
VRS = frozenset(
    {
        *("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT"),
        *("OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST"),
        *("SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"),
    }
)
#: Characters XML 1.0 does not allow (XML 1.0 section 2.2, production Char), and surrogates.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'


@dataclass(frozen=True)
class XmlDocument:
    """One ``NativeDicomModel`` document.

    Attributes
    ----------
    body : bytes
        The document in UTF-8, with its XML declaration.
    replaced : int
        How many characters XML 1.0 cannot carry were replaced by U+FFFD.
    """

    body: bytes
    replaced: int


def _escape_text(text: str) -> str:
    """*text* as character data (XML 1.0 section 2.4): ``&``, ``<`` and ``>`` escaped, and
    CR as ``&#13;`` so that end-of-line handling (section 2.11) cannot make it a LF."""
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if "\r" in text:
        text = text.replace("\r", "&#13;")
    return text


def _escape_attribute(text: str) -> str:
    """*text* as a double-quoted attribute value (XML 1.0 section 3.1): markup and ``"``
    escaped, and tab, LF and CR as character references, which attribute-value
    normalization (section 3.3.3) keeps."""
    text = _escape_text(text)
    if '"' in text:
        text = text.replace('"', "&quot;")
    if "\t" in text:
        text = text.replace("\t", "&#9;")
    if "\n" in text:
        text = text.replace("\n", "&#10;")
    return text


@lru_cache(maxsize=4096)
def _keyword(tag: int) -> str:
    """The PS3.6 keyword of a public *tag* from pydicom's dictionary, or ``""``."""
    keyword: str = keyword_for_tag(tag)
    return keyword


class _Writer:
    """Writes the elements of one data set, counting replaced characters.

    Every value goes through :meth:`clean` and then :func:`_escape_text` or
    :func:`_escape_attribute`; element and attribute names are this module's constants.
    """

    def __init__(self) -> None:
        self.out: list[str] = []
        self.replaced = 0

    def clean(self, value: Any) -> str:
        """*value* as text: numbers as Python writes them, characters XML 1.0 cannot carry
        replaced by U+FFFD (and counted)."""
        text = value if isinstance(value, str) else repr(value)
        clean, count = _NOT_XML.subn("\ufffd", text)
        self.replaced += count
        return clean

    def dataset(self, dataset: Mapping[str, Any]) -> None:
        """One ``DicomAttribute`` per attribute of *dataset*, by tag."""
        tags = []
        for key in dataset:
            if not isinstance(key, str) or not _TAG.fullmatch(key):
                raise ValueError(f"{str(key)[:16]!r} is not a DICOM JSON tag (PS3.18 F.2.1)")
            tags.append((int(key, 16), key))
        for tag, key in sorted(tags):
            if tag & 0xFFFF == 0:  # Group Length: never in the Native DICOM Model (A.1.1)
                continue
            attribute = dataset[key]
            if not isinstance(attribute, Mapping):
                raise ValueError(f"attribute {key} is not a DICOM JSON object (PS3.18 F.2.2)")
            self.attribute(tag, attribute, dataset)

    def attribute(self, tag: int, attribute: Mapping[str, Any], dataset: Mapping[str, Any]) -> None:
        out = self.out
        vr = attribute.get("vr")
        if not isinstance(vr, str) or vr not in VRS:
            vr = "UN"
        out.append(f'<DicomAttribute tag="{tag:08X}" vr="{vr}"')
        if _is_private(tag):
            creator = _private_creator(tag, dataset)
            if creator is not None:
                out.append(f' privateCreator="{_escape_attribute(self.clean(creator))}"')
        else:
            keyword = _keyword(tag)
            if keyword:
                out.append(f' keyword="{_escape_attribute(keyword)}"')
        if "BulkDataURI" in attribute:
            uri = _escape_attribute(self.clean(attribute["BulkDataURI"]))
            out.append(f'><BulkData uri="{uri}"/></DicomAttribute>')
            return
        if "InlineBinary" in attribute:
            data = _escape_text(self.clean(attribute["InlineBinary"]))
            out.append(f"><InlineBinary>{data}</InlineBinary></DicomAttribute>")
            return
        values = attribute.get("Value") or ()
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise ValueError(f"the Value of {tag:08X} is not an array (PS3.18 F.2.4)")
        if not values:
            out.append("/>")
            return
        out.append(">")
        for number, value in enumerate(values, start=1):
            if vr == "SQ":
                if not value:
                    out.append(f'<Item number="{number}"/>')
                    continue
                if not isinstance(value, Mapping):
                    raise ValueError(f"an item of {tag:08X} is not an object")
                out.append(f'<Item number="{number}">')
                self.dataset(value)
                out.append("</Item>")
            elif vr == "PN":
                self.person_name(number, value)
            elif value is None:
                out.append(f'<Value number="{number}"/>')
            else:
                out.append(f'<Value number="{number}">{_escape_text(self.clean(value))}</Value>')
        out.append("</DicomAttribute>")

    def person_name(self, number: int, value: Any) -> None:
        """One ``PersonName`` (PS3.19 A.1.5, PS3.18 F.2.2): groups, then components."""
        if isinstance(value, str):  # not PS3.18 F.2.2, but a name all the same
            value = dict(zip(_GROUPS, value.split("="), strict=False))
        if value is not None and not isinstance(value, Mapping):
            raise ValueError("a person name is not an object (PS3.18 F.2.2)")
        groups = [(g, value.get(g)) for g in _GROUPS] if value else []
        groups = [(g, text) for g, text in groups if text]
        if not groups:
            self.out.append(f'<PersonName number="{number}"/>')
            return
        out = self.out
        out.append(f'<PersonName number="{number}">')
        for group, text in groups:
            parts = self.clean(text).split("^")
            if len(parts) > len(_COMPONENTS):
                parts = [*parts[:4], "^".join(parts[4:])]
            out.append(f"<{group}>")
            for name, part in zip(_COMPONENTS, parts, strict=False):
                if part:
                    out.append(f"<{name}>{_escape_text(part)}</{name}>")
            out.append(f"</{group}>")
        out.append("</PersonName>")


def _is_private(tag: int) -> bool:
    """Private data element (PS3.5 7.8.1): an odd group other than 0001 to 0007 and FFFF."""
    group = tag >> 16
    return group % 2 == 1 and group > 0x0007 and group != 0xFFFF


def _private_creator(tag: int, dataset: Mapping[str, Any]) -> str | None:
    """The Private Creator of private element *tag*, from (gggg,00xx) in *dataset*."""
    element = tag & 0xFFFF
    if element < 0x1000:  # a Private Creator itself (0010-00FF), or not in a block
        return None
    creator = dataset.get(f"{tag >> 16:04X}00{element >> 8:02X}")
    if not isinstance(creator, Mapping):
        return None
    values = creator.get("Value")
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


def to_xml(dataset: Mapping[str, Any]) -> XmlDocument:
    """One DICOM JSON object (PS3.18 F.2) as a Native DICOM Model document (PS3.19 A.1).

    Parameters
    ----------
    dataset : mapping
        A DICOM JSON object: 8-hex-digit tags to ``{"vr": ..., "Value": [...]}``,
        ``{"vr": ..., "InlineBinary": ...}`` or ``{"vr": ..., "BulkDataURI": ...}``.

    Returns
    -------
    XmlDocument
        The UTF-8 document with its XML declaration, and the count of characters replaced
        because XML 1.0 cannot carry them (see the module's notes).

    Raises
    ------
    ValueError
        *dataset* is not DICOM JSON (a key that is not a tag, a Value that is not an array).
    """
    writer = _Writer()
    writer.out.append('<NativeDicomModel xml:space="preserve">')
    writer.dataset(dataset)
    writer.out.append("</NativeDicomModel>")
    return XmlDocument(_DECLARATION + "".join(writer.out).encode("utf-8"), writer.replaced)


def multipart(documents: Iterable[bytes]) -> tuple[str, bytes]:
    """*documents* as a ``multipart/related; type="application/dicom+xml"`` body.

    One body part per document (PS3.18 8.6.1.2, 8.7.3.2), each with ``Content-Type:
    application/dicom+xml`` and its ``Content-Length``; the boundary is random, so it
    cannot occur in a document by chance. Returns the ``Content-Type`` of the answer and
    its body.

    Raises
    ------
    ValueError
        No document: a multipart body has at least one part (RFC 2046 5.1.1), so the caller
        answers 204 instead (PS3.18 10.6.3.1).
    """
    boundary = uuid.uuid4().hex
    out = bytearray()
    for document in documents:
        out += (
            f"--{boundary}\r\nContent-Type: {XML_MEDIA_TYPE}\r\n"
            f"Content-Length: {len(document)}\r\n\r\n"
        ).encode()
        out += document
        out += b"\r\n"
    if not out:
        raise ValueError("a multipart/related body needs at least one part (RFC 2046 5.1.1)")
    out += f"--{boundary}--\r\n".encode()
    return f"{MULTIPART_XML}; boundary={boundary}", bytes(out)


def negotiate(ranges: Sequence[MediaRange]) -> str | None:
    """The media type to answer DICOM data sets in, or None when no range accepts one.

    *ranges* are the ``Accept`` media ranges, best first
    (:func:`stockade.web.wado.parse_accept`). The first that accepts one of the two wins:

    - ``application/dicom+json`` for ``application/dicom+json``, ``application/json``,
      ``application/*`` and ``*/*`` (so no ``Accept`` means JSON);
    - :data:`MULTIPART_XML` for ``multipart/related`` whose ``type`` is
      ``application/dicom+xml`` (PS3.18 8.7.3.2), ``application/*`` or ``*/*``, or absent,
      for ``multipart/*``, and for a bare ``application/dicom+xml``.
    """
    for r in ranges:
        if r.media in ("*/*", "application/*", JSON_MEDIA_TYPE, "application/json"):
            return JSON_MEDIA_TYPE
        if r.media in ("multipart/*", XML_MEDIA_TYPE):
            return MULTIPART_XML
        if r.media == "multipart/related":
            part = r.params.get("type", XML_MEDIA_TYPE).strip().lower()
            if part in (XML_MEDIA_TYPE, "application/*", "*/*"):
                return MULTIPART_XML
    return None


def replaced_warning(count: int) -> str:
    """The ``Warning`` header value (PS3.18 8.3.4.2) saying *count* characters were replaced."""
    return (
        f'299 stockade "{count} character(s) that XML 1.0 cannot carry were replaced by '
        'U+FFFD; application/dicom+json has them"'
    )
