"""Audit records as DICOM audit messages (PS3.15 A.5, the IHE ATNA / RFC 3881 model).

:func:`audit_message` turns one stored record (:mod:`stockade.audit.trail`) into an
``AuditMessage`` of the DICOM schema (PS3.15 A.5.1): ``EventIdentification`` (EventID and
EventTypeCode from the DCM coding scheme, PS3.16; EventActionCode, EventDateTime,
EventOutcomeIndicator), one ``ActiveParticipant`` per party (the caller, Stockade, a C-MOVE
destination) with its role (PS3.15 A.5.2), ``AuditSourceIdentification``, and a
``ParticipantObjectIdentification`` per patient, study, query or other object concerned.
Events with no message of their own in PS3.15 A.5.3 carry an EventTypeCode of the private
coding scheme ``99STOCKADE`` (PS3.16 8.2: private designators start with "99").

Every value comes from a record, so from peers: the XML is built with ElementTree (which
escapes markup), characters XML 1.0 cannot carry are replaced, and lists are capped.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Most patients and most studies described in one message (records may name more).
MAX_OBJECTS = 100

#: Characters XML 1.0 does not allow (PS3.15 A.5 messages are XML 1.0), and surrogates.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

#: Query/Retrieve Information Model FIND SOP Classes (PS3.4 C.6), the query object's ID.
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText)."""

    value: str
    scheme: str
    meaning: str


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


def _own(value: str, meaning: str) -> Code:
    return Code(value, "99STOCKADE", meaning)


# PS3.16 CID 400 (Audit Event ID) and the event type codes of PS3.15 A.5.3.
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
EXPORT = _dcm("110106", "Export")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATED = _dcm("110114", "User Authentication")
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
OBJECT_SECURITY_CHANGED = _dcm("110135", "Object Security Attributes Changed")
USER_SECURITY_CHANGED = _dcm("110137", "User security Attributes Changed")
# PS3.16 CID 402 (Audit Active Participant Role ID Code).
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_LAUNCHER = _dcm("110151", "Application Launcher")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")
ROLE_DESTINATION_MEDIA = _dcm("110154", "Destination Media")
# Participant object ID types: PS3.16 CID 404 and RFC 3881 5.5.4.
ID_STUDY = _dcm("110180", "Study Instance UID")
ID_SOP_CLASS = _dcm("110181", "SOP Class UID")
ID_NODE = _dcm("110182", "Node ID")
ID_PATIENT = Code("2", "RFC-3881", "Patient Number")
ID_USER = Code("11", "RFC-3881", "User Identifier")
ID_URI = Code("12", "RFC-3881", "URI")
#: AuditSourceTypeCode (PS3.15 A.5.2): an application server process.
SOURCE_APPLICATION_SERVER = _dcm("4", "Application Server Process Tier in a Multi-tier System")


@dataclass(frozen=True)
class EventKind:
    """How one record type maps onto PS3.15 A.5.3."""

    event_id: Code
    action: str  # C create, R read, U update, D delete, E execute
    type_code: Code | None = None


