"""OHIF served by Stockade (fast: a small fake viewer folder, Starlette's test client): the
status route, the generated configuration, safe file serving with OHIF's client routes, the
login in front of it, its content security policy, and the installation's checks and
adaptation (with a stand-in for npm)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from stockade.archive import Archive
from stockade.cli_viewer import ViewerError, adapt, install, remove
from stockade.errors import ConfigError
from stockade.web import ohif, ui
from stockade.web.app import create_app
from tests.conftest import authed

INDEX = (
    '<!doctype html><html><head><script>console.time("scriptToView"),window.PUBLIC_URL="/"'
    '</script><link rel="manifest" href="/manifest.json"><link rel="icon" '
    'href="/assets/favicon.ico"><script rel="preload" as="script" src="/app-config.js">'
    '</script><script rel="preload" as="script" type="module" src="/init-service-worker.js">'
    "</script><title>OHIF Viewer</title><script>function browserImportFunction(n){return "
    'import(n)}window.PUBLIC_URL="/"</script><script defer src="/app.bundle.0123.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body>'
    "</html>"
)
BUNDLE = b'(()=>{__webpack_require__.p = "/";console.log("viewer")})();'
CSS = b"@font-face{src:url(/a1.woff2)}"


def fake_dist(folder: Path) -> Path:
    """A folder shaped like OHIF's ``dist`` as published (built for the site root)."""
    folder.mkdir(parents=True)
    (folder / "index.html").write_text(INDEX, encoding="utf-8")
    (folder / "app.bundle.0123.js").write_bytes(BUNDLE)
    (folder / "app.bundle.css").write_bytes(CSS)
    (folder / "app-config.js").write_text("window.config = {dataSources: ['elsewhere']};")
    (folder / "assets").mkdir()
    (folder / "assets" / "favicon.ico").write_bytes(b"\0\0\1\0")
    (folder / "decoder.wasm").write_bytes(b"\0asm\1\0\0\0")
    return folder


def put_viewer(archive: Archive) -> Path:
    """Install the fake viewer as ``stockade viewer install`` lays it out."""
    root = archive.settings.viewer_path
    folder = fake_dist(root / "ohif-3.13.2-test")
    adapt(folder)
    record = {"package": ohif.PACKAGE, "version": "3.13.2", "integrity": "sha512-x"}
    (folder / ohif.MANIFEST).write_text(json.dumps(record))
    (root / ohif.CURRENT).symlink_to(folder.name)
    return folder


@pytest.fixture
def client(archive: Archive) -> TestClient:
    return authed(TestClient(create_app(archive)), archive, "radiologist")


def test_not_installed(client: TestClient) -> None:
    answer = client.get("/api/ohif")
    assert answer.status_code == 200
    assert answer.json() == {
        "installed": False,
        "version": None,
        "url": "/ohif/viewer?StudyInstanceUIDs=",
    }
    for path in ("/ohif/", "/ohif", "/ohif/viewer", "/ohif/app-config.js", "/ohif/index.html"):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"] == "application/problem+json"
        assert "stockade viewer install" in answer.json()["detail"]


