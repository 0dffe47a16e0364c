"""C-GET and C-MOVE SCP (PS3.4 C.4.2 and C.4.3), and the C-STORE sub-operations they share
with ``stockade send``.

Both locate their instances through :meth:`Archive.retrieve` (the one retrieve path: locate,
open, verify the hash, audit) and send each one as a C-STORE sub-operation: for C-GET on the
requestor's own association, over the storage contexts it proposed with the SCP role (SCP/SCU
Role Selection, PS3.7 D.3.3.4); for C-MOVE on a new association to the Move Destination,
which must be a configured node (else A801H). Each instance goes in its stored transfer
syntax when the receiver accepted it, otherwise transcoded to one it accepted
(:mod:`stockade.dicom.transcode`). After each sub-operation a Pending response carries the
counts; the final response is Success, Warning B000H with the Failed SOP Instance UID List,
Refused A702H when every sub-operation failed, or Cancel FE00H after a C-CANCEL-RQ.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stockade.dicom import transcode
from stockade.dicom.attributes import Level
from stockade.dicom.tables import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    TRANSFER_SYNTAX_BY_UID,
)
from stockade.dimse.association import Association, Link, Message, _Closed
from stockade.dimse.commands import Command, Tag, error_comment
from stockade.dimse.find import decode_identifier, query_of
from stockade.dimse.requestor import MAX_CONTEXTS, AssociationFailed, Proposal, Requestor, connect
from stockade.errors import CannotTranscode, IntegrityError, NotFound, StockadeError
from stockade.query import LEVEL_ORDER
from stockade.retrieve import StoredInstance
from stockade.security.tls import dicom_client_context

if TYPE_CHECKING:
    from stockade.archive import Archive, Peer
    from stockade.retrieve import Retrieval

log = logging.getLogger(__name__)

PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
#: Retrieve information models and their levels (PS3.4 C.6.1 and C.6.2).
MOVE_MODELS: dict[str, tuple[Level, ...]] = {
    PATIENT_ROOT_MOVE: LEVEL_ORDER,
    STUDY_ROOT_MOVE: LEVEL_ORDER[1:],
}
GET_MODELS: dict[str, tuple[Level, ...]] = {
    PATIENT_ROOT_GET: LEVEL_ORDER,
    STUDY_ROOT_GET: LEVEL_ORDER[1:],
}

PENDING, CANCELLED, SUCCESS, WARNING = 0xFF00, 0xFE00, 0x0000, 0xB000
UNABLE = 0xA702  # Refused: Out of Resources - Unable to perform sub-operations
FAILED_SOP_INSTANCE_UID_LIST = 0x00080058
#: Seconds between Pending responses after the first (each costs a write and a wake-up of
#: the requestor; a viewer's progress bar needs no more).
PENDING_INTERVAL = 0.1
#: Largest object read ahead while the previous one is being sent (larger ones are read
#: when their turn comes, so that at most one large object is in memory per retrieve).
PREFETCH_MAX = 64 * 1024 * 1024
#: An explicit VR UI value has a 16-bit length: the failed list is clipped to fit.
_MAX_UID_LIST = 0xFFFE


def failed_identifier(uids: list[str], transfer_syntax: str) -> bytes:
    """The response identifier holding Failed SOP Instance UID List (0008,0058)."""
    value = b""
    for uid in uids:
        item = uid.encode("ascii") if not value else b"\\" + uid.encode("ascii")
        if len(value) + len(item) > _MAX_UID_LIST - 1:
            break
        value += item
    if len(value) % 2:
        value += b"\x00"
    ts = TRANSFER_SYNTAX_BY_UID.get(transfer_syntax)
    if ts is not None and ts.implicit_vr:
        return struct.pack("<HHL", 0x0008, 0x0058, len(value)) + value
    return struct.pack("<HH2sH", 0x0008, 0x0058, b"UI", len(value)) + value


def status_kind(status: int) -> str:
    """completed, warning or failed for a C-STORE response status (PS3.4 B.2.3)."""
    if status == SUCCESS:
        return "completed"
    if status in (0x0001, 0x0107, 0x0116) or status & 0xF000 == 0xB000:
        return "warning"
    return "failed"


class StoreTarget(Protocol):
    """Where sub-operations go: the requestor's association (C-GET) or a new one."""

    def contexts(self, sop_class_uid: str) -> list[tuple[int, str]]:
        """(context id, transfer syntax) usable to send instances of this SOP class."""

    def store(self, context_id: int, inst: StoredInstance, data: bytes | memoryview) -> int:
        """Send one C-STORE-RQ and return the response status."""


@dataclass(frozen=True)
class _Prepared:
    """One instance made ready to send: its data set and context, or why it cannot go."""

    context_id: int = 0
    data: bytes | memoryview = b""
    failure: str | None = None


