"""One DIMSE association, requestor side (PS3.8 section 9, PS3.7 section 9).

Stockade opens associations to other application entities for C-MOVE sub-operations,
``stockade send``, ``stockade query`` and ``stockade retrieve``. As on the acceptor side,
pynetdicom encodes and decodes the association PDUs and negotiates presentation contexts
(``negotiate_as_requestor``); the data phase is the same bounded loop as the acceptor's
(:class:`~stockade.dimse.association.Link`). Whatever the peer answers is as untrusted as a
C-STORE from a stranger: PDU lengths are checked against what we announced, command sets
against 64 KiB, data sets against ``max_object_size``.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor

from stockade.dimse.association import (
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    Link,
    Message,
    OnDataset,
    _Closed,
    user_information,
)
from stockade.dimse.commands import Command, Tag
from stockade.errors import StockadeError
from stockade.security.tls import handshake_failure

log = logging.getLogger(__name__)

#: Most presentation contexts one association may propose (PS3.8 9.3.2.2: odd ids 1-255).
MAX_CONTEXTS = 128


class AssociationFailed(StockadeError):
    """The peer could not be reached, rejected the association, or broke the protocol."""

    http_status = 502
    dimse_status = 0xA702  # Refused: Out of Resources, unable to perform sub-operations
    code = "association-failed"


_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Proposal:
    """One presentation context to propose: an abstract syntax and its transfer syntaxes,
    and for storage contexts of a C-GET, whether we ask to act as their SCP."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    as_scp: bool = False


@dataclass(frozen=True)
class Response:
    """One DIMSE response as received: its command elements and data set, if any."""

    command: dict[int, int | str]
    dataset: bytes | None

    @property
    def status(self) -> int:
        """The Status (0000,0900), or 0xC000 when the peer left it out."""
        value = self.command.get(Tag.STATUS)
        return value if isinstance(value, int) else 0xC000

    def get(self, tag: int) -> int | str | None:
        """A command element."""
        return self.command.get(tag)


