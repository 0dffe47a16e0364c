"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data of stored objects.

Resources, relative to the DICOMweb base:

* ``/studies/{study}``, ``.../series/{series}``, ``.../instances/{instance}``:
  ``multipart/related; type="application/dicom"`` (PS3.18 8.7.3.3.2, 10.4.1.1.1), one part
  per instance, each a Part 10 file with a 128-byte zero preamble (PS3.10 7.1) and its
  ``Content-Type: application/dicom; transfer-syntax=<uid>``. The answer is streamed: each
  instance is read (and verified, or transcoded) in a worker thread while the previous one is
  being sent, so that a study is never held in memory whole.
* ``.../metadata`` at the three levels: ``application/dicom+json`` (PS3.18 10.4.1.1.2,
  Annex F), bulk data as ``BulkDataURI`` (:mod:`stockade.web.metadata`), per series cached
  by :meth:`stockade.archive.Archive.metadata`; or ``multipart/related;
  type="application/dicom+xml"`` converted from it (:mod:`stockade.web.dicomxml`).
* ``.../instances/{instance}/frames/{list}`` (PS3.18 10.4.1.1.3): the frames (1-based,
  comma-separated) as ``multipart/related; type="application/octet-stream"``, uncompressed
  (Explicit VR Little Endian byte order; compressed pixel data is decoded), or, when the
  ``Accept`` header asks for the stored compression (``image/jpeg``, ``image/jls``,
  ``image/jp2``, ``image/jpx``, ``image/jphc``, ``image/dicom-rle``, PS3.18 Table 8.7.3-5),
  the stored compressed frames as they are.
* ``.../instances/{instance}/bulkdata/{tag}[/{item}/{tag}...]`` (PS3.18 10.4.1.1.5): one
  bulk data value as ``multipart/related; type="application/octet-stream"`` (little endian;
  Pixel Data decoded when stored compressed).