def _prepare(retrieval: Retrieval, inst: StoredInstance, by_ts: dict[str, int]) -> _Prepared:
    """Read, verify and (if needed) transcode one instance for the accepted contexts."""
    candidates = [t for t in transcode.producible(inst.transfer_syntax) if t in by_ts]
    if not candidates:
        offered = ", ".join(sorted(by_ts)) or "none"
        return _Prepared(
            failure=f"no accepted context for {inst.sop_class_uid} in a transfer syntax "
            f"producible from {inst.transfer_syntax} (accepted: {offered})"
        )
    try:
        chosen, data = retrieval.dataset(inst, candidates)
    except (IntegrityError, CannotTranscode) as exc:
        return _Prepared(failure=exc.reason)
    return _Prepared(by_ts[chosen], data)


def run_suboperations(
    retrieval: Retrieval,
    target: StoreTarget,
    pending: Callable[[Retrieval], None] | None,
    cancelled: Callable[[], bool],
) -> bool:
    """Send every located instance to *target* (PS3.4 C.4.2.3.1); True if cancelled.

    An instance is sent in its stored transfer syntax when an accepted context has it,
    else in the first accepted one :func:`transcode.producible` lists that its codecs
    manage; an instance with none, a hash that no longer matches, or no successful
    transcode counts as failed and is not sent. The next instance is read, verified and
    transcoded in a helper thread while the receiver handles the current one (file reads,
    SHA-256 and the codecs release the GIL), unless it is larger than
    :data:`PREFETCH_MAX`. A Pending response follows the first sub-operation and then at
    most every :data:`PENDING_INTERVAL` seconds (PS3.4 C.4.2.3.1 makes them optional).
    """
    instances = retrieval.instances
    if not instances:
        return False
    accepted: dict[str, dict[str, int]] = {}

    def contexts(inst: StoredInstance) -> dict[str, int]:
        if inst.sop_class_uid not in accepted:
            found = target.contexts(inst.sop_class_uid)
            accepted[inst.sop_class_uid] = {ts: cid for cid, ts in reversed(found)}
        return accepted[inst.sop_class_uid]

    last_pending = -PENDING_INTERVAL
    with ThreadPoolExecutor(1, thread_name_prefix="retrieve-read") as pool:
        ahead: Future[_Prepared] | None = None
        for number, inst in enumerate(instances):
            if cancelled():
                if ahead is not None:
                    ahead.cancel()
                return True
            ready = _prepare(retrieval, inst, contexts(inst)) if ahead is None else ahead.result()
            ahead = None
            if number + 1 < len(instances) and instances[number + 1].size <= PREFETCH_MAX:
                following = instances[number + 1]
                ahead = pool.submit(_prepare, retrieval, following, contexts(following))
            if ready.failure is not None:
                retrieval.done(inst, "failed", ready.failure)
            else:
                status = target.store(ready.context_id, inst, ready.data)
                kind = status_kind(status)
                retrieval.done(inst, kind, None if kind != "failed" else f"status {status:#06x}")
            del ready
            now = time.monotonic()
            if (
                pending is not None
                and retrieval.remaining
                and (now - last_pending >= PENDING_INTERVAL)
            ):
                pending(retrieval)
                last_pending = now
    return False


class _SameAssociation:
    """C-GET: C-STORE sub-operations on the requestor's association (PS3.4 C.4.3.3)."""

    def __init__(self, assoc: Association, inbox: Iterator[Message], cancel_id: int) -> None:
        self.assoc = assoc
        self.inbox = inbox
        self.cancel_id = cancel_id
        self.cancel_seen = False
        self._next_id = 0

    def contexts(self, sop_class_uid: str) -> list[tuple[int, str]]:
        return [
            (cid, str(cx.transfer_syntax[0]))
            for cid, cx in self.assoc.accepted.items()
            if str(cx.abstract_syntax) == sop_class_uid and cx.as_scu
        ]  # called once per SOP class and retrieve

    def store(self, context_id: int, inst: StoredInstance, data: bytes | memoryview) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        mid = self._next_id
        self.assoc.send_message(
            context_id,
            [
                (Tag.COMMAND_FIELD, Command.C_STORE_RQ),
                (Tag.MESSAGE_ID, mid),
                (Tag.PRIORITY, 0),
                (Tag.COMMAND_DATA_SET_TYPE, 0x0000),
                (Tag.AFFECTED_SOP_CLASS_UID, inst.sop_class_uid),
                (Tag.AFFECTED_SOP_INSTANCE_UID, inst.sop_instance_uid),
            ],
            data,
        )
        while True:
            try:
                message = next(self.inbox)
            except StopIteration:
                raise _Closed("peer released the association during C-GET") from None
            field = message.command.get(Tag.COMMAND_FIELD)
            responded = message.command.get(Tag.MESSAGE_ID_BEING_RESPONDED_TO)
            if field == Command.C_CANCEL_RQ and responded == self.cancel_id:
                self.cancel_seen = True
                continue
            if field == Command.C_STORE_RSP and responded == mid:
                status = message.command.get(Tag.STATUS)
                return status if isinstance(status, int) else 0xC000
            self.assoc.abort()
            raise _Closed(f"unexpected DIMSE message {field!r} during C-GET sub-operations")


