"""The one retrieve path: locate through the index, open the blob, verify its hash, audit.

C-GET and C-MOVE (PS3.4 C.4.2 and C.4.3), ``stockade send`` and later WADO-RS all send
stored instances the same way. :meth:`Archive.retrieve` locates the instances with the
query engine (the unique keys of the retrieve level and above, PS3.4 C.4.2.2.1) and returns
a :class:`Retrieval`; the adapter asks it for each instance's data set in the transfer
syntax the receiver accepted, reports how each sub-operation ended, and finishes it, which
writes one ``InstancesRetrieved`` audit record. An instance whose bytes no longer match the
SHA-256 recorded at ingest is never sent: it counts as failed and raises a Security Alert.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from stockade.audit.events import Actor, InstancesRetrieved, SecurityAlert
from stockade.dicom.attributes import Level
from stockade.dicom.matching import parse
from stockade.dicom.part10 import read_part10
from stockade.errors import (
    CannotTranscode,
    DecodeFailure,
    IntegrityError,
    InvalidQuery,
    StockadeError,
    StorageFailure,
)
from stockade.index.base import StoredInstance
from stockade.query import KEYS, LEVEL_ORDER, UNIQUE, Query, Scope, at_or_above

if TYPE_CHECKING:
    from stockade.archive import Archive

log = logging.getLogger(__name__)

#: Adapters take the instance model from here, never from ``index/`` (architecture).
__all__ = ["Retrieval", "StoredInstance", "refused", "retrieve_query"]


def retrieve_query(
    level: Level, values: Mapping[str, str | None], *, limit: int, scope: Scope | None = None
) -> Query:
    """The query of a retrieve identifier (PS3.4 C.4.2.2.1, C.4.3.2.1).

    Only the unique keys of *level* and the levels above count: the unique key of *level*
    is required, each is a single value or (for UIDs) a list, never a wildcard. Other keys
    are ignored, as the standard asks of an SCP that does not support relational retrieve.

    Raises
    ------
    InvalidQuery
        The level's unique key is missing or empty, or a unique key holds a wildcard.
    """
    conditions = []
    for lv in LEVEL_ORDER:
        if lv not in at_or_above(level):
            continue
        keyword = UNIQUE[lv]
        raw = (values.get(keyword) or "").strip()
        if not raw:
            if lv is level:
                raise InvalidQuery(f"a {level} level retrieve needs a value for {keyword}")
            continue
        if "*" in raw or "?" in raw:
            raise InvalidQuery(f"{keyword} of a retrieve may not hold a wildcard")
        conditions.append(parse(keyword, KEYS[keyword].vr, raw))
    return Query(level, tuple(conditions), (), limit, scope=scope)


@dataclass
class Retrieval:
    """One retrieve operation under way: the located instances and how each one went.

    Created by :meth:`Archive.retrieve`; :meth:`finish` writes the audit record.
    """

    archive: Archive
    instances: list[StoredInstance]
    actor: Actor
    service: str
    destination: str | None
    level: str
    keys: dict[str, str]
    completed: int = 0
    warning: int = 0
    failed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def remaining(self) -> int:
        """Sub-operations not yet done."""
        return len(self.instances) - self.completed - self.warning - len(self.failed)

    def read(self, inst: StoredInstance) -> bytes:
        """The stored Part 10 file of *inst*, after checking its size and SHA-256 (SR-18).

        Raises
        ------
        IntegrityError
            The blob is missing, or its bytes no longer match the index; a Security Alert
            is audited and nothing of it may be sent.
        """
        try:
            with self.archive.store.open(inst.blob_key) as fh:
                data = fh.read(inst.size + 1)
        except (StorageFailure, OSError) as exc:
            reason = exc.reason if isinstance(exc, StorageFailure) else str(exc.strerror)
            self._integrity(inst, f"blob unreadable: {reason}")
        if len(data) != inst.size or hashlib.sha256(data).hexdigest() != inst.sha256:
            self._integrity(inst, "content no longer matches its SHA-256")
        return data

    def _integrity(self, inst: StoredInstance, detail: str) -> NoReturn:
        log.error("instance %s not sent: %s", inst.sop_instance_uid, detail)
        self.archive.audit(
            SecurityAlert(
                actor=self.actor,
                outcome="failure",
                finding="integrity",
                detail=detail,
                sop_instance_uid=inst.sop_instance_uid,
            )
        )
        raise IntegrityError(f"{inst.sop_instance_uid}: {detail}")

    def dataset(
        self, inst: StoredInstance, candidates: Sequence[str]
    ) -> tuple[str, bytes | memoryview]:
        """The data set of *inst* (no preamble, no File Meta) in the first of *candidates*
        it can be produced in, and that transfer syntax: as stored when it is the stored
        one, else transcoded (PS3.5 10, lossless only) by the archive's decoder, whose
        codecs run in decoder processes (threat model SR-13). A codec may refuse one image
        (bit depth, size): the next candidate is tried.

        Raises
        ------
        IntegrityError
            See :meth:`read`.
        CannotTranscode
            No candidate: no codec, a lossy conversion, decoded pixels over
            ``max_decoded_size``, or every codec refused (the last reason is given).
        DecodeFailure
            A codec crashed, or ran past ``decode_timeout`` or ``decode_memory_limit``.
        """
        if not candidates:
            raise CannotTranscode("the receiver accepted no transfer syntax to send it in")
        data = self.read(inst)
        error: CannotTranscode | None = None
        for ts in candidates:
            if ts == inst.transfer_syntax:
                return ts, memoryview(data)[read_part10(data).dataset_offset :]
            try:
                return ts, self.archive.decoder.transcode(
                    data, ts, max_pixel_bytes=self.archive.settings.max_decoded_size
                )
            except DecodeFailure:
                raise  # the codec crashed or ran out of time: another target would decode too
            except CannotTranscode as exc:
                error = exc
        assert error is not None  # noqa: S101 - candidates is not empty
        raise error

    def done(self, inst: StoredInstance, status: str, reason: str | None = None) -> None:
        """Record how the sub-operation for *inst* ended: completed, warning or failed."""
        if status == "completed":
            self.completed += 1
        elif status == "warning":
            self.warning += 1
        else:
            self.failed.append(inst.sop_instance_uid)
            if reason and len(self.reasons) < 5:
                self.reasons.append(f"{inst.sop_instance_uid}: {reason}")

    def fail_rest(self, reason: str) -> None:
        """Count every instance not yet done as failed (the destination went away)."""
        done = self.completed + self.warning + len(self.failed)
        for inst in self.instances[done:]:
            self.done(inst, "failed", reason)

    def finish(self, *, cancelled: bool = False) -> None:
        """Write the operation's audit record (once)."""
        if self.finished:
            return
        self.finished = True
        self.archive.audit(
            InstancesRetrieved(
                actor=self.actor,
                outcome="failure" if cancelled or self.failed else "success",
                service=self.service,
                destination=self.destination,
                level=self.level,
                keys=self.keys,
                study_uids=sorted({i.study_instance_uid for i in self.instances}),
                patient_ids=sorted({i.patient_id for i in self.instances if i.patient_id}),
                located=len(self.instances),
                completed=self.completed,
                warning=self.warning,
                failed=len(self.failed),
                cancelled=cancelled,
                reason="; ".join(self.reasons) or None,
            )
        )


def refused(
    archive: Archive,
    actor: Actor,
    service: str,
    destination: str | None,
    level: str,
    keys: dict[str, str],
    error: StockadeError,
) -> None:
    """Audit a retrieve refused before anything was located."""
    archive.audit(
        InstancesRetrieved(
            actor=actor,
            outcome="failure",
            service=service,
            destination=destination,
            level=level,
            keys=keys,
            study_uids=[],
            patient_ids=[],
            located=0,
            completed=0,
            warning=0,
            failed=0,
            reason=error.reason,
        )
    )
