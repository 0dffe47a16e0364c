"""The HTTP listener: uvicorn serving :func:`stockade.web.app.create_app` in its own process.

``stockade serve`` binds the HTTP socket in the parent (so that a busy port is a start-up
error, like the DIMSE one) and runs this module as a child process that inherits it; the
parent restarts the child if it dies and stops it with the DIMSE workers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

import uvicorn

from stockade.app import build_archive, configure_logging
from stockade.errors import ConfigError
from stockade.settings import Settings, load
from stockade.web.app import create_app

log = logging.getLogger(__name__)


def bind_http(settings: Settings) -> socket.socket:
    """Bind and listen on the HTTP address.

    Raises
    ------
    ConfigError
        The address cannot be bound (in use, not local).
    """
    family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.http_host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {settings.http_host}:{settings.http_port}: {exc.strerror}"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_http(settings: Settings, sock: socket.socket) -> None:
    """Serve DICOMweb on *sock* until SIGTERM or SIGINT (uvicorn handles both)."""
    archive = build_archive(settings)
    try:
        config = uvicorn.Config(
            create_app(archive),
            log_level=settings.log_level.lower(),
            access_log=False,
            server_header=False,
            proxy_headers=False,
            h11_max_incomplete_event_size=64 * 1024,
            timeout_keep_alive=max(1, int(settings.dicom_idle_timeout)),
        )
        server = uvicorn.Server(config)
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        archive.close()


def _main() -> int:
    parser = argparse.ArgumentParser(prog="stockade-http")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    settings = load(args.config)
    configure_logging(settings.log_level)
    serve_http(settings, socket.socket(fileno=args.fd))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
