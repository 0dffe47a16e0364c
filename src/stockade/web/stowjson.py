"""STOW-RS of DICOM JSON metadata and bulk data (PS3.18 10.5.1.2, 8.6.1.2, Annex F).

A request of ``multipart/related; type="application/dicom+json"`` carries one or more
metadata parts, each a DICOM JSON array of instances (PS3.18 F.2; a single object is taken
as an array of one), and bulk data parts named by their ``Content-Location``, which is the
``BulkDataURI`` the metadata gives (PS3.18 F.2.6, 8.7.3):

- ``application/octet-stream``: the value as it is, little endian (any bulk attribute);
- a compressed pixel media type of PS3.18 Table 8.7.3-5 (``image/jpeg``, ``image/jls``,
  ``image/jp2``, ``image/jpx``, ``image/jphc``, ``image/dicom-rle``): Pixel Data of one
  frame at ``{BulkDataURI}``, or one frame per part at ``{BulkDataURI}/frames/{n}``,
  numbered from 1. The transfer syntax is the part's ``transfer-syntax`` parameter, else
  the metadata's Transfer Syntax UID (0002,0010), else the media type's only one; it must
  be one the media type carries. The frames are encapsulated (PS3.5 A.4) with an empty
  Basic Offset Table.

Each instance becomes a Part 10 file (PS3.10 7.1: zero preamble, ``DICM``, File Meta
Information from its SOP Class and Instance UIDs, Explicit VR Little Endian for native
data) that goes through the one ingest pipeline like any other part, so every check of
ingest applies to it. What cannot be converted fails alone with 0xC000 and its reason;
nothing of it is stored. File Meta elements (group 0002) in the metadata are not copied:
Stockade writes its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from stockade.dicom.tables import PIXEL_MEDIA_TYPES
from stockade.errors import InvalidAttribute, InvalidObject, ObjectTooLarge

#: The media type of metadata parts and of the request's ``type`` parameter.
METADATA_MEDIA_TYPE = "application/dicom+json"
OCTET = "application/octet-stream"
#: Largest metadata part parsed, in bytes (its JSON becomes Python objects several times
#: that size); a 1,000-instance CT series is about 11 MB of DICOM JSON.
MAX_METADATA_BYTES = 64 * 1024 * 1024
#: Most frames gathered for one instance's compressed Pixel Data.
MAX_FRAMES = 100_000
PIXEL_DATA = "7FE00010"
PIXEL_DATA_TAG = 0x7FE00010
TRANSFER_SYNTAX = "00020010"
NUMBER_OF_FRAMES = "00280008"


@dataclass(frozen=True)
class Bulk:
    """One bulk data part: its media type, its ``transfer-syntax`` parameter, its bytes."""

    media: str
    transfer_syntax: str | None
    body: bytes | bytearray


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (RFC 8259 6)")


def instances(body: bytes | bytearray) -> list[Any]:
    """The instances of one metadata part (a DICOM JSON array, PS3.18 F.2).

    Raises
    ------
    ObjectTooLarge
        The part is larger than :data:`MAX_METADATA_BYTES`.
    InvalidObject
        Not UTF-8 JSON, nested too deeply, or neither an array nor an object.
    """
    if len(body) > MAX_METADATA_BYTES:
        raise ObjectTooLarge(
            f"a metadata part of {len(body)} bytes is larger than {MAX_METADATA_BYTES} bytes"
        )
    try:
        parsed = json.loads(bytes(body).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidObject(f"the metadata part is not DICOM JSON: {str(exc)[:200]}") from None
    if isinstance(parsed, dict):
        return [parsed]
    if not isinstance(parsed, list):
        raise InvalidObject("the metadata part is neither a JSON array nor an object (PS3.18 F.2)")
    return parsed


def claimed(obj: Any, tag: str) -> str | None:
    """The first value of *tag* in an instance's JSON, when it is a string."""
    if not isinstance(obj, dict):
        return None
    attribute = obj.get(tag)
    if not isinstance(attribute, dict):
        return None
    values = attribute.get("Value")
    if isinstance(values, list) and values and isinstance(values[0], (str, int)):
        return str(values[0])  # whole: a shortened UID could pass for a valid one
    return None


