"""The built-in viewer in a real browser (Debian's chromium through chromium-driver): scroll
through a CT series, window/level by dragging (the canvas pixels are checked against the
linear VOI function of PS3.3 C.11.2.1.2.1), a length in mm from Pixel Spacing, ROI statistics
in HU, a colour image, and hostile text shown literally. Screenshots go to
``test-artifacts/ui/``."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from tests.dicomfactory import make_dataset

from .browser import base_url, console_errors, shot, sign_in, stow
from .conftest import StockadeServer

XSS = "<img src=x onerror=alert(1)>"
SIZE = 256
SPACING = 0.5  # mm, rows and columns
BLOCK_HU = 60  # the uniform block in the middle of every slice


def ct_slice(study: str, series: str, number: int, **extra: Any) -> Dataset:
    """A 256 x 256 CT slice: air (-1000 HU), a 60 HU block in the middle, and a bright square
    whose place moves with the slice (so scrolling changes the picture)."""
    hu = np.full((SIZE, SIZE), -1000, dtype=np.int32)
    hu[64:192, 64:192] = BLOCK_HU
    hu[8:24, 8 + 8 * number : 24 + 8 * number] = 1000
    ds = make_dataset(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        PatientName="VIEWER^TEST",
        PatientID="VIEW-1",
        StudyDescription="Viewer test",
        Rows=SIZE,
        Columns=SIZE,
        InstanceNumber=number,
        PixelData=(hu + 1024).astype(np.uint16).tobytes(),
    )
    ds.SeriesNumber = 1
    ds.SeriesDescription = XSS
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelSpacing = [SPACING, SPACING]
    ds.SliceLocation = number * 2.5
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def colour_image(study: str) -> Dataset:
    """An RGB image: red on the left half, blue on the right (no Pixel Spacing)."""
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[:, :32, 0] = 255
    rgb[:, 32:, 2] = 255
    ds = make_dataset(
        StudyInstanceUID=study,
        PatientName="VIEWER^TEST",
        PatientID="VIEW-1",
        Modality="XC",
        Rows=64,
        Columns=64,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PixelData=rgb.tobytes(),
    )
    ds.PlanarConfiguration = 0
    ds.SeriesNumber = 2
    ds.SeriesDescription = "colour"
    return ds


def multiframe(study: str) -> Dataset:
    """A MONOCHROME1 multi-frame image: 4 frames of 32 x 32, frame k uniformly k * 100."""
    frames = np.stack([np.full((32, 32), k * 100, dtype=np.uint16) for k in range(1, 5)])
    ds = make_dataset(
        StudyInstanceUID=study,
        PatientName="VIEWER^TEST",
        PatientID="VIEW-1",
        Modality="XA",
        Rows=32,
        Columns=32,
        PhotometricInterpretation="MONOCHROME1",
        PixelData=frames.tobytes(),
    )
    ds.NumberOfFrames = 4
    ds.SeriesNumber = 3
    ds.SeriesDescription = "multi-frame"
    ds.WindowCenter = 250
    ds.WindowWidth = 300
    return ds


def linear_voi(x: float, center: float, width: float) -> int:
    """PS3.3 C.11.2.1.2.1, to 0..255."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0
    if x > center - 0.5 + (width - 1) / 2:
        return 255
    return round(((x - (center - 0.5)) / (width - 1) + 0.5) * 255)


def canvas_pixel(driver: Any, selector: str, x: float, y: float) -> list[int]:
    """The RGBA of the canvas at CSS position (x, y) of the canvas."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        const c = document.querySelector(arguments[0]);
        const r = c.width / c.getBoundingClientRect().width;
        return Array.from(c.getContext('2d').getImageData(
            Math.round(arguments[1] * r), Math.round(arguments[2] * r), 1, 1).data);
        """,
        selector,
        x,
        y,
    )


