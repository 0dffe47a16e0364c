"""Quarantine: objects held apart for an administrator (threat model SR-20, policy action
``quarantine``).

A quarantined object is kept exactly as received (for a file, its preamble included, so that
the evidence is intact), in its own folder ``<data_dir>/quarantine`` (mode 0700; files 0600,
never executable), named by an id derived from its SHA-256, never by anything a peer sent.
It is not in the index: query and retrieve cannot see it. ``stockade quarantine
list|show|release|delete`` manages it; a release runs the object through the ingest pipeline
again with the policy lowered to alerts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stockade.errors import NotFound, StorageFailure

Buffer = bytes | bytearray | memoryview
_ID = re.compile(r"[0-9a-f]{32}")
#: Entries larger than this are not believable (findings are bounded by the data set).
MAX_ENTRY_JSON = 4 * 1024 * 1024


@dataclass(frozen=True)
class QuarantineEntry:
    """What is known of a quarantined object (all of it validated or ours).

    Attributes
    ----------
    id : str
        32 hex digits, from the object's SHA-256.
    received_at : str
        ISO 8601 time of the first receipt.
    via, ae_title, address, user : str or None
        Where it came from.
    sop_class_uid, sop_instance_uid, study_uid, patient_id : str or None
        Its identity, where valid.
    transfer_syntax : str
    size : int
    sha256 : str
    findings : list of dict
        ``kind``, ``where``, ``detail`` and ``action`` of each finding.
    times : int
        How often the same bytes arrived.
    """

    id: str
    received_at: str
    via: str
    ae_title: str | None
    address: str | None
    user: str | None
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    patient_id: str | None
    transfer_syntax: str
    size: int
    sha256: str
    findings: list[dict[str, str]]
    times: int = 1


def check_id(text: str) -> str:
    """Return *text* if it is a quarantine id (32 lowercase hex digits), else raise NotFound."""
    if not _ID.fullmatch(text):
        raise NotFound("no such quarantined object (an id is 32 hexadecimal digits)")
    return text


class Quarantine:
    """The quarantine folder.

    Parameters
    ----------
    root : Path
        ``<data_dir>/quarantine``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.root

    def _write(self, path: Path, parts: Iterable[Buffer]) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise StorageFailure(f"cannot write to the quarantine: {exc.strerror}") from None
        os.close(fd)
        os.replace(tmp, path)

    def put(self, parts: Iterable[Buffer], entry: dict[str, Any]) -> QuarantineEntry:
        """Keep an object (its bytes, in *parts*) with what is known of it.

        The same bytes quarantined again are kept once; their count goes up.
        """
        blob = b"".join(bytes(p) for p in parts)
        sha = hashlib.sha256(blob).hexdigest()
        qid = sha[:32]
        root = self._dir()
        known = self._entry(qid)
        if known is not None:
            updated = QuarantineEntry(**{**asdict(known), "times": known.times + 1})
            self._write(root / f"{qid}.json", [json.dumps(asdict(updated)).encode()])
            return updated
        record = QuarantineEntry(
            id=qid,
            received_at=datetime.now(UTC).isoformat(timespec="seconds"),
            size=len(blob),
            sha256=sha,
            **entry,
        )
        self._write(root / f"{qid}.dcm", [blob])
        self._write(root / f"{qid}.json", [json.dumps(asdict(record)).encode()])
        with contextlib.suppress(OSError):
            fd = os.open(root, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return record

    def _entry(self, qid: str) -> QuarantineEntry | None:
        path = self.root / f"{qid}.json"
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_ENTRY_JSON + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_ENTRY_JSON:
            raise StorageFailure(f"quarantine entry {qid} is too large")
        return QuarantineEntry(**json.loads(raw))

    def entries(self) -> Iterator[QuarantineEntry]:
        """Every quarantined object, oldest first."""
        if not self.root.is_dir():
            return
        found = []
        for path in self.root.iterdir():
            if path.suffix == ".json" and _ID.fullmatch(path.stem):
                entry = self._entry(path.stem)
                if entry is not None and (self.root / f"{entry.id}.dcm").is_file():
                    found.append(entry)
        yield from sorted(found, key=lambda e: (e.received_at, e.id))

    def get(self, qid: str) -> QuarantineEntry:
        """The entry of id *qid*.

        Raises
        ------
        NotFound
        """
        entry = self._entry(check_id(qid))
        if entry is None:
            raise NotFound(f"no quarantined object {qid}")
        return entry

    def read(self, qid: str) -> bytes:
        """The object's bytes, as received."""
        entry = self.get(qid)
        with (self.root / f"{entry.id}.dcm").open("rb") as fh:
            data = fh.read(entry.size + 1)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StorageFailure(f"quarantined object {qid} no longer matches its hash")
        return data

    def remove(self, qid: str) -> QuarantineEntry:
        """Delete a quarantined object and its entry."""
        entry = self.get(qid)
        (self.root / f"{entry.id}.dcm").unlink(missing_ok=True)
        (self.root / f"{entry.id}.json").unlink(missing_ok=True)
        return entry
