"""The upload page in a real browser (Debian's chromium through chromium-driver): a folder of
valid, broken, non-DICOM and polyglot files goes through STOW-RS, and the page reports each
file's result with its reason; only the valid files end up stored, the polyglots in the
quarantine."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.dicomfactory import make_dataset, part10
from tests.polyglots import PREAMBLES, active_pdf, zip_appended

from .browser import base_url, console_errors, shot, sign_in
from .conftest import StockadeServer

TERMINAL = ("stored", "stored with warning", "quarantined", "rejected", "failed")


def _folder(root: Path) -> tuple[Path, dict[str, tuple[str, str, str]]]:
    """A folder to upload: file name -> (SOP Instance UID, expected result, words expected
    in the reason)."""
    folder = root / "exam"
    (folder / "more").mkdir(parents=True)
    expected: dict[str, tuple[str, str, str]] = {}

    def put(name: str, data: bytes, uid: str, result: str, reason: str) -> None:
        (folder / name).write_bytes(data)
        expected[f"exam/{name}"] = (uid, result, reason)

    study = make_dataset(PatientID="UPLOAD-1", PatientName="UPLOAD^VALID")
    for n, name in enumerate(("ct-1.dcm", "ct-2.dcm", "more/ct-3.dcm")):
        ds = make_dataset(PatientID="UPLOAD-1", PatientName="UPLOAD^VALID")
        ds.StudyInstanceUID = study.StudyInstanceUID
        ds.InstanceNumber = n + 1
        put(name, part10(ds), ds.SOPInstanceUID, "stored", "")
    trailing = make_dataset(PatientID="UPLOAD-2")
    put(
        "trailing.dcm",
        part10(trailing) + b"\0" * 7,
        trailing.SOPInstanceUID,
        "stored with warning",
        "not stored",
    )
    broken = make_dataset(PatientID="UPLOAD-3")
    whole = part10(broken)
    put("broken.dcm", whole[: len(whole) // 2], broken.SOPInstanceUID, "failed", "not a readable")
    put("notes.txt", b"Patient called, will bring CDs.\n", "", "failed", "not a DICOM Part 10")
    pe = make_dataset(PatientID="UPLOAD-4")
    put(
        "setup.exe.dcm",
        PREAMBLES["pe"] + part10(pe)[128:],
        pe.SOPInstanceUID,
        "quarantined",
        "executable-preamble",
    )
    zipped = make_dataset(PatientID="UPLOAD-5")
    put("zip.dcm", zip_appended(zipped), zipped.SOPInstanceUID, "quarantined", "ZIP archive")
    pdf = active_pdf()
    put("report.dcm", part10(pdf), pdf.SOPInstanceUID, "quarantined", "active-pdf")
    return folder, expected


def _rows(driver: Any) -> dict[str, dict[str, str]]:
    from selenium.webdriver.common.by import By

    out = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        out[row.get_attribute("data-name")] = {
            "result": row.get_attribute("data-result"),
            "reason": cells[3],
            "uid": cells[4],
        }
    return out


def _settled(driver: Any, count: int) -> bool:
    rows = _rows(driver)
    return len(rows) == count and all(r["result"] in TERMINAL for r in rows.values())


def test_upload_a_folder_reports_each_file(
    make_server: Callable[..., StockadeServer], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(http_workers=2)  # a session must hold across HTTP workers
    server.start()
    password = secrets.token_urlsafe(18)
    server.add_user("tech1", "technologist", password)
    folder, expected = _folder(tmp_path)
    driver = browser
    wait = WebDriverWait(driver, 60)
    sign_in(driver, server, "tech1", password)
    driver.get(base_url(server) + "/ui/upload")
    wait.until(lambda d: d.find_element(By.ID, "who").text == "tech1 (technologist)")

    driver.find_element(By.ID, "folder").send_keys(str(folder))
    wait.until(lambda d: _settled(d, len(expected)))
    rows = _rows(driver)
    assert set(rows) == set(expected)
    for name, (uid, result, reason) in expected.items():
        row = rows[name]
        assert row["result"] == result, (name, row)
        assert reason in row["reason"], (name, row)
        if result.startswith("stored"):
            assert row["uid"] == uid
    summary = driver.find_element(By.ID, "summary").text
    assert summary == "3 stored, 1 stored with warning, 3 quarantined, 2 failed"
    assert driver.find_element(By.ID, "progress-text").text.startswith("9 of 9 files")
    assert driver.find_element(By.ID, "progress").get_attribute("value") == driver.find_element(
        By.ID, "progress"
    ).get_attribute("max")
    shot(driver, "40-upload-folder")

    # several files through the "multiple" input, and a file dropped on the page
    two = [folder / "ct-1.dcm", folder / "notes.txt"]
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in two))
    driver.execute_script(
        """
        const data = new DataTransfer();
        data.items.add(new File(["not an image"], "dropped.txt", { type: "text/plain" }));
        const drop = document.getElementById("drop");
        const init = { dataTransfer: data, bubbles: true, cancelable: true };
        drop.dispatchEvent(new DragEvent("drop", init));
        """
    )
    wait.until(lambda d: _settled(d, len(expected) + 3))
    more = _rows(driver)
    assert more["ct-1.dcm"]["result"] == "stored"  # the same bytes again: a success
    assert more["notes.txt"]["result"] == "failed"
    assert more["dropped.txt"]["result"] == "failed"
    assert "not a readable DICOM file" in more["dropped.txt"]["reason"]
    assert not [e for e in console_errors(driver) if "Content Security Policy" in e]
    shot(driver, "41-upload-more")

    # only the valid files are stored (QIDO-RS), the polyglots are in the quarantine
    for uid, result, _ in expected.values():
        if not uid:
            continue
        found = server.get(f"{server.dicomweb}/instances", params={"SOPInstanceUID": uid})
        matches = found.json() if found.status_code == 200 else []
        assert len(matches) == (1 if result.startswith("stored") else 0), (uid, result)
    assert server.count() == 4
    held = server.get(base_url(server) + "/api/admin/quarantine").json()["entries"]
    assert len(held) == 3
