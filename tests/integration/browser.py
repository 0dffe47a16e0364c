"""Shared pieces of the browser tests: Debian's chromium driven by chromium-driver through
Selenium (headless), sign-in, STOW-RS of generated datasets, and screenshots kept in
``test-artifacts/ui/`` for a person to look at."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest

from tests.conftest import require_tool
from tests.dicomfactory import part10

if TYPE_CHECKING:
    from .conftest import StockadeServer

ARTIFACTS = Path(os.environ.get("STOCKADE_TEST_ARTIFACTS", "test-artifacts")) / "ui"


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless chromium (Debian's, never a downloaded one)."""
    require_tool("chromium")
    require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def stow(server: StockadeServer, *datasets: pydicom.Dataset) -> None:
    """Store *datasets* with one STOW-RS request; every one must be accepted."""
    body = (
        b"".join(
            b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10(ds) + b"\r\n"
            for ds in datasets
        )
        + b"--b--\r\n"
    )
    answer = server.post(
        f"{server.dicomweb}/studies",
        content=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text


def shot(driver: Any, name: str) -> Path:
    """Save a screenshot as ``test-artifacts/ui/<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def base_url(server: StockadeServer) -> str:
    """The server's HTTP origin (``http://127.0.0.1:port``)."""
    return server.dicomweb.removesuffix("/dicomweb")


def sign_in(driver: Any, server: StockadeServer, user: str, password: str) -> None:
    """Sign in through the login page and wait for the study list."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    driver.get(base_url(server) + "/ui/login")
    wait.until(ec.presence_of_element_located((By.ID, "username")))
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(lambda d: d.current_url.endswith("/ui/"))


def console_errors(driver: Any) -> list[str]:
    """The browser console's errors since the last call (CSP violations show up here)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