class _Destination:
    """C-MOVE and ``stockade send``: sub-operations on an association we opened."""

    def __init__(self, link: Requestor, originator: tuple[str, int] | None) -> None:
        self.link = link
        self.originator = originator

    def contexts(self, sop_class_uid: str) -> list[tuple[int, str]]:
        return self.link.contexts_for(sop_class_uid)

    def store(self, context_id: int, inst: StoredInstance, data: bytes | memoryview) -> int:
        return self.link.store(
            context_id,
            inst.sop_class_uid,
            inst.sop_instance_uid,
            data,
            move_originator=self.originator,
        ).status


def storage_proposals(instances: list[StoredInstance]) -> list[Proposal]:
    """Presentation contexts to send *instances*: per SOP class one context per transfer
    syntax producible from what is stored, stored ones first (at most 128 in all; past
    that, each class keeps its stored syntaxes and the two uncompressed ones)."""
    stored: dict[str, list[str]] = {}
    for inst in instances:
        seen = stored.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax not in seen:
            seen.append(inst.transfer_syntax)
    full: list[Proposal] = []
    short: list[Proposal] = []
    for sop_class, syntaxes in stored.items():
        wanted: list[str] = []
        for ts in syntaxes:
            for candidate in (ts, *transcode.producible(ts)):
                if candidate not in wanted:
                    wanted.append(candidate)
        full += [Proposal(sop_class, (ts,)) for ts in wanted]
        basic = [*syntaxes]
        basic += [
            t for t in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN) if t not in basic
        ]
        short += [Proposal(sop_class, (ts,)) for ts in basic]
    if len(full) <= MAX_CONTEXTS:
        return full
    return short[:MAX_CONTEXTS]


