"""HTTP authentication and authorisation (threat model SR-7, SR-16): every route refuses a
caller without credentials, roles limit what a caller may do, scopes what it may see."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydicom.uid import generate_uid
from sqlalchemy import text
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from stockade.archive import Archive
from stockade.audit.events import Actor, UserChanged, UserLogin, UserLogout
from stockade.audit.sink import MemoryAuditSink
from stockade.auth.admin import INITIAL_PASSWORD_FILE, bootstrap
from stockade.auth.passwords import WeakPassword
from stockade.auth.roles import Role
from stockade.ingest import Origin
from stockade.query import Scope
from stockade.web.app import create_app
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10

ADMIN = Actor(via="internal")
PASSWORD = secrets.token_urlsafe(18)
UID = "1.2.3.4"


def _paths(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled with a valid UID."""
    out = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                path = prefix + route.path
                for name in route.param_convertors:
                    path = path.replace("{" + name + "}", "1" if name == "frames" else UID)
                for method in sorted(route.methods or ()):
                    if method != "HEAD":
                        out.append((method, path))

    walk(app.routes, "")
    return out


def test_every_route_refuses_a_caller_without_credentials(archive: Archive) -> None:
    app = create_app(archive)
    client = TestClient(app)
    routes = _paths(app)
    assert len(routes) >= 30  # the walk found the DICOMweb routes, not just a few
    public = {"/auth/login", "/ui/login", "/", "/favicon.ico"}  # no patient data behind them
    for method, path in routes:
        if path in public:
            continue
        response = client.request(method, path, follow_redirects=False)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"] == 'Bearer realm="Stockade"'
        assert response.headers["x-content-type-options"] == "nosniff"
        if path.startswith(("/ui/", "/ohif")):  # a page: a page that goes on to the login
            assert response.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert f'url=/ui/login?next={quote(path, safe="")}"' in response.text
        else:
            assert response.headers["content-type"] == "application/problem+json", path
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    # the way back is encoded whole, and markup in it stays text
    hostile = client.get('/ui/study?study="><script>alert(1)</script>', follow_redirects=False)
    assert hostile.status_code == 401 and "<script>" not in hostile.text
    assert "next=%2Fui%2Fstudy%3Fstudy%3D%2522%253E%253Cscript%253E" in hostile.text  # as sent
    assert "next=" not in client.get("/ui/study?q=" + "x" * 3000).text  # too long: no way back
    for bad in ("Bearer stk_nope", "Bearer ", "Digest x", "Basic !!!", "Basic " + "a" * 10):
        response = client.get("/dicomweb/studies", headers={"Authorization": bad})
        assert response.status_code == 401, bad


def _store(archive: Archive, **attrs: Any) -> Any:
    ds = make_dataset(**attrs)
    archive.store_file(part10(ds), Origin(via="import"))
    return ds


def _user(archive: Archive, name: str, role: Role, scope: Scope | None = None) -> str:
    archive.accounts.add(name, role, PASSWORD, ADMIN, scope=scope)
    token, _ = archive.accounts.create_token(name, timedelta(days=1), "t", ADMIN)
    return token


def _client(archive: Archive, token: str, **kwargs: Any) -> TestClient:
    client = TestClient(create_app(archive), **kwargs)
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def test_roles_are_enforced_with_403(archive: Archive) -> None:
    ds = _store(archive)
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        + part10(make_dataset())
        + b"\r\n--b--\r\n"
    )
    stow = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    auditor = _client(archive, _user(archive, "audit-1", Role.AUDITOR))
    referrer = _client(archive, _user(archive, "ref-1", Role.REFERRER))
    tech = _client(archive, _user(archive, "tech-1", Role.TECHNOLOGIST))
    assert auditor.get("/dicomweb/studies").status_code == 403
    assert "may not view" in auditor.get("/dicomweb/studies").json()["detail"]
    assert referrer.get("/dicomweb/studies").status_code == 200
    assert referrer.get(f"/dicomweb/studies/{ds.StudyInstanceUID}").status_code == 200
    assert referrer.post("/dicomweb/studies", content=body, headers=stow).status_code == 403
    assert tech.post("/dicomweb/studies", content=body, headers=stow).status_code == 200
    assert archive.counts()["instances"] == 2


def test_scope_is_applied_in_the_query_and_out_of_scope_is_404(archive: Archive) -> None:
    mine = _store(archive, PatientID="MINE")
    other = _store(archive, PatientID="OTHER")
    by_patient = _store(archive, PatientID="FRIEND")
    scope = Scope(frozenset({mine.StudyInstanceUID}), frozenset({"FRIEND"}))
    client = _client(archive, _user(archive, "referrer", Role.REFERRER, scope))
    found = {s["0020000D"]["Value"][0] for s in client.get("/dicomweb/studies").json()}
    assert found == {mine.StudyInstanceUID, by_patient.StudyInstanceUID}
    patients = client.get("/dicomweb/studies", params={"PatientID": "OTHER"}).json()
    assert patients == []
    assert client.get("/dicomweb/instances").status_code == 200
    assert len(client.get("/dicomweb/instances").json()) == 2
    for tail in ("", "/metadata", "/series", "/thumbnail"):
        theirs = client.get(f"/dicomweb/studies/{other.StudyInstanceUID}{tail}")
        missing = client.get(f"/dicomweb/studies/{generate_uid()}{tail}")
        assert theirs.status_code == missing.status_code, tail
        assert theirs.status_code in (404, 200) and (
            theirs.status_code == 404 or theirs.json() == []
        ), tail
    assert client.get(f"/dicomweb/studies/{mine.StudyInstanceUID}/metadata").status_code == 200
    unscoped = authed(TestClient(create_app(archive)), archive)
    assert len(unscoped.get("/dicomweb/studies").json()) == 3


