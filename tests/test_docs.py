"""Documentation is generated from, or checked against, the code's own tables."""

from __future__ import annotations

from pathlib import Path

from stockade.audit.events import EVENT_TYPES
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


def test_conformance_lists_every_sop_class_and_transfer_syntax() -> None:
    text = (DOCS / "conformance" / "dicom.md").read_text(encoding="utf-8")
    missing = [u for u in STORAGE_SOP_CLASSES if f"`{u}`" not in text]
    missing += [t.uid for t in TRANSFER_SYNTAXES if f"`{t.uid}`" not in text]
    assert not missing
