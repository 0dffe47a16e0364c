"""The DIMSE listener: accepts connections, runs associations, answers C-ECHO and C-STORE.

This module is the one place where core errors become DIMSE statuses (architecture: "one
error tree ... exactly two places translate"). Several worker processes may share one
listening socket (see :mod:`stockade.dimse.workers`); each runs a :class:`DimseServer`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pynetdicom.presentation import PresentationContext

from stockade.dicom.tables import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from stockade.dimse.association import Association, Limits, Message, Receiver, _Closed
from stockade.dimse.commands import Command, Tag, error_comment
from stockade.dimse.find import MODELS, FindService
from stockade.dimse.retrieve import GET_MODELS, MOVE_MODELS, RetrieveService
from stockade.errors import StockadeError
from stockade.ingest import Receiving
from stockade.security.tls import handshake_failure

if TYPE_CHECKING:
    from stockade.archive import Archive, Peer
    from stockade.settings import Settings

log = logging.getLogger(__name__)

SUCCESS = 0x0000
UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 Annex C
PROCESSING_FAILURE = 0x0110
ELEMENTS_DISCARDED = 0xB006  # Warning: Elements Discarded (PS3.4 B.2.3)
#: C-FIND pending responses sent per write (and between looks for a C-CANCEL-RQ).
FIND_BATCH = 16


def supported_contexts() -> list[PresentationContext]:
    """Verification, the FIND, MOVE and GET models (uncompressed transfer syntaxes), and
    every storage SOP class with every stored transfer syntax.

    Where a requestor offers several transfer syntaxes in one context, the first of ours
    it offers wins: Explicit VR Little Endian comes first. Storage contexts accept either
    role when the requestor proposes SCP/SCU Role Selection (PS3.7 D.3.3.4), so a C-GET
    requestor may act as their SCP and receive its instances.
    """
    explicit = "1.2.840.10008.1.2.1"
    syntaxes: list[Any] = [explicit, *(ts.uid for ts in TRANSFER_SYNTAXES if ts.uid != explicit)]
    uncompressed: list[Any] = [explicit, "1.2.840.10008.1.2"]
    out = []
    models = (*MODELS, *MOVE_MODELS, *GET_MODELS)
    for uid in (VERIFICATION_SOP_CLASS, *models, *STORAGE_SOP_CLASSES):
        cx = PresentationContext()
        cx.abstract_syntax = uid
        if uid in STORAGE_SOP_CLASSES:
            cx.transfer_syntax = syntaxes
            cx.scu_role = True
            cx.scp_role = True
        else:
            cx.transfer_syntax = uncompressed
        out.append(cx)
    return out


class DimseServer:
    """Accepts associations on a listening socket; one thread per association.

    With *tls_listener* and *tls_context* it also serves DICOM TLS (PS3.15 Annex B): a
    connection accepted there gets its TLS handshake in its association thread, bounded by
    ``dicom_acse_timeout``, so a slow or hostile handshake never holds the accept loop. A
    failed handshake is logged and audited (``Archive.refuse_connection``). *listener* may
    be None when only the TLS listener runs.
    """

    def __init__(
        self,
        settings: Settings,
        archive: Archive,
        listener: socket.socket | None,
        *,
        tls_listener: socket.socket | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.archive = archive
        self.listener = listener
        self.listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        if listener is not None:
            self.listeners.append((listener, None))
        if tls_listener is not None and tls_context is not None:
            self.listeners.append((tls_listener, tls_context))
        self.contexts = supported_contexts()
        self.limits = Limits(
            max_pdu=settings.max_pdu_size,
            max_object=settings.max_object_size,
            idle_timeout=settings.dicom_idle_timeout,
            acse_timeout=settings.dicom_acse_timeout,
        )
        self._active = 0
        #: Associations open per peer address (setting max_associations_per_peer).
        self._per_peer: dict[str, int] = {}
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self.finder = FindService(archive)
        self.retriever = RetrieveService(archive)

    def serve_forever(self) -> None:
        """Accept connections on every listener until :meth:`stop` is called (the first
        listener in this thread, any other in a thread of its own)."""
        others = [
            threading.Thread(target=self._accept, args=pair, name="accept-tls", daemon=True)
            for pair in self.listeners[1:]
        ]
        for thread in others:
            thread.start()
        if self.listeners:
            self._accept(*self.listeners[0])
        for thread in others:
            thread.join()

    def _accept(self, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError as exc:
                # EINVAL/EBADF: the shared listener was shut down (by us or a sibling worker
                # at shutdown). Anything else (EMFILE, ECONNABORTED...) is transient.
                if self._stopping.is_set() or exc.errno in (errno.EINVAL, errno.EBADF):
                    break
                log.warning("accept failed: %s", exc)
                self._stopping.wait(0.05)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._run,
                args=(conn, str(addr[0]), context),
                name=f"assoc-{addr[0]}:{addr[1]}",
                daemon=True,
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; wait up to *grace* seconds for running associations."""
        self._stopping.set()
        for listener, _context in self.listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(grace)

    def _handshake(
        self, conn: socket.socket, address: str, context: ssl.SSLContext
    ) -> socket.socket | None:
        """The TLS server handshake on an accepted connection, each step bounded by
        ``dicom_acse_timeout``; None (logged and audited) when it fails."""
        conn.settimeout(self.settings.dicom_acse_timeout)
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            reason = handshake_failure(exc)
            try:
                self.archive.refuse_connection(address, reason)
            except Exception:  # noqa: BLE001 - the audit's own failure is logged there
                log.warning("connection from %s refused: %s (not audited)", address, reason)
            conn.close()
            return None
        log.debug("TLS from %s: %s %s", address, tls.version(), tls.cipher())
        return tls

    def _run(self, conn: socket.socket, address: str, context: ssl.SSLContext | None) -> None:
        with self._lock:
            self._active += 1
            held = self._per_peer[address] = self._per_peer.get(address, 0) + 1
            full = (
                self._active > self.settings.max_associations
                or held > self.settings.max_associations_per_peer
            )
        try:
            self._serve(conn, address, context, full)
        finally:
            with self._lock:
                self._active -= 1
                self._per_peer[address] -= 1
                if not self._per_peer[address]:
                    del self._per_peer[address]
                self._threads.discard(threading.current_thread())

    def _serve(
        self, conn: socket.socket, address: str, context: ssl.SSLContext | None, full: bool
    ) -> None:
        if context is not None:
            wrapped = self._handshake(conn, address, context)
            if wrapped is None:
                return
            conn = wrapped
        fingerprint = None
        if isinstance(conn, ssl.SSLSocket):
            der = conn.getpeercert(binary_form=True)
            fingerprint = hashlib.sha256(der).hexdigest() if der else None
        admit = functools.partial(
            self.archive.admit, tls=context is not None, cert_sha256=fingerprint
        )
        assoc = Association(conn, address, self.settings.dicom_ae_title, self.contexts, self.limits)
        try:
            peer = assoc.negotiate(admit, full)
            log.info("association from %s (%s) accepted", assoc.calling_ae, address)
            inbox = assoc.messages(lambda *args: self._receive(peer, *args))
            for message in inbox:
                try:
                    self._dispatch(assoc, peer, message, inbox)
                finally:
                    if message.receiver is not None:
                        message.receiver.abort()  # a no-op if the archive kept the data set
            log.info("association from %s (%s) released", assoc.calling_ae, address)
        except _Closed as exc:
            log.info("association from %s (%s) ended: %s", assoc.calling_ae or "?", address, exc)
        except OSError as exc:
            log.info("association from %s ended by network error: %s", address, exc)
        finally:
            conn.close()

    def _dispatch(
        self, assoc: Association, peer: Peer, message: Message, inbox: Iterator[Message]
    ) -> None:
        field = message.command.get(Tag.COMMAND_FIELD)
        message_id = message.command.get(Tag.MESSAGE_ID, 0)
        if field == Command.C_ECHO_RQ:
            status, comment = SUCCESS, None
            try:
                peer.check("echo")
            except StockadeError as exc:
                status, comment = exc.dimse_status, exc.reason
            self._respond(assoc, message, Command.C_ECHO_RSP, message_id, status, comment)
        elif field == Command.C_STORE_RQ:
            status, comment = self._store(peer, message)
            self._respond(
                assoc, message, Command.C_STORE_RSP, message_id, status, comment, instance=True
            )
        elif field == Command.C_FIND_RQ:
            self._find(assoc, peer, message)
        elif field in (Command.C_GET_RQ, Command.C_MOVE_RQ):
            self._retrieve(assoc, peer, message, inbox)
        elif field == Command.C_CANCEL_RQ:
            pass  # for a request already answered: nothing to stop, no response (PS3.7 9.3.2.3)
        else:
            log.warning("unsupported DIMSE command %r from %s", field, assoc.calling_ae)
            response = (int(field) | 0x8000) if isinstance(field, int) else 0x8000
            self._respond(
                assoc,
                message,
                response,
                message_id,
                UNRECOGNIZED_OPERATION,
                "operation not supported",
            )

    def _receive(
        self,
        peer: Peer,
        _context_id: int,
        command: dict[int, int | str],
        transfer_syntax: str,
        _abstract_syntax: str,
    ) -> Receiver | None:
        """Let the archive stage a C-STORE data set while it arrives (None: just buffer)."""
        if command.get(Tag.COMMAND_FIELD) != Command.C_STORE_RQ:
            return None
        try:
            return self.archive.receive_dimse(
                transfer_syntax,
                sop_class_uid=str(command.get(Tag.AFFECTED_SOP_CLASS_UID, "")),
                sop_instance_uid=str(command.get(Tag.AFFECTED_SOP_INSTANCE_UID, "")),
                peer=peer,
            )
        except StockadeError as exc:
            # Buffer only; the C-STORE itself then gets the failure with its reason.
            log.debug("not staging a data set while it arrives: %s", exc.reason)
            return None

    def _store(self, peer: Peer, message: Message) -> tuple[int, str | None]:
        """Run a C-STORE through the archive; map the outcome to a status (PS3.4 B.2.3)."""
        cmd = message.command
        sop_class = str(cmd.get(Tag.AFFECTED_SOP_CLASS_UID, ""))
        sop_instance = str(cmd.get(Tag.AFFECTED_SOP_INSTANCE_UID, ""))
        try:
            result = self.archive.store_dimse(
                message.dataset or b"",
                message.transfer_syntax,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                peer=peer,
                abstract_syntax=message.abstract_syntax,
                dropped=message.too_large,
                # Only what receive_dimse() returned is ever set on a message.
                receiving=message.receiver if isinstance(message.receiver, Receiving) else None,
            )
        except StockadeError as exc:
            log.warning("C-STORE from %s refused: %s", peer.ae_title, exc.reason)
            return exc.dimse_status, exc.reason
        except Exception:  # the adapter boundary: a bug must not kill the association
            log.exception("C-STORE from %s failed", peer.ae_title)
            return PROCESSING_FAILURE, "internal error while storing; see the server log"
        if result.discarded:  # the payload policy cut parts out (PS3.4 B.2.3)
            return ELEMENTS_DISCARDED, "; ".join(result.warnings)[:1024]
        return SUCCESS, None

    def _find(self, assoc: Association, peer: Peer, message: Message) -> None:
        """Answer a C-FIND-RQ with pending responses and a final status (PS3.4 C.4.1.3).

        Pending responses share one command set, encoded once, and go out in batches of
        :data:`FIND_BATCH` per write; the peer's C-CANCEL-RQ is looked for before each
        batch (responses already sent may still arrive after it, PS3.7 9.3.2.3).
        """
        message_id = message.command.get(Tag.MESSAGE_ID, 0)
        mid = int(message_id) if isinstance(message_id, int) else 0
        cx = message.context_id
        batch: list[bytes] = []
        pending: bytes | None = None

        def flush() -> None:
            if batch:
                assoc.send_raw(b"".join(batch))
                batch.clear()

        def cancelled() -> bool:
            if batch and len(batch) < 2 * FIND_BATCH:
                return False  # looked before the first match, then once per batch
            flush()
            return assoc.cancel_requested(mid)

        responses = self.finder.run(
            peer,
            message.abstract_syntax,
            message.dataset or b"",
            message.transfer_syntax,
            cancelled,
        )
        try:
            for status, identifier, comment in responses:
                if identifier is None:
                    flush()
                    self._respond(assoc, message, Command.C_FIND_RSP, mid, status, comment)
                    continue
                if pending is None:
                    elements = self._response_elements(
                        message, Command.C_FIND_RSP, mid, status, None, with_dataset=True
                    )
                    pending = assoc.command_pdu(cx, elements)
                batch += (pending, assoc.data_pdus(cx, identifier))
        except StockadeError as exc:
            flush()
            self._respond(assoc, message, Command.C_FIND_RSP, mid, exc.dimse_status, exc.reason)
        except _Closed:
            raise
        except Exception:  # the adapter boundary: a bug must not kill the association
            log.exception("C-FIND from %s failed", peer.ae_title)
            flush()
            self._respond(
                assoc, message, Command.C_FIND_RSP, mid, PROCESSING_FAILURE, "internal error"
            )

    def _retrieve(
        self, assoc: Association, peer: Peer, message: Message, inbox: Iterator[Message]
    ) -> None:
        """Answer a C-GET-RQ or C-MOVE-RQ (:mod:`stockade.dimse.retrieve`)."""
        field = message.command.get(Tag.COMMAND_FIELD)
        response = Command.C_GET_RSP if field == Command.C_GET_RQ else Command.C_MOVE_RSP
        try:
            if field == Command.C_GET_RQ:
                self.retriever.get(assoc, peer, message, inbox)
            else:
                self.retriever.move(assoc, peer, message)
        except _Closed:
            raise
        except StockadeError as exc:
            self._respond(
                assoc,
                message,
                response,
                message.command.get(Tag.MESSAGE_ID, 0),
                exc.dimse_status,
                exc.reason,
            )
        except Exception:  # the adapter boundary: a bug must not kill the association
            log.exception("retrieve from %s failed", peer.ae_title)
            self._respond(
                assoc,
                message,
                response,
                message.command.get(Tag.MESSAGE_ID, 0),
                PROCESSING_FAILURE,
                "internal error",
            )

    def _response_elements(
        self,
        message: Message,
        field: int,
        message_id: object,
        status: int,
        comment: str | None,
        *,
        instance: bool = False,
        with_dataset: bool = False,
    ) -> list[tuple[int, int | str]]:
        """The command elements of a response (PS3.7 9.3 and Annex C for the status)."""
        cmd = message.command
        elements: list[tuple[int, int | str]] = [
            (Tag.COMMAND_FIELD, field),
            (
                Tag.MESSAGE_ID_BEING_RESPONDED_TO,
                int(message_id) if isinstance(message_id, int) else 0,
            ),
            # 0101H: no data set follows; any other value: one does (PS3.7 E.1).
            (Tag.COMMAND_DATA_SET_TYPE, 0x0000 if with_dataset else 0x0101),
            (Tag.STATUS, status),
        ]
        sop_class = cmd.get(Tag.AFFECTED_SOP_CLASS_UID)
        if sop_class is not None:
            elements.append((Tag.AFFECTED_SOP_CLASS_UID, str(sop_class)[:64]))
        if instance and cmd.get(Tag.AFFECTED_SOP_INSTANCE_UID) is not None:
            elements.append(
                (Tag.AFFECTED_SOP_INSTANCE_UID, str(cmd[Tag.AFFECTED_SOP_INSTANCE_UID])[:64])
            )
        if comment and status != SUCCESS:
            elements.append((Tag.ERROR_COMMENT, error_comment(comment)))
        return elements

    def _respond(
        self,
        assoc: Association,
        message: Message,
        field: int,
        message_id: object,
        status: int,
        comment: str | None,
        *,
        instance: bool = False,
    ) -> None:
        assoc.send_command(
            message.context_id,
            self._response_elements(message, field, message_id, status, comment, instance=instance),
        )
