"""The administration API of the web application, under ``/api/admin`` (threat model SR-16).

What ``stockade user``, ``stockade node``, ``stockade quarantine``, ``stockade audit`` and
``stockade check`` do on the command line, as JSON for the administration page
(``/ui/admin``). Every route requires :attr:`~stockade.auth.roles.Permission.ADMIN`, except
the audit routes, which require :attr:`~stockade.auth.roles.Permission.READ_AUDIT` (the
administrator has it, and so has the auditor); anyone else gets 403. Requests with the
session cookie that change something carry ``X-CSRF-Token`` (checked by
:class:`~stockade.web.auth.Authenticate`).

Every change goes through the same :class:`~stockade.archive.Archive` and
:class:`~stockade.auth.admin.Accounts` methods as the command line, so it is audited the same
way, with the signed-in user as the actor (``via: web``). Request bodies are JSON objects of
at most :data:`MAX_BODY` bytes, every field checked; answers never hold a password hash, a
token or a token digest.

Routes:

- ``GET /api/admin/users``; ``POST /api/admin/users`` (``name``, ``role``, ``password``,
  ``must_change``); ``POST /api/admin/users/{name}/password`` (``password``,
  ``must_change``); ``POST /api/admin/users/{name}/disable`` and ``.../enable``.
- ``GET /api/admin/nodes``; ``POST /api/admin/nodes`` (``name``, ``ae_title``, ``host``,
  ``port``, ``allow``, ``tls``, ``cert_sha256``); ``PUT /api/admin/nodes/{name}`` (the same
  fields; recorded as the node removed and added again, as the command line would do it);
  ``DELETE /api/admin/nodes/{name}``; ``POST /api/admin/nodes/{name}/echo`` (C-ECHO: status
  and round-trip time).
- ``GET /api/admin/quarantine``; ``GET /api/admin/quarantine/{id}`` (with the findings);
  ``POST /api/admin/quarantine/{id}/release``; ``DELETE /api/admin/quarantine/{id}``.
- ``GET /api/admin/audit`` (filters ``type``, ``user``, ``outcome``, ``ae``, ``patient``,
  ``study``, ``since``, ``until``; paging ``limit`` and ``offset``; newest first);
  ``GET /api/admin/audit/types``; ``POST /api/admin/audit/verify`` (the hash chain).
- ``GET /api/admin/posture`` (what ``stockade check`` reports);
  ``GET /api/admin/statistics`` (patients, studies, series, instances, stored bytes,
  quarantined objects, free space).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from stockade.audit.events import BY_NAME, Actor
from stockade.auth.roles import Permission, Role
from stockade.auth.service import Principal, require
from stockade.auth.users import User
from stockade.dicom.uids import ae_title_problem
from stockade.errors import (
    ConfigError,
    Conflict,
    InvalidQuery,
    InvalidRequest,
    NotFound,
    StockadeError,
)
from stockade.index.base import Node
from stockade.security.posture import assess
from stockade.security.quarantine import QuarantineEntry
from stockade.web.app import actor_of, archive_of
from stockade.web.auth import principal_of
from stockade.web.body import json_object

if TYPE_CHECKING:
    from stockade.archive import Archive

PREFIX = "/api/admin"
#: Largest JSON body accepted.
MAX_BODY = 64 * 1024
#: Longest text field (other than passwords, which the policy bounds).
MAX_TEXT = 256
#: Longest wait for a C-ECHO from the "Test" button, in seconds.
ECHO_TIMEOUT = 10.0
#: Largest audit page, and how far back paging reaches.
MAX_PAGE = 500
MAX_OFFSET = 10_000
#: Records read when a filter is applied after reading (``outcome``) or ``since`` is given.
AUDIT_WINDOW = 5_000
OUTCOMES = frozenset({"success", "failure"})
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


# -- requests ------------------------------------------------------------------------------


async def body_of(request: Request) -> dict[str, Any]:
    """The request's JSON object, at most :data:`MAX_BODY` bytes (see
    :func:`stockade.web.body.json_object`)."""
    return await json_object(request, MAX_BODY)


def text_field(data: dict[str, Any], key: str, *, size: int = MAX_TEXT) -> str:
    """A required, non-empty string field of at most *size* characters."""
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{key} is missing or not a string")
    if len(value) > size:
        raise InvalidRequest(f"{key} is longer than {size} characters")
    if any(not c.isprintable() for c in value):
        raise InvalidRequest(f"{key} holds control characters")
    return value


def bool_field(data: dict[str, Any], key: str, default: bool = False) -> bool:
    """An optional boolean field."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false")
    return value


