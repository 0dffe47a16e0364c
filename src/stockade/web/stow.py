"""STOW-RS (PS3.18 10.5): store instances sent as ``multipart/related`` DICOM.

Routes (relative to ``/dicomweb``): ``POST /studies`` and ``POST /studies/{study}``, taking
``multipart/related; type="application/dicom"; boundary=...`` (PS3.18 10.5.1.2, 8.6.1.2; the
``type`` parameter quoted or not), or ``multipart/related; type="application/dicom+json"``:
DICOM JSON metadata and bulk data parts, each instance made into a Part 10 file by
:mod:`stockade.web.stowjson` and then stored like a DICOM part. Such a request is held in
memory until it ends (a bulk data part may come after the metadata that names it, or before),
so its parts together are bounded by ``max_object_size`` (413 beyond), and its instances by
:data:`~stockade.web.multipart.MAX_PARTS` (400 beyond).

The request body is read as it arrives and cut into parts by
:class:`~stockade.web.multipart.MultipartParser` under hard limits (threat model SR-14): a
declared Content-Length over ``http_max_body_size`` is refused with 413 before anything is
read, a body that grows past it is cut off with 413, each part is kept up to
``max_object_size``, at most :data:`~stockade.web.multipart.MAX_PARTS` parts. Each part, once
complete, is a Part 10 file (PS3.10 7.1; one that starts directly with its File Meta
Information, as pydicom writes a data set without a preamble, is given the zero preamble and
``DICM`` first: see :func:`add_missing_preamble`) that goes through the one ingest pipeline
in two steps (:class:`_Parts`): :meth:`Archive.prepare_file
<stockade.archive.Archive.prepare_file>` checks and stages it durably in a worker thread while
the next parts arrive, and :meth:`Archive.finish_files <stockade.archive.Archive.finish_files>`
records the parts staged so far together (one index transaction with a savepoint per part, one
fdatasync, one audit append), publishes and audits them. The stored copy gets a zero preamble
and Stockade's own File Meta (SR-20). A part is never stored twice; storing an instance
already held (same bytes, also earlier in the same request) is a success.

On ``/studies/{study}`` each part's Study Instance UID is read (File Meta, then a bounded
:func:`~stockade.dicom.parse.scan` of the data set, as ingest does) *before* it is stored; an
instance of another study, or one whose study cannot be read, fails with 0xA900 and nothing of
it is stored (PS3.18 10.5.1: the instances shall belong to the study of the URL).

Response (PS3.18 10.5.3, Table 10.5.3-1 and the Store Instances Response Module, Table
10.5.3-2), ``application/dicom+json``:

- Retrieve URL (0008,1190): the study's URL, when the target resource is a study or every
  stored instance belongs to one study;
- Referenced SOP Sequence (0008,1199): per stored instance, Referenced SOP Class UID
  (0008,1150), Referenced SOP Instance UID (0008,1155), Retrieve URL (0008,1190), and Warning
  Reason (0008,1196) when ingest reported a warning: 0xB006 *Elements Discarded* when bytes
  after the data set were not stored or the payload policy stripped elements, else 0xB000
  *Coercion of Data Elements* (a preamble replaced by zeros);
- Failed SOP Sequence (0008,1198): per failed part, the two UIDs when they could be read and
  are valid UIDs (never an invalid value sent back), and Failure Reason (0008,1197): the error
  tree's status per PS3.4 B.2.3 and PS3.18 10.5.3 (0xA700 out of resources and its 0xA7xx
  sub-codes, 0xA900 data set does not match SOP class or the study of the URL, 0xC000 cannot
  understand and its 0xCxxx sub-codes, among them 0xC003 refused and 0xC004 quarantined by
  the payload policy, 0x0110 processing failure, 0x0111 duplicate SOP instance, 0x0122 SOP
  class not supported).

The human-readable reason has no standard attribute in these items, so it is carried in a
private block (PS3.5 7.8.1) reserved by Private Creator (0009,0010) ``STOCKADE``: (0009,1001)
LT the reason, (0009,1002) LO Stockade's stable error code, in Failed SOP Sequence items and
(reason only: the warnings) in Referenced SOP Sequence items. Clients that do not know the
block ignore it, as PS3.5 allows.

Status (PS3.18 10.5.3.1): 200 every instance stored without warnings; 202 some failed or
had warnings; 409 every instance failed; 400 a malformed request (bad multipart, no parts, a
bad study UID in the URL); 415 another media type; 413 too large. When the request breaks
down after some parts were stored (a truncated body, a body past ``http_max_body_size``),
the answer is a problem document (400 or 413) whose ``stored`` member lists the SOP
Instance UIDs already stored: they stay stored, like any acknowledged instance.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import deque
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from stockade.audit.events import InstanceRejected
from stockade.dicom.attributes import extract
from stockade.dicom.examine import inflate
from stockade.dicom.parse import scan
from stockade.dicom.part10 import PREFIX, ZERO_PREAMBLE, read_part10
from stockade.dicom.tables import TRANSFER_SYNTAX_BY_UID
from stockade.dicom.uids import uid_problem
from stockade.errors import (
    DatasetMismatch,
    InvalidAttribute,
    InvalidObject,
    ObjectTooLarge,
    StockadeError,
)
from stockade.ingest import Origin, Prepared
from stockade.web import stowjson
from stockade.web.app import BASE, PROBLEM, actor_of, archive_of
from stockade.web.dicomjson import JSON_MEDIA_TYPE, RETRIEVE_URL, tag_hex
from stockade.web.encoding import BadEncoding, check_coding, decoded
from stockade.web.multipart import (
    MAX_PARTS,
    MalformedMultipart,
    MultipartParser,
    Part,
    check_boundary,
    read_parts,
)

if TYPE_CHECKING:
    from stockade.archive import Archive

DICOM_MEDIA_TYPE = "application/dicom"

# Tags of the Store Instances Response Module (PS3.18 Table 10.5.3-2).
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155
WARNING_REASON = 0x00081196
FAILURE_REASON = 0x00081197
FAILED_SOP_SEQUENCE = 0x00081198
REFERENCED_SOP_SEQUENCE = 0x00081199
#: Stockade's private block for the text of a failure or warning (PS3.5 7.8.1).
PRIVATE_CREATOR = 0x00090010
PRIVATE_CREATOR_NAME = "STOCKADE"
PRIVATE_REASON = 0x00091001
PRIVATE_CODE = 0x00091002

#: Warning Reason values (PS3.18 Table 10.5.3-3, PS3.4 B.2.3).
COERCION = 0xB000
ELEMENTS_DISCARDED = 0xB006

_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY = 0x0020000D
_IDENTITY = frozenset({_SOP_CLASS, _SOP_INSTANCE, _STUDY})

_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
#: A parameter: name, then a quoted string or a bare value. A bare value may hold "/"
#: (``type=application/dicom``, common though not a token per RFC 9110 5.6.2).
_PARAM = re.compile(rf';\s*({_TCHARS})\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s"]+)\s*')


class UnsupportedMediaType(StockadeError):
    """The request body is not in a media type this resource accepts (HTTP 415)."""

    http_status = 415
    dimse_status = 0xC000
    code = "unsupported-media-type"


class StudyMismatch(DatasetMismatch):
    """An instance sent to ``/studies/{study}`` belongs to another study (0xA900)."""

    code = "study-mismatch"


#: Parts queued for staging while the request is still arriving, and the most bytes they hold.
STORE_AHEAD = 8
STORE_AHEAD_BYTES = 256 * 1024 * 1024
#: Most staged parts recorded in one index transaction.
RECORD_BATCH = 100


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """The media type of a Content-Type value, lower-cased, and its parameters (RFC 9110
    8.3.1: names case-insensitive, values as tokens or quoted strings).

    Raises
    ------
    MalformedMultipart
        Parameters that do not parse.
    """
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    rest = ";" + rest if rest else ""
    pos = 0
    while pos < len(rest):
        found = _PARAM.match(rest, pos)
        if found is None:
            if not rest[pos:].strip(" \t;"):
                break
            raise MalformedMultipart("the Content-Type parameters do not parse (RFC 9110 8.3.1)")
        raw = found.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[found.group(1).lower()] = raw
        pos = found.end()
    return main.strip().lower(), params


def _keep(headers: Mapping[str, str]) -> bool:
    """Whether a part is DICOM (a part without Content-Type takes the ``type`` parameter,
    RFC 2387 3.1)."""
    given = headers.get("content-type")
    if given is None:
        return True
    try:
        return media_type(given)[0] == DICOM_MEDIA_TYPE
    except MalformedMultipart:
        return False  # that part fails alone


@dataclass(frozen=True)
class Identity:
    """The UIDs read from a part before or after it went through ingest."""

    sop_class: str | None = None
    sop_instance: str | None = None
    study: str | None = None


def _valid(uid: str | None) -> str | None:
    return uid if uid is not None and not uid_problem(uid) else None


def identify(data: bytes | bytearray, archive: Archive) -> Identity:
    """SOP Class, SOP Instance and Study Instance UIDs of a Part 10 file, read as ingest
    reads them (File Meta per PS3.10 7.1, then a bounded structural walk of the data set).

    Raises
    ------
    StockadeError
        The file does not parse (the same errors ingest would raise).
    """
    part10 = read_part10(data)
    ts = TRANSFER_SYNTAX_BY_UID.get(part10.transfer_syntax)
    if ts is None:
        raise InvalidObject(f"transfer syntax {part10.transfer_syntax[:64]} is not supported")
    dataset: bytes | bytearray | memoryview = memoryview(data)[part10.dataset_offset :]
    if ts.deflated:
        dataset, _after = inflate(dataset, archive.settings.max_inflated_size)
    found = scan(
        dataset,
        implicit_vr=ts.implicit_vr,
        little_endian=ts.little_endian,
        wanted=_IDENTITY,
        limits=archive.ingest.limits,
    )
    attrs = extract(dataset, found.values, little_endian=ts.little_endian)
    return Identity(
        sop_class=_text(attrs.get("SOPClassUID")) or part10.media_sop_class_uid,
        sop_instance=_text(attrs.get("SOPInstanceUID")) or part10.media_sop_instance_uid,
        study=_text(attrs.get("StudyInstanceUID")),
    )


def _text(value: str | int | None) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class Outcome:
    """What happened to one part."""

    identity: Identity
    stored: bool
    reasons: list[str] = field(default_factory=list)
    status: int = 0
    code: str = ""


def _warning_reason(warnings: list[str]) -> int:
    discarded = any("not stored" in w or w.startswith("discarded") for w in warnings)
    return ELEMENTS_DISCARDED if discarded else COERCION


_META_START = re.compile(rb"\x02\x00[\x00-\xff]{2}[A-Z]{2}")


def add_missing_preamble(data: bytearray) -> None:
    """Give a part that starts with its File Meta Information (no preamble, no ``DICM``) the
    128 zero bytes and prefix of PS3.10 7.1, in place.

    pydicom writes a data set without a preamble that way, so dicomweb-client sends data
    sets built in memory so; everything after the prefix is still checked by ingest.
    """
    if data[128:132] != PREFIX and _META_START.match(data):
        data[0:0] = ZERO_PREAMBLE + PREFIX


def prepare_part(
    archive: Archive, data: bytearray, origin: Origin, study: str | None
) -> Prepared | Outcome:
    """Check one complete part against the study of the URL, then run it through steps 1
    to 4 of the one ingest pipeline (checked and staged durably, not recorded yet); runs in
    a worker thread. A refused part comes back as its :class:`Outcome`."""
    add_missing_preamble(data)
    known = Identity()
    try:
        if study is not None:
            try:
                known = identify(data, archive)
            except StockadeError as exc:
                raise StudyMismatch(
                    f"the instance cannot be checked against study {study} of the URL: {exc.reason}"
                ) from None
            if known.study != study:
                raise StudyMismatch(
                    f"study instance UID mismatch: the instance belongs to study "
                    f"{_valid(known.study) or '(invalid or missing)'}, not {study} of the URL"
                )
        return archive.prepare_file(data, origin)
    except StudyMismatch as exc:
        return _rejected(archive, origin, known, exc)
    except StockadeError as exc:
        if known == Identity():
            try:
                known = identify(data, archive)
            except StockadeError:
                known = _meta_identity(data)
        return Outcome(known, False, [exc.reason], exc.dimse_status, exc.code)


def finish_parts(archive: Archive, prepared: list[Prepared]) -> list[Outcome]:
    """Record, publish and audit prepared parts together (one index transaction, one
    audit append); runs in a worker thread. Their outcomes, in order."""
    outcomes = []
    for item, result in zip(prepared, archive.finish_files(prepared), strict=True):
        if isinstance(result, StockadeError):
            attrs = item.attrs
            known = Identity(
                _text(attrs.get("SOPClassUID")),
                _text(attrs.get("SOPInstanceUID")),
                _text(attrs.get("StudyInstanceUID")),
            )
            reasons = [result.reason]
            outcomes.append(Outcome(known, False, reasons, result.dimse_status, result.code))
            continue
        identity = Identity(
            result.sop_class_uid, result.sop_instance_uid, result.study_instance_uid
        )
        outcomes.append(Outcome(identity, True, list(result.warnings), code=result.outcome.value))
    return outcomes


def _meta_identity(data: bytearray) -> Identity:
    """The UIDs the File Meta claims, when the data set itself does not parse."""
    try:
        part10 = read_part10(data)
    except StockadeError:
        return Identity()
    return Identity(part10.media_sop_class_uid, part10.media_sop_instance_uid)


def _refused(part: Part, max_object_size: int) -> Outcome | None:
    """The failure of a part the parser did not keep (too large, not DICOM)."""
    if not part.kept:
        reason = (
            f"part Content-Type {part.content_type[:64]!r} is not {DICOM_MEDIA_TYPE} "
            "(PS3.18 8.6.1.2)"
        )
        return Outcome(Identity(), False, [reason], 0xC000, "unsupported-media-type")
    if part.too_large:
        reason = f"part of {part.size} bytes exceeds max_object_size ({max_object_size})"
        return Outcome(Identity(), False, [reason], ObjectTooLarge.dimse_status, "too-large")
    return None


def _uid(value: str | None) -> dict[str, Any]:
    value = _valid(value)
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _private(item: dict[str, Any], reasons: list[str], code: str | None) -> None:
    item[tag_hex(PRIVATE_CREATOR)] = {"vr": "LO", "Value": [PRIVATE_CREATOR_NAME]}
    item[tag_hex(PRIVATE_REASON)] = {"vr": "LT", "Value": ["\n".join(reasons)[:10240]]}
    if code:
        item[tag_hex(PRIVATE_CODE)] = {"vr": "LO", "Value": [code[:64]]}


def response_body(base: str, outcomes: list[Outcome], study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-2) in DICOM JSON."""
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies = set()
    for outcome in outcomes:
        ident = outcome.identity
        item = {
            tag_hex(REFERENCED_SOP_CLASS_UID): _uid(ident.sop_class),
            tag_hex(REFERENCED_SOP_INSTANCE_UID): _uid(ident.sop_instance),
        }
        if outcome.stored:
            studies.add(ident.study)
            url = f"{base}/studies/{ident.study}/instances/{ident.sop_instance}"
            item[tag_hex(RETRIEVE_URL)] = {"vr": "UR", "Value": [url]}
            if outcome.reasons:
                reason = _warning_reason(outcome.reasons)
                item[tag_hex(WARNING_REASON)] = {"vr": "US", "Value": [reason]}
                _private(item, outcome.reasons, None)
            stored.append(dict(sorted(item.items())))
        else:
            item[tag_hex(FAILURE_REASON)] = {"vr": "US", "Value": [outcome.status]}
            _private(item, outcome.reasons, outcome.code)
            failed.append(dict(sorted(item.items())))
    body: dict[str, Any] = {}
    target = study if study is not None else (next(iter(studies)) if len(studies) == 1 else None)
    if target is not None:
        body[tag_hex(RETRIEVE_URL)] = {"vr": "UR", "Value": [f"{base}/studies/{target}"]}
    if failed:
        body[tag_hex(FAILED_SOP_SEQUENCE)] = {"vr": "SQ", "Value": failed}
    if stored:
        body[tag_hex(REFERENCED_SOP_SEQUENCE)] = {"vr": "SQ", "Value": stored}
    return body


