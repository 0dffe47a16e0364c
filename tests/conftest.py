"""Shared fixtures: database back ends, settings, an archive on a temporary folder.

Every test that takes ``db_url`` runs twice: on SQLite and on the PostgreSQL server named by
``STOCKADE_TEST_POSTGRES_URL`` (each test gets a fresh schema). Without that variable the
PostgreSQL runs are skipped, and say why. With ``CI=true`` a skipped test is a failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from stockade.archive import Archive
from stockade.audit.sink import MemoryAuditSink
from stockade.index.sql import SqlIndex
from stockade.settings import Settings, load
from stockade.storage.filesystem import FilesystemBlobStore

POSTGRES_URL = os.environ.get("STOCKADE_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Return the path of a command-line tool, or skip the test (a failure in CI)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed "
            "(apt-get install dcmtk dicom3tools orthanc chromium chromium-driver)"
        )
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a skip is a failure: every tool and service must be there."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI (not allowed): {reason}"


@contextlib.contextmanager
def database(kind: str, folder: Path) -> Iterator[str]:
    """The URL of an empty index: SQLite in *folder*, or a fresh PostgreSQL schema (dropped
    afterwards). Skips the test when PostgreSQL is asked for and not configured."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'index.sqlite3'}"
        return
    if not POSTGRES_URL:
        pytest.skip("STOCKADE_TEST_POSTGRES_URL is not set: PostgreSQL runs skipped")
    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for an empty index: SQLite in tmp_path, or a fresh PostgreSQL schema."""
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings for an archive in tmp_path on the parametrised database."""
    return load(environ={}, overrides={"data_dir": str(tmp_path / "data"), "database_url": db_url})


@pytest.fixture
def audit() -> MemoryAuditSink:
    """An audit sink that keeps events in memory."""
    return MemoryAuditSink()


@pytest.fixture
def archive(settings: Settings, audit: MemoryAuditSink) -> Iterator[Archive]:
    """A prepared archive on the parametrised database."""
    store = FilesystemBlobStore(settings.data_dir)
    index = SqlIndex(settings.index_url)
    arch = Archive(settings, store, index, audit)
    arch.prepare()
    try:
        yield arch
    finally:
        arch.close()


@functools.cache
def _unused_password_hash() -> str:
    """The argon2id hash of a random password nobody knows, made once per run."""
    from stockade.auth.passwords import hash_password

    return hash_password(secrets.token_urlsafe(18))


def bearer(archive: Archive, role: str = "admin") -> str:
    """A bearer token of a user of *role* (created on first use, with a random password).

    That user only ever presents its token, so its password is never checked: it gets the
    hash of one random password made once per run, rather than an argon2id hash of its own
    (64 MiB, 3 passes; about 0.13 s in each of the many tests that need a token)."""
    from stockade.audit.events import Actor
    from stockade.auth.roles import Role

    name = f"test-{role}"
    if archive.users.find(name) is None:
        with mock.patch("stockade.auth.users.hash_password", lambda _: _unused_password_hash()):
            archive.accounts.add(name, Role(role), secrets.token_urlsafe(18), Actor(via="internal"))
    token, _ = archive.accounts.create_token(name, timedelta(days=1), "test", Actor(via="internal"))
    return token


def authed(client: Any, archive: Archive, role: str = "admin") -> Any:
    """*client* (a Starlette TestClient) with the bearer token of a user of *role*, as every
    DICOMweb route requires."""
    client.headers["Authorization"] = f"Bearer {bearer(archive, role)}"
    return client