def check_host(host: str) -> str:
    """*host* if it is an IP address or a DNS host name (RFC 1123), else InvalidRequest."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise InvalidRequest("host must be an IP address or a host name (letters, digits, '-')")
    return host


def node_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a node (the arguments of :meth:`Archive.add_node`)."""
    from stockade.archive import SERVICES

    name = text_field(data, "name", size=64)
    if not _NODE_NAME.fullmatch(name):
        raise InvalidRequest("a node name is 1 to 64 letters, digits, '-' or '_'")
    ae_title = text_field(data, "ae_title", size=16)
    problem = ae_title_problem(ae_title)
    if problem:
        raise InvalidRequest(f"AE title {problem}")
    host = check_host(text_field(data, "host"))
    port = data.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequest("port must be a whole number from 1 to 65535")
    allow = data.get("allow", ["echo", "store"])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise InvalidRequest("allow must be a list of services")
    unknown = set(allow) - SERVICES
    if unknown:
        raise InvalidRequest(f"unknown service(s) {sorted(unknown)}; use {sorted(SERVICES)}")
    tls = bool_field(data, "tls")
    cert = data.get("cert_sha256") or None
    if cert is not None:
        if not isinstance(cert, str) or len(cert) > 100:
            raise InvalidRequest("cert_sha256 must be a SHA-256 fingerprint")
        cert = cert.replace(":", "").strip().lower()
        if not _HEX64.fullmatch(cert):
            raise InvalidRequest("a certificate fingerprint is 64 hexadecimal digits (SHA-256)")
        if not tls:
            raise InvalidRequest("a certificate fingerprint needs a DICOM TLS node")
    return {
        "name": name,
        "ae_title": ae_title.strip(),
        "host": host,
        "port": port,
        "allow": frozenset(allow),
        "tls": tls,
        "cert_sha256": cert,
    }


def _query(request: Request, key: str) -> str | None:
    value = request.query_params.get(key, "").strip()
    if not value:
        return None
    if len(value) > MAX_TEXT or any(not c.isprintable() for c in value):
        raise InvalidRequest(f"{key} is longer than {MAX_TEXT} characters or not text")
    return value


def _number(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key, "")
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{key} must be a whole number from {low} to {high}")
    return int(raw)


# -- running a change ------------------------------------------------------------------------


def _authorised(request: Request, permission: Permission) -> Principal:
    principal = principal_of(request)
    require(principal, permission)
    return principal


async def _run(call: Callable[[], T]) -> T:
    """Run *call* in a worker thread; a configuration error becomes a 400."""

    def guarded() -> T:
        try:
            return call()
        except ConfigError as exc:  # bad values found by the archive: the caller's mistake
            raise InvalidRequest(exc.reason) from None

    return await run_in_threadpool(guarded)


def _json(data: object, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status)


# -- answers ---------------------------------------------------------------------------------


