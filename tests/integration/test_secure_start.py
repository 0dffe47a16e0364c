"""Secure start (threat model SR-2, SR-3): HTTP beyond loopback without any user refuses to
start, naming the fix, and no administrator is invented for it; on loopback the first start
creates ``admin`` with a one-time password."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from .conftest import StockadeServer


def test_beyond_loopback_without_users_refuses_and_creates_no_admin(
    make_server: Callable[..., StockadeServer],
) -> None:
    server = make_server(
        settings={
            "STOCKADE_HTTP_HOST": "0.0.0.0",
            "STOCKADE_ALLOW_PLAIN_BEYOND_LOOPBACK": "true",
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "serve"],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "no user exists" in run.stderr and "stockade user add" in run.stderr
    assert not (server.data_dir / "initial-admin-password").exists()
    assert "one-time password" not in run.stderr
    listed = server.cli("user", "list")
    assert listed.returncode == 0 and listed.stdout.strip() == ""


def test_first_start_on_loopback_creates_admin_once(
    make_server: Callable[..., StockadeServer],
) -> None:
    server = make_server()
    server.start()
    secret = server.data_dir / "initial-admin-password"
    password = secret.read_text().strip()
    assert len(password) >= 20 and secret.stat().st_mode & 0o777 == 0o600
    assert password in server.log_path.read_text()  # printed once, at the first start
    server.stop()
    server.start()
    assert server.log_path.read_text().count("one-time password") == 0  # a new log: not again
    listed = server.cli("user", "list")
    assert "admin  admin  active  all studies, must change password" in listed.stdout
