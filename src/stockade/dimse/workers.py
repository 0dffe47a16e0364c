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
from stockade.dimse.server import DimseServer
from stockade.errors import ConfigError
from stockade.settings import Settings, is_loopback, load

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


def serve_in_process(settings: Settings, listener: socket.socket) -> None:
    """Run one DIMSE server in this process until SIGTERM or SIGINT."""
    archive = build_archive(settings)
    server = DimseServer(settings, archive, listener)
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
    finally:
        archive.close()
    http = None
    if settings.http_enabled:
        if not is_loopback(settings.http_host):
            raise ConfigError(
                f"http_host {settings.http_host} is not a loopback address: the HTTP listener "
                "has no user authentication yet, so it serves this machine only"
            )
        http = bind(settings.http_host, settings.http_port)
    listener = bind_listener(settings)
    workers = settings.worker_count
    log.info(
        "Stockade DIMSE listening on %s:%d as %s (%d worker%s), data in %s",
        settings.dicom_host,
        settings.dicom_port,
        settings.dicom_ae_title,
        workers,
        "" if workers == 1 else "s",
        settings.data_dir.resolve(),
    )
    if http is not None:
        log.info(
            "Stockade DICOMweb on http://%s:%d/dicomweb", settings.http_host, settings.http_port
        )
    audit = build_archive(settings)
    audit.started("dimse")
    try:
        if workers == 1 and http is None:
            serve_in_process(settings, listener)
            return 0
        return _supervise(config_file, listener, workers, http, settings.http_worker_count)
    finally:
        audit.stopped("dimse")
        audit.close()


def _spawn(config_file: Path | None, module: str, fd: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", module, "--fd", str(fd)]
    if config_file is not None:
        args += ["--config", str(config_file)]
    return subprocess.Popen(args, pass_fds=(fd,))


def _supervise(
    config_file: Path | None,
    listener: socket.socket,
    count: int,
    http: socket.socket | None,
    http_count: int,
) -> int:
    kinds = [("stockade.dimse.workers", listener.fileno())] * count
    if http is not None:
        kinds += [("stockade.web.server", http.fileno())] * http_count
    children = [_spawn(config_file, module, fd) for module, fd in kinds]
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
        listener.close()
        if http is not None:
            http.close()
    return 0


def _worker_main() -> int:
    parser = argparse.ArgumentParser(prog="stockade-dimse-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    settings = load(args.config)
    configure_logging(settings.log_level)
    listener = socket.socket(fileno=args.fd)
    serve_in_process(settings, listener)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
