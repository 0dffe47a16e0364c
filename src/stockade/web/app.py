"""The ASGI application: DICOMweb (PS3.18) under ``/dicomweb``.

A thin adapter like the DIMSE one: each route turns its request into one call on the
:class:`~stockade.archive.Archive` with the caller as an audit :class:`Actor`, and its result
back into HTTP. This module is the one place where core errors become HTTP answers:
:func:`problem` turns every :class:`~stockade.errors.StockadeError` (and Starlette's own
HTTP errors) into an RFC 9457 problem document with the error's status. Every response
carries ``X-Content-Type-Options: nosniff``; CORS headers are sent only to the origins
listed in ``http_cors_origins`` (none by default, never ``*``, never with credentials).
Routes live in :mod:`stockade.web.qido`, :mod:`stockade.web.wado`, :mod:`stockade.web.render`,
:mod:`stockade.web.stow` and :mod:`stockade.web.uri`, each exporting ``ROUTES``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockade.audit.events import Actor
from stockade.auth.service import Principal
from stockade.dicom.uids import uid_problem
from stockade.errors import InvalidQuery, NotAuthenticated, StockadeError
from stockade.query import Scope as ViewScope
from stockade.settings import cors_origins
from stockade.web import ohif
from stockade.web.ui import CONTENT_SECURITY_POLICY

if TYPE_CHECKING:
    from stockade.archive import Archive

log = logging.getLogger(__name__)

#: Where DICOMweb lives: the base URL a client configures is http(s)://host:port/dicomweb.
BASE = "/dicomweb"
PROBLEM = "application/problem+json"
#: Headers on every response (threat model SR-21).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
#: Added on HTTPS (RFC 6797 HSTS; threat model SR-4, SR-10): never framed, nothing loaded
#: from a DICOMweb response, no referrer, the origin kept to itself.
HTTPS_HEADERS = [
    (b"strict-transport-security", b"max-age=31536000"),
    (
        b"content-security-policy",
        b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def archive_of(request: Request) -> Archive:
    """The archive the application serves."""
    archive: Archive = request.app.state.archive
    return archive


def actor_of(request: Request) -> Actor:
    """The authenticated caller, for the audit trail."""
    client = request.client
    principal: Principal | None = getattr(request.state, "principal", None)
    return Actor(
        user=principal.user if principal else None,
        address=client.host if client else None,
        via="web",
    )


def scope_of(request: Request) -> ViewScope | None:
    """What the authenticated caller may see (None: everything); applied in the query."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # the middleware lets no unauthenticated request through
        raise NotAuthenticated("authentication required")
    return principal.scope


#: Path parameters naming UIDs, and their keywords.
PATH_UIDS = (
    ("study", "StudyInstanceUID"),
    ("series", "SeriesInstanceUID"),
    ("instance", "SOPInstanceUID"),
)


def path_uids(request: Request) -> dict[str, str]:
    """The UIDs of the URL path by keyword, each checked per PS3.5 9.1.

    Raises
    ------
    InvalidQuery
        A UID that breaks PS3.5 9.1 (400).
    """
    values: dict[str, str] = {}
    for name, keyword in PATH_UIDS:
        uid = request.path_params.get(name)
        if uid is None:
            continue
        problem = uid_problem(uid)
        if problem:
            raise InvalidQuery(f"{keyword} in the URL {problem}")
        values[keyword] = uid
    return values


def problem_response(status: int, title: str, detail: str, code: str) -> Response:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body["code"] = code
    return Response(json.dumps(body), status_code=status, media_type=PROBLEM)


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


async def problem(request: Request, exc: Exception) -> Response:
    """Translate an error into a problem document (the web half of the one error tree)."""
    if isinstance(exc, StockadeError):
        status = exc.http_status
        if status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc.reason)
        response = problem_response(status, _TITLES.get(status, "Error"), exc.reason, exc.code)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="Stockade"'
        return response
    if isinstance(exc, HTTPException):
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(status, "Error")
        return problem_response(status, _TITLES.get(status, "Error"), detail, "http")
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem_response(500, _TITLES[500], "internal error; see the server log", "internal")


class Activity:
    """The HTTP requests this process is serving (a streamed answer counts until its last
    byte): background work, such as warming the metadata cache, gives way to them."""

    def __init__(self) -> None:
        self.requests = 0  # changed by the event loop only; read by other threads

    def busy(self) -> bool:
        """Whether a request is being served."""
        return self.requests > 0


