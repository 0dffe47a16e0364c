"""Audit records as DICOM audit messages (PS3.15 A.5.1): required elements, codes, escaping."""

from __future__ import annotations

import base64
import dataclasses
import json
import xml.etree.ElementTree as ET
from datetime import datetime
from typing import Any

import pytest

from stockade.audit.atna import KINDS, Source, audit_message
from stockade.audit.events import (
    EVENT_TYPES,
    Actor,
    AuditEvent,
    InstancesDeleted,
    InstancesRetrieved,
    InstanceStored,
    QueryPerformed,
    UserLogin,
)
from stockade.audit.syslog import BOM, syslog_message

SOURCE = Source(ae_title="STOCKADE", host="pacs.example", source_id="STOCKADE@pacs.example")

#: Children of each element in the order the schema's sequences give (PS3.15 A.5.1).
ORDER = {
    "AuditMessage": [
        "EventIdentification",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
    ],
    "EventIdentification": ["EventID", "EventTypeCode", "EventOutcomeDescription"],
    "ActiveParticipant": ["RoleIDCode", "MediaIdentifier"],
    "AuditSourceIdentification": ["AuditSourceTypeCode"],
    "ParticipantObjectIdentification": [
        "ParticipantObjectIDTypeCode",
        "ParticipantObjectName",
        "ParticipantObjectQuery",
        "ParticipantObjectDetail",
        "ParticipantObjectDescription",
        "SOPClass",
    ],
}
CODED = {
    "EventID",
    "EventTypeCode",
    "RoleIDCode",
    "AuditSourceTypeCode",
    "ParticipantObjectIDTypeCode",
}


def _ordered(element: ET.Element) -> None:
    allowed = ORDER.get(element.tag)
    if allowed is None:
        return
    positions = []
    for child in element:
        assert child.tag in allowed, f"{child.tag} is not allowed in {element.tag}"
        positions.append(allowed.index(child.tag))
        _ordered(child)
    assert positions == sorted(positions), f"children of {element.tag} out of order"


def check_message(xml: bytes) -> ET.Element:
    """Parse *xml* and check what the PS3.15 A.5.1 schema requires; return the root."""
    root = ET.fromstring(xml)  # noqa: S314 - our own output, checked in a test
    assert root.tag == "AuditMessage"
    _ordered(root)
    for element in root.iter():
        if element.tag in CODED:
            assert element.get("csd-code"), element.tag
            assert element.get("codeSystemName"), element.tag
            assert element.get("originalText"), element.tag
    (event,) = root.findall("EventIdentification")
    assert event.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    datetime.fromisoformat(str(event.get("EventDateTime")))
    assert len(event.findall("EventID")) == 1
    participants = root.findall("ActiveParticipant")
    assert participants
    for participant in participants:
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
        if participant.get("NetworkAccessPointID"):
            assert participant.get("NetworkAccessPointTypeCode") in {"1", "2", "3", "4", "5"}
    (source,) = root.findall("AuditSourceIdentification")
    assert source.get("AuditSourceID")
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode") in {"1", "2", "3", "4"}
        assert 1 <= int(str(obj.get("ParticipantObjectTypeCodeRole"))) <= 24
        assert obj[0].tag == "ParticipantObjectIDTypeCode"
    return root