def send_to_node(
    archive: Archive,
    retrieval: Retrieval,
    host: str,
    port: int,
    called_ae: str,
    *,
    originator: tuple[str, int] | None = None,
    pending: Callable[[Retrieval], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Open an association to a node and send every located instance; True if cancelled.

    Raises
    ------
    AssociationFailed
        The node could not be reached or refused the association (nothing was sent).
    """
    settings = archive.settings
    if not retrieval.instances:
        return False
    node = next(
        (n for n in archive.nodes() if (n.ae_title, n.host, n.port) == (called_ae, host, port)),
        None,
    )
    link = connect(
        host,
        port,
        calling_ae=settings.dicom_ae_title,
        called_ae=called_ae,
        proposals=storage_proposals(retrieval.instances),
        max_pdu=settings.max_pdu_size,
        max_object=settings.max_object_size,
        timeout=settings.dicom_acse_timeout,
        tls=dicom_client_context(settings) if node is not None and node.tls else None,
    )
    link.idle_timeout = settings.dicom_idle_timeout
    try:
        stopped = run_suboperations(retrieval, _Destination(link, originator), pending, cancelled)
    except AssociationFailed as exc:
        link.abort()
        link.close()
        retrieval.fail_rest(exc.reason)
        return False
    except BaseException:
        link.abort()
        link.close()
        raise
    link.release()
    return stopped


class RetrieveService:
    """Answers C-GET and C-MOVE requests of one association."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def _respond(
        self,
        assoc: Association,
        message: Message,
        field: int,
        status: int,
        retrieval: Retrieval | None,
        comment: str | None = None,
        *,
        final: bool = False,
    ) -> None:
        """A C-GET-RSP or C-MOVE-RSP with the sub-operation counts (PS3.4 C.4.2.1.6)."""
        mid = message.command.get(Tag.MESSAGE_ID, 0)
        elements: list[tuple[int, int | str]] = [
            (Tag.COMMAND_FIELD, field),
            (Tag.MESSAGE_ID_BEING_RESPONDED_TO, mid if isinstance(mid, int) else 0),
            (Tag.STATUS, status),
            (Tag.AFFECTED_SOP_CLASS_UID, message.abstract_syntax),
        ]
        identifier = None
        if retrieval is not None:
            if status in (PENDING, CANCELLED):
                elements.append((Tag.REMAINING_SUBOPERATIONS, retrieval.remaining))
            elements += [
                (Tag.COMPLETED_SUBOPERATIONS, retrieval.completed),
                (Tag.FAILED_SUBOPERATIONS, len(retrieval.failed)),
                (Tag.WARNING_SUBOPERATIONS, retrieval.warning),
            ]
            if final and retrieval.failed:
                identifier = failed_identifier(retrieval.failed, message.transfer_syntax)
        if comment and status not in (SUCCESS, PENDING):
            elements.append((Tag.ERROR_COMMENT, error_comment(comment)))
        elements.append((Tag.COMMAND_DATA_SET_TYPE, 0x0101 if identifier is None else 0x0000))
        if identifier is None:
            assoc.send_command(message.context_id, elements)
        else:
            assoc.send_message(message.context_id, elements, identifier)

    def _final(
        self, assoc: Association, message: Message, field: int, retrieval: Retrieval, stopped: bool
    ) -> None:
        if stopped:
            status, comment = CANCELLED, None
        elif retrieval.failed and not retrieval.completed and not retrieval.warning:
            status, comment = UNABLE, "; ".join(retrieval.reasons) or "every sub-operation failed"
        elif retrieval.failed or retrieval.warning:
            status, comment = WARNING, "; ".join(retrieval.reasons) or None
        else:
            status, comment = SUCCESS, None
        retrieval.finish(cancelled=stopped)
        self._respond(assoc, message, field, status, retrieval, comment, final=True)

    def _locate(
        self,
        peer: Peer,
        message: Message,
        models: dict[str, tuple[Level, ...]],
        service: str,
        destination: str | None = None,
    ) -> Retrieval:
        identifier = decode_identifier(message.dataset or b"", message.transfer_syntax)
        level, values, _requested = query_of(identifier, models[message.abstract_syntax])
        return self.archive.retrieve(
            level, values, service=service, peer=peer, destination=destination
        )

    def get(
        self, assoc: Association, peer: Peer, message: Message, inbox: Iterator[Message]
    ) -> None:
        """Answer a C-GET-RQ (PS3.4 C.4.3.3)."""
        field = Command.C_GET_RSP
        mid = message.command.get(Tag.MESSAGE_ID, 0)
        try:
            retrieval = self._locate(peer, message, GET_MODELS, "get", assoc.calling_ae)
        except StockadeError as exc:
            log.warning("C-GET from %s refused: %s", peer.ae_title, exc.reason)
            self._respond(assoc, message, field, exc.dimse_status, None, exc.reason)
            return
        target = _SameAssociation(assoc, inbox, mid if isinstance(mid, int) else 0)

        def cancelled() -> bool:
            return target.cancel_seen or assoc.cancel_requested(target.cancel_id)

        def pending(r: Retrieval) -> None:
            self._respond(assoc, message, field, PENDING, r)

        try:
            stopped = run_suboperations(retrieval, target, pending, cancelled)
        except _Closed:
            retrieval.fail_rest("the requestor's association ended")
            retrieval.finish(cancelled=True)
            raise
        self._final(assoc, message, field, retrieval, stopped)

    def move(self, assoc: Association, peer: Peer, message: Message) -> None:
        """Answer a C-MOVE-RQ (PS3.4 C.4.2.3): sub-operations to a configured node."""
        field = Command.C_MOVE_RSP
        mid = message.command.get(Tag.MESSAGE_ID, 0)
        mid = mid if isinstance(mid, int) else 0
        destination = str(message.command.get(Tag.MOVE_DESTINATION, "")).strip()
        try:
            peer.check("move")
            node = self.archive.node_by_ae(destination)
            if node is None:
                raise NotFound(  # A801H: Move Destination unknown
                    f"move destination {destination[:16]!r} is not a configured node"
                )
            retrieval = self._locate(peer, message, MOVE_MODELS, "move", destination)
        except StockadeError as exc:
            log.warning("C-MOVE from %s refused: %s", peer.ae_title, exc.reason)
            self._respond(assoc, message, field, exc.dimse_status, None, exc.reason)
            return

        def pending(r: Retrieval) -> None:
            self._respond(assoc, message, field, PENDING, r)

        try:
            stopped = send_to_node(
                self.archive,
                retrieval,
                node.host,
                node.port,
                node.ae_title,
                originator=(assoc.calling_ae, mid),
                pending=pending,
                cancelled=lambda: assoc.cancel_requested(mid),
            )
        except AssociationFailed as exc:
            log.warning("C-MOVE to %s failed: %s", destination, exc.reason)
            retrieval.fail_rest(exc.reason)
            retrieval.finish()
            self._respond(assoc, message, field, UNABLE, retrieval, exc.reason, final=True)
            return
        except _Closed:
            retrieval.finish(cancelled=True)
            raise
        self._final(assoc, message, field, retrieval, stopped)


__all__ = ["GET_MODELS", "MOVE_MODELS", "Link", "RetrieveService", "send_to_node"]
