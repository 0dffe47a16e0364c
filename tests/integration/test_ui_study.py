"""The study page in a real browser (Debian's chromium through chromium-driver): open a study
from the list, series with thumbnails, hostile DICOM text shown literally (threat model
SR-10), send to a DCMTK storescp, the ZIP download, and deletion by an administrator after a
confirmation inside the page; a radiologist is not offered Delete. Screenshots are kept in
``test-artifacts/ui/``."""

from __future__ import annotations

import io
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicomfactory import make_dataset

from .browser import base_url, console_errors, shot, sign_in, stow
from .conftest import StockadeServer, require_dcmtk, storescp

XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_TEXT = "</script><script>alert(1)</script>"
WAIT = 30


def _image(study: str, series: str, number: int, instance: int, **attrs: Any) -> Any:
    rows = cols = 64
    ramp = (np.add.outer(np.arange(rows), np.arange(cols)) * (16 + 8 * instance)) % 4096
    return make_dataset(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SeriesNumber=number,
        InstanceNumber=instance,
        Rows=rows,
        Columns=cols,
        PixelData=ramp.astype("<u2").tobytes(),
        PatientName=XSS_NAME,
        PatientID="XSS-9",
        PatientBirthDate="19700102",
        PatientSex="F",
        AccessionNumber="ACC-77",
        StudyDescription=XSS_TEXT,
        **attrs,
    )


def thumbnails_loaded(driver: Any) -> bool:
    """Every series thumbnail of the page is loaded and has pixels."""
    return bool(
        driver.execute_script(
            "const images = [...document.querySelectorAll('#series img')];"
            "return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0)"
        )
    )


def _no_csp_violation(driver: Any) -> None:
    errors = console_errors(driver)
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors


