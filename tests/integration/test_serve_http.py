"""``stockade serve`` and its HTTP listener: secure start, busy port, supervision."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import HOST, StockadeServer, clean_env, free_port

pytestmark = pytest.mark.dcmtk  # the server's readiness check is a C-ECHO


def _serve(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(
        {
            "STOCKADE_DATA_DIR": str(tmp_path / "data"),
            "STOCKADE_DICOM_PORT": str(free_port()),
            **settings,
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_http_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    done = _serve(tmp_path, STOCKADE_HTTP_HOST="0.0.0.0", STOCKADE_HTTP_PORT=str(free_port()))
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr


def test_a_busy_http_port_is_a_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        done = _serve(tmp_path, STOCKADE_HTTP_PORT=str(busy.getsockname()[1]))
    assert done.returncode == 2
    assert "cannot listen on" in done.stderr


def _web_children(server: StockadeServer) -> set[int]:
    """The HTTP worker processes of the server."""
    return {
        pid
        for pid in server.group_pids()
        if b"stockade.web.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


def test_a_dead_http_process_is_restarted(make_server) -> None:  # type: ignore[no-untyped-def]
    server: StockadeServer = make_server(settings={"STOCKADE_HTTP_WORKERS": "2"})
    server.start()
    url = f"{server.dicomweb}/studies"
    assert server.get(url, timeout=30).status_code == 200
    before = _web_children(server)
    assert len(before) == 2
    killed = min(before)
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # bounded wait for the supervisor to notice and start a new worker
        now = _web_children(server)
        if len(now) == 2 and killed not in now and "restarting" in server.log_path.read_text():
            break
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    for _ in range(4):  # whichever worker takes the connection answers
        assert server.get(url, timeout=30).status_code == 200
    server.stop()


def test_metadata_of_a_new_series_is_built_in_the_background(
    make_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """A series stored over C-STORE gets its WADO-RS metadata cache once its study has been
    quiet for metadata_warm_delay; the first request is then served from it."""
    from .conftest import storescu, write_ct_series

    server: StockadeServer = make_server(
        settings={"STOCKADE_METADATA_WARM_DELAY": "0.5", "STOCKADE_HTTP_WORKERS": "2"}
    )
    server.start()
    # The warmer looks at what arrives once its HTTP worker runs: wait for the workers.
    assert httpx.options(server.dicomweb, timeout=30, headers=server.auth).status_code == 200
    deadline = time.monotonic() + 30
    while server.log_path.read_text().count("Application startup complete") < 2:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    files = write_ct_series(tmp_path / "ct", 4, patient_id="WARM-1")
    assert storescu(server.port, list(files.values())).returncode == 0
    cache = server.data_dir / "cache" / "metadata"
    deadline = time.monotonic() + 30
    while not list(cache.rglob("*.json")):  # bounded wait for the background build
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    warmed = [e for e in server.audit() if e["type"] == "InstancesRetrieved"]
    assert [(e["service"], e["completed"], e["actor"]["via"]) for e in warmed] == [
        ("cache", 4, "internal")
    ]
    import pydicom

    first = pydicom.dcmread(next(iter(files.values())))
    url = (
        f"{server.dicomweb}/studies/{first.StudyInstanceUID}"
        f"/series/{first.SeriesInstanceUID}/metadata"
    )
    answer = server.get(url, timeout=30)
    assert answer.status_code == 200 and len(answer.json()) == 4
    server.stop()
