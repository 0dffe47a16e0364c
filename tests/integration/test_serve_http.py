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


def _web_child(server: StockadeServer) -> int:
    for pid in server.group_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"stockade.web.server" in cmdline:
            return pid
    raise AssertionError("no HTTP child process")


def test_a_dead_http_process_is_restarted(make_server) -> None:  # type: ignore[no-untyped-def]
    server: StockadeServer = make_server()
    server.start()
    url = f"{server.dicomweb}/studies"
    deadline = time.monotonic() + 30
    while True:  # the HTTP child may start a moment after the DIMSE listener answers
        try:
            assert httpx.get(url).status_code == 200
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)  # readiness polling only
    first = _web_child(server)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url).status_code == 200 and _web_child(server) != first:
                break
        except (httpx.TransportError, AssertionError):
            pass
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)  # bounded wait for the restart
    assert "restarting" in server.log_path.read_text()
    server.stop()
