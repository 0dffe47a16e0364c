"""The study page's actions: download a study as a ZIP, send it to a node, delete it.

Routes (JSON answers; errors are RFC 9457 problem documents, :func:`stockade.web.app.problem`).
They are not DICOMweb routes, so each checks its permission itself
(:func:`stockade.auth.service.require`); a study outside the caller's scope is answered like a
missing one (404). Unsafe methods with the session cookie need ``X-CSRF-Token``
(:class:`stockade.web.auth.Authenticate`).

``GET /api/studies/{study}/zip`` (``download``)
    The study as ``application/zip`` (PKWARE APPNOTE 6.3, stored entries, ZIP64 where a size,
    an offset or the entry count needs it), ``Content-Disposition: attachment;
    filename="study-<StudyInstanceUID>.zip"``. One entry per instance, its Part 10 file as
    stored (PS3.10 7.1) with a 128-byte zero preamble. Entry names are made by Stockade from
    the series and instance order, ``S0001/I00001.dcm``, never from DICOM values. The answer
    is streamed: each instance is read and verified (:meth:`stockade.retrieve.Retrieval.read`)
    in a worker thread and sent before the next is read, so memory is bounded by one instance.
    An instance that fails its integrity check is left out and named in a ``MISSING.txt``
    entry. One ``InstancesRetrieved`` audit record (service ``zip``), as for WADO-RS.
``POST /api/studies/{study}/send`` (``download``: the data leaves the archive)
    Body ``{"node": "<name>"}`` (at most :data:`MAX_BODY` bytes). C-STORE of the study to that
    configured node through the path of ``stockade send``
    (:func:`stockade.dimse.retrieve.send_to_node`), audited as ``InstancesRetrieved`` (service
    ``send``, destination the node's AE title). Answers ``{"node", "ae_title", "located",
    "completed", "warning", "failed"}``. An unknown node is 404; a node that cannot be reached
    or refuses the association is 502.
``DELETE /api/studies/{study}`` (``delete``)
    Deletes the study (:meth:`stockade.archive.Archive.delete`, audited ``InstancesDeleted``
    in the transaction of the deletion). Answers ``{"deleted": <instances>}``.
``GET /api/nodes`` (``download``)
    The configured nodes a study can be sent to: ``[{"name", "ae_title"}]`` (no host or port).
"""

from __future__ import annotations

import re
import struct
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from stockade.auth.roles import Permission
from stockade.auth.service import require
from stockade.dicom.attributes import Level
from stockade.errors import InvalidQuery, NotFound, StockadeError
from stockade.retrieve import StoredInstance
from stockade.web.app import actor_of, archive_of, path_uids, scope_of
from stockade.web.auth import principal_of
from stockade.web.body import json_object
from stockade.web.wado import RetrievalStream, stored_part10

__all__ = ["MAX_BODY", "ROUTES", "ZipStream", "entry_names"]

#: Largest JSON body of ``POST /api/studies/{study}/send``.
MAX_BODY = 4096
#: Sizes and offsets from this value on are written as ZIP64 fields (APPNOTE 4.5.3).
ZIP64_FROM = 0xFFFFFFFF
#: More entries than this need the ZIP64 end of central directory record (APPNOTE 4.4.21).
ZIP64_ENTRIES = 0xFFFF
_VERSION_ZIP = 20  # 2.0: stored files, folders (APPNOTE 4.4.3.2)
_VERSION_ZIP64 = 45  # 4.5: ZIP64
_MADE_BY_UNIX = 3 << 8
_REGULAR_FILE = 0o100644 << 16
_DICOM_UID = re.compile(r"[0-9.]{1,64}")


# -- the ZIP writer (PKWARE APPNOTE.TXT 6.3) -------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: bytes
    crc: int
    size: int
    offset: int


