"""HTTP authentication and the permission of each route (threat model SR-7, SR-16).

:class:`Authenticate` runs before every route: a request without valid credentials gets 401
(a problem document and ``WWW-Authenticate: Bearer``), whatever route it asks for, except
the login route itself. Credentials, in order:

1. ``Authorization: Bearer`` with a Stockade token or an OIDC/JWT token;
2. ``Authorization: Basic``, only over HTTPS or from loopback;
3. the ``stockade_session`` cookie of a browser session (``POST /auth/login``), whose
   state-changing requests must also carry ``X-CSRF-Token``.

:func:`needed` maps each DICOMweb request to the permission it needs, checked by
:func:`~stockade.auth.service.require` (403 when the role lacks it). What a caller may *see*
is its scope, applied in the query engine: a study out of scope is answered like a missing
one (404).

The ``/auth`` routes: ``POST /auth/login`` (JSON ``username``, ``password``; sets the
session cookie, answers the CSRF secret), ``POST /auth/logout``, ``POST /auth/password``
(JSON ``current``, ``new``), ``GET /auth/me``.
"""

from __future__ import annotations

import base64
import binascii
import html
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from stockade.auth.roles import PERMISSIONS, Permission
from stockade.auth.service import Principal, require
from stockade.errors import InvalidQuery, NotAuthenticated, StockadeError
from stockade.settings import is_loopback
from stockade.web import ui
from stockade.web.body import json_object

if TYPE_CHECKING:
    from stockade.archive import Archive

COOKIE = "stockade_session"
CSRF_HEADER = "x-csrf-token"
#: Routes that need no credentials.
PUBLIC = frozenset({"/auth/login"})
#: Largest JSON body of the /auth routes.
MAX_AUTH_BODY = 8 * 1024
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_SEARCH = frozenset({"studies", "series", "instances"})
_VIEW = frozenset({"metadata", "rendered", "thumbnail"})


def needed(method: str, path: str, query: str, base: str) -> Permission | None:
    """The permission a DICOMweb request needs (None: any authenticated caller).

    Searches (QIDO-RS), metadata, rendered images and thumbnails need ``view``; DICOM
    objects, frames and bulk data (WADO-RS, WADO-URI ``application/dicom``) ``download``;
    STOW-RS ``upload``. Anything else is denied by the routes themselves (405/404).
    """
    if not path.startswith(base):
        return None
    rest = [p for p in path[len(base) :].split("/") if p]
    if not rest:
        return None  # the capabilities document
    if method == "POST":
        return Permission.UPLOAD
    if rest == ["wado"]:  # WADO-URI: DICOM objects are downloads, images are views
        kinds = parse_qs(query).get("contentType", [""])
        dicom = any(k.strip().lower().startswith("application/dicom") for k in kinds)
        return Permission.DOWNLOAD if dicom else Permission.VIEW
    if rest[-1] in _SEARCH or rest[-1] in _VIEW:
        return Permission.VIEW
    return Permission.DOWNLOAD


def principal_of(request: Request) -> Principal:
    """The authenticated caller (set by :class:`Authenticate`)."""
    principal: Principal = request.state.principal
    return principal


