"""The hidden-payload policy: what happens to an object with findings (PS3.10 section 7.5).

Each finding type of :mod:`stockade.dicom.inspect` has an action, configurable with the
``screening_actions`` setting (``docs/security.md`` lists the defaults):

``alert``
    store the object unchanged; the finding is a Security Alert audit event.
``strip``
    store the object without the offending part (a top-level element, the preamble, bytes after
    the data set); the C-STORE answer is the warning B006 "Elements Discarded" (PS3.4 B.2.3).
    A part that cannot be cut out (nested in a sequence, or the document itself) is quarantined
    instead.
``quarantine``
    keep the object apart, as received, out of reach of query and retrieve, for an
    administrator to release or delete (``stockade quarantine``); the sender gets a failure.
``reject``
    refuse it; nothing is kept.

The object's fate is the most severe action among its findings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from stockade.dicom.inspect import Finding, Kind


class Action(StrEnum):
    """What to do about a finding, from the mildest."""

    ALERT = "alert"
    STRIP = "strip"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        """0 for alert up to 3 for reject."""
        return list(Action).index(self)


DEFAULT_ACTIONS: Mapping[Kind, Action] = {
    Kind.EXECUTABLE_PREAMBLE: Action.QUARANTINE,
    Kind.MARKUP_PREAMBLE: Action.QUARANTINE,
    Kind.EXECUTABLE_PAYLOAD: Action.QUARANTINE,
    Kind.MARKUP_PAYLOAD: Action.ALERT,
    Kind.ACTIVE_PDF: Action.QUARANTINE,
    Kind.XML_ENTITY: Action.QUARANTINE,
    Kind.POLYGLOT_TRAILER: Action.QUARANTINE,
    Kind.TRAILING_DATA: Action.STRIP,
    Kind.TRAILING_PADDING: Action.STRIP,
    Kind.FILE_META_PRIVATE: Action.STRIP,
    Kind.GROUP_LENGTH: Action.STRIP,
    Kind.PRIVATE_WITHOUT_CREATOR: Action.ALERT,
}
"""The action of each finding type unless ``screening_actions`` says otherwise."""

WHY: Mapping[Kind, str] = {
    Kind.EXECUTABLE_PREAMBLE: "PE, ELF, Mach-O or script header in the 128-byte preamble "
    "(CVE-2019-11687): the file is also a program.",
    Kind.MARKUP_PREAMBLE: "HTML, XML or PDF header in the preamble: the file is also a document "
    "a browser or reader may open.",
    Kind.EXECUTABLE_PAYLOAD: "an executable header at the start of, or inside, an opaque or "
    "private value, File Meta private information, padding or pixel data fragment.",
    Kind.MARKUP_PAYLOAD: "an opaque or private value starts with HTML/XML/PDF (vendors do put "
    "XML there, so the default only alerts).",
    Kind.ACTIVE_PDF: "an encapsulated PDF with JavaScript, launch or submit actions, embedded "
    "files, rich media or XFA (also inside compressed object streams).",
    Kind.XML_ENTITY: "an encapsulated XML document (CDA) that declares entities or an external "
    "DTD (XXE).",
    Kind.POLYGLOT_TRAILER: "bytes after the data set that are a ZIP archive, an executable, a "
    "PDF or markup: the file is a polyglot.",
    Kind.TRAILING_DATA: "other bytes after the end of the data set.",
    Kind.TRAILING_PADDING: "Data Set Trailing Padding (FFFC,FFFC) that is not all zeros or "
    "spaces: a place to hide bytes.",
    Kind.FILE_META_PRIVATE: "File Meta private information (0002,0102); Stockade writes its own "
    "File Meta, so it is never kept.",
    Kind.GROUP_LENGTH: "a group length element (gggg,0000, retired outside group 0002, PS3.5 "
    "7.2) that is not a 4-byte UL: the carrier element of the published PE/DICOM proof of "
    "concept.",
    Kind.PRIVATE_WITHOUT_CREATOR: "a private element whose Private Creator is missing, or a "
    "reserved private element (PS3.5 7.8.1): nobody can say what it holds (common in real "
    "data, so the default only alerts; its value is still checked for payloads).",
}
"""One line on each finding type (``docs/security.md`` and ``stockade scan`` use it)."""


def parse_actions(text: str) -> dict[Kind, Action]:
    """Parse ``kind=action,kind=action`` (the ``screening_actions`` setting).

    Raises
    ------
    ValueError
        An unknown finding type or action, or one named twice.
    """
    actions: dict[Kind, Action] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not kind=action")
        try:
            kind = Kind(name.strip())
        except ValueError:
            raise ValueError(f"unknown finding type {name.strip()!r}") from None
        try:
            action = Action(value.strip())
        except ValueError:
            raise ValueError(f"unknown action {value.strip()!r} for {kind.value}") from None
        if kind in actions:
            raise ValueError(f"{kind.value} is named twice")
        actions[kind] = action
    return actions


@dataclass(frozen=True)
class Decision:
    """A finding and what the policy does about it."""

    finding: Finding
    action: Action


@dataclass(frozen=True)
class Verdict:
    """The policy's answer for one object."""

    decisions: tuple[Decision, ...]

    @property
    def action(self) -> Action | None:
        """The most severe action, or None when nothing was found."""
        if not self.decisions:
            return None
        return max((d.action for d in self.decisions), key=lambda a: a.severity)

    def cuts(self) -> list[tuple[int, int]]:
        """Byte ranges to remove from the data set, in order, without overlaps."""
        ranges = sorted(
            d.finding.cut
            for d in self.decisions
            if d.action is Action.STRIP and d.finding.cut is not None
        )
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    def summary(self) -> str:
        """One line naming each finding and its action."""
        return "; ".join(
            f"{d.finding.kind.value} in {d.finding.where}: {d.finding.detail} ({d.action.value})"
            for d in self.decisions
        )


class Policy:
    """Decides the fate of an object from its findings.

    Parameters
    ----------
    overrides : mapping
        Actions that replace :data:`DEFAULT_ACTIONS` for some finding types.
    """

    def __init__(self, overrides: Mapping[Kind, Action] | None = None) -> None:
        self.actions = {**DEFAULT_ACTIONS, **(overrides or {})}

    def judge(self, findings: Iterable[Finding], *, release: bool = False) -> Verdict:
        """Decide each finding; *release* (an administrator released the object from
        quarantine) lowers quarantine and reject to alert, keeping strips."""
        decisions = []
        for finding in findings:
            action = self.actions[finding.kind]
            if action is Action.STRIP and not finding.strippable:
                action = Action.QUARANTINE
            if release and action.severity >= Action.QUARANTINE.severity:
                action = Action.ALERT
            decisions.append(Decision(finding, action))
        return Verdict(tuple(decisions))


def findings_markdown() -> str:
    """The table of finding types, what each means and its default action
    (``docs/security.md`` holds it; a test keeps the two equal)."""
    rows = ["| finding | what it is | default action |", "|---|---|---|"]
    for kind in Kind:
        rows.append(f"| `{kind.value}` | {WHY[kind]} | `{DEFAULT_ACTIONS[kind].value}` |")
    return "\n".join(rows) + "\n"
