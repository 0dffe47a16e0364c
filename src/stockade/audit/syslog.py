"""Export of the audit trail to an audit record repository over syslog (IHE ATNA, ITI-20).

Each record becomes a DICOM audit message (:mod:`stockade.audit.atna`) in an RFC 5424
syslog message: ``<85>1`` (facility 10 authpriv, severity 5 notice), the record's time,
this host, ``stockade``, no process id, MSGID ``IHE+RFC-3881``, the structured data
``[meta sequenceId="N"]`` (RFC 5424 7.3.1; the record's sequence number, so that a collector
can spot a gap or a repeat) and the XML after a UTF-8 BOM.

Transports: TLS (RFC 5425: octet-counting framing ``LEN SP MSG``, TLS 1.2 or later, the
collector's certificate verified against ``audit_syslog_ca_file`` and its name against
``audit_syslog_host``, an optional client certificate) or UDP (RFC 5426: one message per
datagram).

The spool is the trail itself. One sender thread, in the process that serves (the one that
calls :meth:`Archive.started`, and only one per data folder: ``spool/sender.lock``), sends
the records after the last one delivered, in sequence order, and moves its cursor
(``<data_dir>/audit/spool/cursor``, mode 0600) past each record only once it was handed to
the transport. While the collector is down nothing moves: records wait in the trail, the
sender retries with exponential back-off, and ingest never waits for it. Records written by
other processes (workers, the CLI) are found by polling the trail.

Delivery is exactly once and in order for TLS as long as the sender runs; if the sender
is killed between a send and the cursor update, that one record is sent again at the next
start (the sequence number tells). Over UDP "sent" means handed to the kernel: a datagram
lost on the way, or sent while nothing listens, is not sent again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stockade.audit.atna import Source, audit_message, clean
from stockade.errors import ConfigError, StockadeError

if TYPE_CHECKING:
    from stockade.audit.trail import AuditTrail
    from stockade.settings import Settings

log = logging.getLogger(__name__)

#: PRI of every message: facility 10 (security/authorization, authpriv) * 8 + severity 5
#: (notice), as IHE ITI-20 uses (RFC 5424 6.2.1).
PRI = 10 * 8 + 5
MSGID = "IHE+RFC-3881"
APP_NAME = "stockade"
BOM = b"\xef\xbb\xbf"
#: Largest UDP payload on IPv4 (RFC 5426 3.2 leaves the limit to the transport).
MAX_DATAGRAM = 65_507
#: Records read from the trail at a time.
READ_BATCH = 200


def _printable(text: str, size: int) -> str:
    """RFC 5424 PRINTUSASCII (33-126), at most *size* characters, or the NILVALUE."""
    kept = "".join(c for c in text if 33 <= ord(c) <= 126)[:size]
    return kept or "-"


def syslog_message(xml: bytes, *, time: str, hostname: str, seq: int) -> bytes:
    """One RFC 5424 message (section 6) carrying *xml* as its UTF-8 MSG.

    Parameters
    ----------
    xml : bytes
        The audit message (UTF-8).
    time : str
        The record's time (RFC 3339, as records hold it).
    hostname : str
        This host's name (RFC 5424 6.2.4).
    seq : int
        The record's sequence number, sent as ``meta sequenceId`` (1 to 2147483647,
        wrapping; RFC 5424 7.3.1).
    """
    sequence = (seq - 1) % 2_147_483_647 + 1
    header = (
        f"<{PRI}>1 {_printable(time, 40)} {_printable(hostname, 255)} {APP_NAME} - {MSGID} "
        f'[meta sequenceId="{sequence}"] '
    )
    return header.encode("ascii") + BOM + xml


class Transport(Protocol):
    """Sends one syslog message; raises OSError when it could not."""

    def send(self, message: bytes) -> None:
        """Send *message* (a whole RFC 5424 message)."""

    def close(self) -> None:
        """Drop the connection, if any."""


class TlsTransport:
    """Syslog over TLS (RFC 5425): one connection, octet-counting framing (section 4.3)."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, *, timeout: float = 10.0
    ) -> None:
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self._sock: ssl.SSLSocket | None = None

    def _connected(self) -> ssl.SSLSocket:
        sock = self._sock
        if sock is not None and not self._closed_by_peer(sock):
            return sock
        self.close()
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except (OSError, ssl.SSLError):
            raw.close()
            raise
        self._sock = sock
        return sock

    def _closed_by_peer(self, sock: ssl.SSLSocket) -> bool:
        """True when the collector closed (or reset) the connection.

        A collector sends no syslog data (RFC 5425 4.3), but a TLS 1.3 server does send
        records after the handshake (session tickets): what is readable is read here, so
        that only an end of stream or an error counts, and so that closing the socket
        never finds unread data (which would make the kernel reset the connection and the
        collector lose what it had not read yet).
        """
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        return self._drain(sock)

    def _drain(self, sock: ssl.SSLSocket) -> bool:
        """Read what the collector sent; True if the connection ended."""
        sock.setblocking(False)
        try:
            while True:
                if not sock.recv(4096):
                    return True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False  # TLS records only (or nothing): still open
        except (OSError, ssl.SSLError):
            return True
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.timeout)

    def send(self, message: bytes) -> None:
        """Send ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 4.3)."""
        sock = self._connected()
        try:
            sock.sendall(str(len(message)).encode("ascii") + b" " + message)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (a TLS close_notify first, when possible)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        # Unread data at close makes the kernel send a reset, which can discard what the
        # collector has not read yet: drain first, then end the stream with a FIN.
        if not self._drain(sock):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.close()