def _when(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def user_json(user: User) -> dict[str, Any]:
    """What the page shows of a user (never the hash)."""
    return {
        "name": user.name,
        "role": user.role.value,
        "disabled": user.disabled,
        "must_change": user.must_change,
        "locked_until": _when(user.locked_until),
        "failed_logins": user.failed_logins,
        "scoped": user.scope is not None,
        "created_at": _when(user.created_at),
    }


def node_json(node: Node) -> dict[str, Any]:
    """A node as JSON."""
    return {
        "name": node.name,
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port,
        "allow": sorted(node.allow),
        "tls": node.tls,
        "cert_sha256": node.cert_sha256,
    }


def entry_json(entry: QuarantineEntry, *, findings: bool = True) -> dict[str, Any]:
    """A quarantined object's entry as JSON (the findings too, or only their kinds)."""
    data = asdict(entry)
    if not findings:
        data["findings"] = sorted({str(f.get("kind", "")) for f in entry.findings})
    return data


# -- users -----------------------------------------------------------------------------------


async def users_list(request: Request) -> Response:
    """``GET /api/admin/users``: every user."""
    _authorised(request, Permission.ADMIN)
    archive = archive_of(request)
    found = await run_in_threadpool(archive.users.list)
    return _json({"users": [user_json(u) for u in found], "roles": [r.value for r in Role]})


async def users_add(request: Request) -> Response:
    """``POST /api/admin/users``: create a user with a role and a password."""
    _authorised(request, Permission.ADMIN)
    data = await body_of(request)
    name = text_field(data, "name", size=64)
    role_text = text_field(data, "role", size=32)
    try:
        role = Role(role_text)
    except ValueError:
        raise InvalidRequest(f"role must be one of {[r.value for r in Role]}") from None
    password = text_field(data, "password", size=1024)
    must_change = bool_field(data, "must_change", default=True)
    archive, actor = archive_of(request), actor_of(request)
    user = await _run(
        lambda: archive.accounts.add(name, role, password, actor, must_change=must_change)
    )
    return _json(user_json(user), 201)


async def users_password(request: Request) -> Response:
    """``POST /api/admin/users/{name}/password``: set a user's password (ends its sessions)."""
    _authorised(request, Permission.ADMIN)
    name = request.path_params["name"]
    data = await body_of(request)
    password = text_field(data, "password", size=1024)
    must_change = bool_field(data, "must_change", default=True)
    archive, actor = archive_of(request), actor_of(request)
    await _run(
        lambda: archive.accounts.set_password(name, password, actor, must_change=must_change)
    )
    return _json(user_json(await run_in_threadpool(archive.users.get, name)))


async def users_role(request: Request) -> Response:
    """``POST /api/admin/users/{name}/role`` with ``{"role": ...}``: give a user another role
    (not one's own; the last administrator stays one)."""
    principal = _authorised(request, Permission.ADMIN)
    name = request.path_params["name"]
    data = await body_of(request)
    wanted = text_field(data, "role", size=32)
    try:
        role = Role(wanted)
    except ValueError:
        raise InvalidQuery(f"{wanted[:32]!r} is not a role") from None
    if name == principal.user:
        raise Conflict("you cannot change your own role")
    archive, actor = archive_of(request), actor_of(request)
    await _run(lambda: archive.accounts.set_role(name, role, actor))
    return _json(user_json(await run_in_threadpool(archive.users.get, name)))


def _disabler(disabled: bool) -> Callable[[Request], Any]:
    async def change(request: Request) -> Response:
        principal = _authorised(request, Permission.ADMIN)
        name = request.path_params["name"]
        if disabled and name == principal.user:
            raise Conflict("you cannot disable your own account")
        archive, actor = archive_of(request), actor_of(request)
        await _run(lambda: archive.accounts.set_disabled(name, disabled, actor))
        return _json(user_json(await run_in_threadpool(archive.users.get, name)))

    change.__doc__ = f"``POST /api/admin/users/{{name}}/{'disable' if disabled else 'enable'}``."
    return change


# -- nodes -----------------------------------------------------------------------------------


async def nodes_list(request: Request) -> Response:
    """``GET /api/admin/nodes``: the configured DICOM peers."""
    _authorised(request, Permission.ADMIN)
    archive = archive_of(request)
    found = await run_in_threadpool(archive.nodes)
    return _json({"nodes": [node_json(n) for n in found]})


def _add(archive: Archive, fields: dict[str, Any], actor: Actor, replacing: str = "") -> Node:
    """Add the node *fields* describe, or (*replacing*) put it in that node's place."""
    values = [fields[k] for k in ("name", "ae_title", "host", "port", "allow")]
    options = {"tls": fields["tls"], "cert_sha256": fields["cert_sha256"], "actor": actor}
    if replacing:
        return archive.edit_node(replacing, *values, **options)
    return archive.add_node(*values, **options)


async def nodes_add(request: Request) -> Response:
    """``POST /api/admin/nodes``: configure a DICOM peer."""
    _authorised(request, Permission.ADMIN)
    fields = node_fields(await body_of(request))
    archive, actor = archive_of(request), actor_of(request)

    def add() -> Node:
        if any(n.name == fields["name"] for n in archive.nodes()):
            raise Conflict(f"a node named {fields['name']} exists already")
        return _add(archive, fields, actor)

    return _json(node_json(await _run(add)), 201)


async def nodes_edit(request: Request) -> Response:
    """``PUT /api/admin/nodes/{name}``: change a peer (its name too), in one transaction and
    one ``NodeChanged`` record (action ``edit``)."""
    _authorised(request, Permission.ADMIN)
    old_name = request.path_params["name"]
    fields = node_fields(await body_of(request))
    archive, actor = archive_of(request), actor_of(request)

    def edit() -> Node:
        existing = {n.name for n in archive.nodes()}
        if old_name not in existing:
            raise NotFound(f"no node named {old_name[:64]!r}")
        if fields["name"] != old_name and fields["name"] in existing:
            raise Conflict(f"a node named {fields['name']} exists already")
        return _add(archive, fields, actor, replacing=old_name)

    return _json(node_json(await _run(edit)))


async def nodes_remove(request: Request) -> Response:
    """``DELETE /api/admin/nodes/{name}``: remove a peer."""
    _authorised(request, Permission.ADMIN)
    name = request.path_params["name"]
    archive, actor = archive_of(request), actor_of(request)
    if not await _run(lambda: archive.remove_node(name, actor=actor)):
        raise NotFound(f"no node named {name[:64]!r}")
    return Response(status_code=204)


def echo(archive: Archive, node: Node) -> dict[str, Any]:
    """C-ECHO *node* (PS3.7 9.1.5) as this archive's AE title: whether it answered Success,
    its status, the round-trip time in milliseconds, and why it failed."""
    from stockade.dimse.requestor import Proposal, connect
    from stockade.security.tls import dicom_client_context

    settings = archive.settings
    started = time.monotonic()
    result: dict[str, Any] = {"node": node.name, "ok": False, "status": None, "detail": ""}
    try:
        with connect(
            node.host,
            node.port,
            calling_ae=settings.dicom_ae_title,
            called_ae=node.ae_title,
            proposals=[Proposal("1.2.840.10008.1.1", ("1.2.840.10008.1.2",))],
            max_pdu=settings.max_pdu_size,
            max_object=settings.max_object_size,
            timeout=min(settings.dicom_acse_timeout, ECHO_TIMEOUT),
            tls=dicom_client_context(settings) if node.tls else None,
        ) as link:
            link.idle_timeout = min(settings.dicom_idle_timeout, ECHO_TIMEOUT)
            status = link.echo()
    except StockadeError as exc:
        result["detail"] = exc.reason
    else:
        result["status"] = status
        result["ok"] = status == 0
        result["detail"] = "success" if status == 0 else f"status {status:#06x}"
    result["milliseconds"] = round((time.monotonic() - started) * 1000, 1)
    return result


async def nodes_echo(request: Request) -> Response:
    """``POST /api/admin/nodes/{name}/echo``: test a peer with C-ECHO."""
    _authorised(request, Permission.ADMIN)
    archive = archive_of(request)
    node = await run_in_threadpool(archive.node, request.path_params["name"])
    return _json(await run_in_threadpool(echo, archive, node))


# -- quarantine ------------------------------------------------------------------------------


async def quarantine_list(request: Request) -> Response:
    """``GET /api/admin/quarantine``: objects held in quarantine, oldest first."""
    _authorised(request, Permission.ADMIN)
    archive = archive_of(request)
    entries = await run_in_threadpool(archive.quarantined)
    return _json({"entries": [entry_json(e, findings=False) for e in entries]})


async def quarantine_show(request: Request) -> Response:
    """``GET /api/admin/quarantine/{id}``: one entry with its findings."""
    _authorised(request, Permission.ADMIN)
    archive = archive_of(request)
    entry = await run_in_threadpool(archive.quarantine_entry, request.path_params["id"])
    return _json(entry_json(entry))


async def quarantine_release(request: Request) -> Response:
    """``POST /api/admin/quarantine/{id}/release``: store the object after all."""
    _authorised(request, Permission.ADMIN)
    archive, actor = archive_of(request), actor_of(request)
    qid = request.path_params["id"]
    result = await _run(lambda: archive.release(qid, actor=actor))
    return _json(
        {
            "id": qid,
            "outcome": result.outcome.value,
            "sop_instance_uid": result.sop_instance_uid,
            "study_instance_uid": result.study_instance_uid,
            "warnings": list(result.warnings),
        }
    )


async def quarantine_delete(request: Request) -> Response:
    """``DELETE /api/admin/quarantine/{id}``: delete a quarantined object for good."""
    _authorised(request, Permission.ADMIN)
    archive, actor = archive_of(request), actor_of(request)
    qid = request.path_params["id"]
    await _run(lambda: archive.discard_quarantined(qid, actor=actor))
    return Response(status_code=204)


# -- audit -----------------------------------------------------------------------------------


async def audit_list(request: Request) -> Response:
    """``GET /api/admin/audit``: audit records, newest first, filtered and paged.

    Filters: ``type`` (an event type), ``user``, ``outcome`` (success or failure), ``ae``,
    ``patient``, ``study``, ``since`` and ``until`` (ISO 8601; ``until`` excluded). Paging:
    ``limit`` (1 to 500, default 50) and ``offset``. The reading is audited itself.
    """
    _authorised(request, Permission.READ_AUDIT)
    event_type = _query(request, "type")
    if event_type is not None and event_type not in BY_NAME:
        raise InvalidRequest(f"unknown event type {event_type[:40]!r}")
    outcome = _query(request, "outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidRequest("outcome must be success or failure")
    limit = _number(request, "limit", 50, 1, MAX_PAGE)
    offset = _number(request, "offset", 0, 0, MAX_OFFSET)
    filters = {
        "event_type": event_type,
        "user": _query(request, "user"),
        "ae_title": _query(request, "ae"),
        "patient": _query(request, "patient"),
        "study": _query(request, "study"),
        "since": _query(request, "since"),
        "until": _query(request, "until"),
    }
    # Without since and a filter applied here, the newest offset+limit+1 are enough; else
    # a bounded window is read (the first from since, or the newest) and paged here.
    window = AUDIT_WINDOW if outcome or filters["since"] else offset + limit + 1
    archive, actor = archive_of(request), actor_of(request)
    found = await _run(lambda: archive.audit_records(actor=actor, limit=window, **filters))
    truncated = len(found) >= window and window == AUDIT_WINDOW
    found.reverse()
    if outcome:
        found = [r for r in found if r.get("outcome") == outcome]
    page = found[offset : offset + limit]
    return _json(
        {
            "records": page,
            "offset": offset,
            "limit": limit,
            "more": len(found) > offset + limit,
            "truncated": truncated,
        }
    )


async def audit_types(request: Request) -> Response:
    """``GET /api/admin/audit/types``: the event types, for the filter."""
    _authorised(request, Permission.READ_AUDIT)
    return _json({"types": sorted(BY_NAME)})


async def audit_verify(request: Request) -> Response:
    """``POST /api/admin/audit/verify``: check the audit trail's hash chain (audited)."""
    _authorised(request, Permission.READ_AUDIT)
    archive, actor = archive_of(request), actor_of(request)
    check = await _run(lambda: archive.audit_verify(actor=actor))
    return _json(
        {
            "ok": check.ok,
            "checked": check.checked,
            "broken": check.broken,
            "reason": check.reason,
        }
    )


# -- posture and statistics ------------------------------------------------------------------


async def posture(request: Request) -> Response:
    """``GET /api/admin/posture``: the security posture report of ``stockade check``
    (listeners, TLS, certificates and their expiry, risky settings, permissions)."""
    _authorised(request, Permission.ADMIN)
    archive = archive_of(request)

    def report() -> dict[str, Any]:
        return assess(
            archive.settings, nodes=archive.nodes(), has_users=archive.users.any_user()
        ).as_dict()

    return _json(await run_in_threadpool(report))


def statistics_of(archive: Archive) -> dict[str, Any]:
    """Counts of the index, the bytes stored, the quarantine, and the space left."""
    counts = archive.counts()
    data_dir = archive.settings.data_dir
    try:
        disk = shutil.disk_usage(data_dir)
        free: int | None = disk.free
        total: int | None = disk.total
    except OSError:
        free = total = None
    return {
        **counts,
        "stored_bytes": archive.stored_bytes(),
        "quarantined": len(archive.quarantined()),
        "disk_free_bytes": free,
        "disk_total_bytes": total,
    }


async def statistics(request: Request) -> Response:
    """``GET /api/admin/statistics``: storage and index statistics."""
    _authorised(request, Permission.ADMIN)
    return _json(await run_in_threadpool(statistics_of, archive_of(request)))


ROUTES: list[BaseRoute] = [
    Route(f"{PREFIX}/users", users_list, methods=["GET"]),
    Route(f"{PREFIX}/users", users_add, methods=["POST"]),
    Route(f"{PREFIX}/users/{{name}}/password", users_password, methods=["POST"]),
    Route(f"{PREFIX}/users/{{name}}/role", users_role, methods=["POST"]),
    Route(f"{PREFIX}/users/{{name}}/disable", _disabler(True), methods=["POST"]),
    Route(f"{PREFIX}/users/{{name}}/enable", _disabler(False), methods=["POST"]),
    Route(f"{PREFIX}/nodes", nodes_list, methods=["GET"]),
    Route(f"{PREFIX}/nodes", nodes_add, methods=["POST"]),
    Route(f"{PREFIX}/nodes/{{name}}", nodes_edit, methods=["PUT"]),
    Route(f"{PREFIX}/nodes/{{name}}", nodes_remove, methods=["DELETE"]),
    Route(f"{PREFIX}/nodes/{{name}}/echo", nodes_echo, methods=["POST"]),
    Route(f"{PREFIX}/quarantine", quarantine_list, methods=["GET"]),
    Route(f"{PREFIX}/quarantine/{{id}}", quarantine_show, methods=["GET"]),
    Route(f"{PREFIX}/quarantine/{{id}}", quarantine_delete, methods=["DELETE"]),
    Route(f"{PREFIX}/quarantine/{{id}}/release", quarantine_release, methods=["POST"]),
    Route(f"{PREFIX}/audit", audit_list, methods=["GET"]),
    Route(f"{PREFIX}/audit/types", audit_types, methods=["GET"]),
    Route(f"{PREFIX}/audit/verify", audit_verify, methods=["POST"]),
    Route(f"{PREFIX}/posture", posture, methods=["GET"]),
    Route(f"{PREFIX}/statistics", statistics, methods=["GET"]),
]
"""The administration routes (each checks its permission first)."""
