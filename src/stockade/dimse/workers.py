"""Worker processes sharing one DIMSE listening socket.

One Python process runs on one core. The parent binds the listening socket once and starts
``dicom_workers`` child processes that inherit it (``pass_fds``); the kernel hands each new
connection to one of the processes blocked in ``accept``, so concurrent associations spread
over the cores. The parent restarts a worker that dies and stops them all on SIGTERM/SIGINT.
With a single worker the parent serves itself.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from stockade.app import build_archive, configure_logging
from stockade.auth.admin import bootstrap
from stockade.dimse.server import DimseServer
from stockade.errors import ConfigError
from stockade.security.posture import secure_start
from stockade.security.tls import dicom_server_context
from stockade.settings import Settings, load

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* that child processes may inherit.

    Raises
    ------
    ConfigError
        The address cannot be bound (in use, not local).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def bind_listener(settings: Settings) -> socket.socket:
    """Bind and listen on the DIMSE address (Nagle off on accepted sockets, see server)."""
    return bind(settings.dicom_host, settings.dicom_port)


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def serve_in_process(
    settings: Settings, listener: socket.socket | None, tls_listener: socket.socket | None = None
) -> None:
    """Run one DIMSE server in this process until SIGTERM or SIGINT (on the plain
    listener, the DICOM TLS one, or both)."""
    context = dicom_server_context(settings, warn=False) if tls_listener is not None else None
    archive = build_archive(settings)
    server = DimseServer(
        settings, archive, listener, tls_listener=tls_listener, tls_context=context
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            if not thread.is_alive():
                break
    finally:
        server.stop()
        archive.close()


def serve(settings: Settings, config_file: Path | None) -> int:
    """Prepare the archive, bind the listeners and run the workers (and the HTTP process);
    return an exit code."""
    archive = build_archive(settings)
    try:
        archive.prepare()
        # Secure start (threat model SR-3, SR-4, SR-6): nothing is bound for a set-up that
        # would expose the archive (beyond loopback without TLS or without any user), or
        # with a certificate that cannot be served.
        secure_start(settings)
        # The first start on loopback: an administrator with a one-time password, never a
        # default one (beyond loopback, a user must exist before the first start).
        bootstrap(archive.accounts, settings.data_dir)
    finally:
        archive.close()
    http = None
    if settings.http_enabled:
        http = bind(settings.http_host, settings.http_port)
    listener = bind_listener(settings) if settings.dicom_plain else None
    tls_listener = (
        bind(settings.dicom_host, settings.dicom_tls_port) if settings.dicom_tls else None
    )
    workers = settings.worker_count
    if listener is not None:
        log.info(
            "Stockade DIMSE listening on %s:%d as %s (%d worker%s), data in %s",
            settings.dicom_host,
            settings.dicom_port,
            settings.dicom_ae_title,
            workers,
            "" if workers == 1 else "s",
            settings.data_dir.resolve(),
        )
    if tls_listener is not None:
        log.info(
            "Stockade DICOM TLS listening on %s:%d as %s (%s)",
            settings.dicom_host,
            settings.dicom_tls_port,
            settings.dicom_ae_title,
            "mutual TLS" if settings.dicom_tls_client_ca_file else "server certificate only",
        )
    if http is not None:
        log.info(
            "Stockade DICOMweb on %s://%s:%d/dicomweb",
            "https" if settings.http_tls else "http",
            settings.http_host,
            settings.http_port,
        )
    audit = build_archive(settings)
    audit.started("dimse")
    try:
        if workers == 1 and http is None:
            serve_in_process(settings, listener, tls_listener)
            return 0
        return _supervise(
            config_file, listener, workers, http, settings.http_worker_count, tls_listener
        )
    finally:
        audit.stopped("dimse")
        audit.close()


#: A child process to run: its module and the listening sockets it inherits, by option.
_Kind = tuple[str, tuple[tuple[str, int], ...]]


def _spawn(
    config_file: Path | None, module: str, fds: tuple[tuple[str, int], ...]
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", module]
    for option, fd in fds:
        args += [option, str(fd)]
    if config_file is not None:
        args += ["--config", str(config_file)]
    return subprocess.Popen(args, pass_fds=tuple(fd for _option, fd in fds))


def _supervise(
    config_file: Path | None,
    listener: socket.socket | None,
    count: int,
    http: socket.socket | None,
    http_count: int,
    tls_listener: socket.socket | None = None,
) -> int:
    dimse: list[tuple[str, int]] = []
    if listener is not None:
        dimse.append(("--fd", listener.fileno()))
    if tls_listener is not None:
        dimse.append(("--tls-fd", tls_listener.fileno()))
    kinds: list[_Kind] = [("stockade.dimse.workers", tuple(dimse))] * count
    if http is not None:
        kinds += [("stockade.web.server", (("--fd", http.fileno()),))] * http_count
    children = [_spawn(config_file, module, fds) for module, fds in kinds]
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    restarts: list[float] = []
    try:
        while True:
            time.sleep(0.5)
            for i, child in enumerate(children):
                code = child.poll()
                if code is None:
                    continue
                log.error("worker %d exited with code %s; restarting", child.pid, code)
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 10:
                    log.critical("workers keep dying; stopping")
                    return 1
                children[i] = _spawn(config_file, *kinds[i])
    except _Stop:
        log.info("stopping the workers")
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        for sock in (listener, tls_listener, http):
            if sock is not None:
                sock.close()
    return 0


def _worker_main() -> int:
    parser = argparse.ArgumentParser(prog="stockade-dimse-worker")
    parser.add_argument("--fd", type=int, help="the plain DIMSE listening socket")
    parser.add_argument("--tls-fd", type=int, help="the DICOM TLS listening socket")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    settings = load(args.config)
    configure_logging(settings.log_level)
    listener = socket.socket(fileno=args.fd) if args.fd is not None else None
    tls_listener = socket.socket(fileno=args.tls_fd) if args.tls_fd is not None else None
    serve_in_process(settings, listener, tls_listener)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