def _check_request(request: Request, archive: Archive) -> tuple[bytes, str]:
    """Check the headers of a STOW-RS request; return the multipart boundary and the media
    type of its parts (``application/dicom`` or ``application/dicom+json``).

    Raises
    ------
    ObjectTooLarge
        A declared Content-Length over ``http_max_body_size`` (nothing has been read).
    UnsupportedMediaType
        Not ``multipart/related`` of ``application/dicom`` or ``application/dicom+json``.
    MalformedMultipart
        No usable boundary, or a Content-Length that is not a number.
    """
    limit = archive.settings.http_max_body_size
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise MalformedMultipart("Content-Length is not a number")
        if int(declared) > limit:
            raise ObjectTooLarge(
                f"the request body of {int(declared)} bytes is larger than "
                f"http_max_body_size ({limit} bytes)"
            )
    check_coding(request.headers.get("content-encoding"))
    kind, params = media_type(request.headers.get("content-type", ""))
    if kind != "multipart/related":
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="{DICOM_MEDIA_TYPE}", not '
            f"{kind[:64] or 'a body without Content-Type'} (PS3.18 10.5.1.2)"
        )
    part_type = params.get("type", "").lower()
    if part_type not in (DICOM_MEDIA_TYPE, stowjson.METADATA_MEDIA_TYPE):
        raise UnsupportedMediaType(
            f"multipart/related of type {part_type[:64]!r} is not supported; "
            f"only {DICOM_MEDIA_TYPE} and {stowjson.METADATA_MEDIA_TYPE} (PS3.18 10.5.1.2)"
        )
    return check_boundary(params.get("boundary", "")), part_type


