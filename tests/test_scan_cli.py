"""``stockade scan``: pydicom's test files, a mixed folder of planted polyglots, ZIPs, --fix
and --json, run as the command a hospital would run (no server, no data folder)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests import polyglots
from tests.dicomfactory import make_dataset, part10


def _scan(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "scan", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def _records(output: str) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    summary = lines.pop()["summary"]
    return {str(r["file"]): r for r in lines}, summary


def _pydicom_files() -> Path:
    return Path(str(get_testdata_file("CT_small.dcm"))).parent


def test_pydicom_test_files_tiff_preambles_are_benign(tmp_path: Path) -> None:
    folder = _pydicom_files()
    result = _scan(folder, "--json", cwd=tmp_path)
    records, summary = _records(result.stdout)
    tiff = {Path(f).name for f, r in records.items() if r["preamble"] == "tiff"}
    assert {"CT_small.dcm", "MR_small.dcm"} <= tiff  # dual-format files in pydicom's data
    assert summary["tiff_preambles"] == len(tiff)
    for name in tiff:
        kinds = {f["kind"] for f in records[str(folder / name)]["findings"]}  # type: ignore[attr-defined,union-attr]
        assert not kinds & {"executable-preamble", "markup-preamble", "executable-payload"}
    # nothing in pydicom's data is a polyglot
    for record in records.values():
        kinds = {f["kind"] for f in record["findings"]}  # type: ignore[attr-defined,union-attr]
        assert not kinds & {"executable-preamble", "executable-payload", "polyglot-trailer"}
    assert not list(tmp_path.iterdir())  # no data folder, nothing written
    text = _scan(folder / "CT_small.dcm", cwd=tmp_path)
    assert "TIFF preamble (benign" in text.stdout


def _mixed_folder(root: Path) -> dict[str, str]:
    """Planted polyglots among clean files; returns file name -> expected finding."""
    root.mkdir()
    planted: dict[str, str] = {}
    for name, preamble in polyglots.PREAMBLES.items():
        (root / f"{name}-preamble.dcm").write_bytes(part10(make_dataset(), preamble=preamble))
        planted[f"{name}-preamble.dcm"] = polyglots.PREAMBLE_KIND[name]
    for name, (build, kind) in polyglots.DATASET_PAYLOADS.items():
        ds, raw = build()
        (root / f"{name}.dcm").write_bytes(polyglots.as_file(ds, raw))
        planted[f"{name}.dcm"] = kind
    (root / "zip-appended.dcm").write_bytes(polyglots.zip_appended())
    planted["zip-appended.dcm"] = "polyglot-trailer"
    (root / "meta-elf.dcm").write_bytes(polyglots.meta_elf())
    planted["meta-elf.dcm"] = "executable-payload"
    sub = root / "clean" / "deeper"
    sub.mkdir(parents=True)
    for i in range(5):
        (sub / f"clean{i}.dcm").write_bytes(part10(make_dataset()))
    shutil.copy(str(get_testdata_file("CT_small.dcm")), root / "clean" / "ct_small.dcm")
    (root / "README.txt").write_text("a CD's readme, not DICOM\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(
            "../../escape.dcm", part10(make_dataset(), preamble=polyglots.PREAMBLES["pe"])
        )
        archive.writestr("ok.dcm", part10(make_dataset()))
    (root / "cd.zip").write_bytes(buf.getvalue())
    planted["cd.zip!../../escape.dcm"] = "executable-preamble"
    return planted


def test_every_planted_polyglot_is_found(tmp_path: Path) -> None:
    planted = _mixed_folder(tmp_path / "mixed")
    result = _scan(tmp_path / "mixed", "--json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    records, summary = _records(result.stdout)
    for name, kind in planted.items():
        record = records[str(tmp_path / "mixed" / name)]
        assert record["status"] == "findings", (name, record)
        assert kind in {f["kind"] for f in record["findings"]}, (name, record)  # type: ignore[attr-defined,union-attr]
    clean = [r for f, r in records.items() if "/clean/" in f or f.endswith("ok.dcm")]
    assert len(clean) == 7 and all(r["status"] == "clean" for r in clean)
    assert records[str(tmp_path / "mixed" / "README.txt")]["status"] == "not-dicom"
    assert summary["with_findings"] == len(planted)
    assert summary["files"] == len(planted) + 8
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()
    # a clean folder: exit 0
    assert _scan(tmp_path / "mixed" / "clean", cwd=tmp_path).returncode == 0
    # the text report names each planted file
    text = _scan(tmp_path / "mixed", cwd=tmp_path).stdout
    for name in planted:
        assert f"{name}: " in text


def test_fix_writes_sanitised_copies_that_scan_clean(tmp_path: Path) -> None:
    _mixed_folder(tmp_path / "mixed")
    out = tmp_path / "fixed"
    result = _scan(tmp_path / "mixed", "--fix", out, "--json", cwd=tmp_path)
    records, summary = _records(result.stdout)
    fixed = {f: r for f, r in records.items() if r["fixed"]}
    unfixable = {Path(f).name for f, r in records.items() if r["unfixable"]}
    # nested payloads, active documents and XXE cannot be cut out
    assert {
        "nested-pe.dcm",
        "active-pdf.dcm",
        "hidden-active-pdf.dcm",
        "cda-entity.dcm",
    } <= unfixable
    assert "pe-preamble.dcm" not in unfixable and "proof-of-concept.dcm" not in unfixable
    assert summary["fixed"] == len(fixed) >= 12
    again = _scan(out, "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stdout
    for path in out.iterdir():
        data = path.read_bytes()
        assert data[:128] == bytes(128)
        assert b"This program cannot be run" not in data and b"\x7fELF" not in data
        assert b"PK\x03\x04" not in data
        pydicom.dcmread(path)  # still a readable DICOM file


@pytest.mark.parametrize("bad", ["missing-folder"])
def test_bad_usage_exits_2(tmp_path: Path, bad: str) -> None:
    result = _scan(tmp_path / bad, cwd=tmp_path)
    assert result.returncode == 2 and "no such file" in result.stderr
