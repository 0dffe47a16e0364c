"""One DIMSE association, acceptor side (PS3.8 section 9, state machine of PS3.8 9.2).

Association negotiation reuses pynetdicom's PDU codecs and presentation context negotiation.
The data phase is Stockade's own blocking loop: each P-DATA-TF PDU is read straight into a
reusable buffer and its PDVs are appended to the message being assembled (one copy), with no
polling threads between the socket and the handler. Every bound is checked before allocation:
PDU lengths against what we announced, command sets against 64 KiB, data sets against
``max_object_size`` (the excess is drained and answered with a failure status).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from stockade.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from stockade.dimse import commands
from stockade.dimse.commands import Tag
from stockade.errors import InvalidObject, NotAuthorized, ObjectTooLarge

log = logging.getLogger(__name__)

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
#: Largest P-DATA-TF we send when the peer announced no maximum (PS3.8 D.1: 0 = no limit).
MAX_SEND_PDU = 256 * 1024
#: Bound on PDUs other than P-DATA-TF (an A-ASSOCIATE-RQ with 128 contexts is ~20 KiB).
MAX_CONTROL_PDU = 1024 * 1024
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ABORT reasons, source "service provider" (PS3.8 9.3.8)
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06


def user_information(max_pdu: int) -> list[Any]:
    """Our User Information items (PS3.7 D.3.3): Maximum Length, Implementation Class UID
    and Implementation Version Name."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_length, impl_uid, impl_name]


class _Closed(Exception):
    """The peer closed, aborted, or broke the protocol: end the association."""


@dataclass
class Message:
    """One DIMSE message as received."""

    context_id: int
    command: dict[int, int | str]
    dataset: bytearray | None
    transfer_syntax: str
    abstract_syntax: str
    too_large: int = 0  # bytes dropped when the data set passed max_object_size
    receiver: Receiver | None = None  # where the data set was also streamed, if anywhere


class Receiver(Protocol):
    """Takes a data set's fragments as they arrive (the archive stages them)."""

    def write(self, fragment: memoryview) -> None:
        """Take the next fragment."""

    def abort(self) -> None:
        """The data set will not be complete or will not be stored."""


#: (context id, decoded command, transfer syntax, abstract syntax) -> a receiver or None
OnDataset = Callable[[int, dict[int, int | str], str, str], Receiver | None]


@dataclass(frozen=True)
class Limits:
    """Per-association limits, from settings."""

    max_pdu: int
    max_object: int
    idle_timeout: float
    acse_timeout: float


#: (calling AE, called AE, address, identity=(type, primary, secondary) or None) -> peer
Admit = Callable[..., Any]