Transfer syntax negotiation (PS3.18 8.7.3): the ``Accept`` media ranges are taken in order
of their q-values (ties in header order). For instances, ``multipart/related;
type="application/dicom"`` with ``transfer-syntax=*`` means as stored, with a UID means that
transfer syntax (transcoded losslessly, :mod:`stockade.dicom.transcode`), without one
Explicit VR Little Endian (PS3.18 8.7.3.5.2 default); ``*/*``, ``multipart/*`` or no
``Accept`` mean the default. Each instance goes in the first acceptable transfer syntax it
can be produced in. If none is acceptable at all, or the first instance cannot be produced in
any, the answer is 406 with a problem document; once streaming has started, a later instance
that cannot be produced (or fails its integrity check) is left out, counted as failed in the
audit record, and logged (the status line is already sent).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from stockade.dicom import transcode
from stockade.dicom.attributes import Level
from stockade.dicom.part10 import PREAMBLE_LENGTH, ZERO_PREAMBLE, file_header
from stockade.dicom.tables import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    PIXEL_MEDIA_TYPES,
    TRANSFER_SYNTAX_BY_UID,
)
from stockade.dicom.uids import uid_problem
from stockade.errors import (
    CannotTranscode,
    IntegrityError,
    InvalidObject,
    InvalidQuery,
    NotFound,
    StockadeError,
)
from stockade.retrieve import Retrieval
from stockade.web import dicomxml, fastjson, metadata
from stockade.web.app import BASE, actor_of, archive_of, path_uids, scope_of
from stockade.web.dicomjson import JSON_MEDIA_TYPE

if TYPE_CHECKING:  # types only: adapters never use index/ (docs/architecture.md)
    from stockade.retrieve import StoredInstance

__all__ = ["ROUTES", "MediaRange", "NotAcceptable", "dicom_candidates", "parse_accept"]

DICOM = "application/dicom"
OCTET = "application/octet-stream"
#: Marks "as stored" (``transfer-syntax=*``) among the candidate transfer syntaxes.
AS_STORED = "*"
#: Native transfer syntaxes whose stored bytes can be sliced as they are (little endian).
_NATIVE_LE = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN})
#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3), first found wins.
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
#: Longest ``Accept`` header read, and most media ranges taken from it.
MAX_ACCEPT = 4096
MAX_RANGES = 32
MAX_FRAMES = 1024
_FRAME_LIST = re.compile(r"[0-9]{1,9}(?:,[0-9]{1,9})*")
_TAG = re.compile(r"[0-9A-Fa-f]{8}")


class NotAcceptable(StockadeError):
    """No media type of the ``Accept`` header can be given for the resource (PS3.18 8.7)."""

    http_status = 406
    dimse_status = 0xA900
    code = "not-acceptable"


# -- Accept parsing (RFC 9110 12.5.1, PS3.18 8.7) --------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    """One media range of an ``Accept`` header: type, parameters (lower-case names), q."""

    media: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0


def _split(text: str, sep: str) -> list[str]:
    """Split on *sep* outside double-quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an ``Accept`` header, best first (q-value, then header order).

    A missing or empty header is ``*/*``. Ranges with ``q=0`` are dropped; a q-value that is
    not a number counts as 0 (RFC 9110 12.4.2).
    """
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranked: list[tuple[float, int, MediaRange]] = []
    for order, item in enumerate(_split(header[:MAX_ACCEPT], ",")[:MAX_RANGES]):
        pieces = _split(item, ";")
        media = pieces[0].strip().lower()
        if not media:
            continue
        params: dict[str, str] = {}
        q = 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name, value = name.strip().lower(), value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if name == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
            elif name:
                params[name] = value
        if q > 0:
            ranked.append((-q, order, MediaRange(media, params, q)))
    return [r for _, _, r in sorted(ranked, key=lambda t: (t[0], t[1]))]


def dicom_candidates(ranges: Sequence[MediaRange]) -> list[str]:
    """Transfer syntaxes acceptable for ``application/dicom`` parts, best first.

    :data:`AS_STORED` stands for the stored transfer syntax of each instance.

    Raises
    ------
    NotAcceptable
        No range allows ``multipart/related; type="application/dicom"``.
    """
    found: list[str] = []
    for r in ranges:
        if r.media in ("*/*", "multipart/*"):
            ts = EXPLICIT_VR_LITTLE_ENDIAN
        elif r.media == "multipart/related":
            part = r.params.get("type", DICOM).lower()
            if part not in (DICOM, "application/*", "*/*"):
                continue
            ts = r.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN).strip()
            if ts != AS_STORED and uid_problem(ts):
                continue
        else:
            continue
        if ts not in found:
            found.append(ts)
    if not found:
        raise NotAcceptable(
            'only multipart/related; type="application/dicom" (PS3.18 8.7.3.3.2) can be '
            "given for this resource"
        )
    return found


def _resolve(candidates: Sequence[str], inst: StoredInstance) -> list[str]:
    """*candidates* for *inst*: as-stored resolved, only what can be produced from it."""
    possible = transcode.producible(inst.transfer_syntax)
    out: list[str] = []
    for ts in candidates:
        uid = inst.transfer_syntax if ts == AS_STORED else ts
        if uid in possible and uid not in out:
            out.append(uid)
    return out


# -- request helpers -------------------------------------------------------------------------


def _level(values: dict[str, str | None]) -> Level:
    if "SOPInstanceUID" in values:
        return Level.IMAGE
    return Level.SERIES if "SeriesInstanceUID" in values else Level.STUDY


def _base(request: Request) -> str:
    """The DICOMweb base URL of *request*, for BulkDataURIs.

    The host comes from the ``Host`` header. When that header has no port but the
    connection came to a non-default one, the port of the socket is added: dicomweb-client
    sends ``Host`` without its port (RFC 9110 7.2 wants it), and Stockade serves no proxy
    headers, so the socket's port is the one the client used.
    """
    url = request.base_url
    server = request.scope.get("server")
    if url.port is None and server and server[1] not in (None, 80 if url.scheme == "http" else 443):
        url = url.replace(port=int(server[1]))
    return str(url).rstrip("/") + BASE


def _not_found(level: Level, values: dict[str, str | None]) -> NotFound:
    keyword = {Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "instance"}[level]
    uid = values.get(
        {
            Level.STUDY: "StudyInstanceUID",
            Level.SERIES: "SeriesInstanceUID",
            Level.IMAGE: "SOPInstanceUID",
        }[level]
    )
    return NotFound(f"no {keyword} {uid} is stored here")


class _Multipart:
    """Builds ``multipart/related`` bodies (RFC 2387, PS3.18 8.6.1.2)."""

    def __init__(self, part_type: str) -> None:
        self.boundary = uuid.uuid4().hex
        self.content_type = f'multipart/related; type="{part_type}"; boundary={self.boundary}'

    def head(self, content_type: str, length: int, location: str | None = None) -> bytes:
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        if location:
            lines.append(f"Content-Location: {location}")
        lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def whole(self, parts: Sequence[tuple[str, bytes | memoryview]]) -> bytes:
        out = bytearray()
        for content_type, data in parts:
            out += self.head(content_type, len(data))
            out += data
            out += b"\r\n"
        out += self.end()
        return bytes(out)


_ATTACHMENT = {"Content-Disposition": "attachment"}


# -- instances (PS3.18 10.4.1.1.1) -----------------------------------------------------------


def stored_part10(retrieval: Retrieval, inst: StoredInstance) -> list[bytes | memoryview]:
    """The stored Part 10 file of *inst*, checked against its SHA-256, as chunks with a zero
    preamble (PS3.10 7.1; stored blobs have one, and no other is ever sent).

    Raises
    ------
    IntegrityError
        See :meth:`Retrieval.read`.
    """
    data = retrieval.read(inst)
    if data[:PREAMBLE_LENGTH] != ZERO_PREAMBLE:
        return [ZERO_PREAMBLE, memoryview(data)[PREAMBLE_LENGTH:]]
    return [data]


def _dicom_part(
    retrieval: Retrieval, inst: StoredInstance, candidates: Sequence[str]
) -> tuple[str, list[bytes | memoryview]]:
    """The Part 10 file of *inst* in the first candidate it can be produced in, as chunks.

    Raises
    ------
    CannotTranscode
        No candidate can be produced from the stored transfer syntax.
    IntegrityError
        The blob failed its check (see :meth:`Retrieval.read`).
    """
    wanted = _resolve(candidates, inst)
    if not wanted:
        raise CannotTranscode(
            f"{inst.sop_instance_uid} is stored as {inst.transfer_syntax} and cannot be given "
            "in any transfer syntax the Accept header allows"
        )
    if wanted[0] == inst.transfer_syntax:
        return wanted[0], stored_part10(retrieval, inst)
    ts, body = retrieval.dataset(inst, wanted)
    header = file_header(inst.sop_class_uid, inst.sop_instance_uid, ts, None)
    return ts, [header, body]


class RetrievalStream(StreamingResponse):
    """A streamed answer (an attachment) that finishes its :class:`Retrieval`, the audit
    record, however the stream ends: one the client broke off is recorded as cancelled."""

    def __init__(
        self,
        content: AsyncIterator[bytes | memoryview],
        retrieval: Retrieval,
        media_type: str,
        disposition: str = "attachment",
    ) -> None:
        super().__init__(
            content, media_type=media_type, headers={"Content-Disposition": disposition}
        )
        self.retrieval = retrieval
        self.content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.content, "aclose", None)
            if aclose is not None:
                await aclose()
            self.retrieval.finish(cancelled=self.retrieval.remaining > 0)


async def _retrieve(request: Request) -> Response:
    """GET a study, series or instance (PS3.18 10.4.1.1.1), streamed."""
    values: dict[str, str | None] = dict(path_uids(request))
    level = _level(values)
    candidates = dicom_candidates(parse_accept(request.headers.get("accept")))
    archive = archive_of(request)
    retrieval = await run_in_threadpool(
        lambda: archive.retrieve(
            level, values, service="wado", actor=actor_of(request), scope=scope_of(request)
        )
    )
    try:
        if not retrieval.instances:
            raise _not_found(level, values)
        first = retrieval.instances[0]
        try:
            ts, chunks = await run_in_threadpool(_dicom_part, retrieval, first, candidates)
        except StockadeError as exc:
            retrieval.done(first, "failed", exc.reason)
            raise
    except BaseException:
        retrieval.finish()
        raise
    multipart = _Multipart(DICOM)

    def head(inst: StoredInstance, ts: str, chunks: list[bytes | memoryview]) -> bytes:
        return multipart.head(f"{DICOM}; transfer-syntax={ts}", sum(len(c) for c in chunks))

    async def stream() -> AsyncIterator[bytes | memoryview]:
        yield head(first, ts, chunks)
        for chunk in chunks:
            yield chunk
        yield b"\r\n"
        retrieval.done(first, "completed")
        for inst in retrieval.instances[1:]:
            try:
                uid, parts = await run_in_threadpool(_dicom_part, retrieval, inst, candidates)
            except (CannotTranscode, IntegrityError, InvalidObject) as exc:
                retrieval.done(inst, "failed", exc.reason)
                continue
            yield head(inst, uid, parts)
            for chunk in parts:
                yield chunk
            yield b"\r\n"
            retrieval.done(inst, "completed")
        yield multipart.end()

    return RetrievalStream(stream(), retrieval, multipart.content_type)


# -- metadata (PS3.18 10.4.1.1.2) ------------------------------------------------------------


def _metadata_media(ranges: Sequence[MediaRange]) -> str:
    """The media type of a metadata answer (PS3.18 8.7.3.2), by :func:`dicomxml.negotiate`.

    Raises
    ------
    NotAcceptable
        The ``Accept`` header allows neither DICOM JSON nor DICOM XML.
    """
    media = dicomxml.negotiate(ranges)
    if media is None:
        raise NotAcceptable(
            f"metadata is given as {JSON_MEDIA_TYPE} or as {dicomxml.MULTIPART_XML} "
            "(PS3.18 8.7.3.2)"
        )
    return media


async def _metadata(request: Request) -> Response:
    """GET the metadata of a study, series or instance (PS3.18 10.4.1.1.2).

    As DICOM JSON (the cached per-series JSON with absolute BulkDataURIs), or as
    ``multipart/related; type="application/dicom+xml"`` with one Native DICOM Model part per
    instance (PS3.19 A.1), converted from that same JSON by :mod:`stockade.web.dicomxml`.
    """
    values: dict[str, str | None] = dict(path_uids(request))
    level = _level(values)
    media = _metadata_media(parse_accept(request.headers.get("accept")))
    archive = archive_of(request)

    def work() -> tuple[str | None, bytes, dict[str, str] | None]:
        try:
            body = archive.metadata(
                level,
                values,
                actor=actor_of(request),
                scope=scope_of(request),
                build=metadata.build,
            )
        except NotFound:
            raise _not_found(level, values) from None
        body = metadata.absolute(body, _base(request))
        if media == JSON_MEDIA_TYPE:
            return JSON_MEDIA_TYPE, body, None
        documents = [dicomxml.to_xml(instance) for instance in json.loads(body)]
        replaced = sum(d.replaced for d in documents)
        headers = {"Warning": dicomxml.replaced_warning(replaced)} if replaced else None
        if not documents:  # every instance failed to read: no part to send
            return None, b"", headers
        content_type, answer = dicomxml.multipart(d.body for d in documents)
        return content_type, answer, headers

    content_type, body, headers = await run_in_threadpool(work)
    if content_type is None:
        return Response(status_code=204, headers=headers)
    return Response(body, media_type=content_type, headers=headers)


# -- frames and bulk data (PS3.18 10.4.1.1.3, 10.4.1.1.5) -----------------------------------


def _instance(request: Request) -> tuple[Retrieval, StoredInstance]:
    """Locate the one instance of the URL (the caller finishes the retrieval).

    Raises
    ------
    NotFound
        No such instance in that study and series.
    """
    values: dict[str, str | None] = dict(path_uids(request))
    retrieval = archive_of(request).retrieve(
        Level.IMAGE, values, service="wado", actor=actor_of(request), scope=scope_of(request)
    )
    if not retrieval.instances:
        retrieval.finish()
        raise _not_found(Level.IMAGE, values)
    return retrieval, retrieval.instances[0]


def _dataset(
    retrieval: Retrieval, inst: StoredInstance, *, decoded: bool
) -> tuple[Dataset, bytes | memoryview]:
    """*inst* parsed by pydicom, little endian; *decoded*: with native pixel data.

    Stored Explicit or Implicit VR Little Endian is read as it is; anything else is first
    transcoded to Explicit VR Little Endian when *decoded* or when stored big endian (the
    stored encapsulated and deflated syntaxes are little endian).
    """
    stored = inst.transfer_syntax
    native_le = stored in _NATIVE_LE or (
        not decoded
        and stored != transcode.EXPLICIT_VR_BIG_ENDIAN
        and stored in TRANSFER_SYNTAX_BY_UID
    )
    if native_le:
        data: bytes | memoryview = retrieval.read(inst)
    else:
        ts, body = retrieval.dataset(inst, [EXPLICIT_VR_LITTLE_ENDIAN])
        data = file_header(inst.sop_class_uid, inst.sop_instance_uid, ts, None) + bytes(body)
    try:
        return dcmread(BytesIO(data)), data
    except Exception as exc:  # pydicom raises anything on damaged input
        raise InvalidObject(f"{inst.sop_instance_uid} cannot be parsed: {exc}") from exc


def _frame_choice(ranges: Sequence[MediaRange], stored: str) -> tuple[str, str] | None:
    """(part media type, transfer syntax) for the frames of an object stored in *stored*.

    ``application/octet-stream`` (or ``*/*``, ``multipart/*``, ``type="*/*"``) gives
    uncompressed frames in Explicit VR Little Endian byte order (PS3.18 8.7.3.5.2; its
    ``transfer-syntax`` may be that UID or ``*``). A compressed ``image/...`` type gives
    the stored frames when the stored transfer syntax is one it carries (and equals the
    ``transfer-syntax`` parameter, if given); nothing is compressed on request.
    """
    for r in ranges:
        if r.media in ("*/*", "multipart/*"):
            return OCTET, EXPLICIT_VR_LITTLE_ENDIAN
        if r.media != "multipart/related":
            continue
        part = r.params.get("type", OCTET).lower()
        ts = r.params.get("transfer-syntax")
        if part in (OCTET, "application/*", "*/*"):
            if ts is None or ts in (AS_STORED, EXPLICIT_VR_LITTLE_ENDIAN):
                return OCTET, EXPLICIT_VR_LITTLE_ENDIAN
            continue
        families = (
            PIXEL_MEDIA_TYPES.items()
            if part == "image/*"
            else [(part, PIXEL_MEDIA_TYPES.get(part, frozenset()))]
        )
        for media, syntaxes in families:
            if stored in syntaxes and ts in (None, AS_STORED, stored):
                return media, stored
    return None


def _frame_numbers(text: str) -> list[int]:
    if not _FRAME_LIST.fullmatch(text):
        raise InvalidQuery(f"{text[:64]!r} is not a comma-separated list of frame numbers")
    numbers = [int(n) for n in text.split(",")]
    if len(numbers) > MAX_FRAMES:
        raise InvalidQuery(f"at most {MAX_FRAMES} frames per request")
    if min(numbers) < 1:
        raise InvalidQuery("frame numbers start at 1 (PS3.18 10.4.1.1.3)")
    return numbers


def _frames_of(
    retrieval: Retrieval, inst: StoredInstance, numbers: list[int], media: str
) -> list[bytes | memoryview]:
    """The requested frames of *inst*: stored compressed (*media* an image type) or native.

    Raises
    ------
    NotFound
        No pixel data, or a frame number beyond Number of Frames.
    CannotTranscode
        The pixel data cannot be decoded, or 1-bit frames do not start on a byte.
    """
    ds, _ = _dataset(retrieval, inst, decoded=media == OCTET)
    tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise NotFound(f"{inst.sop_instance_uid} has no pixel data")
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        count = 1
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise NotFound(f"{inst.sop_instance_uid} has {count} frame(s); no frame {beyond[0]}")
    value = ds[tag].value
    if media != OCTET:
        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        return [
            get_frame(value, n - 1, number_of_frames=count, extended_offsets=extended)
            for n in numbers
        ]
    bits = int(
        ds.get("BitsAllocated") or (32 if tag == 0x7FE00008 else 64 if tag == 0x7FE00009 else 8)
    )
    samples = int(ds.get("SamplesPerPixel") or 1)
    frame_bits = int(ds.Rows) * int(ds.Columns) * samples * bits
    if frame_bits % 8:
        raise CannotTranscode("frames of 1-bit pixel data that do not start on a byte")
    size = frame_bits // 8
    view = memoryview(value)
    out: list[bytes | memoryview] = []
    for n in numbers:
        frame = view[(n - 1) * size : n * size]
        if len(frame) != size:
            raise NotFound(f"{inst.sop_instance_uid}: frame {n} is not in the pixel data")
        out.append(frame)
    return out


async def _frames(request: Request) -> Response:
    """GET frames of an instance (PS3.18 10.4.1.1.3)."""
    numbers = _frame_numbers(request.path_params["frames"])
    ranges = parse_accept(request.headers.get("accept"))

    def work() -> tuple[str, bytes]:
        retrieval, inst = _instance(request)
        try:
            choice = _frame_choice(ranges, inst.transfer_syntax)
            if choice is None:
                raise NotAcceptable(
                    f"frames of {inst.sop_instance_uid} (stored as {inst.transfer_syntax}) can "
                    'be given as multipart/related; type="application/octet-stream", or in '
                    "the media type of the stored compression"
                )
            media, ts = choice
            frames = _frames_of(retrieval, inst, numbers, media)
        except StockadeError as exc:
            retrieval.done(inst, "failed", exc.reason)
            raise
        finally:
            if not retrieval.failed:
                retrieval.done(inst, "completed")
            retrieval.finish()
        multipart = _Multipart(media)
        part_type = f"{media}; transfer-syntax={ts}"
        return multipart.content_type, multipart.whole([(part_type, f) for f in frames])

    content_type, body = await run_in_threadpool(work)
    return Response(body, media_type=content_type, headers=_ATTACHMENT)


def _bulk_path(text: str) -> list[int | str]:
    """``tag/item/tag...`` as alternating tags (int) and item indexes (str of digits)."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 == 0 or len(parts) > 33:
        raise InvalidQuery("a bulk data path is tag[/item/tag]... (PS3.18 F.2.6)")
    out: list[int | str] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if not _TAG.fullmatch(part):
                raise InvalidQuery(f"{part[:16]!r} is not a tag of eight hex digits")
            out.append(int(part, 16))
        else:
            if not part.isdigit() or len(part) > 6:
                raise InvalidQuery(f"{part[:16]!r} is not an item index")
            out.append(part)
    return out


def _bulk_value(retrieval: Retrieval, inst: StoredInstance, path: list[int | str]) -> bytes:
    """The value at *path* in *inst*, when it is bulk data (PS3.18 F.2.6).

    Raises
    ------
    NotFound
        No such attribute, or not one whose value is bulk data.
    """
    top = path[0]
    pixel = len(path) == 1 and top in _PIXEL_TAGS
    ds, _ = _dataset(retrieval, inst, decoded=pixel)
    where = f"{inst.sop_instance_uid} has no bulk data at {'/'.join(str(p) for p in path)}"
    node: Any = ds
    for i, step in enumerate(path):
        if i % 2 == 0:
            assert isinstance(step, int)  # noqa: S101 - _bulk_path alternates
            if not isinstance(node, Dataset) or step not in node:
                raise NotFound(where)
            node = node[step]
            if i < len(path) - 1:
                if node.VR != "SQ":
                    raise NotFound(where)
                node = node.value
        else:
            index = int(step)
            if index >= len(node):
                raise NotFound(where)
            node = node[index]
    if node.VR not in fastjson.BULK_VRS or not isinstance(node.value, bytes | bytearray):
        raise NotFound(where)
    return bytes(node.value)


async def _bulkdata(request: Request) -> Response:
    """GET one bulk data value of an instance (PS3.18 10.4.1.1.5)."""
    path = _bulk_path(request.path_params["path"])
    ranges = parse_accept(request.headers.get("accept"))
    if _frame_choice(ranges, EXPLICIT_VR_LITTLE_ENDIAN) is None:
        raise NotAcceptable(
            'bulk data is given as multipart/related; type="application/octet-stream"'
        )

    def work() -> bytes:
        retrieval, inst = _instance(request)
        try:
            value = _bulk_value(retrieval, inst, path)
        except StockadeError as exc:
            retrieval.done(inst, "failed", exc.reason)
            raise
        finally:
            if not retrieval.failed:
                retrieval.done(inst, "completed")
            retrieval.finish()
        return value

    value = await run_in_threadpool(work)
    multipart = _Multipart(OCTET)
    body = multipart.whole([(f"{OCTET}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}", value)])
    return Response(body, media_type=multipart.content_type, headers=_ATTACHMENT)


_INSTANCE = "/studies/{study}/series/{series}/instances/{instance}"

ROUTES: list[BaseRoute] = [
    Route("/studies/{study}", _retrieve, methods=["GET"]),
    Route("/studies/{study}/series/{series}", _retrieve, methods=["GET"]),
    Route(_INSTANCE, _retrieve, methods=["GET"]),
    Route("/studies/{study}/metadata", _metadata, methods=["GET"]),
    Route("/studies/{study}/series/{series}/metadata", _metadata, methods=["GET"]),
    Route(_INSTANCE + "/metadata", _metadata, methods=["GET"]),
    Route(_INSTANCE + "/frames/{frames}", _frames, methods=["GET"]),
    Route(_INSTANCE + "/bulkdata/{path:path}", _bulkdata, methods=["GET"]),
]
