"""Composition root: builds the :class:`~stockade.archive.Archive` from settings."""

from __future__ import annotations

import logging

from stockade.archive import Archive
from stockade.audit.syslog import SyslogExporter
from stockade.audit.trail import AuditTrail
from stockade.index.sql import SqlIndex
from stockade.settings import Settings
from stockade.storage.filesystem import FilesystemBlobStore


def build_archive(settings: Settings) -> Archive:
    """Create the data folder if needed and wire storage, index and audit together.

    The audit trail lives in the index database; the syslog exporter (when
    ``audit_syslog_host`` is set) is created here and started by :meth:`Archive.started`.
    """
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = FilesystemBlobStore(settings.data_dir)
    index = SqlIndex(settings.index_url)
    trail = AuditTrail(index, settings.data_dir / "audit")
    exporter = SyslogExporter.configured(settings, trail)
    return Archive(settings, store, index, trail, exporter=exporter)


def configure_logging(level: str) -> None:
    """Log to standard error, one line per record, no secrets (none are logged)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
