"""The web application's pages (the browser side of Stockade): login and the study list.

Plain HTML, CSS and JavaScript modules served from ``web/static``, no inline script and no
framework. Every HTML response carries :data:`CONTENT_SECURITY_POLICY` (added by the
security headers middleware to any ``text/html`` answer); pages insert DICOM values as text
only (``textContent``), never as HTML (threat model SR-10). Data comes from DICOMweb with
the session cookie of ``/auth/login``, so the caller's role and scope apply as they do for
any client.

Routes: ``/`` (redirects to the study list), ``/ui/login`` and ``/ui/static/...`` (public:
they hold no patient data), and the pages of :data:`PAGES` (authenticated like every other
route; what each page may do is checked by the routes it calls). A page listed in
:data:`PAGE_PERMISSIONS` is also refused as a whole (403, a page without data) to a caller
whose role lacks its permission.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stockade.auth.roles import Permission
from stockade.auth.service import require
from stockade.errors import NotAuthorized

STATIC = Path(__file__).resolve().parent / "static"
#: The policy of every HTML page: scripts, styles and connections from this origin only,
#: images also from blob: (rendered frames), nothing inline, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Paths reachable without credentials (no patient data behind them).
PUBLIC_PREFIXES = ("/ui/static/",)
PUBLIC_PATHS = frozenset({"/ui/login", "/", "/favicon.ico"})


def _page(name: str) -> Response:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")


async def root(_request: Request) -> Response:
    """``/``: to the study list (which sends an unauthenticated browser to the login)."""
    return RedirectResponse("/ui/", status_code=303)


async def favicon(_request: Request) -> Response:
    """``/favicon.ico``: the icon browsers ask for (public, no patient data)."""
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


async def login_page(_request: Request) -> Response:
    """``/ui/login``: sign in, and change the password when it must be changed."""
    return _page("login.html")


#: The pages behind the login: path -> file in ``static``.
PAGES = {
    "/ui/": "studies.html",  # the study list
    "/ui/study": "study.html",  # one study: series, thumbnails, actions (?study=UID)
    "/ui/viewer": "viewer.html",  # the zero-footprint viewer (?study=UID[&series=UID])
    "/ui/upload": "upload.html",  # upload files and folders with STOW-RS
    "/ui/admin": "admin.html",  # administration (admin role only: PAGE_PERMISSIONS)
}


#: Pages refused (403) to a caller whose role lacks the permission: path -> permission.
PAGE_PERMISSIONS = {"/ui/admin": Permission.ADMIN}


def _forbidden(reason: str) -> Response:
    """403 for a page of the web application: a page that says so, without any data."""
    body = (
        '<!doctype html><html lang="en"><meta charset="utf-8"><title>Forbidden</title>'
        '<link rel="stylesheet" href="/ui/static/app.css"><main><h1>Forbidden</h1>'
        "<p>Your role may not open this page.</p><p>"
        + reason.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        + '</p><p><a href="/ui/">Back to the studies</a></p></main></html>'
    )
    return HTMLResponse(body, status_code=403)


def _serve(path: str, name: str) -> object:
    permission = PAGE_PERMISSIONS.get(path)

    async def page(request: Request) -> Response:
        if permission is not None:
            from stockade.web.auth import principal_of  # auth imports this module

            try:
                require(principal_of(request), permission)
            except NotAuthorized as exc:
                return _forbidden(exc.reason)
        return _page(name)

    page.__doc__ = f"The page ``{name}``."
    return page


ROUTES = [
    Route("/", root, methods=["GET"]),
    Route("/favicon.ico", favicon, methods=["GET"]),
    Route("/ui/login", login_page, methods=["GET"]),
    *(Route(path, _serve(path, name), methods=["GET"]) for path, name in PAGES.items()),  # type: ignore[arg-type]
    Mount("/ui/static", app=StaticFiles(directory=STATIC), name="static"),
]