class Requestor(Link):
    """An association Stockade opened to a peer (after :func:`connect`)."""

    def __init__(self, sock: socket.socket, max_pdu: int, max_object: int) -> None:
        super().__init__(sock, max_pdu)
        self.max_object = max_object
        self._ids = itertools.count(1)
        self._inbox: Iterator[Message] | None = None

    # -- contexts --------------------------------------------------------------------------

    def contexts_for(self, abstract_syntax: str, *, as_scp: bool = False) -> list[tuple[int, str]]:
        """(context id, transfer syntax) of every accepted context for *abstract_syntax*
        (with *as_scp*, only those on which the peer may send us C-STOREs)."""
        out = []
        for cid, cx in self.accepted.items():
            if str(cx.abstract_syntax) != abstract_syntax:
                continue
            if as_scp and not cx.as_scp:
                continue
            out.append((cid, str(cx.transfer_syntax[0])))
        return out

    def next_message_id(self) -> int:
        """A new Message ID (PS3.7 9.3.1.1), 1 to 65535."""
        return (next(self._ids) - 1) % 0xFFFF + 1

    # -- messages --------------------------------------------------------------------------

    def inbox(self, on_dataset: OnDataset | None = None) -> Iterator[Message]:
        """The one stream of messages from the peer (created on first use)."""
        if self._inbox is None:
            self._inbox = self.messages(on_dataset)
        return self._inbox

    def receive(self) -> Message:
        """The next complete message from the peer.

        Raises
        ------
        AssociationFailed
            The peer released, aborted or broke the protocol.
        """
        try:
            return next(self.inbox())
        except StopIteration:
            raise AssociationFailed("the peer released the association mid-operation") from None
        except _Closed as exc:
            raise AssociationFailed(f"association ended: {exc}") from None
        except OSError as exc:
            raise AssociationFailed(f"network error: {exc}") from None

    def response_to(self, message_id: int, field: int) -> Response:
        """Wait for the response *field* to *message_id*; anything else is a protocol error."""
        message = self.receive()
        command = message.command
        if command.get(Tag.COMMAND_FIELD) != field or (
            command.get(Tag.MESSAGE_ID_BEING_RESPONDED_TO) != message_id
        ):
            self.abort()
            raise AssociationFailed(
                f"expected response {field:#06x} to message {message_id}, got "
                f"{command.get(Tag.COMMAND_FIELD)!r}"
            )
        data = None if message.dataset is None else bytes(message.dataset)
        return Response(command, data)

    def send(
        self,
        context_id: int,
        elements: list[tuple[int, int | str]],
        dataset: bytes | bytearray | memoryview | None = None,
    ) -> None:
        """Send a request (command, and data set if given)."""
        try:
            if dataset is None:
                self.send_command(context_id, elements)
            else:
                self.send_message(context_id, elements, dataset)
        except _Closed as exc:
            raise AssociationFailed(f"association ended: {exc}") from None

    # -- services --------------------------------------------------------------------------

    def echo(self) -> int:
        """C-ECHO (PS3.7 9.1.5); the response status."""
        contexts = self.contexts_for("1.2.840.10008.1.1")
        if not contexts:
            raise AssociationFailed("the peer did not accept the Verification SOP Class")
        mid = self.next_message_id()
        self.send(
            contexts[0][0],
            [
                (Tag.COMMAND_FIELD, Command.C_ECHO_RQ),
                (Tag.MESSAGE_ID, mid),
                (Tag.COMMAND_DATA_SET_TYPE, 0x0101),
                (Tag.AFFECTED_SOP_CLASS_UID, "1.2.840.10008.1.1"),
            ],
        )
        return self.response_to(mid, Command.C_ECHO_RSP).status

    def store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: bytes | bytearray | memoryview,
        *,
        move_originator: tuple[str, int] | None = None,
    ) -> Response:
        """C-STORE one data set (PS3.7 9.1.1) and wait for its response."""
        mid = self.next_message_id()
        elements: list[tuple[int, int | str]] = [
            (Tag.COMMAND_FIELD, Command.C_STORE_RQ),
            (Tag.MESSAGE_ID, mid),
            (Tag.PRIORITY, 0),
            (Tag.COMMAND_DATA_SET_TYPE, 0x0000),
            (Tag.AFFECTED_SOP_CLASS_UID, sop_class_uid),
            (Tag.AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
        ]
        if move_originator is not None:
            elements += [
                (Tag.MOVE_ORIGINATOR_AE_TITLE, move_originator[0]),
                (Tag.MOVE_ORIGINATOR_MESSAGE_ID, move_originator[1]),
            ]
        self.send(context_id, elements, dataset)
        return self.response_to(mid, Command.C_STORE_RSP)

    def request(
        self,
        abstract_syntax: str,
        field: int,
        identifier: bytes,
        *,
        move_destination: str | None = None,
    ) -> tuple[int, int]:
        """Send a C-FIND, C-GET or C-MOVE request (PS3.7 9.1.2-9.1.4); return (context id,
        message id). The identifier must be encoded in the context's transfer syntax."""
        contexts = self.contexts_for(abstract_syntax)
        if not contexts:
            raise AssociationFailed(f"the peer did not accept {abstract_syntax}")
        cid = contexts[0][0]
        mid = self.next_message_id()
        elements: list[tuple[int, int | str]] = [
            (Tag.COMMAND_FIELD, field),
            (Tag.MESSAGE_ID, mid),
            (Tag.PRIORITY, 0),
            (Tag.COMMAND_DATA_SET_TYPE, 0x0000),
            (Tag.AFFECTED_SOP_CLASS_UID, abstract_syntax),
        ]
        if move_destination is not None:
            elements.append((Tag.MOVE_DESTINATION, move_destination))
        self.send(cid, elements, identifier)
        return cid, mid

    def cancel(self, context_id: int, message_id: int) -> None:
        """C-CANCEL a running request (PS3.7 9.3.2.3)."""
        self.send(
            context_id,
            [
                (Tag.COMMAND_FIELD, Command.C_CANCEL_RQ),
                (Tag.MESSAGE_ID_BEING_RESPONDED_TO, message_id),
                (Tag.COMMAND_DATA_SET_TYPE, 0x0101),
            ],
        )

    # -- ending ----------------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE (PS3.8 7.2): send the request and wait (bounded) for the reply."""
        try:
            self._send(struct.pack(">BBLL", RELEASE_RQ, 0, 4, 0))
            while True:
                pdu_type, _body = self._read_pdu()
                if pdu_type == RELEASE_RP:
                    return
                if pdu_type != P_DATA_TF:  # late P-DATA may still arrive; anything else ends
                    return
        except (_Closed, OSError):
            return
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket (after a release or an abort)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Requestor:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()
            self.close()


def connect(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    proposals: Sequence[Proposal],
    max_pdu: int,
    max_object: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> Requestor:
    """Open an association (PS3.8 7.1) and negotiate *proposals* (at most 128).

    With *tls* (:func:`stockade.security.tls.dicom_client_context`) the connection is DICOM
    TLS (PS3.15 Annex B): the handshake, bounded by *timeout*, checks the peer's
    certificate and that it names *host*, before any association PDU is sent.

    Raises
    ------
    AssociationFailed
        The peer could not be reached, rejected the association, accepted none of the
        proposed contexts, or answered something that is not an association response.
    """
    if not proposals or len(proposals) > MAX_CONTEXTS:
        raise AssociationFailed(f"{len(proposals)} presentation contexts; 1 to 128 possible")
    request = A_ASSOCIATE()
    request.application_context_name = APPLICATION_CONTEXT
    request.calling_ae_title = calling_ae
    request.called_ae_title = called_ae
    contexts: list[PresentationContext] = []
    roles: list[Any] = []
    role_classes: set[str] = set()
    for number, proposal in enumerate(proposals):
        cx = PresentationContext()
        cx.context_id = 2 * number + 1
        cx.abstract_syntax = proposal.abstract_syntax
        cx.transfer_syntax = list(proposal.transfer_syntaxes)
        contexts.append(cx)
        if proposal.as_scp and proposal.abstract_syntax not in role_classes:
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = proposal.abstract_syntax
            role.scu_role = False
            role.scp_role = True
            roles.append(role)
            role_classes.add(proposal.abstract_syntax)
    request.presentation_context_definition_list = contexts
    request.user_information = [*user_information(max_pdu), *roles]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise AssociationFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise AssociationFailed(
                f"{called_ae} at {host}:{port}: {handshake_failure(exc)}"
            ) from None
    link = Requestor(sock, max_pdu, max_object)
    link.idle_timeout = timeout
    try:
        link.sock.settimeout(timeout)
        link._send(pdu.encode())
        pdu_type, body = link._read_pdu()
        raw = struct.pack(">BBL", pdu_type, 0, len(body)) + bytes(body)
        if pdu_type == ASSOCIATE_RJ:
            rj = A_ASSOCIATE_RJ()
            rj.decode(raw)
            source, reason = int(rj.source or 0), int(rj.reason_diagnostic or 0)
            text = _REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
            raise AssociationFailed(
                f"{called_ae} at {host}:{port} rejected the association: {text}"
            )
        if pdu_type != ASSOCIATE_AC:
            link.abort()
            raise AssociationFailed(
                f"unexpected PDU type {pdu_type:#04x} instead of A-ASSOCIATE-AC"
            )
        ac = A_ASSOCIATE_AC()
        try:
            ac.decode(raw)
            reply = ac.to_primitive()
        except Exception as exc:  # noqa: BLE001 - third-party decoder on untrusted bytes
            link.abort()
            raise AssociationFailed(
                f"undecodable A-ASSOCIATE-AC ({exc.__class__.__name__})"
            ) from None
        reply_roles: dict[Any, tuple[bool | None, bool | None]] = {}
        for item in reply.user_information:
            if isinstance(item, MaximumLengthNotification):
                link.peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                reply_roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
        results = negotiate_as_requestor(
            contexts, reply.presentation_context_definition_results_list, reply_roles or None
        )
        for cx in results:
            if cx.result == 0x00:
                link.accepted[int(cx.context_id or 0)] = cx
        if not link.accepted:
            link.abort()
            raise AssociationFailed(f"{called_ae} accepted none of the proposed contexts")
    except (_Closed, OSError) as exc:
        link.close()
        raise AssociationFailed(f"association with {host}:{port} failed: {exc}") from None
    except AssociationFailed:
        link.close()
        raise
    return link