def test_browser_session_cookie_csrf_and_logout(archive: Archive, audit: MemoryAuditSink) -> None:
    archive.accounts.add("rad", Role.RADIOLOGIST, PASSWORD, ADMIN)
    client = TestClient(create_app(archive))
    response = client.post("/auth/login", json={"username": "rad", "password": PASSWORD})
    assert response.status_code == 200, response.text
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; HTTPS sets it
    csrf = response.json()["csrf_token"]
    assert client.get("/dicomweb/studies").status_code == 200
    who = client.get("/auth/me").json()
    assert who["user"] == "rad"
    assert who["permissions"] == ["download", "modify", "share", "upload", "view"]
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        + part10(make_dataset())
        + b"\r\n--b--\r\n"
    )
    stow = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    refused = client.post("/dicomweb/studies", content=body, headers=stow)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    wrong = client.post("/dicomweb/studies", content=body, headers={**stow, "X-CSRF-Token": "x"})
    assert wrong.status_code == 403
    ok = client.post("/dicomweb/studies", content=body, headers={**stow, "X-CSRF-Token": csrf})
    assert ok.status_code == 200
    assert client.post("/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    client.cookies.clear()
    client.cookies.set("stockade_session", cookie.split(";")[0].split("=", 1)[1])
    assert client.get("/dicomweb/studies").status_code == 401  # revoked on the server
    logins = [e for e in audit.events if isinstance(e, UserLogin)]
    assert [(e.outcome, e.actor.user) for e in logins] == [("success", "rad")]
    assert [e.reason for e in audit.events if isinstance(e, UserLogout)] == ["logout"]


def test_idle_sessions_end(archive: Archive) -> None:
    archive.accounts.add("rad", Role.RADIOLOGIST, PASSWORD, ADMIN)
    archive.auth.settings = dataclasses.replace(archive.settings, session_idle_timeout=1)
    client = TestClient(create_app(archive))
    assert client.post("/auth/login", json={"username": "rad", "password": PASSWORD}).is_success
    with archive.index.engine.begin() as conn:  # as if the session had been idle for a minute
        conn.execute(text("update tokens set created_at = :t"), {"t": "2000-01-01 00:00:00"})
    response = client.get("/dicomweb/studies")
    assert response.status_code == 401 and "inactivity" in response.json()["detail"]


def test_failed_logins_back_off_and_are_audited(archive: Archive, audit: MemoryAuditSink) -> None:
    archive.accounts.add("rad", Role.RADIOLOGIST, PASSWORD, ADMIN)
    client = TestClient(create_app(archive))
    for _ in range(5):
        bad = client.post("/auth/login", json={"username": "rad", "password": "wrong-" * 3})
        assert bad.status_code == 401 and bad.json()["detail"] == "wrong user name or password"
    locked = client.post("/auth/login", json={"username": "rad", "password": PASSWORD})
    assert locked.status_code == 401 and "try again in" in locked.json()["detail"]
    unknown = client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})
    assert unknown.json()["detail"] == "wrong user name or password"  # names cannot be probed
    failures = [e for e in audit.events if isinstance(e, UserLogin) and e.outcome == "failure"]
    assert len(failures) == 7
    assert "locked until" in str(failures[4].reason)
    assert archive.users.get("rad").locked_until is not None


def test_basic_only_over_https_or_loopback(archive: Archive) -> None:
    archive.accounts.add("rad", Role.RADIOLOGIST, PASSWORD, ADMIN)
    basic = "Basic " + base64.b64encode(f"rad:{PASSWORD}".encode()).decode()
    local = TestClient(create_app(archive), client=("127.0.0.1", 5000))
    assert local.get("/dicomweb/studies", headers={"Authorization": basic}).status_code == 200
    remote = TestClient(create_app(archive), client=("192.0.2.7", 5000))
    response = remote.get("/dicomweb/studies", headers={"Authorization": basic})
    assert response.status_code == 401 and "HTTPS" in response.json()["detail"]
    tls = TestClient(create_app(archive), client=("192.0.2.7", 5000), base_url="https://pacs")
    assert tls.get("/dicomweb/studies", headers={"Authorization": basic}).status_code == 200