class UdpTransport:
    """Syslog over UDP (RFC 5426): one message per datagram, no delivery guarantee."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._sock: socket.socket | None = None

    def send(self, message: bytes) -> None:
        """Send one datagram; a message too long for one is logged and dropped."""
        if len(message) > MAX_DATAGRAM:
            log.error(
                "audit export: a %d-byte message does not fit in one UDP datagram; "
                "not sent (use TLS)",
                len(message),
            )
            return
        if self._sock is None:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            try:
                sock.connect(info[4])
            except OSError:
                sock.close()
                raise
            self._sock = sock
        try:
            self._sock.send(message)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Close the socket."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def tls_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """A client TLS context for the collector (RFC 5425 5: TLS 1.2 or later here, the
    server's certificate checked against *ca_file* and its name against the host).

    Raises
    ------
    ConfigError
        No CA file, or a file that cannot be loaded.
    """
    if not ca_file:
        raise ConfigError("audit_syslog_transport tls needs audit_syslog_ca_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        # The reason only: never the content of a key file.
        raise ConfigError(
            f"cannot load the audit syslog TLS files: {exc.__class__.__name__}"
        ) from None
    return context


class SyslogExporter:
    """Sends the trail's records to a collector from a background thread (module note).

    Parameters
    ----------
    trail : AuditTrail
        Where the records are (and wait while the collector is down).
    transport : Transport
        TLS or UDP.
    source : Source
        This archive, as the messages name it.
    spool : Path
        ``<data_dir>/audit/spool``: the cursor and the sender lock.
    poll : float
        Seconds between looks at the trail when everything was sent.
    retry_max : float
        Longest wait between attempts while the collector is unreachable.
    """

    def __init__(
        self,
        trail: AuditTrail,
        transport: Transport,
        source: Source,
        spool: Path,
        *,
        poll: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        self.trail = trail
        self.transport = transport
        self.source = source
        self.spool = spool
        self.poll = poll
        self.retry_max = retry_max
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd = -1
        self._cursor_fd = -1

    @classmethod
    def configured(cls, settings: Settings, trail: AuditTrail) -> SyslogExporter | None:
        """The exporter *settings* ask for, or None when ``audit_syslog_host`` is empty.

        Raises
        ------
        ConfigError
            TLS without a usable CA file.
        """
        if not settings.audit_syslog_host:
            return None
        host, port = settings.audit_syslog_host, settings.audit_syslog_port
        transport: Transport
        if settings.audit_syslog_transport == "udp":
            transport = UdpTransport(host, port)
        else:
            context = tls_context(
                settings.audit_syslog_ca_file,
                settings.audit_syslog_cert_file,
                settings.audit_syslog_key_file,
            )
            transport = TlsTransport(host, port, context)
        hostname = socket.gethostname()
        source = Source(
            ae_title=settings.dicom_ae_title,
            host=hostname,
            source_id=f"{settings.dicom_ae_title}@{hostname}",
        )
        return cls(trail, transport, source, settings.data_dir / "audit" / "spool")

    # -- the cursor ------------------------------------------------------------------------

    @property
    def cursor_path(self) -> Path:
        """The file holding the sequence number of the last record delivered."""
        return self.spool / "cursor"

    def cursor(self) -> int:
        """The sequence number of the last record delivered (0: none yet)."""
        try:
            text = self.cursor_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text) if text.isdigit() else 0

    def _save_cursor(self, seq: int) -> None:
        """Overwrite the cursor in place: one fixed-width write into the page cache, no
        file created or renamed per record (that cost 0.7 ms a record here); it survives
        the process, and :meth:`close` syncs it."""
        if self._cursor_fd < 0:
            self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._cursor_fd = os.open(self.cursor_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self._cursor_fd, f"{seq:020d}\n".encode("ascii"), 0)

    # -- sending ---------------------------------------------------------------------------

    def message(self, record: dict[str, Any]) -> bytes:
        """The syslog message of one record."""
        xml = audit_message(record, self.source)
        return syslog_message(
            xml,
            time=str(record.get("time") or "-"),
            hostname=self.source.host,
            seq=int(record.get("seq") or 0),
        )

    def deliver(self) -> int:
        """Send every record after the cursor, in order, until none is left; return how
        many were sent. Raises OSError (after moving the cursor past those sent) when the
        collector cannot be reached."""
        count = 0
        cursor = self.cursor()
        while not self._stop.is_set():
            records = self.trail.after(cursor, READ_BATCH)
            if not records:
                break
            for record in records:
                if self._stop.is_set():
                    break
                self.transport.send(self.message(record))
                cursor = int(record["seq"])
                self._save_cursor(cursor)
                count += 1
                self.sent += 1
        return count

    def _take_lock(self) -> bool:
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._lock_fd < 0:
            self._lock_fd = os.open(self.spool / "sender.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _run(self) -> None:
        while not self._take_lock():  # another process of this data folder sends
            if self._stop.wait(5.0):
                return
        delay, down = self.poll, False
        while not self._stop.is_set():
            try:
                sent = self.deliver()
            except (OSError, ssl.SSLError) as exc:
                self.transport.close()
                if not down:
                    log.warning(
                        "audit export to %s: %s; records wait in the trail and are sent "
                        "when it answers",
                        clean(self.source.source_id, 64),
                        exc.__class__.__name__,
                    )
                down = True
                delay = min(max(delay * 2, 0.5), self.retry_max)
                self._stop.wait(delay)
                continue
            except StockadeError as exc:  # the index failed: try again later
                log.warning("audit export: %s", exc.reason)
                self._stop.wait(self.retry_max)
                continue
            if down:
                log.info("audit export: the collector answers again (%d records sent)", sent)
                down = False
            delay = self.poll
            self._stop.wait(self.poll)

    def start(self) -> None:
        """Start the sender thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-export", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the sender (it finishes the message it is sending) and release the lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.transport.close()
        if self._cursor_fd >= 0:
            try:
                os.fsync(self._cursor_fd)
            except OSError as exc:
                log.warning("audit export: cursor not synced: %s", exc.strerror)
            os.close(self._cursor_fd)
            self._cursor_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


__all__ = [
    "SyslogExporter",
    "TlsTransport",
    "Transport",
    "UdpTransport",
    "syslog_message",
    "tls_context",
]
