"""``stockade viewer``: install, show and remove the OHIF viewer Stockade serves under /ohif/.

``viewer install`` obtains the prebuilt viewer with npm (``npm pack @ohif/app@<version>``: the
package's tarball only, no dependencies, no install scripts; npm checks it against the
registry's integrity, and for the pinned :data:`~stockade.web.ohif.VERSION` Stockade checks
it against :data:`INTEGRITY` too), unpacks its ``dist`` folder into a temporary folder beside
the installation, adapts it to ``/ohif/`` (:func:`adapt`), and then switches the
``<viewer_dir>/ohif`` link to it in one atomic rename. npm's cache (``~/.npm``) keeps the
tarball, so a second installation does not download it again.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from stockade.errors import ConfigError, StockadeError
from stockade.settings import Settings
from stockade.web.ohif import CURRENT, MANIFEST, PACKAGE, PREFIX, STUDY_URL, VERSION, current

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

#: The top-level commands this module handles.
COMMANDS = frozenset({"viewer"})
#: Subresource Integrity (sha512) of the tarballs Stockade knows, as the npm registry
#: publishes them: a tarball that differs is refused even if the registry agrees with it.
INTEGRITY = {
    "3.13.2": "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4f"
    "jEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==",
}
#: How long npm may take.
NPM_TIMEOUT = 900.0
_VERSION = re.compile(r"[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}(?:-[0-9A-Za-z.]{1,40})?")
#: webpack's public path as built (the site root), and as Stockade serves the viewer.
_PUBLIC_PATH = b'__webpack_require__.p = "/";'
_DIST = "package/dist/"


class ViewerError(StockadeError):
    """The viewer could not be installed."""

    code = "viewer"


@dataclass(frozen=True)
class Result:
    """A finished installation."""

    folder: Path
    version: str
    integrity: str
    download_bytes: int
    seconds: float


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``viewer install|status|remove`` to the ``stockade`` parser."""
    v = sub.add_parser("viewer", help="the OHIF viewer served under /ohif/")
    v_sub = v.add_subparsers(dest="viewer_command", required=True)
    inst = v_sub.add_parser(
        "install", help=f"obtain {PACKAGE} with npm and serve it under {PREFIX}"
    )
    inst.add_argument(
        "--version",
        default=VERSION,
        help=f"the {PACKAGE} version (default {VERSION}, the one Stockade is tested with)",
    )
    v_sub.add_parser("status", help="the installed viewer, if any")
    v_sub.add_parser("remove", help="remove the installed viewer")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``viewer install``, ``viewer status`` or ``viewer remove``."""
    if args.viewer_command == "install":
        result = install(settings.viewer_path, args.version)
        out.print(f"installed {PACKAGE}@{result.version} in {result.folder}")
        out.print(f"integrity {result.integrity}")
        out.print(f"served at {PREFIX} (a study: {STUDY_URL}<StudyInstanceUID>)")
        return 0
    if args.viewer_command == "remove":
        removed = remove(settings.viewer_path)
        out.print("removed the viewer" if removed else "no viewer is installed")
        return 0
    installed = current(settings)
    if installed is None:
        out.print(f"not installed (stockade viewer install puts it in {settings.viewer_path})")
        return 1
    out.print(f"{installed.package}@{installed.version} in {installed.folder}")
    out.print(f"integrity {installed.integrity}")
    return 0


def install(folder: Path, version: str = VERSION, npm: str | None = None) -> Result:
    """Install *version* of the viewer under *folder*; the previous one is removed after.

    Raises
    ------
    ConfigError
        npm is missing, or *version* is not a version number.
    ViewerError
        npm failed, the tarball does not match its integrity, or it is not the prebuilt
        viewer Stockade can adapt.
    """
    if not _VERSION.fullmatch(version):
        raise ConfigError(f"not a version number: {version[:60]!r}")
    npm = npm or shutil.which("npm")
    if npm is None:
        raise ConfigError("npm is not installed (Debian: apt-get install npm)")
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".install-", dir=folder))
    try:
        tarball, integrity = _pack(npm, version, work)
        expected = INTEGRITY.get(version)
        if expected is not None and integrity != expected:
            raise ViewerError(
                f"npm answered integrity {integrity} for {version}; Stockade expects {expected}"
            )
        _check(tarball, expected or integrity)
        size = tarball.stat().st_size
        staged = work / "dist"
        _unpack(tarball, staged)
        patched = adapt(staged)
        record = {
            "package": PACKAGE,
            "version": version,
            "integrity": expected or integrity,
            "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "adapted": patched,
        }
        (staged / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        final = folder / f"ohif-{version}-{secrets.token_hex(4)}"
        staged.rename(final)
        previous = _target(folder)
        link = folder / f".{CURRENT}-{secrets.token_hex(4)}"
        link.symlink_to(final.name)
        os.replace(link, folder / CURRENT)  # the switch: one rename
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Result(final, version, expected or integrity, size, time.monotonic() - started)


def remove(folder: Path) -> bool:
    """Remove the installed viewer; False when there was none."""
    link = folder / CURRENT
    target = _target(folder)
    if target is None and not link.is_symlink():
        return False
    link.unlink(missing_ok=True)
    if target is not None:
        shutil.rmtree(target, ignore_errors=True)
    return True


def _target(folder: Path) -> Path | None:
    """The installed version's folder (inside *folder*), or None."""
    link = folder / CURRENT
    if not link.is_symlink():
        return None
    target = (folder / os.readlink(link)).resolve()
    return target if target.parent == folder.resolve() and target.is_dir() else None


