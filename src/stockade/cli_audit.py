"""``stockade audit list|verify`` and ``stockade delete``: the audit trail and deletion.

A thin adapter like :mod:`stockade.cli`: arguments become calls on the
:class:`~stockade.archive.Archive` (with the operating-system account as the audit actor),
results become lines on standard output. Record values come from peers, so text output
escapes every control character (no terminal escape sequence ever reaches the screen).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stockade.archive import Archive, local_actor
from stockade.errors import ConfigError

#: Commands this module handles.
COMMANDS = frozenset({"audit", "delete"})


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` and ``delete`` to the ``stockade`` parser."""
    audit = sub.add_parser("audit", help="list or verify the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    listing = audit_sub.add_parser("list", help="audit records, oldest first")
    listing.add_argument("--since", help="from this ISO 8601 date or time (UTC unless given)")
    listing.add_argument("--until", help="before this ISO 8601 date or time")
    listing.add_argument("--user", help="records of this user (the account, for the CLI)")
    listing.add_argument("--ae", help="records of this calling AE title")
    listing.add_argument("--patient", help="records concerning this Patient ID")
    listing.add_argument("--study", help="records concerning this Study Instance UID")
    listing.add_argument("--type", help="records of this event type, e.g. InstanceStored")
    listing.add_argument(
        "--limit",
        type=int,
        default=1000,
        help="at most this many: the first from --since, else the newest (default 1000)",
    )
    listing.add_argument("--json", action="store_true", help="one JSON record per line")
    audit_sub.add_parser(
        "verify", help="check the hash chain; exit 1 naming the first broken record"
    )
    delete = sub.add_parser(
        "delete", help="delete a study, a series or an instance (audited; cannot be undone)"
    )
    delete.add_argument("--study", required=True, help="Study Instance UID")
    delete.add_argument("--series", help="Series Instance UID (delete one series)")
    delete.add_argument("--instance", help="SOP Instance UID (one instance; needs --series)")
    delete.add_argument("--yes", action="store_true", help="really delete (required)")


def run(archive: Archive, args: argparse.Namespace) -> int:
    """Run ``audit`` or ``delete``; return the exit code."""
    if args.command == "delete":
        return _delete(archive, args)
    if args.audit_command == "verify":
        return _verify(archive)
    return _list(archive, args)


def safe(value: object, size: int = 200) -> str:
    """*value* for a terminal: control characters escaped, at most *size* characters."""
    text = str(value)[:size]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _line(record: dict[str, Any]) -> str:
    actor = record.get("actor") or {}
    who = actor.get("user") or actor.get("ae_title") or "-"
    where = actor.get("address") or "-"
    patients = record.get("patient_ids") or (
        [record["patient_id"]] if record.get("patient_id") else []
    )
    studies = record.get("study_uids") or ([record["study_uid"]] if record.get("study_uid") else [])
    fields = [
        str(record.get("seq", "")),
        str(record.get("time", "")),
        str(record.get("type", "")),
        str(record.get("outcome", "")),
        f"{who}@{where}/{actor.get('via') or '-'}",
        "patient=" + (",".join(patients) or "-"),
        "study=" + (",".join(studies) or "-"),
    ]
    return " ".join(safe(f) for f in fields)


def _list(archive: Archive, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ConfigError("--limit must be 1 or more")
    records = archive.audit_records(
        actor=local_actor(),
        limit=args.limit,
        since=args.since,
        until=args.until,
        user=args.user,
        ae_title=args.ae,
        patient=args.patient,
        study=args.study,
        event_type=args.type,
    )
    for record in records:
        if args.json:
            sys.stdout.write(json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n")
        else:
            sys.stdout.write(_line(record) + "\n")
    return 0


def _verify(archive: Archive) -> int:
    check = archive.audit_verify(actor=local_actor())
    unwritten = sorted((archive.settings.data_dir / "audit").glob("unwritten-*.jsonl"))
    for path in unwritten:
        sys.stdout.write(
            f"audit trail: records that could not be written to it are in {safe(path, 500)}\n"
        )
    if check.ok:
        sys.stdout.write(f"audit trail: {check.checked} records, chain intact\n")
        return 1 if unwritten else 0
    sys.stdout.write(
        f"audit trail BROKEN at record {check.broken}: {safe(check.reason, 500)} "
        f"({check.checked} records before it verified)\n"
    )
    return 1


def _delete(archive: Archive, args: argparse.Namespace) -> int:
    if not args.yes:
        raise ConfigError("delete removes stored instances for good: add --yes to confirm")
    gone = archive.delete(args.study, args.series, args.instance, actor=local_actor())
    studies = sorted({i.study_instance_uid for i in gone})
    sys.stdout.write(f"deleted {len(gone)} instances of study {safe(', '.join(studies))}\n")
    return 0
