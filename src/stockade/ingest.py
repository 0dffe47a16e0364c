"""The one ingest pipeline: C-STORE, STOW-RS, ``stockade import`` and quarantine releases.

Steps, in order (architecture, "one ingest pipeline"):

1. bounded parse and inspection (:func:`~stockade.dicom.examine.examine`): size cap, the
   structural walk (lengths, depth, element count) with the hidden-payload inspector as its
   visitor; deflated data sets are inflated with a cap, never in one go; the pixel
   description is checked against ``max_decoded_size``;
2. the hidden-payload policy (PS3.10 7.5, :mod:`stockade.security.policy`): each finding is
   alerted, stripped, quarantined or rejected; the stored copy gets a zero preamble and a
   fresh File Meta Information (PS3.10 7.1); trailing bytes after the data set are not stored;
3. validate: UIDs per PS3.5 9.1, SOP class accepted, command/meta agree with the data set;
4. stage the blob durably (tmp + fsync) under a key derived from its SHA-256;
5. record it in the index in one transaction (the staged blob is dropped if that fails);
6. publish the blob (rename + fsync);
7. audit, and only then report success.

Steps 1 to 4 are :meth:`Ingest.prepare_file` and steps 5 to 7 :meth:`Ingest.finish`, so that
a caller holding several objects (the parts of one STOW-RS request) records them in one
index transaction and one audit append; nothing is acknowledged before :meth:`Ingest.finish`
returned its result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from stockade.audit.events import (
    Actor,
    AuditEvent,
    InstanceRejected,
    InstanceStored,
    SecurityAlert,
)
from stockade.audit.sink import AuditSink
from stockade.dicom.attributes import WANTED_TAGS, extract
from stockade.dicom.examine import check_pixels, examine, file_findings
from stockade.dicom.inspect import Finding
from stockade.dicom.parse import Limits
from stockade.dicom.part10 import PreambleKind, file_header, read_part10
from stockade.dicom.tables import STORAGE_SOP_CLASSES, TRANSFER_SYNTAX_BY_UID
from stockade.dicom.uids import uid_problem
from stockade.errors import (
    DatasetMismatch,
    InvalidAttribute,
    ObjectTooLarge,
    Quarantined,
    RefusedByPolicy,
    SOPClassNotSupported,
    StockadeError,
    StorageFailure,
)
from stockade.index.base import Index, InstanceRecord, Outcome, Recorded
from stockade.security.policy import Action, Policy, Verdict, parse_actions
from stockade.security.quarantine import Quarantine, QuarantineEntry
from stockade.settings import Settings
from stockade.storage.base import BlobStore, Staged, StagingWriter

log = logging.getLogger(__name__)
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Origin:
    """Where an object came from (recorded on the instance and in the audit trail)."""

    via: str  # dimse | import | stow
    ae_title: str | None = None
    address: str | None = None
    user: str | None = None

    def actor(self) -> Actor:
        """The audit actor for this origin."""
        return Actor(ae_title=self.ae_title, address=self.address, user=self.user, via=self.via)


@dataclass(frozen=True)
class StoreResult:
    """What happened to one object."""

    outcome: Outcome
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    warnings: tuple[str, ...] = ()
    #: Parts of the object were not stored by policy (PS3.4 B.2.3 warning B006).
    discarded: bool = False


@dataclass(frozen=True)
class Receiving:
    """A C-STORE data set being staged as it arrives (see :meth:`Ingest.receive`)."""

    header: bytes
    writer: StagingWriter

    def write(self, fragment: Buffer) -> None:
        """Append the next fragment of the data set."""
        self.writer.write(fragment)

    def abort(self) -> None:
        """Drop what was staged (the data set will not be stored)."""
        self.writer.abort()


@dataclass(frozen=True)
class Prepared:
    """An object through steps 1 to 4: checked, judged and staged durably (or, for a
    C-STORE staged while it arrived, with its fsync running). Not in the index and not
    acknowledged: :meth:`Ingest.finish` records, publishes and audits it. Holds no
    reference to the received bytes."""

    record: InstanceRecord
    staged: Staged
    attrs: dict[str, str | int | None]
    verdict: Verdict
    origin: Origin
    preamble_kind: PreambleKind
    warnings: tuple[str, ...]
    stripped: bool
    #: The writer of a C-STORE staged while it arrived, when its index row carries a
    #: staging journal entry (the blob's fsync may still be running).
    receiving: Receiving | None = None
    #: The SOP Instance UID named in the audit record of a refusal (else the data set's).
    refused_uid: str | None = None

    @property
    def sop_instance_uid(self) -> str:
        """The SOP Instance UID of the data set."""
        return str(self.attrs["SOPInstanceUID"])


def _source_ae(origin: Origin) -> str | None:
    return origin.ae_title if origin.ae_title and len(origin.ae_title) <= 16 else None


class Ingest:
    """Runs objects through the pipeline into a blob store and an index."""

    def __init__(
        self, settings: Settings, store: BlobStore, index: Index, audit: AuditSink
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.audit = audit
        self.limits = Limits(
            max_depth=settings.max_nesting_depth, max_elements=settings.max_elements
        )
        self.policy = Policy(parse_actions(settings.screening_actions))
        self.quarantine = Quarantine(settings.data_dir / "quarantine")

    def from_dimse(
        self,
        dataset: Buffer,
        transfer_syntax: str,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        origin: Origin,
        abstract_syntax: str | None = None,
        dropped: int = 0,
        receiving: Receiving | None = None,
    ) -> StoreResult:
        """Store a data set received by C-STORE (PS3.4 B.2): no preamble on the wire.

        *dropped* is the number of bytes the adapter discarded because the data set passed
        ``max_object_size``; *abstract_syntax* is that of the presentation context used;
        *receiving* is what :meth:`receive` returned for this data set, if the adapter
        asked for it. It is finished or dropped here, whatever the outcome.
        """

        def run() -> Prepared:
            if dropped:
                raise ObjectTooLarge(
                    f"data set exceeds max_object_size ({self.settings.max_object_size} bytes)"
                )
            for name, value in (
                ("Affected SOP Class UID", sop_class_uid),
                ("Affected SOP Instance UID", sop_instance_uid),
            ):
                problem = uid_problem(value)
                if problem:
                    raise InvalidAttribute(f"{name} {problem}")
            if abstract_syntax is not None and sop_class_uid != abstract_syntax:
                raise InvalidAttribute(
                    "Affected SOP Class UID differs from the presentation "
                    "context's abstract syntax (PS3.4 B.2.2)"
                )
            if receiving is not None:
                receiving.writer.start_sync()  # durable while the data set is checked
            return self._prepare(
                dataset,
                transfer_syntax,
                PreambleKind.NONE,
                sop_class_uid,
                sop_instance_uid,
                origin,
                receiving,
                refused_uid=sop_instance_uid,
            )

        try:
            return self._one(self._guarded(run, origin, sop_instance_uid))
        finally:
            if receiving is not None:
                receiving.writer.abort()  # a no-op once it became the staged blob

    def receive(
        self, transfer_syntax: str, *, sop_class_uid: str, sop_instance_uid: str, origin: Origin
    ) -> Receiving | None:
        """Start staging a C-STORE data set while it is still arriving.

        The stored copy is the File Meta Information built from the request (the data set
        must agree with it, which :meth:`from_dimse` checks) followed by the data set as
        received, so both can be written and hashed as the PDUs come in. None when the
        request is already known to be refused (its UIDs or transfer syntax are invalid):
        the adapter then only buffers, and :meth:`from_dimse` says why.
        """
        if (
            uid_problem(sop_class_uid)
            or uid_problem(sop_instance_uid)
            or transfer_syntax not in TRANSFER_SYNTAX_BY_UID
        ):
            return None
        header = file_header(sop_class_uid, sop_instance_uid, transfer_syntax, _source_ae(origin))
        writer = self.store.writer()
        writer.write(header)
        return Receiving(header, writer)

    def from_file(self, data: Buffer, origin: Origin, *, release: bool = False) -> StoreResult:
        """Store a DICOM Part 10 file (PS3.10 7.1) read from media, a folder, a ZIP or a
        STOW-RS part. *release*: an administrator released it from quarantine, so findings
        that would quarantine or reject it only alert (strips still apply)."""
        return self._one(self.prepare_file(data, origin, release=release))

    def prepare_file(self, data: Buffer, origin: Origin, *, release: bool = False) -> Prepared:
        """Steps 1 to 4 of :meth:`from_file`: check, judge and stage a Part 10 file durably.
        Nothing is acknowledged until :meth:`finish` has recorded it; a prepared object
        that is never finished is removed with its process's staging folder (or by
        recovery after a crash).

        Raises
        ------
        StockadeError
            The file is refused (audited here, like every refusal).
        """

        def run() -> Prepared:
            if len(data) > self.settings.max_object_size:
                raise ObjectTooLarge(
                    f"file of {len(data)} bytes exceeds max_object_size "
                    f"({self.settings.max_object_size})"
                )
            part10 = read_part10(data)
            kind, found = file_findings(data, part10)
            keep = (
                part10.preamble
                if kind is PreambleKind.TIFF and self.settings.keep_tiff_preamble
                else None
            )
            return self._prepare(
                memoryview(data)[part10.dataset_offset :],
                part10.transfer_syntax,
                kind,
                part10.media_sop_class_uid,
                part10.media_sop_instance_uid,
                origin,
                findings=found,
                original=data,
                preamble=keep,
                release=release,
            )

        return self._guarded(run, origin, None)

    def _hold(
        self,
        parts: list[Buffer],
        verdict: Verdict,
        attrs: dict[str, str | int | None],
        ts_uid: str,
        origin: Origin,
    ) -> QuarantineEntry:
        """Put an object in quarantine, as received, with its findings."""

        def uid(keyword: str) -> str | None:
            value = attrs.get(keyword)
            return str(value) if value is not None and not uid_problem(str(value)) else None

        patient = attrs.get("PatientID")
        return self.quarantine.put(
            parts,
            {
                "via": origin.via,
                "ae_title": _source_ae(origin),
                "address": origin.address,
                "user": origin.user,
                "sop_class_uid": uid("SOPClassUID"),
                "sop_instance_uid": uid("SOPInstanceUID"),
                "study_uid": uid("StudyInstanceUID"),
                "patient_id": None if patient is None else str(patient)[:64],
                "transfer_syntax": ts_uid if not uid_problem(ts_uid) else "",
                "findings": [
                    {
                        "kind": d.finding.kind.value,
                        "where": d.finding.where,
                        "detail": d.finding.detail,
                        "action": d.action.value,
                    }
                    for d in verdict.decisions
                ],
            },
        )

    @staticmethod
    def _alerts(
        verdict: Verdict,
        attrs: dict[str, str | int | None],
        origin: Origin,
        entry: QuarantineEntry | None,
    ) -> list[AuditEvent]:
        """One Security Alert audit event per finding (PS3.15 A.5.3.11)."""
        sop = attrs.get("SOPInstanceUID")
        study = attrs.get("StudyInstanceUID")
        patient = attrs.get("PatientID")
        events: list[AuditEvent] = []
        for decision in verdict.decisions:
            finding = decision.finding
            events.append(
                SecurityAlert(
                    actor=origin.actor(),
                    outcome="success" if decision.action is Action.ALERT else "failure",
                    finding=finding.kind.value,
                    detail=finding.detail,
                    where=finding.where,
                    action=decision.action.value,
                    quarantine_id=entry.id if entry else None,
                    sop_instance_uid=str(sop) if sop and not uid_problem(str(sop)) else None,
                    study_uid=str(study) if study and not uid_problem(str(study)) else None,
                    patient_id=None if patient is None else str(patient)[:64],
                )
            )
        return events

    def _guarded(
        self, run: Callable[[], Prepared], origin: Origin, sop_uid: str | None
    ) -> Prepared:
        """Run steps 1 to 4; audit a refusal (one record per refused object) and re-raise."""
        try:
            return run()
        except StockadeError as exc:
            self.audit.emit(_rejected(exc, origin, sop_uid))
            raise

    def _one(self, prepared: Prepared) -> StoreResult:
        """Finish one prepared object; raise its refusal."""
        result = self.finish([prepared])[0]
        if isinstance(result, StockadeError):
            raise result
        return result

    def _prepare(
        self,
        dataset: Buffer,
        ts_uid: str,
        preamble_kind: PreambleKind,
        claimed_class: str | None,
        claimed_instance: str | None,
        origin: Origin,
        receiving: Receiving | None = None,
        *,
        findings: list[Finding] | None = None,
        original: Buffer | None = None,
        preamble: bytes | None = None,
        release: bool = False,
        refused_uid: str | None = None,
    ) -> Prepared:
        settings = self.settings
        if len(dataset) > settings.max_object_size:
            raise ObjectTooLarge(
                f"data set of {len(dataset)} bytes exceeds max_object_size "
                f"({settings.max_object_size})"
            )
        warnings: list[str] = []

        # 1. bounded parse, inspected on the way (PS3.10 7.5)
        seen = examine(
            dataset,
            ts_uid,
            limits=self.limits,
            inflate_cap=settings.max_inflated_size,
            wanted=WANTED_TAGS,
            findings=findings,
            tiff=preamble_kind is PreambleKind.TIFF,
        )
        ts, parsed, found = seen.ts, seen.parsed, seen.found
        trailing = seen.trailing
        attrs = extract(parsed, found.values, little_endian=ts.little_endian)
        check_pixels(seen.inspector, settings.max_decoded_size)

        # 2. the hidden-payload policy
        verdict = self.policy.judge(seen.findings, release=release)
        if verdict.action in (Action.REJECT, Action.QUARANTINE):
            entry = None
            if verdict.action is Action.QUARANTINE:
                kept = (
                    [original]
                    if original is not None
                    else [
                        file_header(str(claimed_class), str(claimed_instance), ts_uid, None),
                        dataset,
                    ]
                )
                entry = self._hold(kept, verdict, attrs, ts_uid, origin)
            self.audit.emit_many(self._alerts(verdict, attrs, origin, entry))
            if entry is not None:
                raise Quarantined(
                    f"held in quarantine as {entry.id} for review: {verdict.summary()}"
                )
            raise RefusedByPolicy(f"refused by the payload policy: {verdict.summary()}")
        cuts = verdict.cuts()
        stored = seen.kept(dataset, cuts)
        if trailing:
            warnings.append(f"{trailing} bytes after the end of the data set were not stored")
        stripped = [
            d.finding for d in verdict.decisions if d.action is Action.STRIP and d.finding.cut
        ]
        if stripped:
            warnings.append(
                "discarded by policy: " + ", ".join(f"{f.where} ({f.kind})" for f in stripped)
            )

        # 3. validate
        for keyword, tag in (
            ("SOPClassUID", "(0008,0016)"),
            ("SOPInstanceUID", "(0008,0018)"),
            ("StudyInstanceUID", "(0020,000D)"),
            ("SeriesInstanceUID", "(0020,000E)"),
        ):
            problem = uid_problem(attrs.get(keyword))  # type: ignore[arg-type]
            if problem:
                raise InvalidAttribute(f"{keyword} {tag} {problem}")
        sop_class = str(attrs["SOPClassUID"])
        sop_instance = str(attrs["SOPInstanceUID"])
        if sop_class not in STORAGE_SOP_CLASSES:
            raise SOPClassNotSupported(
                f"SOP class {sop_class} is not a storage SOP class this archive accepts"
            )
        if claimed_class is not None and claimed_class != sop_class:
            raise DatasetMismatch(
                f"SOP Class UID {claimed_class[:64]} of the request differs "
                f"from {sop_class} in the data set"
            )
        if claimed_instance is not None and claimed_instance != sop_instance:
            raise DatasetMismatch(
                f"SOP Instance UID of the request differs from {sop_instance} in the data set"
            )
        if preamble_kind not in (PreambleKind.NONE, PreambleKind.ZERO) and preamble is None:
            warnings.append(f"preamble classified {preamble_kind.value} was replaced by zeros")

        # 2 + 4. sanitised copy, staged durably
        source_ae = _source_ae(origin)
        header = file_header(sop_class, sop_instance, ts_uid, source_ae, preamble)
        streamed = (
            receiving is not None
            and stored is dataset
            and receiving.header == header
            and receiving.writer.size == len(header) + len(stored)
        )
        journal: tuple[str, str] | None = None
        if receiving is not None and streamed:
            # What arrived is exactly what is kept. Its fsync is running: the index row
            # commits meanwhile, with a journal entry that lets recovery remove the row if
            # the blob never reached the disk (it is not acknowledged before both are done).
            # A replacement waits for its blob first, as its old blob is deleted after.
            if settings.allow_replace:
                staged = receiving.writer.finish()
            else:
                staged = receiving.writer.written()
                journal = (staged.area, staged.token)
        else:
            staged = self.store.stage((header, stored))
        record = InstanceRecord(
            attributes=attrs,
            sha256=staged.sha256,
            blob_key=staged.key,
            size=staged.size,
            transfer_syntax=ts_uid,
            preamble=preamble_kind.value,
            trailing_bytes=trailing,
            origin=origin.via,
            sender_ae=source_ae,
            sender_address=origin.address,
            received_at=datetime.now(UTC),
            staging=journal,
        )
        return Prepared(
            record=record,
            staged=staged,
            attrs=attrs,
            verdict=verdict,
            origin=origin,
            preamble_kind=preamble_kind,
            warnings=tuple(warnings),
            stripped=bool(stripped),
            receiving=receiving if journal is not None else None,
            refused_uid=refused_uid,
        )

    def finish(self, prepared: Sequence[Prepared]) -> list[StoreResult | StockadeError]:
        """Steps 5 to 7 for prepared objects, in order: one index transaction for all of
        them (each in its own savepoint, so a refusal touches only its object), then each
        blob is published, then one audit append for all. Returns each object's result or
        the error that refused it (audited); only now may the sender be answered."""
        items = list(prepared)
        if not items:
            return []
        try:
            # 5. index, in one transaction
            recorded = self.index.record_all(
                [p.record for p in items], allow_replace=self.settings.allow_replace
            )
        except BaseException:
            for item in items:
                self._drop(item)
            raise
        results: list[StoreResult | StockadeError] = []
        events: list[AuditEvent] = []
        for item, outcome in zip(items, recorded, strict=True):
            try:
                if isinstance(outcome, StockadeError):
                    self._drop(item)
                    raise outcome
                results.append(self._publish(item, outcome))  # 6. publish
            except StockadeError as exc:
                events.append(
                    _rejected(exc, item.origin, item.refused_uid or item.sop_instance_uid)
                )
                results.append(exc)
                continue
            # 7. audit, then success
            events.append(
                InstanceStored(
                    actor=item.origin.actor(),
                    study_uid=str(item.attrs["StudyInstanceUID"]),
                    sop_instance_uid=item.sop_instance_uid,
                    sop_class_uid=str(item.attrs["SOPClassUID"]),
                    patient_id=item.record.text("PatientID"),
                    result=outcome.outcome.value,
                    preamble=item.preamble_kind.value,
                )
            )
            events += self._alerts(item.verdict, item.attrs, item.origin, None)
            if item.warnings:
                log.warning(
                    "stored %s with warnings: %s", item.sop_instance_uid, "; ".join(item.warnings)
                )
        self.audit.emit_many(events)
        return results

    def _drop(self, item: Prepared) -> None:
        """Remove the staged blob of an object that was not recorded."""
        if item.receiving is not None:
            item.receiving.writer.abort()
        else:
            self.store.discard(item.staged)

    def _publish(self, item: Prepared, recorded: Recorded) -> StoreResult:
        """Step 6 for an object the index recorded."""
        staged = item.staged
        if item.receiving is not None:
            try:
                staged = item.receiving.writer.finish()
            except StorageFailure:
                if recorded.outcome is Outcome.STORED:
                    self.index.forget_instance(item.sop_instance_uid)
                raise
        if recorded.outcome is Outcome.DUPLICATE and self.store.exists(staged.key):
            self.store.discard(staged)
        else:
            # Also for a duplicate whose blob is not published yet (its writer died or is
            # still between its commit and its rename): our bytes are identical.
            self.store.commit(staged)
        if item.receiving is not None and recorded.outcome is Outcome.STORED:
            self.index.published(staged.token)
        if recorded.replaced_blob_key:
            self.store.delete(recorded.replaced_blob_key)
            self.index.forget_deletion(recorded.replaced_blob_key)
        return StoreResult(
            recorded.outcome,
            item.sop_instance_uid,
            str(item.attrs["SOPClassUID"]),
            str(item.attrs["StudyInstanceUID"]),
            item.warnings,
            discarded=item.stripped,
        )


def _rejected(exc: StockadeError, origin: Origin, sop_uid: str | None) -> InstanceRejected:
    """The audit record of a refused object."""
    return InstanceRejected(
        actor=origin.actor(),
        outcome="failure",
        reason=exc.reason,
        code=exc.code,
        sop_instance_uid=sop_uid if sop_uid and not uid_problem(sop_uid) else None,
    )
