"""The administration API (``/api/admin``) and page (``/ui/admin``): only administrators get
in (the audit routes: whoever may read the audit trail), every change is audited as the
command line's is, bodies are bounded and checked, and no answer holds a secret."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from stockade.app import build_archive
from stockade.archive import Archive
from stockade.audit.events import Actor
from stockade.auth.roles import Role
from stockade.auth.users import digest
from stockade.errors import Conflict, Quarantined
from stockade.ingest import Origin
from stockade.settings import Settings
from stockade.web import admin
from stockade.web.app import create_app
from tests.conftest import authed, bearer
from tests.dicomfactory import make_dataset, part10
from tests.polyglots import PREAMBLES

PASSWORD = secrets.token_urlsafe(18)
QID = "0" * 32
ACTOR = Actor(via="internal")


@pytest.fixture
def trail(settings: Settings) -> Iterator[Archive]:
    """An archive built as ``stockade serve`` builds it (the hash-chained audit trail)."""
    arch = build_archive(settings)
    arch.prepare()
    try:
        yield arch
    finally:
        arch.close()


class Recorder:
    """A test client that keeps every answer's body (to look for secrets in them)."""

    def __init__(self, archive: Archive, role: str = "admin") -> None:
        self.token = bearer(archive, role)
        self.client = TestClient(create_app(archive))
        self.client.headers["Authorization"] = f"Bearer {self.token}"
        self.bodies: list[str] = []

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        self.bodies.append(response.text)
        return response


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every administration route, path parameters filled in."""
    out = []
    for route in admin.ROUTES:
        assert isinstance(route, Route)
        path = route.path.replace("{name}", "somebody").replace("{id}", QID)
        out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def _quarantine(archive: Archive) -> str:
    """Send a file with a program in its preamble (quarantined by default); its id."""
    raw = PREAMBLES["pe"] + part10(make_dataset())[128:]
    with pytest.raises(Quarantined) as caught:
        archive.store_file(raw, Origin(via="import"))
    return caught.value.reason.split(" as ", 1)[1].split()[0]


def _audit(client: Recorder, **params: str) -> list[dict[str, Any]]:
    response = client("GET", "/api/admin/audit", params=params)
    assert response.status_code == 200, response.text
    records: list[dict[str, Any]] = response.json()["records"]
    return records


def test_only_administrators_get_in(archive: Archive) -> None:
    routes = _routes()
    assert len(routes) == 20
    app = create_app(archive)
    anonymous = TestClient(app)
    for method, path in routes:
        response = anonymous.request(method, path)
        assert response.status_code == 401, (method, path)
    assert anonymous.get("/ui/admin", follow_redirects=False).status_code == 401
    for role in Role:
        if role is Role.ADMIN:
            continue
        client = authed(TestClient(app), archive, role.value)
        for method, path in routes:
            response = client.request(method, path, json={})
            reads_audit = role is Role.AUDITOR and path.startswith("/api/admin/audit")
            if reads_audit:  # the auditor reads the audit trail, and nothing else
                assert response.status_code != 403, (role, method, path, response.text)
            else:
                assert response.status_code == 403, (role, method, path, response.text)
                assert response.json()["code"] == "not-authorized"
        page = client.get("/ui/admin")
        assert page.status_code == 403, role
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "admin.js" not in page.text and "Forbidden" in page.text
    admin_client = authed(TestClient(app), archive)
    page = admin_client.get("/ui/admin")
    assert page.status_code == 200 and "admin.js" in page.text
    assert admin_client.get("/ui/upload").status_code == 200
    # an administrator who must first change the password is refused too
    archive.accounts.add("fresh", Role.ADMIN, PASSWORD, ACTOR, must_change=True)
    fresh = TestClient(app)
    fresh.post("/auth/login", json={"username": "fresh", "password": PASSWORD})
    assert fresh.get("/api/admin/users").status_code == 403
    assert fresh.get("/ui/admin").status_code == 403


def test_nodes_added_edited_tested_removed_and_audited(trail: Archive) -> None:
    client = Recorder(trail)
    peer = {"name": "ct-1", "ae_title": "CT1", "host": "127.0.0.1", "port": 104, "allow": ["echo"]}
    made = client("POST", "/api/admin/nodes", json=peer)
    assert made.status_code == 201, made.text
    assert made.json() == {**peer, "tls": False, "cert_sha256": None}
    assert client("POST", "/api/admin/nodes", json=peer).status_code == 409
    changed = {**peer, "name": "ct-2", "ae_title": "CT2", "host": "ct.example.org", "port": 11112}
    edited = client("PUT", "/api/admin/nodes/ct-1", json=changed)
    assert edited.status_code == 200, edited.text
    listed = client("GET", "/api/admin/nodes").json()["nodes"]
    assert [(n["name"], n["ae_title"], n["host"], n["port"]) for n in listed] == [
        ("ct-2", "CT2", "ct.example.org", 11112)
    ]
    assert client("PUT", "/api/admin/nodes/ct-1", json=changed).status_code == 404

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dead = {**peer, "name": "dead", "port": port}
    assert client("POST", "/api/admin/nodes", json=dead).status_code == 201
    echo = client("POST", "/api/admin/nodes/dead/echo")
    assert echo.status_code == 200
    assert echo.json()["ok"] is False and "cannot connect" in echo.json()["detail"]
    assert client("POST", "/api/admin/nodes/nobody/echo").status_code == 404

    assert client("DELETE", "/api/admin/nodes/ct-2").status_code == 204
    assert client("DELETE", "/api/admin/nodes/ct-2").status_code == 404
    assert [n.name for n in trail.nodes()] == ["dead"]
    records = _audit(client, type="NodeChanged")
    assert [(r["name"], r["action"]) for r in reversed(records)] == [
        ("ct-1", "add"),
        ("ct-2", "edit"),
        ("dead", "add"),
        ("ct-2", "remove"),
    ]
    edit = next(r for r in records if r["action"] == "edit")
    assert edit["detail"] == (
        "name ct-1 -> ct-2; ae_title CT1 -> CT2; host 127.0.0.1 -> ct.example.org; "
        "port 104 -> 11112"
    )
    assert {r["actor"]["user"] for r in records} == {"test-admin"}
    assert {r["actor"]["via"] for r in records} == {"web"}


BAD_NODES: list[tuple[dict[str, Any], str]] = [
    ({"ae_title": "A" * 17}, "ae_title is longer"),
    ({"ae_title": "A\\B"}, "AE title"),
    ({"ae_title": "   "}, "ae_title"),
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"port": "104"}, "port"),
    ({"port": True}, "port"),
    ({"host": "bad host"}, "host"),
    ({"host": "a..b"}, "host"),
    ({"host": "-x.org"}, "host"),
    ({"name": "no spaces"}, "node name"),
    ({"allow": ["echo", "format-disk"]}, "unknown service"),
    ({"allow": "echo"}, "allow"),
    ({"tls": "yes"}, "tls"),
    ({"cert_sha256": "ab" * 32}, "TLS"),
    ({"tls": True, "cert_sha256": "xyz"}, "fingerprint"),
]


def test_node_fields_are_checked(archive: Archive) -> None:
    client = authed(TestClient(create_app(archive)), archive)
    for change, complaint in BAD_NODES:
        peer = {"name": "n1", "ae_title": "N1", "host": "::1", "port": 104, **change}
        response = client.post("/api/admin/nodes", json=peer)
        assert response.status_code == 400, (change, response.text)
        assert complaint in response.json()["detail"], change
    assert archive.nodes() == []


def test_bodies_are_bounded_and_must_be_json_objects(archive: Archive) -> None:
    client = authed(TestClient(create_app(archive)), archive)
    huge = json.dumps({"name": "n", "pad": "x" * (admin.MAX_BODY + 1)})
    for body in (huge, "not json", "[1, 2]", "\xff"):
        response = client.post(
            "/api/admin/nodes", content=body.encode(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, body[:20]
    assert archive.nodes() == []


def test_users_added_disabled_enabled_and_passwords_set_audited(trail: Archive) -> None:
    client = Recorder(trail)
    add = {"name": "tech-1", "role": "technologist", "password": PASSWORD}
    made = client("POST", "/api/admin/users", json=add)
    assert made.status_code == 201, made.text
    assert made.json()["role"] == "technologist" and made.json()["must_change"] is True
    assert client("POST", "/api/admin/users", json=add).status_code == 409
    for bad, complaint in (
        ({**add, "name": "Bad Name"}, "user name"),
        ({**add, "name": "tech-2", "role": "superuser"}, "role"),
        ({**add, "name": "tech-2", "password": "short"}, "at least"),
        ({**add, "name": "tech-2", "must_change": "no"}, "must_change"),
    ):
        response = client("POST", "/api/admin/users", json=bad)
        assert response.status_code == 400, bad
        assert complaint in response.json()["detail"]
        assert "short" not in response.text  # a refused password is never echoed

    token = bearer(trail, "technologist")  # a token of another user, to see it cut off
    other = TestClient(create_app(trail))
    other.headers["Authorization"] = f"Bearer {token}"
    assert other.get("/auth/me").status_code == 200
    assert client("POST", "/api/admin/users/test-technologist/disable").json()["disabled"]
    assert other.get("/auth/me").status_code == 401
    assert not client("POST", "/api/admin/users/test-technologist/enable").json()["disabled"]
    assert other.get("/auth/me").status_code == 200
    mine = client("POST", "/api/admin/users/test-admin/disable")
    assert mine.status_code == 409 and "your own" in mine.json()["detail"]
    assert client("POST", "/api/admin/users/nobody/disable").status_code == 404

    new = secrets.token_urlsafe(18)
    changed = client(
        "POST", "/api/admin/users/tech-1/password", json={"password": new, "must_change": False}
    )
    assert changed.status_code == 200 and changed.json()["must_change"] is False
    login = TestClient(create_app(trail)).post(
        "/auth/login", json={"username": "tech-1", "password": new}
    )
    assert login.status_code == 200
    weak = client("POST", "/api/admin/users/tech-1/password", json={"password": "tech-1-pass"})
    assert weak.status_code == 400

    # roles: another role applies from the next request; never one's own, never "superuser"
    promoted = client("POST", "/api/admin/users/test-technologist/role", json={"role": "admin"})
    assert promoted.status_code == 200 and promoted.json()["role"] == "admin"
    assert other.get("/api/admin/users").status_code == 200  # the same token, now an admin
    client("POST", "/api/admin/users/test-technologist/role", json={"role": "referrer"})
    assert other.get("/api/admin/users").status_code == 403
    assert other.post("/dicomweb/studies", content=b"").status_code == 403  # no upload
    own = client("POST", "/api/admin/users/test-admin/role", json={"role": "referrer"})
    assert own.status_code == 409 and "your own" in own.json()["detail"]
    bad = client("POST", "/api/admin/users/tech-1/role", json={"role": "superuser"})
    assert bad.status_code == 400 and "not a role" in bad.json()["detail"]
    with pytest.raises(Conflict, match="last administrator"):  # test-admin is the only one
        trail.accounts.set_role("test-admin", Role.REFERRER, ACTOR)

    users = client("GET", "/api/admin/users").json()["users"]
    assert {u["name"] for u in users} == {"test-admin", "test-technologist", "tech-1"}
    assert all(set(u) >= {"name", "role", "disabled"} for u in users)
    records = _audit(client, type="UserChanged", user="test-admin")
    actions = [(r["target"], r["action"]) for r in reversed(records)]
    assert actions == [
        ("tech-1", "create"),
        ("test-technologist", "disable"),
        ("test-technologist", "enable"),
        ("tech-1", "password"),
        ("test-technologist", "role"),
        ("test-technologist", "role"),
    ]
    roles = [r.get("detail") for r in records if r["action"] == "role"]
    assert roles == ["admin -> referrer", "technologist -> admin"]  # newest first
    for body in client.bodies:  # no password, hash, token or token digest in any answer
        for secret in (PASSWORD, new, client.token, token, digest(client.token), digest(token)):
            assert secret not in body
        assert "$argon2" not in body and "password_hash" not in body


def test_quarantine_listed_shown_released_and_deleted(trail: Archive) -> None:
    client = Recorder(trail)
    kept, dropped = _quarantine(trail), _quarantine(trail)
    entries = client("GET", "/api/admin/quarantine").json()["entries"]
    assert {e["id"] for e in entries} == {kept, dropped}
    assert all(e["findings"] == ["executable-preamble"] for e in entries)
    shown = client("GET", f"/api/admin/quarantine/{kept}").json()
    assert shown["findings"][0]["kind"] == "executable-preamble"
    assert shown["findings"][0]["where"] == "preamble"
    assert client("GET", f"/api/admin/quarantine/{QID}").status_code == 404
    assert client("GET", "/api/admin/quarantine/..%2f..%2fetc").status_code == 404

    released = client("POST", f"/api/admin/quarantine/{kept}/release")
    assert released.status_code == 200, released.text
    assert released.json()["outcome"] == "stored"
    assert trail.find_instance(released.json()["sop_instance_uid"]) is not None
    assert client("DELETE", f"/api/admin/quarantine/{dropped}").status_code == 204
    assert client("DELETE", f"/api/admin/quarantine/{dropped}").status_code == 404
    assert client("GET", "/api/admin/quarantine").json()["entries"] == []
    statistics = client("GET", "/api/admin/statistics").json()
    assert statistics["instances"] == 1 and statistics["quarantined"] == 0
    assert statistics["stored_bytes"] > 0
    records = _audit(client, type="QuarantineChanged")
    assert [(r["quarantine_id"], r["action"]) for r in reversed(records)] == [
        (kept, "release"),
        (dropped, "delete"),
    ]


def test_audit_viewer_filters_pages_and_verifies(trail: Archive) -> None:
    client = Recorder(trail)
    ds = make_dataset(PatientID="AUD-1")
    trail.store_file(part10(ds), Origin(via="import"))
    trail.store_file(part10(make_dataset(PatientID="AUD-2")), Origin(via="import"))
    TestClient(create_app(trail)).post(
        "/auth/login", json={"username": "test-admin", "password": "wrong-" * 4}
    )
    for n in range(6):
        node = {"name": f"n{n}", "ae_title": f"N{n}", "host": "127.0.0.1", "port": 104 + n}
        assert client("POST", "/api/admin/nodes", json=node).status_code == 201

    study = _audit(client, study=ds.StudyInstanceUID)
    assert [r["type"] for r in study] == ["InstanceStored"]
    assert [r["type"] for r in _audit(client, patient="AUD-2")] == ["InstanceStored"]
    failures = _audit(client, outcome="failure")
    assert [r["type"] for r in failures] == ["UserLogin"]
    page = client("GET", "/api/admin/audit", params={"type": "NodeChanged", "limit": "4"}).json()
    assert [r["name"] for r in page["records"]] == ["n5", "n4", "n3", "n2"] and page["more"]
    rest = client(
        "GET", "/api/admin/audit", params={"type": "NodeChanged", "limit": "4", "offset": "4"}
    ).json()
    assert [r["name"] for r in rest["records"]] == ["n1", "n0"] and not rest["more"]
    newest = page["records"][0]["time"]
    since = _audit(client, type="NodeChanged", since=newest)
    assert [r["name"] for r in since] == ["n5"]
    until = _audit(client, type="NodeChanged", until=newest)
    assert until[0]["name"] == "n4"
    assert _audit(client, type="NodeChanged", since="2999-01-01") == []
    listed = _audit(client, type="AuditLogUsed", limit="1")  # reading is audited itself
    assert listed[0]["action"] == "list" and listed[0]["actor"]["user"] == "test-admin"
    assert "NodeChanged" in client("GET", "/api/admin/audit/types").json()["types"]
    for params in (
        {"type": "NoSuchEvent"},
        {"outcome": "maybe"},
        {"since": "yesterday"},
        {"limit": "0"},
        {"limit": "501"},
        {"offset": "-1"},
        {"user": "x" * 300},
    ):
        assert client("GET", "/api/admin/audit", params=params).status_code == 400, params
    verified = client("POST", "/api/admin/audit/verify").json()
    assert verified["ok"] is True and verified["checked"] > 10

    auditor = Recorder(trail, "auditor")
    assert auditor("GET", "/api/admin/audit", params={"type": "NodeChanged"}).status_code == 200
    assert auditor("GET", "/api/admin/nodes").status_code == 403


def test_posture_and_statistics(archive: Archive) -> None:
    client = authed(TestClient(create_app(archive)), archive)
    archive.store_file(part10(make_dataset()), Origin(via="import"))
    report = client.get("/api/admin/posture").json()
    assert {x["name"] for x in report["listeners"]} >= {"DIMSE", "HTTP"}
    assert isinstance(report["findings"], list) and report["critical"] is False
    counts = client.get("/api/admin/statistics").json()
    assert {k: counts[k] for k in ("patients", "studies", "series", "instances")} == {
        "patients": 1,
        "studies": 1,
        "series": 1,
        "instances": 1,
    }
    assert counts["stored_bytes"] > 100 and counts["quarantined"] == 0
    assert counts["disk_free_bytes"] > 0


def test_session_changes_need_the_csrf_token(archive: Archive) -> None:
    archive.accounts.add("boss", Role.ADMIN, PASSWORD, ACTOR)
    client = TestClient(create_app(archive))
    csrf = client.post("/auth/login", json={"username": "boss", "password": PASSWORD}).json()
    node = {"name": "n1", "ae_title": "N1", "host": "127.0.0.1", "port": 104}
    refused = client.post("/api/admin/nodes", json=node)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    assert archive.nodes() == []
    done = client.post("/api/admin/nodes", json=node, headers={"X-CSRF-Token": csrf["csrf_token"]})
    assert done.status_code == 201
    assert client.get("/api/admin/nodes").status_code == 200  # reads need no CSRF token
