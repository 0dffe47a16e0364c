"""Stockade as a DIMSE service user: query and retrieve from another archive.

``stockade query`` (C-FIND SCU, PS3.4 C.4.1) and ``stockade retrieve`` (C-MOVE or C-GET SCU,
PS3.4 C.4.2 and C.4.3) talk to a configured node. What the node answers is untrusted: its
identifiers go through the same bounded decoder as a C-FIND-RQ's, and every instance it
sends during a C-GET goes through the one ingest pipeline (:meth:`Archive.store_dimse`),
exactly like a C-STORE from a modality. ``stockade send`` is in
:func:`stockade.dimse.retrieve.send_to_node`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pynetdicom.presentation import StoragePresentationContexts

from stockade.dicom.attributes import Level
from stockade.dicom.tables import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    TRANSFER_SYNTAXES,
)
from stockade.dimse.commands import Command, Tag, error_comment
from stockade.dimse.find import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, decode_identifier
from stockade.dimse.requestor import AssociationFailed, Proposal, Requestor, connect
from stockade.dimse.retrieve import (
    CANCELLED,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    PENDING,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from stockade.errors import InvalidQuery, StockadeError
from stockade.ingest import Receiving
from stockade.security.tls import dicom_client_context

if TYPE_CHECKING:
    from stockade.archive import Archive, Node, Peer

log = logging.getLogger(__name__)

FIND = {"study": STUDY_ROOT_FIND, "patient": PATIENT_ROOT_FIND}
MOVE = {"study": STUDY_ROOT_MOVE, "patient": PATIENT_ROOT_MOVE}
GET = {"study": STUDY_ROOT_GET, "patient": PATIENT_ROOT_GET}
_UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
#: Pending C-FIND responses tolerated after our C-CANCEL-RQ before aborting (PS3.7 9.3.2.3
#: lets responses already sent arrive; a peer that never stops is not waited for).
LATE_RESPONSES = 1000

#: Return keys asked for when the user names none, per level.
DEFAULT_KEYS: dict[Level, tuple[str, ...]] = {
    Level.PATIENT: ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    Level.STUDY: (
        "PatientName",
        "PatientID",
        "StudyDate",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "StudyInstanceUID",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "SeriesInstanceUID",
    ),
    Level.IMAGE: ("InstanceNumber", "SOPClassUID", "SOPInstanceUID"),
}


def identifier(level: Level, keys: Mapping[str, str], implicit: bool) -> bytes:
    """Encode a query or retrieve identifier (PS3.4 C.4.1.1.3.1) from keyword values.

    Raises
    ------
    InvalidQuery
        An unknown keyword.
    """
    ds = Dataset()
    text = "".join(keys.values())
    if not text.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = str(level)
    for keyword, value in keys.items():
        if tag_for_keyword(keyword) is None:
            raise InvalidQuery(f"unknown attribute keyword {keyword[:64]!r}")
        setattr(ds, keyword, value)
    out = BytesIO()
    dcmwrite(out, ds, implicit_vr=implicit, little_endian=True)
    return out.getvalue()


def _open(archive: Archive, node: Node, proposals: list[Proposal]) -> Requestor:
    settings = archive.settings
    link = connect(
        node.host,
        node.port,
        calling_ae=settings.dicom_ae_title,
        called_ae=node.ae_title,
        proposals=proposals,
        max_pdu=settings.max_pdu_size,
        max_object=settings.max_object_size,
        timeout=settings.dicom_acse_timeout,
        tls=dicom_client_context(settings) if node.tls else None,
    )
    link.idle_timeout = settings.dicom_idle_timeout
    return link


def _text(value: Any) -> str:
    """A value from a peer as printable text (control characters replaced)."""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(_text(v) for v in value)
    raw = str(value)
    return "".join(c if c.isprintable() else "?" for c in raw)[:1024]


def query(
    archive: Archive,
    node: Node,
    level: Level,
    keys: Mapping[str, str],
    *,
    model: str = "study",
    limit: int = 1000,
) -> tuple[list[dict[str, str]], int, bool]:
    """C-FIND at *node*: (matches as keyword -> text, final status, whether it was cut at
    *limit* with a C-CANCEL).

    Raises
    ------
    AssociationFailed
        The node could not be reached or refused.
    """
    sop_class = FIND[model]
    asked = dict.fromkeys(DEFAULT_KEYS[level], "") if not keys else {}
    asked.update(keys)
    with _open(archive, node, [Proposal(sop_class, _UNCOMPRESSED)]) as link:
        cid, ts = link.contexts_for(sop_class)[0]
        implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
        cid, mid = link.request(sop_class, Command.C_FIND_RQ, identifier(level, asked, implicit))
        rows: list[dict[str, str]] = []
        cut = False
        late = 0
        while True:
            response = link.response_to(mid, Command.C_FIND_RSP)
            if response.status not in (PENDING, 0xFF01):
                return rows, response.status, cut
            if cut:
                late += 1  # responses already on their way after our C-CANCEL
                if late > LATE_RESPONSES:
                    link.abort()
                    raise AssociationFailed(
                        f"{node.name} kept sending matches after C-CANCEL; association aborted"
                    )
                continue
            try:
                ds = decode_identifier(response.dataset or b"", ts)
            except InvalidQuery as exc:
                log.warning("a C-FIND response from %s was not decodable: %s", node.name, exc)
                continue
            rows.append({k: _text(ds.get(k)) for k in asked})
            if len(rows) >= limit:
                link.cancel(cid, mid)
                cut = True


@dataclass
class RetrieveReport:
    """How a retrieve from a node went."""

    status: int = 0xC000
    completed: int = 0
    failed: int = 0
    warning: int = 0
    comment: str | None = None
    stored: int = 0  # instances our ingest stored or found duplicate (C-GET)
    rejected: list[str] = field(default_factory=list)


def _counts(report: RetrieveReport, command: dict[int, int | str]) -> None:
    for attr, tag in (
        ("completed", Tag.COMPLETED_SUBOPERATIONS),
        ("failed", Tag.FAILED_SUBOPERATIONS),
        ("warning", Tag.WARNING_SUBOPERATIONS),
    ):
        value = command.get(tag)
        if isinstance(value, int):
            setattr(report, attr, value)
    comment = command.get(Tag.ERROR_COMMENT)
    report.comment = _text(comment) if comment else None


def retrieve_move(
    archive: Archive,
    node: Node,
    level: Level,
    keys: Mapping[str, str],
    *,
    model: str = "study",
    progress: Callable[[RetrieveReport], None] | None = None,
) -> RetrieveReport:
    """C-MOVE from *node* to this archive's AE title: the node sends the instances to our
    DIMSE listener (which must run, and admit the node with ``store``)."""
    sop_class = MOVE[model]
    report = RetrieveReport()
    with _open(archive, node, [Proposal(sop_class, _UNCOMPRESSED)]) as link:
        ts = link.contexts_for(sop_class)[0][1]
        data = identifier(level, keys, ts == IMPLICIT_VR_LITTLE_ENDIAN)
        _cid, mid = link.request(
            sop_class, Command.C_MOVE_RQ, data, move_destination=archive.settings.dicom_ae_title
        )
        while True:
            response = link.response_to(mid, Command.C_MOVE_RSP)
            _counts(report, response.command)
            if response.status != PENDING:
                report.status = response.status
                return report
            if progress is not None:
                progress(report)


def get_proposals(sop_class: str) -> list[Proposal]:
    """The C-GET model, and 127 storage SOP classes (the most common ones) for which we
    ask to act as SCP, each with every transfer syntax Stockade stores."""
    syntaxes = tuple(ts.uid for ts in TRANSFER_SYNTAXES)
    ordered = (EXPLICIT_VR_LITTLE_ENDIAN, *(t for t in syntaxes if t != EXPLICIT_VR_LITTLE_ENDIAN))
    storage = [str(cx.abstract_syntax) for cx in StoragePresentationContexts][:127]
    return [
        Proposal(sop_class, _UNCOMPRESSED),
        *(Proposal(uid, ordered, as_scp=True) for uid in storage),
    ]


def retrieve_get(
    archive: Archive,
    node: Node,
    peer: Peer,
    level: Level,
    keys: Mapping[str, str],
    *,
    model: str = "study",
    progress: Callable[[RetrieveReport], None] | None = None,
) -> RetrieveReport:
    """C-GET from *node*: it sends the instances back on our association, and each one
    goes through the ingest pipeline as from *peer* (PS3.4 C.4.3)."""
    sop_class = GET[model]
    report = RetrieveReport()

    def on_dataset(
        _cid: int, command: dict[int, int | str], transfer_syntax: str, _abstract: str
    ) -> Receiving | None:
        if command.get(Tag.COMMAND_FIELD) != Command.C_STORE_RQ:
            return None
        try:
            return archive.receive_dimse(
                transfer_syntax,
                sop_class_uid=str(command.get(Tag.AFFECTED_SOP_CLASS_UID, "")),
                sop_instance_uid=str(command.get(Tag.AFFECTED_SOP_INSTANCE_UID, "")),
                peer=peer,
            )
        except StockadeError:
            return None

    with _open(archive, node, get_proposals(sop_class)) as link:
        ts = link.contexts_for(sop_class)[0][1]
        data = identifier(level, keys, ts == IMPLICIT_VR_LITTLE_ENDIAN)
        _cid, mid = link.request(sop_class, Command.C_GET_RQ, data)
        link.inbox(on_dataset)  # instances arriving are staged while they arrive
        while True:
            message = link.receive()
            command = message.command
            field_ = command.get(Tag.COMMAND_FIELD)
            if field_ == Command.C_STORE_RQ:
                status, comment = _ingest(archive, peer, message, report)
                elements: list[tuple[int, int | str]] = [
                    (Tag.COMMAND_FIELD, Command.C_STORE_RSP),
                    (Tag.MESSAGE_ID_BEING_RESPONDED_TO, command.get(Tag.MESSAGE_ID, 0)),
                    (Tag.COMMAND_DATA_SET_TYPE, 0x0101),
                    (Tag.STATUS, status),
                    (Tag.AFFECTED_SOP_CLASS_UID, str(command.get(Tag.AFFECTED_SOP_CLASS_UID, ""))),
                    (
                        Tag.AFFECTED_SOP_INSTANCE_UID,
                        str(command.get(Tag.AFFECTED_SOP_INSTANCE_UID, "")),
                    ),
                ]
                if comment:
                    elements.append((Tag.ERROR_COMMENT, error_comment(comment)))
                link.send(message.context_id, elements)
                continue
            if field_ != Command.C_GET_RSP or command.get(Tag.MESSAGE_ID_BEING_RESPONDED_TO) != mid:
                link.abort()
                raise AssociationFailed(f"unexpected DIMSE message {field_!r} during C-GET")
            _counts(report, command)
            final = command.get(Tag.STATUS)
            if final != PENDING:
                report.status = final if isinstance(final, int) else 0xC000
                return report
            if progress is not None:
                progress(report)


def _ingest(
    archive: Archive, peer: Peer, message: Any, report: RetrieveReport
) -> tuple[int, str | None]:
    """Store one instance a node sent during C-GET; its C-STORE response status."""
    command = message.command
    receiving = message.receiver if isinstance(message.receiver, Receiving) else None
    try:
        archive.store_dimse(
            message.dataset or b"",
            message.transfer_syntax,
            sop_class_uid=str(command.get(Tag.AFFECTED_SOP_CLASS_UID, "")),
            sop_instance_uid=str(command.get(Tag.AFFECTED_SOP_INSTANCE_UID, "")),
            peer=peer,
            abstract_syntax=message.abstract_syntax,
            dropped=message.too_large,
            receiving=receiving,
        )
    except StockadeError as exc:
        if receiving is not None:
            receiving.abort()
        report.rejected.append(exc.reason)
        return exc.dimse_status, exc.reason
    report.stored += 1
    return 0x0000, None


__all__ = ["CANCELLED", "query", "retrieve_get", "retrieve_move"]
