"""The HTTP listener: uvicorn serving :func:`stockade.web.app.create_app` in its own process.

``stockade serve`` binds the HTTP socket in the parent (so that a busy port is a start-up
error, like the DIMSE one) and runs this module as a child process that inherits it; the
parent restarts the child if it dies and stops it with the DIMSE workers.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from stockade.app import build_archive, configure_logging
from stockade.audit.events import Actor
from stockade.dicom.attributes import Level
from stockade.errors import StockadeError
from stockade.security.tls import http_server_context
from stockade.settings import Settings, load
from stockade.web import metadata
from stockade.web.app import ACTIVITY, create_app
from stockade.web.http11 import BoundedHttpTools

if TYPE_CHECKING:
    from stockade.archive import Archive

log = logging.getLogger(__name__)


class MetadataWarmer(threading.Thread):
    """Builds the WADO-RS metadata cache of series that arrived, once their study has been
    quiet for ``metadata_warm_delay`` seconds, whatever brought them (C-STORE, STOW-RS,
    import): a viewer's first metadata request is then answered from the cache instead of
    opening every file. One HTTP worker at a time does it (a lock file decides); the
    instances are read through the one retrieve path, audited as service ``cache``."""

    def __init__(self, archive: Archive, delay: float) -> None:
        super().__init__(name="metadata-warmer", daemon=True)
        self.archive = archive
        self.delay = delay
        self.stopping = threading.Event()

    def run(self) -> None:
        _lower_priority()
        folder = self.archive.settings.data_dir / "cache" / "metadata"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".warmer.lock", "wb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another worker warms
            since = datetime.now(UTC)  # what arrives from now on
            while not self.stopping.wait(min(self.delay, 2.0)):
                since = self.warm(since)

    def warm(self, since: datetime) -> datetime:
        """Build the cache of the series of studies updated after *since* and quiet now;
        return the newest update handled."""
        until = datetime.now(UTC) - timedelta(seconds=self.delay)
        try:
            updated = self.archive.updated_series(since, until)
        except StockadeError as exc:
            log.warning("metadata warming: %s", exc.reason)
            return since
        for study, series, when in updated:
            if self.stopping.is_set():
                break
            try:
                self.archive.metadata(
                    Level.SERIES,
                    {"StudyInstanceUID": study, "SeriesInstanceUID": series},
                    actor=Actor(via="internal"),
                    build=functools.partial(metadata.build, pause=self.give_way),
                    service="cache",
                )
            except StockadeError as exc:  # gone, or too large: a request will tell
                log.info("metadata of series %s not built: %s", series, exc.reason)
            since = max(since, when if when.tzinfo else when.replace(tzinfo=UTC))
        return since

    def give_way(self) -> None:
        """Before each instance: wait while this process serves requests, up to
        :data:`WARM_GIVE_WAY` seconds (a process that is never idle still gets its cache,
        slowly); the worker thread shares the interpreter with the requests."""
        waited = 0.0
        while ACTIVITY.busy() and waited < WARM_GIVE_WAY and not self.stopping.is_set():
            self.stopping.wait(WARM_POLL)
            waited += WARM_POLL


#: The longest the metadata warmer waits for idleness before each instance, and how often
#: it looks.
WARM_GIVE_WAY = 2.0
WARM_POLL = 0.02


def _lower_priority() -> None:
    """Give the calling thread a lower CPU priority (nice 10; Linux schedules threads
    one by one), so that background work takes only the CPU requests leave."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        log.debug("background thread keeps its priority: %s", exc)


#: How long a worker waits before it accepts a connection, per connection it serves already
#: (counting at most two), and the most waiting it does per second.
ACCEPT_DEFER = 0.01
ACCEPT_DEFER_BUDGET = 0.04


class FairListener(socket.socket):
    """The listening socket the HTTP worker processes share, accepting so that connections
    opened together are spread over the workers.

    asyncio accepts every pending connection when the socket becomes readable, and the
    worker whose event loop runs wins the race for the CPU over one that sleeps: four
    STOW-RS connections opened at once were served three and one by two workers, one busy
    and the other idle. So this socket takes one connection each time it is found ready
    (others pending keep it ready), and a worker that serves connections already waits
    :data:`ACCEPT_DEFER` per connection (at most two) before it accepts, so that a less
    busy worker takes it first. The waiting is bounded to :data:`ACCEPT_DEFER_BUDGET`
    seconds per second, so clients that open connection after connection cost a busy
    worker at most that share of its event loop.
    """

    def __init__(self, fileno: int) -> None:
        super().__init__(fileno=fileno)
        self._took = False
        self._served: list[socket.socket] = []
        self._budget = ACCEPT_DEFER_BUDGET
        self._checked = time.monotonic()

    def accept(self) -> tuple[socket.socket, Any]:
        """Accept a connection, or report none pending right after having taken one."""
        if self._took:
            self._took = False
            raise BlockingIOError(errno.EAGAIN, "one connection per readiness")
        self._served = [conn for conn in self._served if conn.fileno() >= 0]
        now = time.monotonic()
        self._budget = min(
            ACCEPT_DEFER_BUDGET, self._budget + (now - self._checked) * ACCEPT_DEFER_BUDGET
        )
        self._checked = now
        wait = min(ACCEPT_DEFER * min(len(self._served), 2), self._budget)
        if wait > 0:
            self._budget -= wait
            time.sleep(wait)  # the GIL is released: this worker's requests go on meanwhile
        conn, address = super().accept()  # BlockingIOError: another worker took it
        self._took = True
        self._served.append(conn)
        return conn, address


def serve_http(settings: Settings, sock: socket.socket) -> None:
    """Serve DICOMweb on *sock* until SIGTERM or SIGINT (uvicorn handles both); over
    HTTPS when ``http_tls_cert_file`` is set (:mod:`stockade.security.tls`)."""
    tls = http_server_context(settings, warn=False) if settings.http_tls else None
    archive = build_archive(settings)
    warmer = MetadataWarmer(archive, settings.metadata_warm_delay)
    if settings.metadata_warm_delay > 0:
        warmer.start()
    try:
        config = uvicorn.Config(
            create_app(archive),
            log_level=settings.log_level.lower(),
            access_log=False,
            server_header=False,
            proxy_headers=False,
            http=BoundedHttpTools,
            timeout_keep_alive=max(1, int(settings.dicom_idle_timeout)),
            ssl_context_factory=None if tls is None else (lambda _config, _default: tls),
        )
        server = uvicorn.Server(config)
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        warmer.stopping.set()
        if warmer.is_alive():
            warmer.join(30)
        archive.close()


def _exit(_signum: int, _frame: FrameType | None) -> None:
    """End the process through ``SystemExit``, so that :func:`serve_http` closes the archive
    (its decoder processes, its staging folder): uvicorn handles SIGTERM and SIGINT while it
    serves and raises them again once it has stopped, which would otherwise end the process
    before its ``finally``."""
    raise SystemExit(0)


def _main() -> int:
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    parser = argparse.ArgumentParser(prog="stockade-http")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    settings = load(args.config)
    configure_logging(settings.log_level)
    serve_http(settings, FairListener(fileno=args.fd))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