def _dos_time(when: time.struct_time) -> tuple[int, int]:
    """MS-DOS time and date (APPNOTE 4.4.6); years before 1980 are written as 1980."""
    year = max(when.tm_year, 1980)
    stamp = (when.tm_hour << 11) | (when.tm_min << 5) | (when.tm_sec // 2)
    day = ((year - 1980) << 9) | (when.tm_mon << 5) | when.tm_mday
    return stamp, day


class ZipStream:
    """Writes a ZIP archive of stored (uncompressed) entries front to back, for streaming.

    Each entry's CRC-32 and size are known before it is written, so every local header
    carries them and no data descriptor is needed (readers that read a ZIP as a stream
    handle it). Only the central directory (about 100 bytes per entry) is kept until
    :meth:`end`. ZIP64 fields (APPNOTE 4.5.3, 4.3.14) are written where a size or an offset
    reaches :data:`ZIP64_FROM` or the entry count passes :data:`ZIP64_ENTRIES`.
    """

    def __init__(self, when: time.struct_time | None = None) -> None:
        self.offset = 0
        self.entries: list[_Entry] = []
        self.time, self.date = _dos_time(when or time.localtime())

    def entry(self, name: str, chunks: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        """The bytes of one entry (local header, then *chunks* as they are) to send next.

        *name* is ASCII, made by the caller (never taken from DICOM values).
        """
        raw = name.encode("ascii")
        crc = 0
        size = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        zip64 = size >= ZIP64_FROM
        extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
        field = 0xFFFFFFFF if zip64 else size
        header = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,  # local file header signature (APPNOTE 4.3.7)
            _VERSION_ZIP64 if zip64 else _VERSION_ZIP,
            0,  # flags: no encryption, no data descriptor, ASCII name
            0,  # stored
            self.time,
            self.date,
            crc,
            field,
            field,
            len(raw),
            len(extra),
        )
        self.entries.append(_Entry(raw, crc, size, self.offset))
        self.offset += len(header) + len(raw) + len(extra) + size
        return [header + raw + extra, *chunks]

    def end(self) -> bytes:
        """The central directory and its end records (APPNOTE 4.3.12 to 4.3.16)."""
        out = bytearray()
        start = self.offset
        for e in self.entries:
            big_size = e.size >= ZIP64_FROM
            big_offset = e.offset >= ZIP64_FROM
            values = ([e.size, e.size] if big_size else []) + ([e.offset] if big_offset else [])
            extra = (
                struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values)
                if values
                else b""
            )
            version = _VERSION_ZIP64 if extra else _VERSION_ZIP
            out += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,  # central file header signature
                _MADE_BY_UNIX | _VERSION_ZIP64,
                version,
                0,
                0,
                self.time,
                self.date,
                e.crc,
                0xFFFFFFFF if big_size else e.size,
                0xFFFFFFFF if big_size else e.size,
                len(e.name),
                len(extra),
                0,  # no comment
                0,  # disk number start
                0,  # internal attributes
                _REGULAR_FILE,
                0xFFFFFFFF if big_offset else e.offset,
            )
            out += e.name + extra
        size = len(out)
        count = len(self.entries)
        if count > ZIP64_ENTRIES or size >= ZIP64_FROM or start >= ZIP64_FROM:
            record = start + size
            out += struct.pack(
                "<IQHHIIQQQQ",
                0x06064B50,  # ZIP64 end of central directory record
                44,
                _MADE_BY_UNIX | _VERSION_ZIP64,
                _VERSION_ZIP64,
                0,
                0,
                count,
                count,
                size,
                start,
            )
            out += struct.pack("<IIQI", 0x07064B50, 0, record, 1)  # its locator
        out += struct.pack(
            "<IHHHHIIH",
            0x06054B50,  # end of central directory record
            0,
            0,
            min(count, 0xFFFF),
            min(count, 0xFFFF),
            min(size, 0xFFFFFFFF),
            min(start, 0xFFFFFFFF),
            0,
        )
        self.offset += len(out)
        return bytes(out)


def entry_names(instances: Sequence[StoredInstance]) -> list[str]:
    """``S0001/I00001.dcm`` and so on: series numbered in the order they come, instances
    within each series in theirs (the retrieve order: series, then Instance Number)."""
    series: dict[str, int] = {}
    within: dict[str, int] = {}
    names = []
    for inst in instances:
        number = series.setdefault(inst.series_instance_uid, len(series) + 1)
        within[inst.series_instance_uid] = within.get(inst.series_instance_uid, 0) + 1
        names.append(f"S{number:04d}/I{within[inst.series_instance_uid]:05d}.dcm")
    return names


# -- routes ----------------------------------------------------------------------------------


def _study(request: Request) -> str:
    """The StudyInstanceUID of the path, checked (PS3.5 9.1)."""
    return path_uids(request)["StudyInstanceUID"]