class _Pixels:
    """The bulk data handler of one instance: values by URI, compressed Pixel Data framed."""

    def __init__(self, bulk: Mapping[str, Bulk], obj: dict[str, Any]) -> None:
        self.bulk = bulk
        self.declared_ts = claimed(obj, TRANSFER_SYNTAX)
        self.frame_count = claimed(obj, NUMBER_OF_FRAMES)
        pixel = obj.get(PIXEL_DATA)
        #: The top-level Pixel Data's URI: the only value that may come compressed (its
        #: transfer syntax becomes the file's; an icon's cannot).
        self.pixel_uri = pixel.get("BulkDataURI") if isinstance(pixel, dict) else None
        self.transfer_syntax: str | None = None  # of compressed Pixel Data, once found

    def __call__(self, tag: str, vr: str, uri: str) -> bytes:
        part = self.bulk.get(uri)
        if part is not None and part.media == OCTET:
            return bytes(part.body)
        if tag.upper() != PIXEL_DATA or uri != self.pixel_uri:
            if part is None:
                raise InvalidObject(f"bulk data {uri[:200]} of ({tag}) is not in the request")
            raise InvalidObject(
                f"bulk data of ({tag}) in {part.media[:64]}: only the data set's Pixel Data "
                f"may be compressed, other values are {OCTET} (PS3.18 8.7.3)"
            )
        frames = [part] if part is not None else self._frames(uri)
        if not frames:
            raise InvalidObject(f"Pixel Data {uri[:200]} is not in the request")
        if self.frame_count is not None and self.frame_count != str(len(frames)):
            raise InvalidObject(
                f"Number of Frames (0028,0008) is {self.frame_count[:16]} but the request "
                f"holds {len(frames)} frame(s) of Pixel Data"
            )
        self.transfer_syntax = self._syntax(frames)
        return encapsulate([bytes(f.body) for f in frames])

    def _frames(self, uri: str) -> list[Bulk]:
        frames: list[Bulk] = []
        while len(frames) < MAX_FRAMES:
            part = self.bulk.get(f"{uri}/frames/{len(frames) + 1}")
            if part is None:
                break
            frames.append(part)
        return frames

    def _syntax(self, frames: list[Bulk]) -> str:
        media = {f.media for f in frames}
        if len(media) != 1:
            raise InvalidObject("the frames of Pixel Data are in different media types")
        kind = media.pop()
        carried = PIXEL_MEDIA_TYPES.get(kind)
        if carried is None:
            raise InvalidObject(f"Pixel Data in {kind[:64]} is not supported (PS3.18 8.7.3)")
        given = {f.transfer_syntax for f in frames if f.transfer_syntax}
        if len(given) > 1:
            raise InvalidObject("the frames of Pixel Data name different transfer syntaxes")
        if given:
            syntax = given.pop()
        elif self.declared_ts in carried:
            syntax = str(self.declared_ts)
        elif len(carried) == 1:
            syntax = next(iter(carried))
        else:
            raise InvalidObject(
                f"the transfer syntax of Pixel Data in {kind} is not given (a transfer-syntax "
                "parameter or Transfer Syntax UID (0002,0010) in the metadata)"
            )
        if syntax not in carried:
            raise InvalidObject(f"transfer syntax {syntax[:64]} is not one {kind} carries")
        return syntax


def to_part10(obj: Any, bulk: Mapping[str, Bulk]) -> bytearray:
    """One instance of the metadata as a Part 10 file (PS3.10 7.1), bulk data filled in.

    Raises
    ------
    InvalidObject
        The object is not a DICOM JSON data set, names bulk data the request does not
        hold, or cannot be encoded; the reason says which.
    """
    if not isinstance(obj, dict):
        raise InvalidObject("an instance of the metadata is not a JSON object (PS3.18 F.2)")
    sop_class, sop_instance = claimed(obj, "00080016"), claimed(obj, "00080018")
    if not sop_class or not sop_instance:
        raise InvalidAttribute(
            "SOP Class UID (0008,0016) and SOP Instance UID (0008,0018) are required"
        )
    pixels = _Pixels(bulk, obj)
    body = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("0002"))}
    try:
        ds = Dataset.from_json(body, pixels)
    except InvalidObject:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises anything on hostile JSON
        raise InvalidObject(
            f"the metadata is not a DICOM JSON data set: {str(exc)[:200]}"
        ) from None
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(pixels.transfer_syntax or ExplicitVRLittleEndian)
    ds.file_meta = meta
    if pixels.transfer_syntax is not None and PIXEL_DATA_TAG in ds:
        ds[PIXEL_DATA_TAG].VR = "OB"
    out = BytesIO()
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - a value pydicom cannot encode
        raise InvalidObject(f"the instance cannot be encoded: {str(exc)[:200]}") from None
    return bytearray(out.getbuffer())
