"""``stockade scan``: find polyglots and hidden payloads in existing files (PS3.10 7.5).

Runs without a server or an archive: each file (or ZIP entry) goes through the same
:func:`~stockade.dicom.examine.examine` as ingest, and the report says what ingest would find.
``--fix`` writes sanitised copies: a zero preamble, a fresh File Meta Information without
private information, no bytes after the data set, and every offending top-level element cut
out. A file whose finding cannot be cut out (a payload nested in a sequence, an active PDF)
is reported as not fixable and no copy is written.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.dicom.attributes import WANTED_TAGS, extract
from stockade.dicom.examine import check_pixels, examine, file_findings
from stockade.dicom.inspect import Finding
from stockade.dicom.parse import Limits
from stockade.dicom.part10 import PREFIX, PreambleKind, file_header, read_part10
from stockade.dicom.uids import uid_problem
from stockade.errors import StockadeError

Buffer = bytes | bytearray | memoryview


@dataclass
class FileReport:
    """What the scanner found in one file.

    Attributes
    ----------
    label : str
        The path, or ``archive.zip!entry`` for a ZIP entry.
    status : str
        ``clean``, ``findings``, ``malformed`` (not a readable Part 10 data set, or over a
        limit), ``not-dicom`` (no ``DICM`` prefix: skipped).
    preamble : str or None
        How the preamble was classified (``zero``, ``tiff``, ``executable``, ...).
    findings : list of Finding
    error : str or None
        Why a file is malformed or not DICOM.
    fixed : str or None
        Where the sanitised copy was written (``--fix``).
    unfixable : str or None
        Why no sanitised copy was written.
    """

    label: str
    status: str
    preamble: str | None = None
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    fixed: str | None = None
    unfixable: str | None = None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "file": self.label,
            "status": self.status,
            "preamble": self.preamble,
            "findings": [
                {"kind": f.kind.value, "where": f.where, "detail": f.detail} for f in self.findings
            ],
            "error": self.error,
            "fixed": self.fixed,
            "unfixable": self.unfixable,
        }


class Scanner:
    """Scans files; optionally writes sanitised copies under *fix_dir*.

    Parameters
    ----------
    limits : Limits
        Structural limits (as ingest's).
    inflate_cap, max_decoded_size : int
        As the settings of the same names.
    fix_dir : Path, optional
        Folder for sanitised copies (created, mode 0700). Copies are named by the SHA-256
        of the file's label, never by anything inside the file.
    """

    def __init__(
        self,
        limits: Limits,
        inflate_cap: int,
        max_decoded_size: int,
        fix_dir: Path | None = None,
    ) -> None:
        self.limits = limits
        self.inflate_cap = inflate_cap
        self.max_decoded_size = max_decoded_size
        self.fix_dir = fix_dir
        self.tally: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()

    def scan(self, label: str, data: Buffer) -> FileReport:
        """Scan one file's bytes."""
        report = self._scan(label, data)
        self.tally[report.status] += 1
        if report.preamble == PreambleKind.TIFF.value:
            self.tally["tiff-preamble"] += 1
        if report.fixed:
            self.tally["fixed"] += 1
        for finding in report.findings:
            self.kinds[finding.kind.value] += 1
        return report

    def unreadable(self, label: str, reason: str) -> FileReport:
        """Count a file that could not even be read (a broken ZIP entry, a file over the
        size limit) as malformed."""
        self.tally["malformed"] += 1
        return FileReport(label, "malformed", error=reason)

    def _scan(self, label: str, data: Buffer) -> FileReport:
        if len(data) < 132 or bytes(data[128:132]) != PREFIX:
            return FileReport(label, "not-dicom", error="no DICM prefix (not a Part 10 file)")
        try:
            part10 = read_part10(data)
            kind, found = file_findings(data, part10)
            dataset = memoryview(data)[part10.dataset_offset :]
            seen = examine(
                dataset,
                part10.transfer_syntax,
                limits=self.limits,
                inflate_cap=self.inflate_cap,
                wanted=WANTED_TAGS,
                findings=found,
                tiff=kind is PreambleKind.TIFF,
            )
            check_pixels(seen.inspector, self.max_decoded_size)
        except StockadeError as exc:
            return FileReport(label, "malformed", error=exc.reason)
        report = FileReport(
            label,
            "findings" if seen.findings else "clean",
            preamble=kind.value,
            findings=seen.findings,
        )
        if self.fix_dir is not None and report.findings:
            unfixable = [f for f in seen.findings if not f.strippable]
            if unfixable:
                report.unfixable = "; ".join(f"{f.kind} in {f.where}" for f in unfixable)
                return report
            attrs = extract(seen.parsed, seen.found.values, little_endian=seen.ts.little_endian)
            uids = [str(attrs.get(k)) for k in ("SOPClassUID", "SOPInstanceUID")]
            if any(uid_problem(u) for u in uids):
                report.unfixable = "the SOP Class or Instance UID is invalid"
                return report
            cuts = sorted(f.cut for f in seen.findings if f.cut is not None)
            header = file_header(uids[0], uids[1], part10.transfer_syntax, None)
            report.fixed = str(self._write(label, [header, seen.kept(dataset, cuts)]))
        return report

    def _write(self, label: str, parts: list[Buffer]) -> Path:
        if self.fix_dir is None:
            raise ValueError("no folder for sanitised copies")
        self.fix_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        path = self.fix_dir / f"{name}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
        return path

    def summary(self) -> dict[str, Any]:
        """Counts of files by status, of findings by type."""
        return {
            "files": sum(self.tally[s] for s in ("clean", "findings", "malformed", "not-dicom")),
            "clean": self.tally["clean"],
            "with_findings": self.tally["findings"],
            "malformed": self.tally["malformed"],
            "not_dicom": self.tally["not-dicom"],
            "tiff_preambles": self.tally["tiff-preamble"],
            "fixed": self.tally["fixed"],
            "findings": dict(sorted(self.kinds.items())),
        }

    @property
    def found_anything(self) -> bool:
        """Whether any file had a finding or was malformed (the exit status)."""
        return bool(self.tally["findings"] or self.tally["malformed"])