#: This process's requests (counted by :class:`SecurityHeaders`, which sees every one).
ACTIVITY = Activity()


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response, and
    :data:`HTTPS_HEADERS` to those sent over HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        added = SECURITY_HEADERS + (HTTPS_HEADERS if scope.get("scheme") == "https" else [])
        # OHIF has its own, less strict policy (stockade.web.ohif), on its scripts too: a
        # web worker runs under the policy of its script's response.
        path = scope.get("path", "")
        viewer = path == ohif.PREFIX.rstrip("/") or path.startswith(ohif.PREFIX)
        policy = ohif.CONTENT_SECURITY_POLICY if viewer else CONTENT_SECURITY_POLICY

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in added}
                ]
                html = any(
                    k.lower() == b"content-type" and v.lower().startswith(b"text/html")
                    for k, v in headers
                )
                extra = added
                if html or viewer:  # a page: its policy (scripts and styles of this origin)
                    extra = [h for h in added if h[0] != b"content-security-policy"] + [
                        (b"content-security-policy", policy.encode()),
                        (b"x-frame-options", b"DENY"),
                    ]
                    extra = list({k: (k, v) for k, v in extra}.values())
                message["headers"] = headers + extra
            await send(message)

        ACTIVITY.requests += 1
        try:
            await self.app(scope, receive, with_headers)
        finally:
            ACTIVITY.requests -= 1


def dicomweb_routes() -> list[BaseRoute]:
    """Every DICOMweb route, relative to :data:`BASE`."""
    from stockade.web import qido, render, stow, uri, wado

    return [*qido.ROUTES, *wado.ROUTES, *render.ROUTES, *stow.ROUTES, *uri.ROUTES]


#: Media types per service, for the capabilities document.
MEDIA_TYPES = {
    "QIDO-RS": ["application/dicom+json", 'multipart/related; type="application/dicom+xml"'],
    "WADO-RS": [
        'multipart/related; type="application/dicom"',
        "application/dicom+json",
        'multipart/related; type="application/dicom+xml"',
        'multipart/related; type="application/octet-stream"',
        "image/jpeg",
        "image/png",
        "image/gif",
    ],
    "STOW-RS": [
        'multipart/related; type="application/dicom"',
        'multipart/related; type="application/dicom+json"',
        "application/dicom+json",
    ],
    "WADO-URI": ["application/dicom", "image/jpeg", "image/png", "image/gif"],
}


def capabilities(routes: list[BaseRoute]) -> dict[str, Any]:
    """The capabilities document (PS3.18 8.9, as JSON rather than WADL): every resource with
    its methods, and the media types of each service. Built from the route table."""
    resources = []
    for route in routes:
        path = getattr(route, "path", None)
        methods = sorted(m for m in getattr(route, "methods", None) or () if m != "HEAD")
        if path:
            resources.append({"path": BASE + path, "methods": methods})
    return {
        "service": "Stockade DICOMweb",
        "base": BASE,
        "resources": resources,
        "mediaTypes": MEDIA_TYPES,
        "conformance": "docs/conformance/dicomweb.md",
    }


def create_app(archive: Archive) -> Starlette:
    """The application serving *archive*."""
    handlers: dict[Any, Any] = {StockadeError: problem, HTTPException: problem, Exception: problem}
    routes = dicomweb_routes()
    document = json.dumps(capabilities(routes))

    async def options(_request: Request) -> Response:
        return Response(document, media_type="application/json", headers={"Allow": "OPTIONS, GET"})

    from stockade.web import admin, auth, ohif, studyactions, ui

    app = Starlette(
        routes=[
            Route(BASE, options, methods=["OPTIONS", "GET"]),
            Mount(BASE, routes=routes),
            *auth.ROUTES,
            *ui.ROUTES,
            *studyactions.ROUTES,
            *admin.ROUTES,
            *ohif.ROUTES,
        ],
        exception_handlers=handlers,
    )
    app.state.archive = archive
    # Every request is authenticated first (deny by default); CORS and the security headers
    # wrap it, so that a refusal carries them too.
    app.add_middleware(auth.Authenticate, archive=archive, base=BASE)
    origins = cors_origins(archive.settings.http_cors_origins)
    if origins:  # explicit origins only; never "*", never with credentials
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Accept", "Content-Type", "Authorization"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)
    return app