#: Record type -> message (PS3.15 A.5.3). Some depend on the record (see _kind).
KINDS: Mapping[str, EventKind] = {
    "InstanceStored": EventKind(INSTANCES_TRANSFERRED, "C"),
    "InstanceRejected": EventKind(INSTANCES_TRANSFERRED, "C"),
    "AssociationRejected": EventKind(SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    "SecurityAlert": EventKind(SECURITY_ALERT, "E", _own("finding", "Suspicious content")),
    "QueryPerformed": EventKind(QUERY, "E"),
    "ApplicationActivity": EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "NodeChanged": EventKind(SECURITY_ALERT, "E", NETWORK_CONFIGURATION),
    "IntegrityChecked": EventKind(
        INSTANCES_ACCESSED, "R", _own("integrity-check", "Integrity check")
    ),
    "InstancesRetrieved": EventKind(INSTANCES_TRANSFERRED, "R"),
    "InstancesDeleted": EventKind(INSTANCES_ACCESSED, "D"),
    "InstancesExported": EventKind(EXPORT, "R"),
    "StudyShared": EventKind(SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    "UserLogin": EventKind(USER_AUTHENTICATED, "E", LOGIN),
    "UserLogout": EventKind(USER_AUTHENTICATED, "E", LOGOUT),
    "UserChanged": EventKind(SECURITY_ALERT, "E", USER_SECURITY_CHANGED),
    "ConfigurationChanged": EventKind(SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    "AuditLogUsed": EventKind(AUDIT_LOG_USED, "R"),
    "QuarantineChanged": EventKind(SECURITY_ALERT, "E", _own("quarantine", "Quarantine changed")),
}


@dataclass(frozen=True)
class Source:
    """This archive as an audit source and participant."""

    ae_title: str
    host: str
    source_id: str


def clean(value: object, size: int = 1024) -> str:
    """*value* as text XML 1.0 can carry, at most *size* characters."""
    return _NOT_XML.sub("\ufffd", str(value)[:size])


def _kind(record: Mapping[str, Any]) -> EventKind:
    kind = KINDS.get(str(record.get("type")))
    if kind is None:
        return EventKind(SECURITY_ALERT, "E", _own(clean(record.get("type"), 64), "Other"))
    name = record.get("type")
    if name == "InstanceStored" and record.get("result") == "replaced":
        return EventKind(kind.event_id, "U")
    if name == "ApplicationActivity" and record.get("action") == "stop":
        return EventKind(kind.event_id, kind.action, APPLICATION_STOP)
    if name == "InstancesDeleted" and record.get("level") == "STUDY":
        return EventKind(STUDY_DELETED, "D")
    if name == "SecurityAlert":
        finding = clean(record.get("finding") or "alert", 64)
        return EventKind(kind.event_id, kind.action, _own(finding, "Security finding"))
    return kind


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _participant(
    root: ET.Element,
    user_id: str,
    *,
    requestor: bool,
    address: str | None,
    roles: tuple[Code, ...] = (),
    alternative: str | None = None,
    name: str | None = None,
    address_is_ip: bool = True,
) -> None:
    attrs = {"UserID": clean(user_id or "unknown", 256)}
    if alternative:
        attrs["AlternativeUserID"] = clean(alternative, 256)
    if name:
        attrs["UserName"] = clean(name, 256)
    attrs["UserIsRequestor"] = "true" if requestor else "false"
    if address:
        attrs["NetworkAccessPointID"] = clean(address, 256)
        # RFC 3881 5.3.4: 1 machine name, 2 IP address.
        attrs["NetworkAccessPointTypeCode"] = "2" if address_is_ip else "1"
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    for role in roles:
        _coded(element, "RoleIDCode", role)


def _object(
    root: ET.Element,
    object_id: str,
    type_code: str,
    role: str,
    id_type: Code,
    *,
    name: str | None = None,
    query: bytes | None = None,
    description: str | None = None,
    sop_class: tuple[str, int] | None = None,
) -> None:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": clean(object_id, 256),
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _coded(element, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    elif name:
        ET.SubElement(element, "ParticipantObjectName").text = clean(name, 256)
    if description:
        ET.SubElement(element, "ParticipantObjectDescription").text = clean(description)
    if sop_class is not None:
        ET.SubElement(
            element,
            "SOPClass",
            {"UID": clean(sop_class[0], 64), "NumberOfInstances": str(sop_class[1])},
        )


def _texts(record: Mapping[str, Any], one: str, many: str) -> list[str]:
    values = []
    if isinstance(record.get(one), str):
        values.append(record[one])
    if isinstance(record.get(many), list):
        values += [v for v in record[many] if isinstance(v, str)]
    seen: dict[str, None] = {}
    for value in values:
        if value.strip():
            seen.setdefault(value.strip(), None)
    return list(seen)[:MAX_OBJECTS]


def _subjects(root: ET.Element, record: Mapping[str, Any]) -> None:
    """Patient (RFC 3881: person, role patient) and study (system object, role report)
    objects, as PS3.15 A.5.3.7 and A.5.3.10 describe them."""
    keys = record.get("keys") if isinstance(record.get("keys"), dict) else {}
    assert isinstance(keys, dict)  # noqa: S101 - for the type checker
    patients = _texts(record, "patient_id", "patient_ids")
    key = keys.get("PatientID")
    if isinstance(key, str) and key and not patients and "*" not in key and "?" not in key:
        patients = [key]
    studies = _texts(record, "study_uid", "study_uids")
    key = keys.get("StudyInstanceUID")
    if isinstance(key, str) and key and not studies:
        studies = [s for s in key.split("\\") if s][:MAX_OBJECTS]
    sop_class = record.get("sop_class_uid")
    for study in studies:
        _object(
            root,
            study,
            "2",
            "3",
            ID_STUDY,
            sop_class=(sop_class, 1) if isinstance(sop_class, str) and sop_class else None,
        )
    for patient in patients:
        _object(root, patient, "1", "1", ID_PATIENT)


def audit_message(record: Mapping[str, Any], source: Source) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1) of one audit record, as UTF-8 XML.

    Parameters
    ----------
    record : mapping
        A record as the trail stores it (``type``, ``time``, ``outcome``, ``actor`` and
        the event's fields).
    source : Source
        This archive (AE title, host name, audit source ID).

    Returns
    -------
    bytes
        ``<?xml ...?><AuditMessage>...</AuditMessage>`` in UTF-8.
    """
    kind = _kind(record)
    root = ET.Element("AuditMessage")
    failed = record.get("outcome") != "success"
    event = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": kind.action,
            "EventDateTime": clean(record.get("time") or "", 40),
            # PS3.15 A.5.1 / RFC 3881 5.1.4: 0 success, 4 minor failure (a refusal).
            "EventOutcomeIndicator": "4" if failed else "0",
        },
    )
    _coded(event, "EventID", kind.event_id)
    if kind.type_code is not None:
        _coded(event, "EventTypeCode", kind.type_code)
    reason = record.get("reason") or (record.get("detail") if failed else None)
    if reason:
        ET.SubElement(event, "EventOutcomeDescription").text = clean(reason)

    actor = record.get("actor") if isinstance(record.get("actor"), dict) else {}
    assert isinstance(actor, dict)  # noqa: S101 - for the type checker
    name = str(record.get("type"))
    via = str(actor.get("via") or "internal")
    caller_id = actor.get("user") or actor.get("ae_title") or actor.get("address") or via
    caller_address = actor.get("address")
    archive_roles: tuple[Code, ...] = ()
    caller_roles: tuple[Code, ...] = ()
    if name in {"InstanceStored", "InstanceRejected", "QueryPerformed"}:
        caller_roles, archive_roles = (ROLE_SOURCE,), (ROLE_DESTINATION,)
    elif name == "InstancesRetrieved":
        archive_roles = (ROLE_SOURCE,)
        if not record.get("destination") or record.get("service") != "move":
            caller_roles = (ROLE_DESTINATION,)
    elif name == "InstancesExported":
        archive_roles = (ROLE_SOURCE,)
    elif name == "ApplicationActivity":
        archive_roles, caller_roles = (ROLE_APPLICATION,), (ROLE_LAUNCHER,)
    internal = via == "internal" and not actor.get("user")
    if not internal:
        _participant(
            root,
            str(caller_id),
            requestor=True,
            address=caller_address,
            roles=caller_roles,
            alternative=actor.get("ae_title") if actor.get("user") else None,
            name=f"via {via}",
        )
    _participant(
        root,
        source.ae_title,
        requestor=internal,
        address=source.host,
        roles=archive_roles,
        alternative=source.source_id,
        address_is_ip=False,
    )
    destination = record.get("destination")
    if name == "InstancesRetrieved" and record.get("service") == "move" and destination:
        _participant(
            root, str(destination), requestor=False, address=None, roles=(ROLE_DESTINATION,)
        )
    if name == "InstancesExported" and destination:
        _participant(
            root, str(destination), requestor=False, address=None, roles=(ROLE_DESTINATION_MEDIA,)
        )

    source_element = ET.SubElement(
        root, "AuditSourceIdentification", {"AuditSourceID": clean(source.source_id, 256)}
    )
    _coded(source_element, "AuditSourceTypeCode", SOURCE_APPLICATION_SERVER)

    _objects(root, record, name, actor)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body


def _objects(
    root: ET.Element, record: Mapping[str, Any], name: str, actor: Mapping[str, Any]
) -> None:
    """The participant objects of each kind of record."""
    if name == "QueryPerformed":
        keys = record.get("keys") if isinstance(record.get("keys"), dict) else {}
        query = json.dumps(
            {"level": record.get("level"), "keys": keys}, sort_keys=True, ensure_ascii=False
        ).encode("utf-8", "replace")
        _object(root, STUDY_ROOT_FIND, "2", "24", ID_SOP_CLASS, query=query)
        _subjects(root, record)
    elif name == "AssociationRejected":
        _object(
            root,
            str(actor.get("address") or actor.get("ae_title") or "unknown"),
            "2",
            "13",
            ID_NODE,
            name=str(actor.get("ae_title") or ""),
            description=str(record.get("reason") or ""),
        )
    elif name == "SecurityAlert":
        uid = record.get("sop_instance_uid")
        _object(
            root,
            f"urn:oid:{uid}" if uid else "urn:stockade:alert",
            "2",
            "13",
            ID_URI,
            description=f"{record.get('finding')}: {record.get('detail')}",
        )
        _subjects(root, record)
    elif name == "NodeChanged":
        _object(
            root,
            str(record.get("name") or ""),
            "2",
            "13",
            ID_NODE,
            description=f"node {record.get('action')}",
        )
    elif name == "UserChanged":
        _object(
            root,
            str(record.get("target") or ""),
            "1",
            "11",
            ID_USER,
            description=str(record.get("action") or ""),
        )
    elif name == "ConfigurationChanged":
        _object(
            root,
            f"urn:stockade:setting:{record.get('setting')}",
            "2",
            "13",
            ID_URI,
            description=str(record.get("action") or ""),
        )
    elif name == "AuditLogUsed":
        _object(root, "urn:stockade:audit-trail", "2", "13", ID_URI, name="Security Audit Log")
    elif name == "QuarantineChanged":
        uid = record.get("sop_instance_uid")
        _object(
            root,
            f"urn:oid:{uid}" if uid else f"urn:stockade:quarantine:{record.get('quarantine_id')}",
            "2",
            "13",
            ID_URI,
            description=f"quarantine {record.get('action')}",
        )
        _subjects(root, record)
    else:
        _subjects(root, record)