def test_installed_viewer_is_served(client: TestClient, archive: Archive) -> None:
    put_viewer(archive)
    assert client.get("/api/ohif").json()["installed"] is True
    assert client.get("/api/ohif").json()["version"] == "3.13.2"

    page = client.get("/ohif/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'src="/ohif/app-config.js"' in html and 'src="/ohif/app.bundle.0123.js"' in html
    assert "<script>" not in html  # no inline script left
    assert "init-service-worker" not in html and 'rel="manifest"' not in html
    for route in ("/ohif/", "/ohif", "/ohif/viewer/dicomweb", "/ohif/local"):
        assert client.get(route).text == html, route  # OHIF's client routes: its page

    script = client.get("/ohif/app.bundle.0123.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert b'__webpack_require__.p = "/ohif/";' in script.content
    assert client.get("/ohif/app.bundle.css").content == b"@font-face{src:url(/ohif/a1.woff2)}"
    assert client.get("/ohif/decoder.wasm").headers["content-type"] == "application/wasm"
    assert client.get("/ohif/assets/favicon.ico").content == b"\0\0\1\0"
    for missing in ("/ohif/nothing.js", "/ohif/assets/nothing", "/ohif/assets/x.png"):
        answer = client.get(missing)
        assert answer.status_code == 404, missing  # a missing file is no page
        assert answer.headers["content-type"] == "application/problem+json"


def test_generated_configuration_points_at_this_dicomweb(
    client: TestClient, archive: Archive
) -> None:
    put_viewer(archive)
    answer = client.get("/ohif/app-config.js")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/javascript")
    text = answer.text
    assert "elsewhere" not in text  # Stockade's configuration, not the package's
    assert 'window.PUBLIC_URL = "/ohif/";' in text
    start = text.index("var config = ") + len("var config = ")
    config = json.loads(text[start : text.index(";\n", start)])
    assert config["routerBasename"] == "/ohif"
    (source,) = config["dataSources"]
    assert config["defaultDataSourceName"] == source["sourceName"]
    roots = source["configuration"]
    assert roots["qidoRoot"] == roots["wadoRoot"] == "/dicomweb"
    assert roots["wadoUriRoot"] == "/dicomweb/wado"
    assert "window.location.origin" in text  # made absolute on the page's own origin
    assert "http:" not in text and "https:" not in text  # no other server, no telemetry
    for off in ("dangerouslyUseDynamicConfig", "customizationUrlPrefixes", "oidc"):
        assert off not in config


@pytest.mark.parametrize(
    "path",
    [
        "/ohif/../settings.py",
        "/ohif/%2e%2e/%2e%2e/etc/passwd",
        "/ohif/assets/..%2f..%2fstockade-viewer.json",
        "/ohif/assets/%2e%2e/%2e%2e/ohif-3.13.2-test/index.html",
        "/ohif/.%2findex.html",
        "/ohif/assets//favicon.ico",
        "/ohif/assets%5cfavicon.ico",
        "/ohif/outside.txt",
        "/ohif/viewer/%2e%2e/%2e%2e/secret",
    ],
)
def test_paths_outside_the_viewer_are_refused(
    client: TestClient, archive: Archive, path: str
) -> None:
    folder = put_viewer(archive)
    secret = archive.settings.viewer_path / "secret.txt"
    secret.write_text("not for the browser")
    (folder / "outside.txt").symlink_to(secret)
    answer = client.get(path)
    assert answer.status_code == 404 and "not for the browser" not in answer.text


def test_resolve_refuses_every_way_out(tmp_path: Path) -> None:
    folder = fake_dist(tmp_path / "dist").resolve()
    assert ohif.resolve(folder, "assets/favicon.ico") == folder / "assets" / "favicon.ico"
    for bad in (
        "",
        "..",
        "../dist/index.html",
        "assets/../index.html",
        "/etc/passwd",
        "assets//favicon.ico",
        "assets\\favicon.ico",
        "a\0b",
        "assets",
        ".",
    ):
        assert ohif.resolve(folder, bad) is None, bad


def test_login_and_permission_in_front(archive: Archive) -> None:
    put_viewer(archive)
    anonymous = TestClient(create_app(archive), follow_redirects=False)
    page = anonymous.get("/ohif/viewer?StudyInstanceUIDs=1.2.3")
    assert page.status_code == 401
    # a browser goes on to the login, and comes back here once signed in
    assert 'url=/ui/login?next=%2Fohif%2Fviewer%3FStudyInstanceUIDs%3D1.2.3"' in page.text
    for path in ("/ohif/app-config.js", "/ohif/app.bundle.0123.js"):
        assert anonymous.get(path).status_code == 401
    api = anonymous.get("/api/ohif")
    assert api.status_code == 401 and api.headers["content-type"] == "application/problem+json"

    auditor = authed(TestClient(create_app(archive)), archive, "auditor")  # no view
    for path in ("/api/ohif", "/ohif/viewer", "/ohif/app-config.js", "/ohif/app.bundle.0123.js"):
        assert auditor.get(path).status_code == 403, path


def test_ohif_policy_under_ohif_only(archive: Archive) -> None:
    put_viewer(archive)
    for base in ("http://testserver", "https://testserver"):
        client = authed(TestClient(create_app(archive), base_url=base), archive)
        for path in ("/ohif/viewer", "/ohif/", "/ohif/app.bundle.0123.js", "/ohif/app-config.js"):
            answer = client.get(path)
            assert answer.headers["content-security-policy"] == ohif.CONTENT_SECURITY_POLICY
            assert answer.headers["x-frame-options"] == "DENY"
            assert answer.headers["x-content-type-options"] == "nosniff"
        login = client.get("/ui/login")
        assert login.headers["content-security-policy"] == ui.CONTENT_SECURITY_POLICY
        json_answer = client.get("/api/ohif")
        assert json_answer.headers.get("content-security-policy") != ohif.CONTENT_SECURITY_POLICY
    policy = ohif.CONTENT_SECURITY_POLICY
    assert "'unsafe-eval'" not in policy and "script-src 'self' 'wasm-unsafe-eval';" in policy
    assert "frame-ancestors 'none'" in policy and "connect-src 'self';" in policy
    assert "*" not in policy and "http" not in policy


def test_adapt_refuses_an_unknown_inline_script(tmp_path: Path) -> None:
    folder = fake_dist(tmp_path / "dist")
    page = (
        (folder / "index.html").read_text().replace("</head>", "<script>alert(1)</script></head>")
    )
    (folder / "index.html").write_text(page)
    with pytest.raises(ViewerError, match="inline script"):
        adapt(folder)


# -- installation with a stand-in for npm ---------------------------------------------------

FAKE_NPM = """#!{python}
import json, os, sys, tarfile
args = sys.argv[1:]
assert args[0] == "pack" and "--ignore-scripts" in args, args
dest = args[args.index("--pack-destination") + 1]
with open(os.path.join(os.environ["FAKE_NPM_LOG"]), "a") as log:
    log.write(json.dumps(args) + "\\n")
name = "ohif-app-" + args[1].rsplit("@", 1)[1] + ".tgz"
with open(os.environ["FAKE_NPM_TARBALL"], "rb") as src, open(os.path.join(dest, name), "wb") as out:
    out.write(src.read())
print(json.dumps([{{"filename": name, "integrity": os.environ["FAKE_NPM_INTEGRITY"]}}]))
"""


def tarball(dist: Path, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(dist.rglob("*")):
            if path.is_file():
                tar.add(path, arcname="package/dist/" + path.relative_to(dist).as_posix())
        tar.addfile(tarfile.TarInfo("package/package.json"), io.BytesIO(b""))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    npm = tmp_path / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text(FAKE_NPM.format(python=sys.executable))
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    data = tarball(fake_dist(tmp_path / "published"))
    (tmp_path / "pkg.tgz").write_bytes(data)
    monkeypatch.setenv("FAKE_NPM_TARBALL", str(tmp_path / "pkg.tgz"))
    monkeypatch.setenv("FAKE_NPM_INTEGRITY", sri(data))
    monkeypatch.setenv("FAKE_NPM_LOG", str(tmp_path / "npm.log"))
    return npm


def test_install_switches_atomically_and_removes(tmp_path: Path, fake_npm: Path) -> None:
    root = tmp_path / "viewer"
    first = install(root, "3.99.0", npm=str(fake_npm))
    assert (root / "ohif").is_symlink() and (root / "ohif").resolve() == first.folder
    record = json.loads((first.folder / ohif.MANIFEST).read_text())
    assert record["version"] == "3.99.0" and record["integrity"].startswith("sha512-")
    assert "index.html" in record["adapted"]
    assert '__webpack_require__.p = "/ohif/";' in (first.folder / "app.bundle.0123.js").read_text()
    args = json.loads((tmp_path / "npm.log").read_text().splitlines()[0])
    assert args[:2] == ["pack", "@ohif/app@3.99.0"]
    second = install(root, "3.99.0", npm=str(fake_npm))
    assert (root / "ohif").resolve() == second.folder and not first.folder.exists()
    assert sorted(p.name for p in root.iterdir()) == ["ohif", second.folder.name]  # no leftovers
    assert remove(root) and not (root / "ohif").exists() and not second.folder.exists()
    assert not remove(root)


def test_install_refuses_a_tarball_that_does_not_match(
    tmp_path: Path, fake_npm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "viewer"
    monkeypatch.setenv("FAKE_NPM_INTEGRITY", sri(b"something else"))
    with pytest.raises(ViewerError, match="does not match"):
        install(root, "3.99.0", npm=str(fake_npm))
    # The pinned version's integrity is Stockade's own, whatever the registry says.
    monkeypatch.setenv("FAKE_NPM_INTEGRITY", sri((tmp_path / "pkg.tgz").read_bytes()))
    with pytest.raises(ViewerError, match="expects"):
        install(root, ohif.VERSION, npm=str(fake_npm))
    assert not (root / "ohif").exists() and os.listdir(root) == []


def test_install_refuses_links_in_the_tarball(
    tmp_path: Path, fake_npm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tarfile.TarInfo("package/dist/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    data = tarball(fake_dist(tmp_path / "linked"), [link])
    (tmp_path / "pkg.tgz").write_bytes(data)
    monkeypatch.setenv("FAKE_NPM_INTEGRITY", sri(data))
    with pytest.raises(ViewerError, match="not a regular file"):
        install(tmp_path / "viewer", "3.99.0", npm=str(fake_npm))


def test_install_refuses_a_version_that_is_an_option(tmp_path: Path, fake_npm: Path) -> None:
    for bad in ("--registry=http://evil", "latest", "3.13", "3.13.2 ; rm -rf /"):
        with pytest.raises(ConfigError, match="not a version number"):
            install(tmp_path / "viewer", bad, npm=str(fake_npm))
