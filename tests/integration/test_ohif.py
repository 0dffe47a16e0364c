"""OHIF served by Stockade, in a real browser (Debian's chromium through chromium-driver):
``stockade viewer install`` obtains the pinned ``@ohif/app`` with npm (npm's cache keeps the
tarball, so only the first run downloads it), a CT study stored with STOW-RS opens in OHIF
after the Stockade login, and its image renders (a canvas with non-blank pixels). The page
runs under OHIF's content security policy without a violation."""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from tests.conftest import require_tool

from .browser import base_url, console_errors, shot, sign_in, stow
from .conftest import StockadeServer, ct_dataset

#: Upper bound for OHIF to load and draw the first image (a cold start parses ~30 MB of
#: JavaScript on two shared cores).
RENDER_TIMEOUT = 180.0

#: Pixel statistics of every cornerstone canvas that a 2D context can read (None for a
#: WebGL one, which the screenshot covers instead).
CANVAS_STATS = """
return Array.from(document.querySelectorAll('canvas')).map(function (c) {
  if (!c.width || !c.height) { return null; }
  var ctx = c.getContext('2d', {willReadFrequently: true});
  if (!ctx) { return null; }
  var data = ctx.getImageData(0, 0, c.width, c.height).data;
  var lit = 0, levels = {};
  for (var i = 0; i < data.length; i += 4) {
    var v = data[i] + data[i + 1] + data[i + 2];
    if (v > 30) { lit++; }
    levels[data[i]] = 1;
  }
  return {cls: c.className, w: c.width, h: c.height, lit: lit,
          levels: Object.keys(levels).length};
});
"""


def study(rows: int = 128, slices: int = 4) -> list[Any]:
    """A CT series with geometry, a bright disc on a gradient (something to see)."""
    rng = np.random.default_rng(9)
    study_uid, series_uid = generate_uid(), generate_uid()
    y, x = np.mgrid[0:rows, 0:rows]
    disc = (x - rows / 2) ** 2 + (y - rows / 2) ** 2 < (rows / 3) ** 2
    out = []
    for n in range(1, slices + 1):
        ds = ct_dataset(
            generate_uid(), study_uid, series_uid, size=rows, number=n, rng=rng, patient_id="OHIF1"
        )
        hu = np.where(disc, 1000 + 20 * n, -1000 + 8 * x).astype(np.int32)
        ds.PixelData = (hu + 1024).clip(0, 4095).astype(np.uint16).tobytes()
        ds.PatientName = "OHIF^Render"
        ds.StudyDescription = "OHIF render test"
        ds.SeriesDescription = "axial"
        ds.ImagePositionPatient = [0.0, 0.0, float(n) * 2.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.FrameOfReferenceUID = study_uid + ".1"
        ds.WindowCenter = 0
        ds.WindowWidth = 2500
        out.append(ds)
    return out


def screenshot_spread(driver: Any) -> tuple[int, float]:
    """Distinct gray levels and their standard deviation in the viewport's screenshot."""
    from PIL import Image, ImageStat
    from selenium.webdriver.common.by import By

    element = driver.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas")[0]
    image = Image.open(io.BytesIO(element.screenshot_as_png)).convert("L")
    levels = sum(1 for count in image.histogram() if count)
    return levels, ImageStat.Stat(image).stddev[0]


def test_study_opens_in_ohif_and_an_image_renders(
    make_server: Callable[..., StockadeServer], browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    require_tool("npm")
    server = make_server(http_workers=2)  # a session must hold across HTTP workers
    started = time.monotonic()
    installed = server.cli("viewer", "install", timeout=900)
    assert installed.returncode == 0, installed.stderr
    install_seconds = time.monotonic() - started
    assert "@ohif/app@3.13.2" in installed.stdout
    status = server.cli("viewer", "status")
    assert status.returncode == 0 and "3.13.2" in status.stdout

    server.start()
    password = secrets.token_urlsafe(18)
    server.add_user("rad1", "radiologist", password)
    datasets = study()
    stow(server, *datasets)
    uid = datasets[0].StudyInstanceUID
    base = base_url(server)

    api = server.get(base + "/api/ohif").json()
    assert api["installed"] is True and api["version"] == "3.13.2"
    config = server.get(base + "/ohif/app-config.js")
    assert config.status_code == 200 and '"qidoRoot": "/dicomweb"' in config.text
    page = server.get(base + "/ohif/viewer", params={"StudyInstanceUIDs": uid})
    assert page.status_code == 200 and 'src="/ohif/app-config.js"' in page.text
    csp = page.headers["content-security-policy"]
    assert "'unsafe-eval'" not in csp and "script-src 'self' 'wasm-unsafe-eval';" in csp

    driver = browser
    # Not signed in: OHIF's page goes on to the Stockade login.
    driver.get(f"{base}{api['url']}{uid}")
    WebDriverWait(driver, 30).until(lambda d: "/ui/login?next=%2Fohif%2Fviewer" in d.current_url)
    sign_in(driver, server, "rad1", password)
    console_errors(driver)  # only what OHIF logs from here on

    driver.get(f"{base}{api['url']}{uid}")
    stats: list[Any] = []

    def rendered(d: Any) -> bool:
        nonlocal stats
        if not d.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas"):
            return False
        stats = [s for s in d.execute_script(CANVAS_STATS) if s]
        if any(s["lit"] > 500 and s["levels"] > 8 for s in stats):
            return True
        levels, spread = screenshot_spread(d)  # a WebGL canvas: read what is on screen
        return levels > 8 and spread > 10

    try:
        WebDriverWait(driver, RENDER_TIMEOUT, poll_frequency=1).until(rendered)
    finally:
        shot(driver, "50-ohif-study")
    levels, spread = screenshot_spread(driver)
    assert levels > 8 and spread > 10, (levels, spread, stats)
    assert "/ohif/viewer" in driver.current_url
    errors = console_errors(driver)
    assert not errors, errors  # no policy violation, no failed request
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(function (e) { return e.name; });"
    )
    assert fetched and all(url.startswith(base + "/") for url in fetched), fetched
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".reduce(function (n, e) { return n + e.transferSize; }, 0);"
    )
    print(f"viewer install {install_seconds:.1f} s; page loaded {loaded / 1e6:.1f} MB; {stats}")


def test_viewer_install_refuses_a_bad_version(make_server: Callable[..., StockadeServer]) -> None:
    server = make_server()
    answer = server.cli("viewer", "install", "--version=--registry=http://evil")
    assert answer.returncode == 2 and "not a version number" in answer.stderr
    assert server.cli("viewer", "status").returncode == 1
