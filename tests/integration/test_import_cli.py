"""``stockade import``: folders, nested folders, ZIPs, and the files that must be refused.

Contract: ``import PATH... --quiet`` prints ``stored N, duplicate N, rejected N`` on stdout,
one ``rejected PATH: reason`` line per refused file on stderr, and exits 1 if anything was
rejected (0 otherwise). A ZIP entry name is a label, never a path to write to.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from .conftest import (
    StockadeServer,
    assert_index_matches_storage,
    assert_verify_intact,
    dataset_offset,
    write_ct_series,
)

MakeServer = Callable[..., StockadeServer]
REJECTED = re.compile(r"^rejected (.+?): (.+)$")


def rejections(stderr: str) -> dict[str, str]:
    """``rejected PATH: reason`` lines of stderr, by PATH (other lines are log output)."""
    out = {}
    for line in stderr.splitlines():
        if m := REJECTED.match(line):
            out[m.group(1)] = m.group(2)
    return out


def test_import_folder_zip_and_bad_files(
    make_server: MakeServer, db_url: str, tmp_path: Path
) -> None:
    server = make_server(db_url)
    inp = tmp_path / "in"
    top = write_ct_series(inp, 3, size=32, seed=1, patient_id="IMP1")
    nested = write_ct_series(inp / "sub" / "deeper", 2, size=32, seed=2, patient_id="IMP2")
    ct_small = Path(get_testdata_file("CT_small.dcm"))
    shutil.copyfile(ct_small, inp / "sub" / "CT_small.dcm")
    ct_small_uid = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert ct_small_uid.encode() in ct_small.read_bytes()

    zipped = write_ct_series(tmp_path / "for-zip", 3, size=32, seed=3, patient_id="IMP3")
    (first, a), (second, b), (evil_uid, evil) = zipped.items()
    bundle = inp / "sub" / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.write(a, "x/a.dcm")
        zf.write(b, "x/y/b.dcm")
        zf.writestr(zipfile.ZipInfo("../../evil.dcm"), evil.read_bytes())
    assert "../../evil.dcm" in zipfile.ZipFile(bundle).namelist()

    notes = inp / "notes.txt"
    notes.write_text("not DICOM at all\n")
    truncated_source = write_ct_series(
        tmp_path / "for-truncation", 1, size=64, seed=4, patient_id="IMP4"
    )
    raw = next(iter(truncated_source.values())).read_bytes()
    assert len(raw) - dataset_offset(raw) > 8192  # the 64 x 64 x 2 bytes of pixel data
    truncated = inp / "sub" / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 4096])  # cut in the middle of Pixel Data
    garbage = inp / "garbage.dcm"
    garbage.write_bytes(
        bytes(128) + b"DICM" + np.random.default_rng(5).integers(0, 256, 600, np.uint8).tobytes()
    )
    duplicate = inp / "sub" / "deeper" / "copy-of-first.dcm"
    shutil.copyfile(next(iter(top.values())), duplicate)

    workdir = tmp_path / "work" / "a" / "b"  # ../../evil.dcm from here stays under tmp_path
    workdir.mkdir(parents=True)
    result = server.cli("import", str(inp), "--quiet", cwd=workdir)
    found = rejections(result.stderr)

    # The ZIP entry ../../evil.dcm is a valid object: stored or rejected are both fine, as
    # long as its name is only a label.
    evil_rejected = evil_uid not in {r.sop_uid for r in server.rows()}
    expected = {*top, *nested, ct_small_uid, first, second}
    if not evil_rejected:
        expected.add(evil_uid)
    bad = 3 + evil_rejected
    assert result.stdout.strip() == f"stored {len(expected)}, duplicate 1, rejected {bad}", (
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    assert result.returncode == 1

    assert [p for p in tmp_path.rglob("evil.dcm")] == []
    assert {r.sop_uid for r in assert_index_matches_storage(server)} == expected
    assert_verify_intact(server, len(expected))

    assert len(found) == bad, f"rejection lines: {found}\nstderr: {result.stderr}"
    reasons = {
        str(notes): r"DICM|Part 10",
        str(truncated): r"(?i)truncat|remain|beyond|end of (the )?(file|data)",
        str(garbage): r"(?i)meta|malformed|truncat",
    }
    if evil_rejected:
        reasons[f"{bundle}!../../evil.dcm"] = r"."
    for path, pattern in reasons.items():
        assert path in found, f"no 'rejected {path}: ...' line in stderr:\n{result.stderr}"
        assert re.search(pattern, found[path]), f"unhelpful reason for {path}: {found[path]}"


def test_import_valid_files_into_fresh_archive(
    make_server: MakeServer, db_url: str, tmp_path: Path
) -> None:
    server = make_server(db_url)
    files = write_ct_series(tmp_path / "in" / "one", 4, size=32, seed=6, patient_id="V1")
    files |= write_ct_series(tmp_path / "in" / "two" / "three", 3, size=32, seed=7, patient_id="V2")

    first = server.cli("import", str(tmp_path / "in"), "--quiet")
    assert (first.returncode, first.stdout.strip()) == (0, "stored 7, duplicate 0, rejected 0"), (
        first.stderr
    )
    assert {r.sop_uid for r in assert_index_matches_storage(server)} == set(files)
    assert_verify_intact(server, 7)

    again = server.cli("import", *(str(p) for p in files.values()), "--quiet")
    assert (again.returncode, again.stdout.strip()) == (0, "stored 0, duplicate 7, rejected 0"), (
        again.stderr
    )
    assert server.count() == 7
    assert len(server.blob_files()) == 7
