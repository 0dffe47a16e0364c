"""C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root Query/Retrieve, FIND.

The identifier is walked with Stockade's bounded parser before pydicom decodes it; its keys
become one :class:`~stockade.query.Query` (the same engine QIDO-RS uses) through
:meth:`Archive.query`. Each match is sent as a Pending response (FF00H); the peer may stop
the query with C-CANCEL (answered FE00H). A query that matches more than
``query_max_results`` gets that many matches, then A700H with an Error Comment that says so
(PS3.4 C.4.1.1.4 has no warning status for a truncated answer).
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections.abc import Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from stockade.dicom.attributes import Level
from stockade.dicom.parse import Limits, scan
from stockade.dicom.tables import TRANSFER_SYNTAX_BY_UID
from stockade.errors import InvalidQuery, StockadeError, TooManyMatches
from stockade.query import KEYS_BY_TAG, LEVEL_ORDER

if TYPE_CHECKING:
    from stockade.archive import Archive, Peer
    from stockade.query import Found

log = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: Information models and the levels each one has (PS3.4 C.6.1 and C.6.2).
MODELS: dict[str, tuple[Level, ...]] = {
    PATIENT_ROOT_FIND: LEVEL_ORDER,
    STUDY_ROOT_FIND: LEVEL_ORDER[1:],
}
#: Largest identifier accepted; real ones are a few hundred bytes.
MAX_IDENTIFIER = 1024 * 1024

PENDING, CANCELLED, SUCCESS = 0xFF00, 0xFE00, 0x0000
QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
_IDENTIFIER_LIMITS = Limits(max_depth=4, max_elements=2000)


def decode_identifier(data: bytes | bytearray, transfer_syntax: str) -> Dataset:
    """Decode a C-FIND identifier with bounds checked first (threat model SR-8, SR-14).

    Raises
    ------
    InvalidQuery
        Too long, structurally invalid, or not decodable.
    """
    if len(data) > MAX_IDENTIFIER:
        raise InvalidQuery(f"identifier longer than {MAX_IDENTIFIER} bytes")
    ts = TRANSFER_SYNTAX_BY_UID.get(transfer_syntax)
    if ts is None or ts.deflated or ts.encapsulated:
        raise InvalidQuery("identifier in an unsupported transfer syntax")
    try:
        scan(
            data,
            implicit_vr=ts.implicit_vr,
            little_endian=ts.little_endian,
            wanted=frozenset(),
            limits=_IDENTIFIER_LIMITS,
        )
    except StockadeError as exc:
        raise InvalidQuery(f"malformed identifier: {exc.reason}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(BytesIO(bytes(data)), ts.implicit_vr, ts.little_endian, len(data))
            ds.decode()  # Specific Character Set applied to text values
            for element in ds:  # force every value to decode now, inside the guard
                _ = element.value
    except Exception as exc:  # noqa: BLE001 - pydicom on hostile bytes; bounds checked above
        raise InvalidQuery(f"undecodable identifier ({exc.__class__.__name__})") from None
    return ds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    return str(value)


def query_of(
    identifier: Dataset, levels: tuple[Level, ...]
) -> tuple[Level, dict[str, str | None], list[int]]:
    """Level, text values per indexed keyword, and every requested tag of an identifier
    (C-FIND, C-GET or C-MOVE) of an information model with *levels*.

    Raises
    ------
    InvalidQuery
        No or an unknown Query/Retrieve Level for the information model.
    """
    raw_level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = Level(raw_level)
    except ValueError:
        raise InvalidQuery(
            f"Query/Retrieve Level {raw_level[:16]!r} is not PATIENT, STUDY, SERIES or IMAGE"
        ) from None
    if level not in levels:
        raise InvalidQuery(f"level {level} is not part of this information model")
    values: dict[str, str | None] = {}
    requested = []
    for element in identifier:
        if element.tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) or (
            element.tag.element == 0  # group lengths are not keys
        ):
            continue
        requested.append(int(element.tag))
        key = KEYS_BY_TAG.get(int(element.tag))
        if key is not None and element.VR != "SQ":
            values[key.keyword] = _text(element.value)
    return level, values, requested


def _charset_for(rows: list[dict[str, str | int | None]]) -> str | None:
    for row in rows:
        for value in row.values():
            if isinstance(value, str) and not value.isascii():
                return "ISO_IR 192"
    return None


#: VRs with a 4-byte length in Explicit VR encoding (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


def _element(tag: int, vr: str, raw: bytes, explicit: bool) -> bytes:
    """One Little Endian data element (PS3.5 7.1); the value padded to even length."""
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if not explicit:
        return struct.pack("<HHL", group, element, len(raw)) + raw
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, len(raw)) + raw
    return struct.pack("<HH2sH", group, element, vr.encode(), len(raw)) + raw


def response_identifiers(
    found: Found,
    level: Level,
    requested: list[int],
    retrieve_ae: str,
    transfer_syntax: str,
) -> Iterator[bytes]:
    """Encode each match as a response identifier (PS3.4 C.4.1.1.3.2): the requested keys
    (empty when Stockade holds no value), the unique keys, the level and the charset.

    Encoded directly (Little Endian, the only byte order the FIND contexts accept): the
    values are text and numbers from the index, and pydicom's general writer cost about
    0.5 ms per match."""
    ts = TRANSFER_SYNTAX_BY_UID[transfer_syntax]
    explicit = not ts.implicit_vr
    charset = _charset_for(found.rows)
    codec = "utf-8" if charset else "ascii"
    fixed: dict[int, tuple[str, bytes]] = {
        QUERY_RETRIEVE_LEVEL: ("CS", str(level).encode("ascii")),
        0x00080054: ("AE", retrieve_ae.encode("ascii")),  # RetrieveAETitle
    }
    if charset:
        fixed[SPECIFIC_CHARACTER_SET] = ("CS", charset.encode("ascii"))
    empty = {tag: (_vr(tag), b"") for tag in requested}
    for row in found.rows:
        elements = dict(empty)
        elements.update(fixed)
        for keyword, value in row.items():
            tag = _tag_of(keyword)
            raw = b"" if value is None else str(value).encode(codec, "replace")
            elements[tag] = (_vr(tag), raw)
        yield b"".join(
            _element(tag, vr, raw, explicit) for tag, (vr, raw) in sorted(elements.items())
        )


_TAGS = {key.keyword: tag for tag, key in KEYS_BY_TAG.items()}


def _tag_of(keyword: str) -> int:
    return _TAGS[keyword]


def _vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return vr.split(" or ", maxsplit=1)[0]


class FindService:
    """Answers C-FIND requests of one association."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def run(
        self,
        peer: Peer,
        model: str,
        data: bytes | bytearray,
        transfer_syntax: str,
        cancelled: Any,
    ) -> Iterator[tuple[int, bytes | None, str | None]]:
        """Yield (status, identifier, error comment) responses for one C-FIND-RQ.

        *cancelled* is called between matches and returns True once a C-CANCEL-RQ came.
        """
        try:
            peer.check("find")
            identifier = decode_identifier(data, transfer_syntax)
            level, values, requested = query_of(identifier, MODELS[model])
            found = self.archive.query(level, values, peer=peer)
        except StockadeError as exc:
            log.warning("C-FIND from %s refused: %s", peer.ae_title, exc.reason)
            yield exc.dimse_status, None, exc.reason
            return
        for encoded in response_identifiers(
            found, level, requested, self.archive.settings.dicom_ae_title, transfer_syntax
        ):
            if cancelled():
                yield CANCELLED, None, None
                return
            yield PENDING, encoded, None
        if found.more:
            limit = self.archive.settings.query_max_results
            log.warning(
                "C-FIND from %s matched more than query_max_results (%d); answered the first",
                peer.ae_title,
                limit,
            )
            error = TooManyMatches(f"more than {limit} matches; refine the query")
            yield error.dimse_status, None, error.reason
            return
        yield SUCCESS, None, None
