"""Filling an archive before it is served: Stockade's own import path, in this process.

The black-box harness (``conftest.py``) imports nothing of Stockade; tests that need a
large or exact archive before the server starts use this instead of sending it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stockade.app import build_archive
from stockade.archive import Archive
from stockade.ingest import Origin
from stockade.settings import load

from .conftest import HOST, StockadeServer


@contextmanager
def archive_of(server: StockadeServer) -> Iterator[Archive]:
    """A prepared archive on the server's data folder and index (the server not running)."""
    overrides = {"data_dir": str(server.data_dir)}
    if server.db_url:
        overrides["database_url"] = server.db_url
    archive = build_archive(load(environ={}, overrides=overrides))
    archive.prepare()
    try:
        yield archive
    finally:
        archive.close()


def store_files(server: StockadeServer, paths: Iterable[Path]) -> None:
    """Store Part 10 files through the ingest pipeline (``stockade import``'s path)."""
    with archive_of(server) as archive:
        for path in paths:
            archive.store_file(path.read_bytes(), Origin(via="import"))


def add_nodes(server: StockadeServer, *nodes: tuple[str, str, int, str]) -> None:
    """Configure each (name, AE title, port, allowed services) on loopback, as ``stockade
    node add`` does (one CLI process each is a second apiece; the command line itself is
    tested where nodes are the subject)."""
    with archive_of(server) as archive:
        for name, ae, port, allow in nodes:
            services = frozenset(a.strip() for a in allow.split(",") if a.strip())
            archive.add_node(name, ae, HOST, port, services)