class Link:
    """One DIMSE connection's PDU and message I/O, shared by both ends (PS3.8 9.3).

    Subclasses negotiate the association (:class:`Association` as acceptor,
    :class:`~stockade.dimse.requestor.Requestor` as requestor) and fill :attr:`accepted`.
    """

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        self.sock = sock
        self.max_pdu = max_pdu
        self.accepted: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.buffer = bytearray(max_pdu)
        self.view = memoryview(self.buffer)
        self._receiver: Receiver | None = None
        self.max_object = 1 << 62
        self.idle_timeout: float | None = None

    # -- socket I/O ------------------------------------------------------------------------

    def _read_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise _Closed("peer closed the connection")
            got += n

    def _read_pdu(self) -> tuple[int, memoryview]:
        header = bytearray(6)
        self._read_exact(memoryview(header))
        pdu_type, _reserved, length = struct.unpack(">BBL", header)
        if pdu_type == P_DATA_TF:
            if length > self.max_pdu:
                self.abort(ABORT_INVALID_PARAMETER)
                raise _Closed(
                    f"P-DATA-TF of {length} bytes exceeds the announced maximum "
                    f"{self.max_pdu} (PS3.8 D.1)"
                )
            body = self.view[:length]
        elif pdu_type in (ASSOCIATE_RQ, RELEASE_RQ, RELEASE_RP, ABORT, ASSOCIATE_AC, ASSOCIATE_RJ):
            if length > MAX_CONTROL_PDU:
                self.abort(ABORT_INVALID_PARAMETER)
                raise _Closed(f"PDU type {pdu_type:#04x} of {length} bytes is too long")
            body = memoryview(bytearray(length))
        else:
            self.abort(ABORT_UNRECOGNIZED_PDU)
            raise _Closed(f"unrecognised PDU type {pdu_type:#04x}")
        self._read_exact(body)
        return pdu_type, body

    def _send(self, data: bytes | bytearray) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Closed(f"send failed: {exc}") from None

    def abort(self, reason: int = 0, source: int = 0x02) -> None:
        """Send an A-ABORT (PS3.8 9.3.8); errors are ignored, the connection is ending."""
        try:
            self.sock.sendall(struct.pack(">BBLBBBB", ABORT, 0, 4, 0, 0, source, reason))
        except OSError:
            pass

    # -- data transfer ---------------------------------------------------------------------

    def messages(self, on_dataset: OnDataset | None = None) -> Any:
        """Yield complete DIMSE messages until the peer releases or aborts.

        *on_dataset* is called when a command announces a data set; the receiver it returns
        gets every fragment of that data set as it arrives, besides the buffered copy.
        """
        try:
            yield from self._messages(on_dataset)
        finally:
            if self._receiver is not None:  # the association ended inside a data set
                self._receiver.abort()
                self._receiver = None

    def _messages(self, on_dataset: OnDataset | None) -> Any:
        self.sock.settimeout(self.idle_timeout)
        command = bytearray()
        dataset: bytearray | None = None
        current: dict[int, int | str] | None = None
        context_id = -1
        dropped = 0
        while True:
            try:
                pdu_type, body = self._read_pdu()
            except TimeoutError:
                self.abort()
                raise _Closed("association idle past dicom_idle_timeout") from None
            if pdu_type == RELEASE_RQ:
                self._send(struct.pack(">BBLL", RELEASE_RP, 0, 4, 0))
                return
            if pdu_type == ABORT:
                raise _Closed("peer aborted")
            if pdu_type != P_DATA_TF:
                self.abort(ABORT_UNEXPECTED_PDU)
                raise _Closed(f"unexpected PDU type {pdu_type:#04x} during data transfer")
            pos, end = 0, len(body)
            while pos < end:
                if end - pos < 6:
                    self.abort(ABORT_INVALID_PARAMETER)
                    raise _Closed("truncated PDV item (PS3.8 9.3.5.1)")
                (item_length,) = struct.unpack_from(">L", body, pos)
                cx, header = body[pos + 4], body[pos + 5]
                start, stop = pos + 6, pos + 4 + item_length
                if item_length < 2 or stop > end:
                    self.abort(ABORT_INVALID_PARAMETER)
                    raise _Closed("PDV item length exceeds its PDU (PS3.8 9.3.5.1)")
                if cx not in self.accepted or (context_id >= 0 and cx != context_id):
                    self.abort(ABORT_INVALID_PARAMETER)
                    raise _Closed(
                        f"PDV on presentation context {cx}, which is not accepted "
                        "or not the one of the message in progress"
                    )
                context_id = cx
                is_command, is_last = header & 0x01, header & 0x02
                if is_command:
                    if current is not None or len(command) + stop - start > (
                        commands.MAX_COMMAND_LENGTH
                    ):
                        self.abort(ABORT_INVALID_PARAMETER)
                        raise _Closed("command fragment out of sequence or too long")
                    command += body[start:stop]
                    if is_last:
                        try:
                            current = commands.decode(command)
                        except InvalidObject as exc:
                            self.abort(ABORT_INVALID_PARAMETER)
                            raise _Closed(exc.reason) from None
                        command = bytearray()
                        if current.get(Tag.COMMAND_DATA_SET_TYPE) == commands.NO_DATASET:
                            yield self._message(context_id, current, None, 0)
                            current, context_id = None, -1
                        else:
                            dataset, dropped = bytearray(), 0
                            if on_dataset is not None:
                                context = self.accepted[context_id]
                                self._receiver = on_dataset(
                                    context_id,
                                    current,
                                    str(context.transfer_syntax[0]),
                                    str(context.abstract_syntax),
                                )
                else:
                    if current is None or dataset is None:
                        self.abort(ABORT_UNEXPECTED_PDU)
                        raise _Closed("data set fragment before its command")
                    if dropped or len(dataset) + stop - start > self.max_object:
                        dropped += len(dataset) + stop - start
                        dataset = bytearray()  # drain, keep memory flat
                        if self._receiver is not None:
                            self._receiver.abort()
                            self._receiver = None
                    else:
                        fragment = body[start:stop]
                        dataset += fragment
                        if self._receiver is not None:
                            self._receiver.write(fragment)
                    if is_last:
                        message = self._message(context_id, current, dataset, dropped)
                        message.receiver, self._receiver = self._receiver, None
                        yield message
                        current, dataset, context_id = None, None, -1
                pos = stop

    def _message(
        self, cx: int, command: dict[int, int | str], dataset: bytearray | None, dropped: int
    ) -> Message:
        context = self.accepted[cx]
        return Message(
            cx,
            command,
            dataset,
            str(context.transfer_syntax[0]),
            str(context.abstract_syntax),
            dropped,
        )

    def send_message(
        self,
        context_id: int,
        elements: list[tuple[int, int | str]],
        dataset: bytes | bytearray | memoryview,
    ) -> None:
        """Send a command and its data set (PS3.7 9.3), the data set as P-DATA-TF PDUs
        within the peer's maximum PDU length (PS3.8 9.3.5), gathered from the caller's
        buffer without copying it."""
        buffers: list[bytes | memoryview] = [self.command_pdu(context_id, elements)]
        view = memoryview(dataset).cast("B")
        room = (self.peer_max_pdu or MAX_SEND_PDU) - 12  # PDU and PDV item headers
        room = max(2, min(room, MAX_SEND_PDU) & ~1)
        total = len(view)
        for pos in range(0, max(total, 1), room):
            chunk = view[pos : pos + room]
            flags = 0x02 if pos + room >= total else 0x00
            n = len(chunk)
            buffers.append(struct.pack(">BBLLBB", P_DATA_TF, 0, n + 6, n + 2, context_id, flags))
            buffers.append(chunk)
        self._send_all(buffers)

    def _send_all(self, buffers: list[bytes | memoryview]) -> None:
        """Send every buffer in order with gathered writes (``sendmsg``)."""
        views = [memoryview(b) for b in buffers if len(b)]
        i = 0
        try:
            while i < len(views):
                sent = self.sock.sendmsg(views[i : i + 256])
                while sent and i < len(views):
                    size = len(views[i])
                    if sent >= size:
                        sent -= size
                        i += 1
                    else:
                        views[i] = views[i][sent:]
                        sent = 0
        except OSError as exc:
            raise _Closed(f"send failed: {exc}") from None

    def data_pdus(self, context_id: int, dataset: bytes) -> bytes:
        """A data set as P-DATA-TF PDUs within the peer's maximum PDU length (PS3.8 9.3.5)."""
        out = []
        room = (self.peer_max_pdu or MAX_SEND_PDU) - 12  # PDU and PDV item headers
        room = max(2, min(room, MAX_SEND_PDU) & ~1)
        for pos in range(0, max(len(dataset), 1), room):
            chunk = dataset[pos : pos + room]
            last = pos + room >= len(dataset)
            pdv = struct.pack(">LBB", len(chunk) + 2, context_id, 0x02 if last else 0x00)
            out.append(struct.pack(">BBL", P_DATA_TF, 0, len(pdv) + len(chunk)) + pdv + chunk)
        return b"".join(out)

    def send_raw(self, data: bytes) -> None:
        """Send already encoded PDUs."""
        self._send(data)

    def cancel_requested(self, message_id: int) -> bool:
        """True if the peer sent C-CANCEL-RQ for *message_id* (PS3.7 9.3.2.3), without
        waiting. Anything else arriving during a response sequence ends the association."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        pdu_type, body = self._read_pdu()
        if pdu_type == ABORT:
            raise _Closed("peer aborted")
        if pdu_type != P_DATA_TF or len(body) < 6:
            self.abort(ABORT_UNEXPECTED_PDU)
            raise _Closed(f"unexpected PDU type {pdu_type:#04x} during a response sequence")
        (item_length,) = struct.unpack_from(">L", body, 0)
        header = body[5]
        if item_length + 4 != len(body) or header != 0x03:  # one last command fragment
            self.abort(ABORT_UNEXPECTED_PDU)
            raise _Closed("only C-CANCEL-RQ may arrive during a response sequence")
        try:
            command = commands.decode(bytearray(body[6:]))
        except InvalidObject as exc:
            self.abort(ABORT_INVALID_PARAMETER)
            raise _Closed(exc.reason) from None
        if command.get(Tag.COMMAND_FIELD) != commands.Command.C_CANCEL_RQ:
            self.abort(ABORT_UNEXPECTED_PDU)
            raise _Closed("only C-CANCEL-RQ may arrive during a response sequence")
        return command.get(Tag.MESSAGE_ID_BEING_RESPONDED_TO) == message_id

    def command_pdu(self, context_id: int, elements: list[tuple[int, int | str]]) -> bytes:
        """A command set as one P-DATA-TF PDU (PS3.7 9.3, PS3.8 9.3.5)."""
        data = commands.encode(elements)
        if self.peer_max_pdu and len(data) + 6 > self.peer_max_pdu:
            raise ObjectTooLarge("peer's maximum PDU is too small for a response")
        pdv = struct.pack(">LBB", len(data) + 2, context_id, 0x03) + data
        return struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv

    def send_command(self, context_id: int, elements: list[tuple[int, int | str]]) -> None:
        """Send a command-only message (a response) in one P-DATA-TF PDU."""
        self._send(self.command_pdu(context_id, elements))


class Association(Link):
    """Serves one TCP connection from association request to release or abort."""

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        ae_title: str,
        contexts: list[PresentationContext],
        limits: Limits,
    ) -> None:
        super().__init__(sock, limits.max_pdu)
        self.address = address
        self.ae_title = ae_title
        self.supported = contexts
        self.limits = limits
        self.max_object = limits.max_object
        self.idle_timeout = limits.idle_timeout
        self.calling_ae = ""

    def reject(self, result: int, source: int, reason: int) -> None:
        """Send an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
        try:
            self.sock.sendall(
                struct.pack(">BBLBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason)
            )
        except OSError:
            pass

    # -- negotiation -----------------------------------------------------------------------

    def negotiate(self, admit: Admit, full: bool) -> Any:
        """Read the A-ASSOCIATE-RQ and accept or reject it; return the admitted peer."""
        self.sock.settimeout(self.limits.acse_timeout)
        try:
            pdu_type, body = self._read_pdu()
        except TimeoutError:
            raise _Closed("no association request within the ACSE timeout") from None
        if pdu_type != ASSOCIATE_RQ:
            self.abort(ABORT_UNEXPECTED_PDU)
            raise _Closed(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}")
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(struct.pack(">BBL", ASSOCIATE_RQ, 0, len(body)) + bytes(body))
            request = pdu.to_primitive()
            calling = str(request.calling_ae_title or "")
            called = str(request.called_ae_title or "")
        except Exception as exc:  # noqa: BLE001 - third-party decoder on hostile bytes
            self.abort(ABORT_INVALID_PARAMETER)
            raise _Closed(f"undecodable A-ASSOCIATE-RQ: {exc.__class__.__name__}") from None
        self.calling_ae = calling.strip()
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            self.reject(0x01, 0x01, 0x02)
            raise _Closed("unsupported application context")
        if full:
            self.reject(0x02, 0x03, 0x02)  # transient, provider (presentation), local limit
            raise _Closed("too many associations (max_associations or max_associations_per_peer)")
        identity = None
        identity_response = None
        for item in request.user_information:
            if isinstance(item, UserIdentityNegotiation):  # PS3.7 D.3.3.7
                identity = (
                    int(item.user_identity_type or 0),
                    bytes(item.primary_field or b"")[:1024],
                    bytes(item.secondary_field or b"")[:1024],
                )
                if item.positive_response_requested:
                    identity_response = UserIdentityNegotiation()
                    identity_response.server_response = b""
        try:
            peer = admit(calling, called, self.address, identity=identity)
        except NotAuthorized as exc:
            diagnostic = 0x07 if exc.reason.startswith("called AE") else 0x03
            if exc.reason.startswith("user identity"):
                diagnostic = 0x01  # no reason given: PS3.8 has none for identities
            self.reject(0x01, 0x01, diagnostic)
            raise _Closed(exc.reason) from None

        roles: dict[Any, tuple[bool | None, bool | None]] = {}
        for item in request.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.supported, roles or None
        )
        for cx in results:
            if cx.result == 0x00:
                self.accepted[int(cx.context_id or 0)] = cx

        reply = A_ASSOCIATE()
        reply.application_context_name = APPLICATION_CONTEXT
        reply.calling_ae_title = request.calling_ae_title
        reply.called_ae_title = request.called_ae_title
        reply.result = 0x00
        reply.result_source = 0x01
        reply.presentation_context_definition_results_list = results
        reply.user_information = [*user_information(self.limits.max_pdu), *role_items]
        if identity_response is not None and getattr(peer, "user", None):
            reply.user_information.append(identity_response)
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(reply)
        self._send(ac.encode())
        return peer