def _pack(npm: str, version: str, work: Path) -> tuple[Path, str]:
    """``npm pack``: the package's tarball in *work*, and the integrity npm checked it by."""
    args = [npm, "pack", f"{PACKAGE}@{version}", "--json", "--ignore-scripts"]
    args += ["--pack-destination", str(work), "--loglevel", "warn"]
    if version in INTEGRITY:
        args.append("--prefer-offline")  # the integrity is pinned: a cached copy will do
    try:
        done = subprocess.run(
            args,
            cwd=work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ViewerError(f"npm pack failed: {exc}") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[:500]
        raise ViewerError(f"npm pack {PACKAGE}@{version} failed ({done.returncode}): {tail}")
    try:
        info = json.loads(done.stdout)[0]
        name, integrity = str(info["filename"]), str(info["integrity"])
    except (ValueError, LookupError, TypeError):
        raise ViewerError("npm pack answered something else than its JSON report") from None
    tarball = work / Path(name).name
    if not tarball.is_file():
        raise ViewerError(f"npm pack did not leave {tarball.name}")
    return tarball, integrity


def _check(tarball: Path, integrity: str) -> None:
    """Check *tarball* against a Subresource Integrity string (``sha512-<base64>``)."""
    algorithm, _, value = integrity.partition("-")
    if algorithm != "sha512":
        raise ViewerError(f"integrity {integrity[:40]!r} is not sha512")
    digest = hashlib.sha512()
    with tarball.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    if base64.b64encode(digest.digest()).decode() != value:
        raise ViewerError(f"{tarball.name} does not match its integrity {integrity}")


def _unpack(tarball: Path, into: Path) -> None:
    """Unpack the ``dist`` folder of *tarball* into *into*: regular files and folders only,
    every path inside *into* (tarfile's ``data`` filter)."""
    into.mkdir()
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(_DIST):
                continue
            if not (member.isfile() or member.isdir()):
                raise ViewerError(f"{member.name[:200]} is not a regular file")
            member.name = member.name[len(_DIST) :]
            if member.name:
                members.append(member)
        tar.extractall(into, members=members, filter="data")
    if not (into / "index.html").is_file():
        raise ViewerError(f"{tarball.name} has no dist/index.html: not the prebuilt viewer")


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
#: What OHIF's inline script does (app-config.js does it instead, stockade.web.ohif).
_KNOWN_INLINE = re.compile(
    r'(?:console\.time\("scriptToView"\),)?window\.PUBLIC_URL="/"'
    r'|function browserImportFunction\(\w+\)\{return import\(\w+\)\}window\.PUBLIC_URL="/"'
)
_SERVICE_WORKER = re.compile(r'<script[^>]*src="/init-service-worker\.js"[^>]*></script>')
_MANIFEST_LINK = re.compile(r'<link rel="manifest"[^>]*>')
_ROOTED = re.compile(r'(\s(?:href|src)=")/(?!/)')


def adapt(dist: Path) -> list[str]:
    """Adapt OHIF's ``dist`` (built for the site root) to :data:`PREFIX`; return what was
    changed.

    * ``index.html``: its inline script is removed (``app-config.js`` sets the public URL and
      the module loader instead, so the page needs no ``'unsafe-inline'``), the service
      worker is not registered (it would fetch Workbox from Google), nor the web app
      manifest (a browser fetches it without the session cookie), and root paths get the
      prefix;
    * webpack's public path in the bundles, and ``url(/...)`` in the style sheets, get the
      prefix (chunks, workers, WebAssembly and fonts load from there).
    """
    changed = []
    index = dist / "index.html"
    page = index.read_text(encoding="utf-8")
    for script in _INLINE_SCRIPT.findall(page):
        if not _KNOWN_INLINE.fullmatch(script.strip()):
            raise ViewerError(
                f"index.html has an inline script Stockade does not know: {script[:120]!r}"
            )
    page = _INLINE_SCRIPT.sub("", page)
    page = _SERVICE_WORKER.sub("", page)
    page = _MANIFEST_LINK.sub("", page)
    page = _ROOTED.sub(lambda m: m.group(1) + PREFIX, page)
    if f'src="{PREFIX}app-config.js"' not in page:
        raise ViewerError("index.html does not load app-config.js")
    index.write_text(page, encoding="utf-8")
    changed.append("index.html")
    public = f'__webpack_require__.p = "{PREFIX}";'.encode()
    for path in sorted(dist.rglob("*")):
        if path.suffix not in (".js", ".css") or not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".js":
            new = data.replace(_PUBLIC_PATH, public)
        else:
            new = re.sub(
                rb"url\((['\"]?)/(?!/)", lambda m: b"url(" + m.group(1) + PREFIX.encode(), data
            )
        if new != data:
            path.write_bytes(new)
            changed.append(path.relative_to(dist).as_posix())
    if not any(name.startswith("app.bundle.") and name.endswith(".js") for name in changed):
        raise ViewerError("the viewer's app bundle has no webpack public path to adapt")
    return changed
