"""Audit sinks: where events go (the trail, :mod:`stockade.audit.trail`, in an archive)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from stockade.audit.events import AuditEvent


class AuditSink(Protocol):
    """Receives every audit event the core emits."""

    def emit(self, event: AuditEvent) -> None:
        """Record one event."""

    def emit_many(self, events: Sequence[AuditEvent]) -> None:
        """Record several events, in order (one write where the sink can)."""

    def close(self) -> None:
        """Flush and release."""


class Exporter(Protocol):
    """Sends the audit trail elsewhere (:class:`stockade.audit.syslog.SyslogExporter`)."""

    def start(self) -> None:
        """Begin sending in the background."""

    def close(self) -> None:
        """Stop sending and release."""


class MemoryAuditSink:
    """Keeps events in a list (tests)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        """Keep the event."""
        with self._lock:
            self.events.append(event)

    def emit_many(self, events: Sequence[AuditEvent]) -> None:
        """Keep the events."""
        with self._lock:
            self.events.extend(events)

    def close(self) -> None:
        """Nothing to release."""