def _stopped(exc: StockadeError, outcomes: list[Outcome]) -> Response:
    """A problem document for a request that broke down, naming what was already stored."""
    stored = [o.identity.sop_instance for o in outcomes if o.stored]
    detail = exc.reason
    if stored:
        detail += f"; {len(stored)} instance(s) received before this were stored"
    body = {
        "type": "about:blank",
        "title": "Content Too Large" if exc.http_status == 413 else "Bad Request",
        "status": exc.http_status,
        "detail": detail,
        "code": exc.code,
        "stored": stored,
    }
    return Response(json.dumps(body), status_code=exc.http_status, media_type=PROBLEM)


def base_url(request: Request) -> str:
    """The DICOMweb base URL the client used, for Retrieve URLs (PS3.18 10.5.3).

    dicomweb-client sends ``Host`` without its port (RFC 9110 7.2 wants it); Stockade serves
    no proxy headers, so the port of the socket is the one the client used (as WADO-RS does).
    """
    url = request.base_url
    server = request.scope.get("server")
    default = 80 if url.scheme == "http" else 443
    if url.port is None and server and server[1] not in (None, default):
        url = url.replace(port=int(server[1]))
    return str(url).rstrip("/") + BASE


class _Parts:
    """The parts of one STOW-RS request on their way through ingest, in order.

    A worker thread takes the complete parts from a queue as they arrive: it checks and
    stages each (:func:`prepare_part`) and lets go of its bytes, and it records what it
    has staged (:func:`finish_parts`: one index transaction, one audit append) whenever the
    queue runs dry and every :data:`RECORD_BATCH` parts. The thread runs while there is
    work and ends when the queue is empty (a slow client holds no thread); the next part
    starts another. The event loop meanwhile receives the next parts; it waits only when
    :data:`STORE_AHEAD` parts or :data:`STORE_AHEAD_BYTES` are queued, until half of them
    are staged, and is woken only then. So a request whose parts come quickly costs a
    few thread wake-ups rather than two per part (a wake-up costs about 0.15 ms of CPU on
    a small virtual machine, as much as cutting the part out of the body). Nothing is
    answered before :meth:`finish` has recorded every part (PS3.18 10.5: the response
    follows the whole request).
    """

    def __init__(self, archive: Archive, origin: Origin, study: str | None) -> None:
        self.archive, self.origin, self.study = archive, origin, study
        self.outcomes: list[Outcome | None] = []
        self.sizes: deque[int] = deque()  # bytes of the parts queued and not staged yet
        self.held = 0
        self.taken = 0  # parts the event loop knows are staged
        self.work: SimpleQueue[tuple[int, bytearray]] = SimpleQueue()
        self.runs: list[asyncio.Future[None]] = []
        self.lock = threading.Lock()
        self.running = False  # under lock
        self.broken = False  # under lock: a run failed, no other starts
        self.staged = 0  # under lock: parts the thread has staged or refused
        self.waiter: tuple[int, asyncio.Future[None]] | None = None  # under lock
        self.loop = asyncio.get_running_loop()

    def add_outcome(self, outcome: Outcome) -> None:
        """A part refused before ingest."""
        self.outcomes.append(outcome)

    async def add(self, body: bytearray) -> None:
        """Queue a complete part (waits while too many are queued)."""
        while self.sizes and (
            len(self.sizes) >= STORE_AHEAD or self.held + len(body) > STORE_AHEAD_BYTES
        ):
            # Until half the queue is staged: one wake-up for several parts.
            await self._staged(self.taken + max(1, len(self.sizes) // 2))
        slot = len(self.outcomes)
        self.outcomes.append(None)
        self.sizes.append(len(body))
        self.held += len(body)
        self.work.put((slot, body))
        with self.lock:
            if self.running or self.broken:
                return
            self.running = True
        self.runs = [run for run in self.runs if not run.done()] + [
            asyncio.ensure_future(run_in_threadpool(self._run))
        ]

    async def _staged(self, count: int) -> None:
        """Wait until the thread has staged *count* parts, then let go of their sizes."""
        with self.lock:
            ready = self.staged >= count
            if not ready:
                future = self.loop.create_future()
                self.waiter = (count, future)
        if not ready:
            await asyncio.shield(future)
        with self.lock:
            staged = self.staged
        while self.sizes and self.taken < staged:
            self.held -= self.sizes.popleft()
            self.taken += 1

    def _signal(self, more: int = 1) -> None:
        """In the thread: *more* parts are staged; wake the event loop if it waits."""
        with self.lock:
            self.staged += more
            staged = self.staged
            waiter = self.waiter
            if waiter is None or waiter[0] > staged:
                return
            self.waiter = None
        self.loop.call_soon_threadsafe(_wake, waiter[1])

    def _run(self) -> None:
        """The worker thread: stage the queued parts in order, record them in batches,
        end when the queue is empty."""
        staged: list[tuple[int, Prepared]] = []
        try:
            while True:
                try:
                    slot, body = self.work.get_nowait()
                except Empty:
                    self._record(staged)
                    with self.lock:
                        if self.work.empty():
                            self.running = False
                            return
                    continue
                result = prepare_part(self.archive, body, self.origin, self.study)
                del body
                if isinstance(result, Outcome):
                    self.outcomes[slot] = result
                else:
                    staged.append((slot, result))
                self._signal()
                if len(staged) >= RECORD_BATCH:
                    self._record(staged)
        except BaseException:
            with self.lock:
                self.running, self.broken = False, True
            self._signal(1 << 62)  # nothing more will be staged: no waiting for it
            raise

    def _record(self, staged: list[tuple[int, Prepared]]) -> None:
        """In the thread: record *staged* together and empty it."""
        if not staged:
            return
        outcomes = finish_parts(self.archive, [p for _, p in staged])
        for (slot, _prepared), outcome in zip(staged, outcomes, strict=True):
            self.outcomes[slot] = outcome
        staged.clear()

    async def finish(self) -> list[Outcome]:
        """Wait until every part is staged and recorded; the outcomes, in order (parts
        whose staging or recording was cut short by an error are left out).

        Raises
        ------
        Exception
            What went wrong in the thread.
        """
        while self.runs:
            await asyncio.shield(self.runs.pop(0))
        return [o for o in self.outcomes if o is not None]


class _Collected:
    """The parts of a metadata and bulk data request, held until the request ends: the
    metadata parts in order, the bulk data parts by Content-Location (PS3.18 8.7.3)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.metadata: list[bytearray] = []
        self.bulk: dict[str, stowjson.Bulk] = {}

    def add(self, part: Part) -> None:
        """Keep *part*. A bulk data part without Content-Location, or whose Content-Type
        does not parse, cannot be named by the metadata and is let go.

        Raises
        ------
        ObjectTooLarge
            A part over ``max_object_size``, or the parts together over it.
        MalformedMultipart
            Two bulk data parts with the same Content-Location.
        """
        self.held += part.size
        if part.too_large or self.held > self.limit:
            raise ObjectTooLarge(
                "a metadata and bulk data request is held until it ends, and its parts "
                f"together exceed max_object_size ({self.limit} bytes)"
            )
        given = part.headers.get("content-type")
        try:
            kind, params = media_type(given) if given else (stowjson.METADATA_MEDIA_TYPE, {})
        except MalformedMultipart:
            return
        if kind == stowjson.METADATA_MEDIA_TYPE:
            self.metadata.append(part.body)
            return
        location = part.headers.get("content-location")
        if location is None:
            return
        if location in self.bulk:
            raise MalformedMultipart(
                f"two bulk data parts have Content-Location {location[:200]!r}"
            )
        self.bulk[location] = stowjson.Bulk(kind, params.get("transfer-syntax"), part.body)


async def _convert(collected: _Collected, parts: _Parts, archive: Archive, origin: Origin) -> None:
    """Make each instance of the metadata a Part 10 file (in a worker thread) and queue it
    for ingest; one that cannot be made fails alone, audited like a refused part."""
    count = 0
    for body in collected.metadata:
        try:
            objects = await run_in_threadpool(stowjson.instances, body)
        except StockadeError as exc:
            parts.add_outcome(_unconverted(archive, origin, None, exc))
            continue
        count += len(objects)
        if count > MAX_PARTS:  # as many instances as a DICOM request may have parts
            raise MalformedMultipart(f"the metadata holds more than {MAX_PARTS} instances")
        for obj in objects:
            try:
                data = await run_in_threadpool(stowjson.to_part10, obj, collected.bulk)
            except StockadeError as exc:
                parts.add_outcome(_unconverted(archive, origin, obj, exc))
                continue
            await parts.add(data)
            del data


def _unconverted(archive: Archive, origin: Origin, obj: Any, exc: StockadeError) -> Outcome:
    known = Identity(
        stowjson.claimed(obj, "00080016"),
        stowjson.claimed(obj, "00080018"),
        stowjson.claimed(obj, "0020000D"),
    )
    return _rejected(archive, origin, known, exc)


def _rejected(archive: Archive, origin: Origin, known: Identity, exc: StockadeError) -> Outcome:
    """Audit a part refused before ingest (ingest audits its own refusals); its outcome."""
    archive.audit(
        InstanceRejected(
            actor=origin.actor(),
            outcome="failure",
            reason=exc.reason,
            code=exc.code,
            sop_instance_uid=_valid(known.sop_instance),
        )
    )
    return Outcome(known, False, [exc.reason], exc.dimse_status, exc.code)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def store(request: Request) -> Response:
    """``POST /studies[/{study}]``: store the instances of a multipart request (PS3.18
    10.5), one part at a time as the body arrives."""
    archive = archive_of(request)
    study: str | None = request.path_params.get("study")
    if study is not None:
        problem = uid_problem(study)
        if problem:
            raise InvalidAttribute(f"StudyInstanceUID in the URL {problem}")
    boundary, part_type = _check_request(request, archive)
    settings = archive.settings
    actor = actor_of(request)  # the authenticated user is recorded as the sender
    origin = Origin(via="web", address=actor.address, user=actor.user)
    collected = (
        _Collected(settings.max_object_size) if part_type == stowjson.METADATA_MEDIA_TYPE else None
    )
    parser = MultipartParser(
        boundary,
        max_part_size=settings.max_object_size,
        keep=_keep if collected is None else None,
    )
    parts = _Parts(archive, origin, study)
    try:
        stream = decoded(
            request.stream(), request.headers.get("content-encoding"), settings.http_max_body_size
        )
        received = read_parts(stream, parser, settings.http_max_body_size)
        async with aclosing(received):
            async for part in received:
                if collected is not None:
                    collected.add(part)
                    continue
                refused = _refused(part, settings.max_object_size)
                if refused is not None:
                    parts.add_outcome(refused)
                    continue
                body, part.body = part.body, bytearray()
                await parts.add(body)
                del body
        if collected is not None:
            await _convert(collected, parts, archive, origin)
        outcomes = await parts.finish()
    except (MalformedMultipart, ObjectTooLarge, BadEncoding) as exc:
        return _stopped(exc, await parts.finish())
    finally:
        await parts.finish()  # the client went away: the parts received are still stored
    if not outcomes:
        raise MalformedMultipart("the request carries no instances")
    base = base_url(request)
    failed = sum(not o.stored for o in outcomes)
    warned = any(o.stored and o.reasons for o in outcomes)
    if failed == len(outcomes):
        status = 409
    elif failed or warned:
        status = 202
    else:
        status = 200
    return Response(
        json.dumps(response_body(base, outcomes, study)),
        status_code=status,
        media_type=JSON_MEDIA_TYPE,
    )


ROUTES: list[BaseRoute] = [
    Route("/studies", store, methods=["POST"]),
    Route("/studies/{study}", store, methods=["POST"]),
]