def test_study_page_view_send_download_and_delete(
    make_server: Callable[..., StockadeServer], browser: Any, tmp_path: Path
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    require_dcmtk("storescp", "echoscu")
    server = make_server(http_workers=2)  # a session must hold across HTTP workers
    server.start()
    base = base_url(server)
    rad_password, admin_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    server.add_user("rad1", "radiologist", rad_password)
    server.add_user("admin1", "admin", admin_password)
    study, chest, head = generate_uid(), generate_uid(), generate_uid()
    hostile = [
        _image(
            study, chest, 1, i, Modality="CT", SeriesDescription=XSS_NAME, BodyPartExamined="CHEST"
        )
        for i in (1, 2, 3)
    ] + [
        _image(
            study, head, 2, i, Modality="MR", SeriesDescription=XSS_TEXT, BodyPartExamined="HEAD"
        )
        for i in (1, 2)
    ]
    plain = make_dataset(PatientName="DOE^PLAIN", PatientID="P-1")
    stow(server, *hostile, plain)

    driver = browser
    wait = WebDriverWait(driver, WAIT)
    find = driver.find_element
    sign_in(driver, server, "rad1", rad_password)
    link = "#studies tbody a.study-link"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, link)) == 2)
    target = next(a for a in driver.find_elements(By.CSS_SELECTOR, link) if a.text == XSS_NAME)
    assert target.get_attribute("href") == f"{base}/ui/study?study={study}"
    target.click()

    # the study page: header, series with thumbnails, hostile text as text
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#series tbody tr")) == 2)
    assert driver.current_url == f"{base}/ui/study?study={study}"
    assert find(By.ID, "patient-name").text == XSS_NAME
    assert find(By.ID, "StudyDescription").text == XSS_TEXT
    assert find(By.ID, "PatientID").text == "XSS-9"
    assert find(By.ID, "PatientBirthDate").text == "1970-01-02"
    assert find(By.ID, "PatientSex").text == "F"
    assert find(By.ID, "AccessionNumber").text == "ACC-77"
    assert set(find(By.ID, "ModalitiesInStudy").text.split(", ")) == {"CT", "MR"}
    rows = [
        [c.text for c in r.find_elements(By.TAG_NAME, "td")]
        for r in driver.find_elements(By.CSS_SELECTOR, "#series tbody tr")
    ]
    assert rows == [
        ["", "1", "CT", XSS_NAME, "3", "CHEST"],
        ["", "2", "MR", XSS_TEXT, "2", "HEAD"],
    ]
    images = driver.find_elements(By.CSS_SELECTOR, "img")
    assert len(images) == 2 and all(i.get_attribute("alt") == "" for i in images)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#series a.thumb > img")) == 2
    assert not driver.find_elements(By.CSS_SELECTOR, "main script")
    wait.until(thumbnails_loaded)
    hrefs = [
        a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#series a.thumb")
    ]
    assert hrefs == [
        f"{base}/ui/viewer?study={study}&series={chest}",
        f"{base}/ui/viewer?study={study}&series={head}",
    ]
    assert find(By.ID, "view").get_attribute("href") == f"{base}/ui/viewer?study={study}"
    download = find(By.ID, "download")
    assert download.is_displayed() and download.get_attribute("download") is not None
    assert download.get_attribute("href") == f"{base}/api/studies/{study}/zip"
    assert not find(By.ID, "delete").is_displayed()  # a radiologist may not delete
    ohif = server.get(f"{base}/api/ohif")
    installed = ohif.status_code == 200 and ohif.json().get("installed") is True
    assert find(By.ID, "ohif").is_displayed() == installed
    if installed:
        assert find(By.ID, "ohif").get_attribute("href") == (
            f"{base}/ohif/viewer?StudyInstanceUIDs={study}"
        )
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    shot(driver, "10-study-page")

    # the browser's session downloads the ZIP the link names
    fetched = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(async r => done([r.status, r.headers.get('content-type'),"
        " r.headers.get('content-disposition'), new Uint8Array(await r.arrayBuffer()).length]))",
        download.get_attribute("href"),
    )
    assert fetched[:3] == [200, "application/zip", f'attachment; filename="study-{study}.zip"']
    answer = server.get(download.get_attribute("href"), timeout=60)
    assert answer.status_code == 200 and len(answer.content) == fetched[3]
    zipped = zipfile.ZipFile(io.BytesIO(answer.content))
    # one folder per series (in the order the series were stored), instances in their order
    folders: dict[str, list[tuple[str, int]]] = {}
    uids = set()
    for name in zipped.namelist():
        data = zipped.read(name)
        assert data[:132] == bytes(128) + b"DICM"
        ds = pydicom.dcmread(io.BytesIO(data))
        uids.add(ds.SOPInstanceUID)
        folder, entry = name.split("/")
        assert entry == f"I{int(ds.InstanceNumber):05d}.dcm"
        folders.setdefault(folder, []).append((ds.SeriesInstanceUID, int(ds.InstanceNumber)))
    assert sorted(folders) == ["S0001", "S0002"]
    assert sorted(folders.values()) == sorted(
        [[(chest, 1), (chest, 2), (chest, 3)], [(head, 1), (head, 2)]]
    )
    assert uids == {ds.SOPInstanceUID for ds in hostile}

    # send to a DCMTK storescp configured as a node
    received = tmp_path / "received"
    with storescp("TAKER", received) as port:
        server.add_nodes(("taker", "TAKER", port, "echo"))
        driver.refresh()
        wait.until(lambda d: d.find_element(By.ID, "send").is_displayed())
        wait.until(thumbnails_loaded)
        Select(find(By.ID, "node")).select_by_value("taker")
        find(By.ID, "send-button").click()
        wait.until(lambda d: "Sent to" in d.find_element(By.ID, "result").text)
        assert find(By.ID, "result").text == (
            "Sent to taker (TAKER): 5 completed, 0 with warnings, 0 failed."
        )
        shot(driver, "11-study-sent")
    stored = {pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir() if p.is_file()}
    assert stored == {ds.SOPInstanceUID for ds in hostile}
    sends = [r for r in server.audit() if r.get("type") == "InstancesRetrieved"]
    sent = [r for r in sends if r.get("service") == "send"]
    assert sent and sent[-1]["destination"] == "TAKER" and sent[-1]["completed"] == 5
    assert sent[-1]["actor"]["user"] == "rad1"
    _no_csp_violation(driver)

    # an administrator deletes it, after confirming inside the page
    find(By.ID, "logout").click()
    wait.until(lambda d: d.current_url.endswith("/ui/login"))
    sign_in(driver, server, "admin1", admin_password)
    driver.get(f"{base}/ui/study?study={study}")
    wait.until(lambda d: d.find_element(By.ID, "delete").is_displayed())
    wait.until(thumbnails_loaded)
    assert not find(By.ID, "confirm").is_displayed()
    find(By.ID, "delete").click()
    wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
    assert "XSS-9" in find(By.ID, "confirm-text").text
    assert XSS_NAME in find(By.ID, "confirm-text").text
    assert server.get(f"{server.dicomweb}/studies", params={"PatientID": "XSS-9"}).json()
    shot(driver, "12-study-confirm-delete")
    find(By.ID, "cancel-delete").click()  # cancelling keeps it
    assert not find(By.ID, "confirm").is_displayed() and find(By.ID, "delete").is_displayed()
    find(By.ID, "delete").click()
    find(By.ID, "confirm-delete").click()
    wait.until(lambda d: d.current_url == f"{base}/ui/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, link)) == 1)
    assert [a.text for a in driver.find_elements(By.CSS_SELECTOR, link)] == ["DOE^PLAIN"]
    answer = server.get(f"{server.dicomweb}/studies", params={"StudyInstanceUID": study})
    assert answer.status_code in (200, 204) and (answer.status_code == 204 or answer.json() == [])
    deleted = [r for r in server.audit() if r.get("type") == "InstancesDeleted"]
    assert len(deleted) == 1 and deleted[0]["deleted"] == 5
    assert deleted[0]["actor"]["user"] == "admin1" and deleted[0]["study_uids"] == [study]
    shot(driver, "13-study-deleted")
    _no_csp_violation(driver)