@pytest.mark.usefixtures("browser")
def test_scroll_window_measure_and_colour(
    make_server: Callable[..., StockadeServer], browser: Any
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(http_workers=2)  # a session must hold across HTTP workers
    server.start()
    password = secrets.token_urlsafe(18)
    server.add_user("rad1", "radiologist", password)
    study, series = generate_uid(), generate_uid()
    stow(
        server,
        *(ct_slice(study, series, n) for n in range(1, 21)),
        colour_image(study),
        multiframe(study),
    )

    driver = browser
    wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])

    def labels(d: Any) -> list[str]:
        """The measurement list, read in one go (the page redraws it)."""
        script = "return [...document.querySelectorAll('#measurements li')].map(e => e.textContent)"
        return d.execute_script(script)  # type: ignore[no-any-return]

    def click(selector: str) -> None:
        """Click what *selector* finds once it is there, again if the page redrew it."""
        retry = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
        retry.until(lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True)

    sign_in(driver, server, "rad1", password)
    # Search, open the study, then its CT series in the viewer.
    driver.find_element(By.ID, "PatientID").send_keys("VIEW-1")
    driver.find_element(By.ID, "find").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) == 1)
    click("#studies tbody a.study-link")  # the list may be drawn again meanwhile
    click(f'tr[data-series="{series}"] a.thumb')
    wait.until(lambda d: d.current_url.startswith(f"{base_url(server)}/ui/viewer?"))
    vp = ".viewport.active"

    def shows(name: str, expected: str) -> None:
        """Wait until the active viewport's data-<name> is *expected*."""
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, vp).get_attribute(name) == expected)

    def drag(a: tuple[float, float], b: tuple[float, float]) -> None:
        """Press at *a* (CSS pixels of the canvas, from on_screen), move to *b*, release."""
        box = canvas.size
        actions = ActionChains(driver).move_to_element_with_offset(
            canvas, int(a[0] - box["width"] / 2), int(a[1] - box["height"] / 2)
        )
        half = (int(b[0] - a[0]) // 2, int(b[1] - a[1]) // 2)
        actions.click_and_hold().move_by_offset(*half)
        actions.move_by_offset(int(b[0] - a[0]) - half[0], int(b[1] - a[1]) - half[1])
        actions.release().perform()

    shows("data-preview", "false")  # the whole series, after a preview of its first slice
    shows("data-loading", "false")
    viewport = driver.find_element(By.CSS_SELECTOR, vp)
    canvas = driver.find_element(By.CSS_SELECTOR, f"{vp} canvas")
    assert viewport.get_attribute("data-count") == "20"
    assert viewport.get_attribute("data-instance-number") == "1"
    corners = driver.find_element(By.CSS_SELECTOR, f"{vp} .corner.tr").text
    assert XSS in corners  # the hostile Series Description, as text
    assert driver.find_element(By.CSS_SELECTOR, f"{vp} .corner.bl").text.startswith("Im 1 (1/20)")
    shot(driver, "30-viewer-first-image")

    def geometry() -> tuple[float, float, float]:
        v = driver.find_element(By.CSS_SELECTOR, vp)
        keys = ("data-scale", "data-origin-x", "data-origin-y")
        return tuple(float(v.get_attribute(k)) for k in keys)  # type: ignore[return-value]

    def on_screen(x: float, y: float) -> tuple[float, float]:
        scale, ox, oy = geometry()
        return ox + x * scale, oy + y * scale

    # The default window (W 400 L 40) applied to the 60 HU block.
    cx, cy = on_screen(SIZE / 2, SIZE / 2)
    before = canvas_pixel(driver, f"{vp} canvas", cx, cy)
    assert before[:3] == [linear_voi(BLOCK_HU, 40, 400)] * 3
    assert canvas_pixel(driver, f"{vp} canvas", *on_screen(32, 128))[:3] == [0, 0, 0]  # air

    # Scroll: keys, then the wheel; the instance shown changes.
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    shows("data-instance-number", "2")
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
    shows("data-instance-number", "3")
    assert driver.find_element(By.CSS_SELECTOR, f"{vp} .corner.bl").text.startswith("Im 3 (3/20)")
    bright = canvas_pixel(driver, f"{vp} canvas", *on_screen(16 + 8 * 3, 16))
    assert bright[:3] == [255, 255, 255]  # slice 3's square, where slice 1 had air
    shot(driver, "31-viewer-scrolled")

    # Window/level by dragging: 100 px right widens, 50 px down lowers the level.
    middle = on_screen(SIZE / 2, SIZE / 2)
    drag(middle, (middle[0] + 100, middle[1] + 50))
    wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, vp).get_attribute("data-window-width") != "400"
    )
    center = float(viewport.get_attribute("data-window-center"))
    width = float(viewport.get_attribute("data-window-width"))
    assert width == pytest.approx(400 + 100 * 400 / 256, abs=2)
    assert center == pytest.approx(40 - 50 * 400 / 256, abs=2)
    after = canvas_pixel(driver, f"{vp} canvas", *on_screen(SIZE / 2, SIZE / 2))
    assert after[:3] == [linear_voi(BLOCK_HU, center, width)] * 3
    assert after != before
    shot(driver, "32-viewer-window-level")

    # Touch: a two-finger pinch zooms about its middle (Chrome's touch input, as a tablet's).
    box = canvas.rect
    mid_x, mid_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def touch(kind: str, spread: float) -> None:
        points = (
            []
            if kind == "touchEnd"
            else [
                {"x": mid_x - spread, "y": mid_y, "id": 1},
                {"x": mid_x + spread, "y": mid_y, "id": 2},
            ]
        )
        driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    scale_before = geometry()[0]
    touch("touchStart", 50)
    for spread in (60, 75, 100):
        touch("touchMove", spread)
    touch("touchEnd", 0)
    wait.until(lambda d: geometry()[0] > scale_before * 1.5)
    assert geometry()[0] == pytest.approx(scale_before * 2, rel=0.05)  # fingers 100 -> 200 px
    shot(driver, "32-viewer-pinched")
    driver.find_element(By.ID, "fit").click()
    wait.until(lambda d: geometry()[0] == pytest.approx(scale_before))

    # A length of 176 pixels along a row: 88 mm with 0.5 mm spacing.
    driver.find_element(By.CSS_SELECTOR, "[data-tool=length]").click()
    drag(on_screen(40, 128), on_screen(216, 128))
    wait.until(lambda d: len(labels(d)) == 1)
    label = labels(driver)[0]
    measured = float(re.search(r"Length ([\d.]+) mm", label).group(1))  # type: ignore[union-attr]
    assert measured == pytest.approx(176 * SPACING, rel=0.01)

    # An ellipse inside the block: 60 HU, SD 0; its area in mm².
    driver.find_element(By.CSS_SELECTOR, "[data-tool=ellipse]").click()
    drag(on_screen(96, 96), on_screen(160, 160))
    wait.until(lambda d: len(labels(d)) == 2)
    roi = labels(driver)[1]
    match = re.search(r"area ([\d.]+) mm² mean ([-\d.]+) HU SD ([\d.]+) HU", roi)
    assert match, roi
    assert float(match.group(2)) == pytest.approx(BLOCK_HU) and float(match.group(3)) == 0
    assert float(match.group(1)) == pytest.approx(np.pi * 16 * 16, rel=0.03)  # 64 px x 0.5 mm
    shot(driver, "33-viewer-measurements")

    # The colour series: RGB shown as RGB, no Pixel Spacing flagged.
    driver.find_element(By.CSS_SELECTOR, "#strip button:nth-child(2)").click()
    shows("data-count", "1")
    shows("data-preview", "false")
    shows("data-loading", "false")
    assert "no Pixel Spacing" in driver.find_element(By.CSS_SELECTOR, f"{vp} .corner.br").text
    red = canvas_pixel(driver, f"{vp} canvas", *on_screen(16, 32))
    blue = canvas_pixel(driver, f"{vp} canvas", *on_screen(48, 32))
    assert red[0] > 200 and red[2] < 50, red
    assert blue[2] > 200 and blue[0] < 50, blue
    shot(driver, "34-viewer-colour")

    # The multi-frame MONOCHROME1 series: frames are scrolled; white is low.
    driver.find_element(By.CSS_SELECTOR, "#strip button:nth-child(3)").click()
    shows("data-count", "4")
    shows("data-preview", "false")
    shows("data-loading", "false")
    centre = on_screen(16, 16)
    for frame in (1, 2):
        value = frame * 100
        wait.until(
            lambda d, v=value: (
                canvas_pixel(d, f"{vp} canvas", *centre)[:3] == [255 - linear_voi(v, 250, 300)] * 3
            )
        )
        assert f"fr {frame}/4" in driver.find_element(By.CSS_SELECTOR, f"{vp} .corner.bl").text
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    shot(driver, "34-viewer-multiframe")

    # The attribute panel shows the hostile description as text.
    driver.find_element(By.ID, "tags").click()
    driver.find_element(By.CSS_SELECTOR, "#strip button:nth-child(1)").click()
    wait.until(lambda d: XSS in d.find_element(By.ID, "attribute-rows").text)
    assert not driver.find_elements(By.CSS_SELECTOR, "#attribute-rows img, .corner img")
    assert console_errors(driver) == []
    shot(driver, "35-viewer-attributes")