def test_first_admin_must_change_the_one_time_password(
    archive: Archive, audit: MemoryAuditSink, capsys: pytest.CaptureFixture[str]
) -> None:
    password = bootstrap(archive.accounts, archive.settings.data_dir)
    assert password is not None and password in capsys.readouterr().err
    assert bootstrap(archive.accounts, archive.settings.data_dir) is None  # once only
    file = archive.settings.data_dir / INITIAL_PASSWORD_FILE
    assert file.read_text().strip() == password and file.stat().st_mode & 0o777 == 0o600
    client = TestClient(create_app(archive))
    login = client.post("/auth/login", json={"username": "admin", "password": password})
    assert login.json()["must_change"] is True
    csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
    refused = client.get("/dicomweb/studies")
    assert refused.status_code == 403 and "changed first" in refused.json()["detail"]
    weak = client.post(
        "/auth/password", json={"current": password, "new": "password123"}, headers=csrf
    )
    assert weak.status_code == 400
    changed = client.post(
        "/auth/password", json={"current": password, "new": PASSWORD}, headers=csrf
    )
    assert changed.status_code == 204
    assert not file.exists()
    again = client.post("/auth/login", json={"username": "admin", "password": PASSWORD})
    assert again.json()["must_change"] is False
    assert client.get("/dicomweb/studies").status_code == 200
    changes = [(e.target, e.action) for e in audit.events if isinstance(e, UserChanged)]
    assert changes == [("admin", "create"), ("admin", "password")]


def test_only_argon2id_hashes_and_token_digests_are_stored(archive: Archive) -> None:
    token = _user(archive, "rad", Role.RADIOLOGIST)
    with archive.index.engine.connect() as conn:
        hashes = [r[0] for r in conn.execute(text("select password_hash from users"))]
        digests = [r[0] for r in conn.execute(text("select digest from tokens"))]
    assert hashes and all(h.startswith("$argon2id$") for h in hashes)
    assert token not in digests and all(len(d) == 64 for d in digests)
    for weak in ("short", "password1234", "rad-is-my-name-1", "aaaaaaaaaaaaaaaa"):
        with pytest.raises(WeakPassword):
            archive.accounts.add("other", Role.REFERRER, weak.replace("rad", "other"), ADMIN)


def test_revoked_expired_and_disabled_tokens_are_refused(archive: Archive) -> None:
    archive.accounts.add("rad", Role.RADIOLOGIST, PASSWORD, ADMIN)
    live, made = archive.accounts.create_token("rad", timedelta(days=1), "a", ADMIN)
    client = _client(archive, live)
    assert client.get("/dicomweb/studies").status_code == 200
    archive.accounts.revoke_token(made.id, ADMIN)
    assert client.get("/dicomweb/studies").status_code == 401
    short, _ = archive.accounts.create_token("rad", timedelta(seconds=1), "b", ADMIN)
    with archive.index.engine.begin() as conn:
        conn.execute(text("update tokens set expires_at = :t"), {"t": "2000-01-01 00:00:00"})
    assert _client(archive, short).get("/dicomweb/studies").status_code == 401
    third, _ = archive.accounts.create_token("rad", timedelta(days=1), "c", ADMIN)
    archive.accounts.set_disabled("rad", True, ADMIN)
    assert _client(archive, third).get("/dicomweb/studies").status_code == 401


# -- OIDC ------------------------------------------------------------------------------------


@pytest.fixture
def oidc(archive: Archive, tmp_path: Path) -> tuple[Archive, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "k1", "use": "sig", "alg": "ES256"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public]}))
    archive.auth.settings = dataclasses.replace(
        archive.settings,
        oidc_issuer="https://idp.example",
        oidc_audience="stockade",
        oidc_jwks_file=str(jwks),
    )
    archive.accounts.add("dr.who", Role.RADIOLOGIST, PASSWORD, ADMIN)
    return archive, key


def _jwt(key: Any, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": "https://idp.example",
        "aud": "stockade",
        "exp": now + 300,
        "iat": now,
        "preferred_username": "dr.who",
        **claims,
    }
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k1"})


def test_oidc_tokens_checked_against_the_key_set(oidc: tuple[Archive, Any]) -> None:
    archive, key = oidc
    client = TestClient(create_app(archive))

    def status(token: str) -> int:
        return client.get(
            "/dicomweb/studies", headers={"Authorization": f"Bearer {token}"}
        ).status_code

    assert status(_jwt(key)) == 200
    assert status(_jwt(key, aud="someone-else")) == 401
    assert status(_jwt(key, iss="https://evil.example")) == 401
    assert status(_jwt(key, exp=int(time.time()) - 3600)) == 401
    assert status(_jwt(key, preferred_username="not-a-user")) == 401
    other = ec.generate_private_key(ec.SECP256R1())
    assert status(_jwt(other)) == 401  # signed by a key outside the set
    unsigned = jwt.encode({"iss": "https://idp.example", "aud": "stockade"}, None, algorithm="none")
    assert status(unsigned) == 401
    hs = jwt.encode(
        {"iss": "https://idp.example", "aud": "stockade", "exp": int(time.time()) + 60},
        "secret-secret-secret-secret-secret!",
        algorithm="HS256",
    )
    assert status(hs) == 401
