"""Audit sinks: where events go. The full hash-chained trail replaces the file sink later."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Protocol

from stockade.audit.events import AuditEvent


class AuditSink(Protocol):
    """Receives every audit event the core emits."""

    def emit(self, event: AuditEvent) -> None:
        """Record one event."""

    def close(self) -> None:
        """Flush and release."""


class JsonLinesAuditSink:
    """Appends one JSON object per event to a file opened with O_APPEND (mode 0600).

    Each record is written with a single ``write`` call so that records from several worker
    processes never interleave.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        """Append the event as one line."""
        line = json.dumps(event.as_record(), ensure_ascii=True, separators=(",", ":")) + "\n"
        with self._lock:
            os.write(self._fd, line.encode("ascii"))

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class MemoryAuditSink:
    """Keeps events in a list (tests)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        """Keep the event."""
        with self._lock:
            self.events.append(event)

    def close(self) -> None:
        """Nothing to release."""
