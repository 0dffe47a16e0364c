"""The web application in a real browser (Debian's chromium, driven by chromium-driver through
Selenium): sign in, search the study list, and hostile DICOM text shown literally (threat
model SR-10). Screenshots are kept in ``test-artifacts/ui/`` for a person to look at."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from urllib.parse import quote

import pydicom
import pytest

from tests.dicomfactory import make_dataset

from .browser import shot, stow
from .conftest import StockadeServer

XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_TEXT = "</script><script>alert(1)</script>"


def test_sign_in_search_and_hostile_text_shown_literally(
    make_server: Callable[..., StockadeServer], browser: object
) -> None:
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(http_workers=2)  # a session must hold across HTTP workers
    server.start()
    password = secrets.token_urlsafe(18)
    server.add_user("rad1", "radiologist", password)
    hostile = make_dataset(
        PatientName=XSS_NAME, PatientID="XSS-1", StudyDescription=XSS_TEXT, Modality="CT"
    )
    hostile.SeriesDescription = XSS_TEXT
    plain = [make_dataset(PatientName=f"DOE^PATIENT{i}", PatientID=f"P{i:03d}") for i in range(30)]
    stow(server, hostile, *plain)
    base = server.dicomweb.removesuffix("/dicomweb")
    for page in ("/ui/login", "/ui/static/login.js"):
        answer = server.get(base + page)
        assert answer.status_code == 200
    csp = server.get(base + "/ui/login").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp

    driver = browser
    wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])  # redraws
    driver.get(base + "/")  # type: ignore[attr-defined]
    wait.until(ec.presence_of_element_located((By.ID, "username")))
    assert "/ui/login?next=%2Fui%2F" in driver.current_url  # type: ignore[attr-defined]
    find = driver.find_element  # type: ignore[attr-defined]
    find(By.ID, "username").send_keys("rad1")
    find(By.ID, "password").send_keys("wrong-password-" * 2)
    find(By.ID, "sign-in").click()
    wait.until(lambda d: "wrong user name or password" in d.find_element(By.ID, "message").text)
    find(By.ID, "password").clear()
    find(By.ID, "password").send_keys(password)
    shot(driver, "01-login")
    find(By.ID, "sign-in").click()
    wait.until(lambda d: d.current_url.endswith("/ui/"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) == 25)
    assert find(By.ID, "who").text == "rad1 (radiologist)"
    assert find(By.ID, "upload-link").is_displayed()  # a radiologist may upload
    assert not find(By.ID, "admin-link").is_displayed()  # but not administer
    assert find(By.ID, "page").text == "studies 1-25"
    shot(driver, "02-study-list")
    find(By.ID, "next").click()
    wait.until(lambda d: d.find_element(By.ID, "page").text == "studies 26-31")
    # sorting is the server's (every page follows it): by patient name, then reversed
    first_patient = "#studies tbody tr:first-child td:first-child"
    find(By.CSS_SELECTOR, 'th[data-key="PatientName"]').click()
    wait.until(lambda d: d.find_element(By.ID, "page").text == "studies 1-25")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, first_patient).text == XSS_NAME)
    find(By.CSS_SELECTOR, 'th[data-key="PatientName"]').click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, first_patient).text == "DOE^PATIENT9")
    header = find(By.CSS_SELECTOR, 'th[data-key="PatientName"]')
    assert header.get_attribute("aria-sort") == "descending"

    find(By.ID, "PatientID").send_keys("XSS-1")
    find(By.ID, "find").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) == 1)
    cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#studies tbody td")]  # type: ignore[attr-defined]
    assert cells[0] == XSS_NAME and cells[4] == XSS_TEXT
    assert not driver.find_elements(By.CSS_SELECTOR, "#studies img, script:not([src])")  # type: ignore[attr-defined]
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # type: ignore[attr-defined]  # noqa: B018
    shot(driver, "03-hostile-text")

    find(By.ID, "logout").click()
    wait.until(lambda d: d.current_url.endswith("/ui/login"))
    stored = server.get(f"{server.dicomweb}/studies", params={"PatientID": "XSS-1"}).json()
    assert pydicom.Dataset.from_json(stored[0]).PatientName == XSS_NAME
    # signed out, a link to a study goes through the login and back to that study
    study_page = f"/ui/study?study={stored[0]['0020000D']['Value'][0]}"
    driver.get(base + study_page)  # type: ignore[attr-defined]
    wait.until(lambda d: "/ui/login?next=" in d.current_url)

    def sign_in_here() -> None:
        wait.until(lambda d: d.find_element(By.ID, "username").is_displayed())
        find(By.ID, "username").send_keys("rad1")
        find(By.ID, "password").send_keys(password)
        find(By.ID, "sign-in").click()

    sign_in_here()
    wait.until(lambda d: d.current_url == base + study_page)
    find(By.ID, "logout").click()
    wait.until(lambda d: d.current_url.endswith("/ui/login"))
    # a way back to anywhere else is ignored: the study list instead
    for elsewhere in ("https://example.org/", "//example.org/ui/", "/ui/login", "/auth/me"):
        driver.get(f"{base}/ui/login?next={quote(elsewhere, safe='')}")  # type: ignore[attr-defined]
        sign_in_here()
        wait.until(lambda d: d.current_url == base + "/ui/")
        find(By.ID, "logout").click()
        wait.until(lambda d: d.current_url.endswith("/ui/login"))
