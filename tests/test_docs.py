"""Documentation is generated from, or checked against, the code's own tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stockade.audit.events import EVENT_TYPES, AuditEvent
from stockade.dicom.tables import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from stockade.settings import DECLARED, markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_settings_doc_is_current() -> None:
    text = (DOCS / "settings.md").read_text(encoding="utf-8")
    assert text == markdown(), "regenerate with: stockade settings --markdown > docs/settings.md"
    for decl in DECLARED:
        assert f"`{decl.name}`" in text and f"`{decl.env}`" in text


def test_every_audit_event_is_documented() -> None:
    text = (DOCS / "audit-events.md").read_text(encoding="utf-8")
    missing = [e.__name__ for e in EVENT_TYPES if f"`{e.__name__}`" not in text]
    assert not missing


def test_every_audit_event_field_is_documented() -> None:
    """Each field of each event is named in that event's row of the table (the first row
    that starts with the event's name); the fields every record has, in their own table."""
    text = (DOCS / "audit-events.md").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            rows.setdefault(line.split("|")[1].strip(), line)
    common = {f.name for f in dataclasses.fields(AuditEvent)}
    missing = [
        f"{event.__name__}.{f.name}"
        for event in EVENT_TYPES
        for f in dataclasses.fields(event)
        if f.name not in common and f"`{f.name}`" not in rows.get(f"`{event.__name__}`", "")
    ]
    missing += [name for name in sorted(common | {"seq", "type"}) if f"`{name}`" not in rows]
    assert not missing


def test_conformance_lists_every_sop_class_and_transfer_syntax() -> None:
    text = (DOCS / "conformance" / "dicom.md").read_text(encoding="utf-8")
    missing = [u for u in STORAGE_SOP_CLASSES if f"`{u}`" not in text]
    missing += [t.uid for t in TRANSFER_SYNTAXES if f"`{t.uid}`" not in text]
    assert not missing


def test_security_doc_lists_every_finding_type_with_its_default() -> None:
    from stockade.security.policy import findings_markdown

    text = (DOCS / "security.md").read_text(encoding="utf-8")
    start = text.index("<!-- findings")
    table = text[text.index("\n", start) + 1 : text.index("<!-- /findings -->")]
    assert table == findings_markdown(), (
        "regenerate with stockade.security.policy.findings_markdown()"
    )


def test_security_doc_has_the_role_table() -> None:
    from stockade.auth.roles import permissions_markdown

    text = (DOCS / "security.md").read_text(encoding="utf-8")
    start = text.index("<!-- roles")
    table = text[text.index("\n", start) + 1 : text.index("<!-- /roles -->")]
    assert table == permissions_markdown(), "regenerate with permissions_markdown()"
