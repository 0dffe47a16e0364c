"""``stockade scan`` and ``stockade quarantine``: the hostile-input commands of the CLI.

A thin adapter like :mod:`stockade.cli`: ``scan`` needs no archive (it reads files with the
same examination as ingest, :mod:`stockade.security.scan`); ``quarantine`` calls the
:class:`~stockade.archive.Archive`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from stockade.archive import Archive
from stockade.audit.events import Actor
from stockade.dicom.parse import Limits
from stockade.errors import ConfigError, StockadeError
from stockade.security.scan import FileReport, Scanner
from stockade.settings import Settings
from stockade.walk import items, walk

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``scan`` and ``quarantine`` to the ``stockade`` parser."""
    scan = sub.add_parser(
        "scan",
        help="look for polyglots and hidden payloads in DICOM files, folders and ZIPs "
        "(no server needed); exit 1 when anything is found",
    )
    scan.add_argument("paths", nargs="+", type=Path)
    scan.add_argument("--fix", type=Path, metavar="OUTDIR", help="write sanitised copies here")
    scan.add_argument(
        "--json", action="store_true", help="one JSON object per file, then a summary"
    )
    scan.add_argument("--quiet", action="store_true", help="no progress bar")
    q = sub.add_parser("quarantine", help="objects held back by the payload policy")
    q_sub = q.add_subparsers(dest="quarantine_command", required=True)
    q_sub.add_parser("list", help="list quarantined objects")
    for name, text in (
        ("show", "show one quarantined object's findings"),
        ("release", "store a quarantined object after all (its findings only alerted)"),
        ("delete", "delete a quarantined object for good"),
    ):
        one = q_sub.add_parser(name, help=text)
        one.add_argument("id", help="the quarantine id (32 hexadecimal digits)")


def scan(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``stockade scan``; 0 when nothing was found, 1 otherwise, 2 on bad usage."""
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {missing[0]}")
    scanner = Scanner(
        Limits(max_depth=settings.max_nesting_depth, max_elements=settings.max_elements),
        settings.max_inflated_size,
        settings.max_decoded_size,
        args.fix,
    )
    from stockade.cli import _progress

    progress = _progress("scanning", quiet=args.quiet or args.json)
    with progress:
        task = progress.add_task("scan", total=sum(1 for _ in walk(args.paths)))
        last = ""
        for label, item in items(args.paths, settings.max_object_size):
            top = label.split("!", 1)[0]
            if top != last:
                progress.advance(task)
                last = top
            if isinstance(item, StockadeError):
                report = scanner.unreadable(label, item.reason)
            else:
                report = scanner.scan(label, item)
            _print(report, as_json=args.json)
    summary = scanner.summary()
    if args.json:
        out.print(json.dumps({"summary": summary}), markup=False)
    else:
        found = ", ".join(f"{k} {v}" for k, v in summary["findings"].items()) or "none"
        out.print(
            f"scanned {summary['files']} files: {summary['clean']} clean, "
            f"{summary['with_findings']} with findings ({found}), {summary['malformed']} "
            f"malformed, {summary['not_dicom']} not DICOM; {summary['tiff_preambles']} TIFF "
            f"preambles (benign)" + (f"; {summary['fixed']} fixed" if args.fix else ""),
            markup=False,
        )
    return 1 if scanner.found_anything else 0


def _print(report: FileReport, *, as_json: bool) -> None:
    if as_json:
        out.print(json.dumps(report.as_json()), markup=False)
        return
    label = escape(report.label)
    if report.status == "malformed":
        out.print(f"{label}: malformed: {escape(report.error or '')}")
    for f in report.findings:
        out.print(f"{label}: {f.kind} in {escape(f.where)}: {escape(f.detail)}")
    if report.preamble == "tiff":
        out.print(f"{label}: TIFF preamble (benign: a dual-format file; stored with zeros)")
    if report.fixed:
        out.print(f"{label}: sanitised copy written to {escape(report.fixed)}")
    if report.unfixable:
        out.print(f"{label}: not fixed: {escape(report.unfixable)}")


def quarantine(archive: Archive, args: argparse.Namespace) -> int:
    """Run ``stockade quarantine list|show|release|delete``."""
    actor = Actor(user=os.environ.get("USER"), via="cli")
    command = args.quarantine_command
    if command == "list":
        entries = archive.quarantined()
        for e in entries:
            kinds = ", ".join(sorted({f["kind"] for f in e.findings}))
            out.print(
                f"{e.id}  {e.received_at}  {e.via}"
                f"{' ' + e.ae_title if e.ae_title else ''}  {e.sop_instance_uid or '-'}  {kinds}",
                markup=False,
            )
        out.print(f"{len(entries)} quarantined object(s)")
        return 0
    if command == "show":
        entry = archive.quarantine_entry(args.id)
        for key, value in vars(entry).items():
            if key != "findings":
                out.print(f"{key}: {value}", markup=False)
        for f in entry.findings:
            out.print(
                f"finding: {f['kind']} in {f['where']}: {f['detail']} ({f['action']})", markup=False
            )
        return 0
    if command == "release":
        result = archive.release(args.id, actor=actor)
        out.print(
            f"released {args.id}: {result.outcome.value} {result.sop_instance_uid}", markup=False
        )
        return 0
    archive.discard_quarantined(args.id, actor=actor)
    out.print(f"deleted {args.id}", markup=False)
    return 0
