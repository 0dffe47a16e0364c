"""Composition root: builds the :class:`~stockade.archive.Archive` from settings."""

from __future__ import annotations

import logging

from stockade.archive import Archive
from stockade.audit.sink import JsonLinesAuditSink
from stockade.index.sql import SqlIndex
from stockade.settings import Settings
from stockade.storage.filesystem import FilesystemBlobStore


def build_archive(settings: Settings) -> Archive:
    """Create the data folder if needed and wire storage, index and audit together."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = FilesystemBlobStore(settings.data_dir)
    index = SqlIndex(settings.index_url)
    audit = JsonLinesAuditSink(settings.data_dir / "audit" / "audit.jsonl")
    return Archive(settings, store, index, audit)


def configure_logging(level: str) -> None:
    """Log to standard error, one line per record, no secrets (none are logged)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