async def study_zip(request: Request) -> Response:
    """``GET /api/studies/{study}/zip``: the study as a streamed ZIP of Part 10 files with
    zero preambles (PS3.10 7.1); entry names made by Stockade; audited like WADO-RS."""
    require(principal_of(request), Permission.DOWNLOAD)
    study = _study(request)
    archive = archive_of(request)
    retrieval = await run_in_threadpool(
        lambda: archive.retrieve(
            Level.STUDY,
            {"StudyInstanceUID": study},
            service="zip",
            actor=actor_of(request),
            scope=scope_of(request),
        )
    )
    if not retrieval.instances:
        retrieval.finish()
        raise NotFound(f"no study {study} is stored here")
    names = entry_names(retrieval.instances)

    async def stream() -> AsyncIterator[bytes | memoryview]:
        writer = ZipStream()
        missing: list[str] = []
        for inst, name in zip(retrieval.instances, names, strict=True):

            def one(inst: StoredInstance = inst, name: str = name) -> list[bytes | memoryview]:
                return writer.entry(name, stored_part10(retrieval, inst))

            try:
                chunks = await run_in_threadpool(one)
            except StockadeError as exc:
                retrieval.done(inst, "failed", exc.reason)
                missing.append(f"{name}: {exc.reason}")
                continue
            for chunk in chunks:
                yield chunk
            retrieval.done(inst, "completed")
        if missing:
            note = "Left out of this download:\n" + "\n".join(missing) + "\n"
            for chunk in writer.entry("MISSING.txt", [note.encode("utf-8")]):
                yield chunk
        yield writer.end()

    safe = study if _DICOM_UID.fullmatch(study) else "download"
    return RetrievalStream(
        stream(), retrieval, "application/zip", f'attachment; filename="study-{safe}.zip"'
    )


async def send_study(request: Request) -> Response:
    """``POST /api/studies/{study}/send``: C-STORE the study to a configured node (PS3.4
    B.2), as ``stockade send`` does; audited ``InstancesRetrieved`` (service ``send``)."""
    from stockade.dimse.requestor import AssociationFailed
    from stockade.dimse.retrieve import send_to_node

    require(principal_of(request), Permission.DOWNLOAD)
    study = _study(request)
    data = await json_object(request, MAX_BODY)
    name = data.get("node")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InvalidQuery('the body must name a node: {"node": "<name>"}')
    archive = archive_of(request)
    actor = actor_of(request)
    scope = scope_of(request)

    def work() -> dict[str, Any]:
        node = archive.node(name)
        retrieval = archive.retrieve(
            Level.STUDY,
            {"StudyInstanceUID": study},
            service="send",
            destination=node.ae_title,
            actor=actor,
            scope=scope,
        )
        try:
            if not retrieval.instances:
                raise NotFound(f"no study {study} is stored here")
            send_to_node(archive, retrieval, node.host, node.port, node.ae_title)
        except AssociationFailed as exc:
            retrieval.fail_rest(exc.reason)
            raise AssociationFailed(
                f"node {node.name} ({node.ae_title}) could not be reached or refused the "
                f"association; nothing was sent: {exc.reason}"
            ) from exc
        finally:
            retrieval.finish()
        return {
            "node": node.name,
            "ae_title": node.ae_title,
            "located": len(retrieval.instances),
            "completed": retrieval.completed,
            "warning": retrieval.warning,
            "failed": len(retrieval.failed),
        }

    return JSONResponse(await run_in_threadpool(work))


async def delete_study(request: Request) -> Response:
    """``DELETE /api/studies/{study}``: delete the study; audited ``InstancesDeleted``."""
    principal = principal_of(request)
    require(principal, Permission.DELETE)
    study = _study(request)
    archive = archive_of(request)
    actor = actor_of(request)
    scope = scope_of(request)

    def work() -> int:
        if scope is not None:  # out of scope is answered like missing
            found = archive.query(
                Level.STUDY, {"StudyInstanceUID": study}, actor=actor, limit=1, scope=scope
            )
            if not found.rows:
                raise NotFound(f"no study {study} is stored here")
        try:
            return len(archive.delete(study, actor=actor))
        except NotFound:
            raise NotFound(f"no study {study} is stored here") from None

    return JSONResponse({"deleted": await run_in_threadpool(work)})


async def nodes(request: Request) -> Response:
    """``GET /api/nodes``: the configured nodes a study can be sent to (name, AE title)."""
    require(principal_of(request), Permission.DOWNLOAD)
    found = await run_in_threadpool(archive_of(request).nodes)
    return JSONResponse(
        [{"name": n.name, "ae_title": n.ae_title} for n in sorted(found, key=lambda n: n.name)]
    )


ROUTES: list[BaseRoute] = [
    Route("/api/studies/{study}/zip", study_zip, methods=["GET"]),
    Route("/api/studies/{study}/send", send_study, methods=["POST"]),
    Route("/api/studies/{study}", delete_study, methods=["DELETE"]),
    Route("/api/nodes", nodes, methods=["GET"]),
]