class Authenticate:
    """ASGI middleware: every request but :data:`PUBLIC` ones is authenticated, and DICOMweb
    requests are checked against :func:`needed`."""

    def __init__(self, app: ASGIApp, archive: Archive, base: str) -> None:
        self.app = app
        self.archive = archive
        self.base = base

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if (
            scope["type"] != "http"
            or path in PUBLIC
            or path in ui.PUBLIC_PATHS
            or path.startswith(ui.PUBLIC_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            principal = await run_in_threadpool(self._authenticate, request)
            permission = needed(
                request.method,
                scope["path"],
                scope.get("query_string", b"").decode("latin-1"),
                self.base,
            )
            if permission is not None:
                require(principal, permission)
        except StockadeError as exc:
            from stockade.web.app import problem

            response = await problem(request, exc)
            if exc.http_status == 401 and path.startswith(("/ui/", "/ohif")):
                # a page of the web application: 401, with a way on (and back)
                response = _to_login(path, scope.get("query_string", b"").decode("latin-1"))
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _authenticate(self, request: Request) -> Principal:
        auth = self.archive.auth
        client = request.client
        address = client.host if client else None
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and value.strip():
            return auth.token(value.strip(), address)
        if scheme == "basic":
            if request.url.scheme != "https" and not (address and is_loopback(address)):
                raise NotAuthenticated("HTTP Basic is accepted only over HTTPS or from loopback")
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise NotAuthenticated("malformed Basic credentials") from None
            name, sep, password = decoded.partition(":")
            if not sep:
                raise NotAuthenticated("malformed Basic credentials")
            return auth.basic(name, password, address)
        if header:
            raise NotAuthenticated("unsupported Authorization scheme; use Bearer or Basic")
        cookie = request.cookies.get(COOKIE)
        if cookie:
            unsafe = request.method not in _SAFE
            return auth.session(cookie, request.headers.get(CSRF_HEADER), unsafe, address)
        raise NotAuthenticated(
            "authentication required: a bearer token, a session (POST /auth/login), or "
            "HTTP Basic over HTTPS"
        )


#: Longest page address carried to the login and back (longer ones go to the study list).
MAX_NEXT = 2048


def _to_login(path: str = "", query: str = "") -> Response:
    """401 for a page of the web application, as a page that goes on to the login, which
    brings the browser back to *path* (with *query*) once signed in. The address is
    percent-encoded whole, and the login page goes back only to a page of this origin."""
    target = "/ui/login"
    wanted = f"{path}?{query}" if query else path
    if wanted and len(wanted) <= MAX_NEXT:
        target += "?next=" + quote(wanted, safe="")
    where = html.escape(target, quote=True)
    body = (
        '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; '
        f'url={where}"><title>Sign in</title><a href="{where}">Sign in</a>'
    )
    return HTMLResponse(
        body, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="Stockade"'}
    )


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise InvalidQuery(f"{key} is missing or not a string")
    return value


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


async def login(request: Request) -> Response:
    """``POST /auth/login``: open a browser session."""
    from stockade.web.app import archive_of

    data = await json_object(request, MAX_AUTH_BODY)
    name, password = _text(data, "username"), _text(data, "password")
    archive = archive_of(request)
    principal, secret, csrf = await run_in_threadpool(
        archive.auth.login, name, password, _address(request)
    )
    response = JSONResponse(
        {
            "user": principal.user,
            "role": principal.role.value,
            "must_change": principal.must_change,
            "csrf_token": csrf,
        }
    )
    response.set_cookie(
        COOKIE,
        secret,
        max_age=archive.settings.session_max_age,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


async def logout(request: Request) -> Response:
    """``POST /auth/logout``: end the browser session."""
    from stockade.web.app import archive_of

    archive = archive_of(request)
    await run_in_threadpool(archive.auth.logout, principal_of(request), _address(request))
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def change_password(request: Request) -> Response:
    """``POST /auth/password``: change one's own password (also the first-login change)."""
    from stockade.web.app import actor_of, archive_of

    data = await json_object(request, MAX_AUTH_BODY)
    current, new = _text(data, "current"), _text(data, "new")
    principal = principal_of(request)
    archive = archive_of(request)

    def change() -> None:
        archive.auth.check_password(principal.user, current, _address(request), "password")
        archive.accounts.set_password(principal.user, new, actor_of(request))

    await run_in_threadpool(change)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def me(request: Request) -> Response:
    """``GET /auth/me``: who the caller is."""
    principal = principal_of(request)
    return JSONResponse(
        {
            "user": principal.user,
            "role": principal.role.value,
            "method": principal.method,
            "must_change": principal.must_change,
            "scoped": principal.scope is not None,
            "permissions": sorted(p.value for p in PERMISSIONS[principal.role]),
        }
    )


ROUTES = [
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/password", change_password, methods=["POST"]),
    Route("/auth/me", me, methods=["GET"]),
]