def _sample(event_type: type[AuditEvent]) -> dict[str, Any]:
    """A record of *event_type* with every required field filled in."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(event_type):
        if f.name in {"actor", "outcome", "time"} or f.default is not dataclasses.MISSING:
            continue
        if f.default_factory is not dataclasses.MISSING:
            continue
        kind = str(f.type)
        if "list" in kind:
            values[f.name] = ["1.2.3"]
        elif "dict" in kind:
            values[f.name] = {"PatientID": "P1"}
        elif "int" in kind:
            values[f.name] = 1
        else:
            values[f.name] = "x"
    event = event_type(actor=Actor(ae_title="SCU", address="10.0.0.9", via="dimse"), **values)
    return {**event.as_record(), "seq": 1}


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda e: e.__name__)
def test_every_event_type_makes_a_valid_message(event_type: type[AuditEvent]) -> None:
    assert event_type.__name__ in KINDS, "map every event type onto PS3.15 A.5.3"
    root = check_message(audit_message(_sample(event_type), SOURCE))
    requestors = [
        p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"
    ]
    assert len(requestors) == 1


def _codes(root: ET.Element, tag: str) -> list[str]:
    return [str(e.get("csd-code")) for e in root.iter(tag)]


def test_store_is_instances_transferred_with_patient_and_study() -> None:
    record = InstanceStored(
        actor=Actor(ae_title="MODALITY", address="10.1.2.3", via="dimse"),
        study_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        patient_id="PAT-7",
        result="stored",
        preamble="zero",
    ).as_record()
    root = check_message(audit_message(record, SOURCE))
    event = root.find("EventIdentification")
    assert event is not None and event.get("EventActionCode") == "C"
    assert _codes(root, "EventID") == ["110104"]
    sender, archive = root.findall("ActiveParticipant")
    assert (sender.get("UserID"), sender.get("NetworkAccessPointID")) == ("MODALITY", "10.1.2.3")
    assert sender.get("NetworkAccessPointTypeCode") == "2"
    assert _codes(sender, "RoleIDCode") == ["110153"] and _codes(archive, "RoleIDCode") == [
        "110152"
    ]
    objects = {
        o.get("ParticipantObjectID"): o for o in root.findall("ParticipantObjectIdentification")
    }
    assert _codes(objects["PAT-7"], "ParticipantObjectIDTypeCode") == ["2"]
    assert _codes(objects["1.2.3.4"], "ParticipantObjectIDTypeCode") == ["110180"]
    sop_class = objects["1.2.3.4"].find("SOPClass")
    assert sop_class is not None and sop_class.get("UID") == "1.2.840.10008.5.1.4.1.1.2"


def test_query_carries_its_keys() -> None:
    record = QueryPerformed(
        actor=Actor(address="127.0.0.1", via="web"),
        level="STUDY",
        keys={"PatientID": "PAT-7", "StudyDate": "2024"},
        matches=2,
    ).as_record()
    root = check_message(audit_message(record, SOURCE))
    assert _codes(root, "EventID") == ["110112"]
    query = root.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert query is not None and query.text
    assert json.loads(base64.b64decode(query.text))["keys"]["StudyDate"] == "2024"
    ids = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")]
    assert "PAT-7" in ids


def test_move_names_the_destination_and_delete_of_a_study() -> None:
    moved = InstancesRetrieved(
        actor=Actor(ae_title="WS", address="10.0.0.5", via="dimse"),
        service="move",
        destination="PRINTER",
        level="STUDY",
        keys={"StudyInstanceUID": "1.2"},
        study_uids=["1.2"],
        patient_ids=["P"],
        located=3,
        completed=3,
        warning=0,
        failed=0,
    ).as_record()
    root = check_message(audit_message(moved, SOURCE))
    users = {p.get("UserID"): _codes(p, "RoleIDCode") for p in root.findall("ActiveParticipant")}
    assert users == {"WS": [], "STOCKADE": ["110153"], "PRINTER": ["110152"]}
    deleted = InstancesDeleted(
        actor=Actor(via="cli", user="admin"),
        level="STUDY",
        keys={"StudyInstanceUID": "1.2"},
        study_uids=["1.2"],
        patient_ids=["P"],
        deleted=3,
    ).as_record()
    root = check_message(audit_message(deleted, SOURCE))
    assert _codes(root, "EventID") == ["110105"]
    event = root.find("EventIdentification")
    assert event is not None and event.get("EventActionCode") == "D"


def test_failed_login_is_user_authentication_with_minor_failure() -> None:
    record = UserLogin(
        actor=Actor(user="mallory", address="10.9.9.9", via="web"),
        outcome="failure",
        method="password",
        reason="wrong password",
    ).as_record()
    root = check_message(audit_message(record, SOURCE))
    assert _codes(root, "EventID") == ["110114"] and _codes(root, "EventTypeCode") == ["110122"]
    event = root.find("EventIdentification")
    assert event is not None and event.get("EventOutcomeIndicator") == "4"
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "wrong password"


def test_hostile_values_are_escaped() -> None:
    nasty = '<x a="1">&amp;</x>\x00\x1b[31m\ud800]]>'
    record = InstanceStored(
        actor=Actor(ae_title=nasty, address=nasty, via="dimse"),
        study_uid=nasty,
        sop_instance_uid="1.2",
        sop_class_uid=nasty,
        patient_id=nasty,
        result="stored",
        preamble="zero",
    ).as_record()
    xml = audit_message(record, SOURCE)
    root = check_message(xml)
    ids = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")]
    assert ids == ['<x a="1">&amp;</x>\ufffd\ufffd[31m\ufffd]]>'] * 2
    assert b"\x00" not in xml and b"\x1b" not in xml


def test_syslog_message_is_rfc5424() -> None:
    message = syslog_message(
        b"<AuditMessage/>", time="2026-12-02T05:42:24.123+00:00", hostname="h st", seq=7
    )
    header, _, body = message.partition(BOM)
    assert (
        header
        == b'<85>1 2026-12-02T05:42:24.123+00:00 hst stockade - IHE+RFC-3881 [meta sequenceId="7"] '
    )
    assert body == b"<AuditMessage/>"
