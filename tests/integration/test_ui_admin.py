"""The administration page in a real browser (Debian's chromium through chromium-driver): an
administrator adds a DICOM peer, tests it with C-ECHO against a DCMTK storescp, finds the
change in the audit log viewer and removes the peer after an in-page confirmation; a
radiologist gets 403 on the page and on every administration API. Users and the quarantine
are worked on in the page too."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.dicomfactory import make_dataset, part10
from tests.polyglots import PREAMBLES

from .browser import base_url, console_errors, shot, sign_in
from .conftest import HOST, StockadeServer, free_port, require_dcmtk, storescp

PEER_AE = "PEERSCP"
PEER_ROW = '#node-table tr[data-node="peer-scp"]'
QID = "0" * 32
#: Every administration route (method, path), path parameters filled in.
ADMIN_API = [
    ("GET", "/api/admin/users"),
    ("POST", "/api/admin/users"),
    ("POST", "/api/admin/users/rad1/password"),
    ("POST", "/api/admin/users/rad1/role"),
    ("POST", "/api/admin/users/rad1/disable"),
    ("POST", "/api/admin/users/rad1/enable"),
    ("GET", "/api/admin/nodes"),
    ("POST", "/api/admin/nodes"),
    ("PUT", "/api/admin/nodes/peer-scp"),
    ("DELETE", "/api/admin/nodes/peer-scp"),
    ("POST", "/api/admin/nodes/peer-scp/echo"),
    ("GET", "/api/admin/quarantine"),
    ("GET", f"/api/admin/quarantine/{QID}"),
    ("DELETE", f"/api/admin/quarantine/{QID}"),
    ("POST", f"/api/admin/quarantine/{QID}/release"),
    ("GET", "/api/admin/audit"),
    ("GET", "/api/admin/audit/types"),
    ("POST", "/api/admin/audit/verify"),
    ("GET", "/api/admin/posture"),
    ("GET", "/api/admin/statistics"),
]


def _node_row(driver: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f'#node-table tr[data-node="{name}"]')
    return found[0] if found else None


def _cells(wait: Any, selector: str) -> list[str]:
    """The texts of the cells of the row *selector*, read again if the table is redrawn
    meanwhile (the wait ignores stale elements)."""
    from selenium.webdriver.common.by import By

    def read(driver: Any) -> list[str] | None:
        rows = driver.find_elements(By.CSS_SELECTOR, selector)
        return [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")] if rows else None

    cells: list[str] = wait.until(read)
    return cells


def _press(wait: Any, selector: str) -> None:
    """Click the button *selector* once it is there (again if the table was redrawn)."""
    from selenium.webdriver.common.by import By

    def press(driver: Any) -> bool:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if not found:
            return False
        found[0].click()
        return True

    wait.until(press)


def test_admin_adds_tests_and_removes_a_peer_and_finds_it_in_the_audit_log(
    make_server: Callable[..., StockadeServer], browser: Any, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    require_dcmtk("storescp", "echoscu")
    server = make_server(http_workers=2)  # a session must hold across HTTP workers
    server.start()
    password, rad_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    server.secrets += [password, rad_password]  # neither may reach a log or the index
    made = server.cli("user", "add", "boss", "--role", "admin", "--password-stdin", input=password)
    assert made.returncode == 0, made.stderr
    port = free_port()
    driver = browser
    wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
    find = driver.find_element

    with storescp(PEER_AE, tmp_path / "received", port):
        sign_in(driver, server, "boss", password)
        driver.get(base_url(server) + "/ui/admin#nodes")
        wait.until(lambda d: d.find_element(By.ID, "node-form").is_displayed())
        find(By.ID, "node-name").send_keys("peer-scp")
        find(By.ID, "node-ae").send_keys(PEER_AE)
        find(By.ID, "node-host").send_keys(HOST)
        find(By.ID, "node-port").send_keys(str(port))
        find(By.ID, "node-save").click()
        wait.until(lambda d: _node_row(d, "peer-scp") is not None)
        assert find(By.ID, "message").text == "added peer peer-scp"
        cells = _cells(wait, PEER_ROW)
        assert cells[:6] == ["peer-scp", PEER_AE, HOST, str(port), "echo, store", "no"]

        _press(wait, f"{PEER_ROW} button.test")
        wait.until(
            lambda d: (
                _node_row(d, "peer-scp").find_element(By.CLASS_NAME, "echo-result").text
                not in ("", "testing…")
            )
        )
        result = _cells(wait, PEER_ROW)[7]
        assert result.startswith("C-ECHO success in "), result
        shot(driver, "20-admin-peer-echo")

    # the change is in the audit log viewer
    find(By.CSS_SELECTOR, '#tabs [data-tab="audit"]').click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "audit-type")).options) > 10)
    Select(find(By.ID, "audit-type")).select_by_value("NodeChanged")
    find(By.ID, "audit-user").send_keys("boss")
    find(By.ID, "audit-search").click()
    wait.until(
        lambda d: (
            [
                r.get_attribute("data-type")
                for r in d.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr")
            ]
            == ["NodeChanged"]
        )
    )
    cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#audit-table tbody td")]
    assert cells[2:4] == ["NodeChanged", "success"]
    assert cells[4].startswith("boss @ 127.0.0.1 (web)")
    assert cells[5] == "name peer-scp" and "action=add" in cells[6]
    find(By.ID, "audit-verify").click()
    wait.until(lambda d: d.find_element(By.ID, "audit-chain").text.startswith("chain intact"))
    shot(driver, "21-admin-audit")

    # removing needs the in-page confirmation; cancelling keeps the peer
    find(By.CSS_SELECTOR, '#tabs [data-tab="nodes"]').click()
    wait.until(lambda d: _node_row(d, "peer-scp") is not None)
    _press(wait, f"{PEER_ROW} button.remove")
    wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
    assert "peer-scp" in find(By.ID, "confirm-text").text
    shot(driver, "22-admin-confirm-remove")
    find(By.ID, "confirm-cancel").click()
    wait.until(lambda d: not d.find_element(By.ID, "confirm").is_displayed())
    assert _node_row(driver, "peer-scp") is not None
    _press(wait, f"{PEER_ROW} button.remove")
    wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
    find(By.ID, "confirm-ok").click()
    wait.until(lambda d: _node_row(d, "peer-scp") is None)
    node_records = [r for r in server.audit() if r["type"] == "NodeChanged"]
    assert [(r["name"], r["action"], r["actor"]["user"]) for r in node_records] == [
        ("peer-scp", "add", "boss"),
        ("peer-scp", "remove", "boss"),
    ]

    # the other tabs show their data
    find(By.CSS_SELECTOR, '#tabs [data-tab="statistics"]').click()
    wait.until(lambda d: d.find_element(By.ID, "stat-instances").text == "0")
    find(By.CSS_SELECTOR, '#tabs [data-tab="posture"]').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#posture-listeners tbody tr")) >= 2)

    # a radiologist added in the Users tab
    find(By.CSS_SELECTOR, '#tabs [data-tab="users"]').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#user-table tr[data-user="boss"]'))
    find(By.ID, "user-name").send_keys("rad1")
    Select(find(By.ID, "user-role")).select_by_value("radiologist")
    find(By.ID, "user-password").send_keys(rad_password)
    find(By.ID, "user-must-change").click()  # off: rad1 signs in without changing it
    find(By.ID, "user-add").click()
    cells = _cells(wait, '#user-table tr[data-user="rad1"]')
    assert [cells[0], *cells[2:4]] == ["rad1", "active", "set"]
    role = '#user-table tr[data-user="rad1"] select.role'
    assert Select(find(By.CSS_SELECTOR, role)).first_selected_option.text == "radiologist"
    assert [r["target"] for r in server.audit() if r["type"] == "UserChanged"][-1] == "rad1"
    # rad1 becomes a technologist, after the confirmation
    Select(find(By.CSS_SELECTOR, role)).select_by_value("technologist")
    wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
    assert "technologist" in find(By.ID, "confirm-text").text
    find(By.ID, "confirm-ok").click()
    wait.until(lambda d: "rad1 is now technologist" in d.find_element(By.ID, "message").text)
    changed = [r for r in server.audit() if r["type"] == "UserChanged"][-1]
    assert (changed["target"], changed["action"], changed["detail"]) == (
        "rad1",
        "role",
        "radiologist -> technologist",
    )
    shot(driver, "23-admin-users")

    # a polyglot held in quarantine: inspected, then deleted after the confirmation
    polyglot = PREAMBLES["pe"] + part10(make_dataset(PatientID="HELD-1"))[128:]
    with httpx.Client(base_url=base_url(server)) as boss:
        csrf = boss.post("/auth/login", json={"username": "boss", "password": password})
        sent = boss.post(
            "/dicomweb/studies",
            content=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + polyglot + b"\r\n--b--\r\n",
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                "X-CSRF-Token": csrf.json()["csrf_token"],
            },
        )
        assert sent.status_code == 409, sent.text
    find(By.CSS_SELECTOR, '#tabs [data-tab="quarantine"]').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#quarantine-table tbody tr"))
    assert _cells(wait, "#quarantine-table tbody tr")[2:5:2] == [
        "HELD-1",
        "executable-preamble",
    ]
    _press(wait, "#quarantine-table tbody tr button.show")
    wait.until(lambda d: d.find_element(By.ID, "quarantine-detail").is_displayed())
    assert "executable-preamble in preamble" in find(By.ID, "quarantine-findings").text
    shot(driver, "24-admin-quarantine")
    _press(wait, "#quarantine-table tbody tr button.delete")
    wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
    find(By.ID, "confirm-ok").click()
    wait.until(lambda d: d.find_element(By.ID, "quarantine-empty").is_displayed())
    assert [r["action"] for r in server.audit() if r["type"] == "QuarantineChanged"] == ["delete"]
    assert not [e for e in console_errors(driver) if "Content Security Policy" in e]

    # a radiologist: 403 on the page and on every administration API
    find(By.ID, "logout").click()
    wait.until(lambda d: d.current_url.endswith("/ui/login"))
    sign_in(driver, server, "rad1", rad_password)
    driver.get(base_url(server) + "/ui/admin")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Forbidden")
    assert not driver.find_elements(By.ID, "tabs")
    shot(driver, "25-admin-forbidden")
    with httpx.Client(base_url=base_url(server)) as rad:
        login = rad.post("/auth/login", json={"username": "rad1", "password": rad_password})
        assert login.status_code == 200, login.text
        headers = {"X-CSRF-Token": login.json()["csrf_token"]}
        page = rad.get("/ui/admin")
        assert page.status_code == 403 and "admin.js" not in page.text
        for method, path in ADMIN_API:
            answer = rad.request(method, path, headers=headers, json={})
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["code"] == "not-authorized"
            anonymous = httpx.request(method, base_url(server) + path, json={})
            assert anonymous.status_code == 401, (method, path)
