"""Time to first image in the built-in viewer (``python -m bench.viewer``).

Run from the repository root (needs Debian's ``chromium`` and ``chromium-driver``)::

    .venv/bin/python -m bench.viewer              # one 300-slice CT series, 10 runs
    .venv/bin/python -m bench.viewer --slices 100 --runs 3

Data: one series of ``--slices`` synthetic CT slices (512 x 512, 16 bits, Explicit VR Little
Endian, about 0.5 MB each; the phantom of :mod:`bench.synthetic`), stored with STOW-RS into
a fresh Stockade (SQLite index) on loopback. A user signs in through ``/ui/login`` in
headless chromium, then the viewer is opened at ``/ui/viewer?study=..&series=..`` and timed
in the browser:

- **first image**: from the start of the navigation to the viewer page (the browser's time
  origin) to the moment the first frame is painted on the canvas (the page's
  ``stockade-first-image`` mark). It includes loading the page and its modules, QIDO-RS for
  the series and its instances, the WADO-RS metadata of the first instance (or of the whole
  series, whichever comes first), one uncompressed frame, and painting.
- **whole series**: from the same origin until every frame of the series is in the
  viewer's memory (prefetched four at a time), for scrolling without waits.

The first run opens the series right after it was stored (the series metadata is built at
ingest); the following runs reload the page (the browser's HTTP cache holds only the page's
static files: DICOMweb answers are ``no-store``). Figures: the first run, and the median and
maximum of the others. The first image must be the first slice and show pixels (checked).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from bench.common import WORK, BenchError, require_tool
from bench.synthetic import _instance, _phantom
from bench.targets import Stockade

BOUNDARY = "stockade-bench-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def series_bodies(slices: int, batch: int = 50) -> list[bytes]:
    """STOW-RS bodies of one synthetic CT series of *slices* slices."""
    from io import BytesIO

    rng = np.random.default_rng(20240101)
    bodies, parts = [], []
    for n in range(1, slices + 1):
        z = n * 1.25
        ds = _instance(5, 1, n, z, _phantom(rng, z))
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        parts.append(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + out.getvalue()
            + b"\r\n"
        )
        if len(parts) == batch or n == slices:
            bodies.append(b"".join(parts) + f"--{BOUNDARY}--\r\n".encode())
            parts = []
    return bodies


def browser() -> Any:
    """Headless Debian chromium through chromium-driver."""
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
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def open_viewer(
    driver: Any, url: str, slices: int, *, timings: bool = False, timeout: float = 120
) -> tuple[float, float]:
    """Open the viewer at *url*; (ms to the first image, ms until every frame is loaded)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout, poll_frequency=0.05)
    wait.until(lambda d: d.execute_script("return document.body.dataset.firstImageMs"))
    first = float(driver.execute_script("return document.body.dataset.firstImageMs"))
    wait.until(
        lambda d: d.execute_script(
            "return document.querySelector('.viewport.active').dataset.preview === 'false'"
        )
    )
    shown = driver.execute_script(
        "const v = document.querySelector('.viewport.active');"
        "return [v.dataset.instanceNumber, v.dataset.count];"
    )
    if shown != ["1", str(slices)]:
        raise BenchError(f"the viewer showed {shown}, not instance 1 of {slices}")
    lit = driver.execute_script(
        "const c = document.querySelector('.viewport.active canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )
    if lit < 1000:
        raise BenchError("the first image is blank")
    wait.until(
        lambda d: (
            d.execute_script(
                "return Number(document.querySelector('.viewport.active').dataset.loaded || 0)"
            )
            >= slices
        )
    )
    whole = float(driver.execute_script("return performance.now()"))
    spans = driver.execute_script(
        "return performance.getEntriesByType('resource').slice(0, 12)"
        ".map(e => [e.name.split('?')[0].slice(-60), Math.round(e.startTime),"
        " Math.round(e.responseEnd)])"
    )
    for name, start, end in spans if timings else []:
        print(f"    {start:6d} {end:6d} {name}")
    return first, whole


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--timings", action="store_true", help="print the first requests of each run"
    )
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = WORK / "viewer" / stamp
    run_dir.mkdir(parents=True)
    print(f"generating {args.slices} slices ...", flush=True)
    bodies = series_bodies(args.slices)
    target = Stockade(60, False, workers=1, database_url=None)
    with target.session(run_dir) as session:
        base = f"http://127.0.0.1:{session.http_port}"
        with httpx.Client(headers=session.http_headers, timeout=300) as client:
            for body in bodies:
                answer = client.post(
                    f"{base}/dicomweb/studies",
                    content=body,
                    headers={"Content-Type": STOW_TYPE},
                )
                if answer.status_code != 200:
                    raise BenchError(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")
            series = client.get(
                f"{base}/dicomweb/series", params={"PatientID": "BENCH-0005"}
            ).json()
        study = series[0]["0020000D"]["Value"][0]
        series_uid = series[0]["0020000E"]["Value"][0]
        password = secrets.token_urlsafe(18)
        env = session.service.env
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "stockade.cli",
                "user",
                "add",
                "viewer",
                "--role",
                "radiologist",
                "--password-stdin",
            ],
            input=password,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise BenchError(f"cannot create the viewer user: {made.stderr.strip()}")
        driver = browser()
        try:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            driver.get(f"{base}/ui/login")
            driver.find_element(By.ID, "username").send_keys("viewer")
            driver.find_element(By.ID, "password").send_keys(password)
            driver.find_element(By.ID, "sign-in").click()
            WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith("/ui/"))
            url = f"{base}/ui/viewer?study={study}&series={series_uid}"
            results = []
            for run in range(args.runs):
                first, whole = open_viewer(driver, url, args.slices, timings=args.timings)
                results.append((first, whole))
                print(
                    f"run {run + 1}: first image {first:.0f} ms, whole series {whole:.0f} ms",
                    flush=True,
                )
        finally:
            driver.quit()
    chromium = subprocess.run(
        ["chromium", "--version"], capture_output=True, text=True, check=False
    )
    later = results[1:] or results
    summary = {
        "slices": args.slices,
        "runs": args.runs,
        "first_run_first_image_ms": round(results[0][0]),
        "first_run_whole_series_ms": round(results[0][1]),
        "median_first_image_ms": round(statistics.median(r[0] for r in later)),
        "max_first_image_ms": round(max(r[0] for r in later)),
        "median_whole_series_ms": round(statistics.median(r[1] for r in later)),
        "chromium": chromium.stdout.strip(),
        "revision": session.notes.get("revision", ""),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
