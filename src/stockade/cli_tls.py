"""``stockade certs`` and ``stockade check``: transport security and posture on the CLI.

A thin adapter like :mod:`stockade.cli`: ``certs init`` and ``certs client`` call
:mod:`stockade.security.certs` (no archive needed); ``check`` reads the configured nodes from
the archive and prints :func:`stockade.security.posture.assess`; it exits 1 on a critical
finding.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex

from rich.console import Console
from rich.markup import escape

from stockade.app import build_archive
from stockade.errors import StockadeError
from stockade.index.base import Node
from stockade.security import certs
from stockade.security.posture import CRITICAL, WARNING, Report, archive_has_users, assess
from stockade.settings import Settings

log = logging.getLogger(__name__)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

#: The top-level commands this module handles.
COMMANDS = frozenset({"certs", "check"})


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs`` and ``check`` to the ``stockade`` parser."""
    c = sub.add_parser("certs", help="a local CA and certificates for DICOM TLS and HTTPS")
    c_sub = c.add_subparsers(dest="certs_command", required=True)
    init = c_sub.add_parser(
        "init", help="create a local CA and a server certificate under <data_dir>/tls/"
    )
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address peers use to reach this archive (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    init.add_argument(
        "--days", type=int, default=certs.DEFAULT_DAYS, help="validity of the server certificate"
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    client = c_sub.add_parser("client", help="issue a client certificate from the local CA")
    client.add_argument("name", help="the client's name (letters, digits, '-', '_')")
    client.add_argument("--days", type=int, default=certs.DEFAULT_DAYS, help="validity")
    client.add_argument("--force", action="store_true", help="replace an existing certificate")
    check = sub.add_parser(
        "check",
        help="security posture report (listeners, TLS, certificates, weak settings, "
        "permissions); exit 1 on a critical finding",
    )
    check.add_argument("--json", action="store_true", help="the report as one JSON object")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``certs`` or ``check``."""
    if args.command == "check":
        return check(settings, as_json=args.json)
    if args.certs_command == "init":
        return _init(settings, args)
    return _client(settings, args)


def _init(settings: Settings, args: argparse.Namespace) -> int:
    issued = certs.init(settings.data_dir, args.host, days=args.days, force=args.force)
    folder = issued.cert.parent
    out.print(f"local CA:           {issued.ca}  (give this file to peers and clients)")
    out.print(f"server certificate: {issued.cert}  (valid until {issued.not_after:%Y-%m-%d})")
    out.print(f"server key:         {issued.key}  (mode 0600)")
    out.print(f"names:              {', '.join(issued.names)}")
    out.print("\nSettings for the TOML file (--config):\n")
    lines = [
        ("dicom_tls_cert_file", str(issued.cert)),
        ("dicom_tls_key_file", str(issued.key)),
        ("http_tls_cert_file", str(issued.cert)),
        ("http_tls_key_file", str(issued.key)),
    ]
    for name, value in lines:
        out.print(f"{name} = {json.dumps(value)}", markup=False)
    out.print(
        "\nFor mutual TLS on DICOM TLS, also: dicom_tls_client_ca_file = "
        f"{json.dumps(str(issued.ca))} (then: stockade certs client NAME)",
        markup=False,
    )
    out.print("\nOr as environment variables:\n")
    for name, value in lines:
        out.print(f"STOCKADE_{name.upper()}={shlex.quote(value)}", markup=False)
    log.debug("certificates written to %s", folder)
    return 0


def _client(settings: Settings, args: argparse.Namespace) -> int:
    issued = certs.issue_client(settings.data_dir, args.name, days=args.days, force=args.force)
    out.print(f"client certificate: {issued.cert}  (valid until {issued.not_after:%Y-%m-%d})")
    out.print(f"client key:         {issued.key}  (mode 0600)")
    out.print(f"CA to trust:        {issued.ca}")
    out.print(
        "\nDCMTK: echoscu --enable-tls "
        f"{shlex.quote(str(issued.key))} {shlex.quote(str(issued.cert))} "
        f"--add-cert-file {shlex.quote(str(issued.ca))} HOST {settings.dicom_tls_port}",
        markup=False,
    )
    return 0


def _nodes(settings: Settings) -> list[Node] | None:
    try:
        archive = build_archive(settings)
    except (StockadeError, OSError) as exc:
        log.warning("cannot open the archive: %s", exc)
        return None
    try:
        archive.index.migrate()
        return archive.nodes()
    except Exception as exc:  # noqa: BLE001 - the report says the index could not be read
        log.warning("cannot read the nodes: %s", exc)
        return None
    finally:
        archive.close()


def check(settings: Settings, *, as_json: bool = False) -> int:
    """Print the security posture report; 1 on a critical finding, else 0."""
    nodes = _nodes(settings)
    try:
        users = archive_has_users(settings)
    except Exception as exc:  # noqa: BLE001 - an unreadable user table counts as no users
        log.warning("cannot tell whether users exist: %s", exc)
        users = False
    report = assess(settings, nodes=nodes, has_users=users)
    if as_json:
        out.print(json.dumps(report.as_dict(), indent=2), markup=False)
    else:
        _print(report)
    return 1 if report.critical else 0


_STYLE = {CRITICAL: "bold red", WARNING: "yellow"}


def _print(report: Report) -> None:
    out.print("[bold]Listeners[/bold]")
    for x in report.listeners:
        where = f"[{x.host}]:{x.port}" if ":" in x.host else f"{x.host}:{x.port}"
        state = "encrypted (TLS)" if x.encrypted else "NOT encrypted"
        scope = "loopback only" if x.loopback else "reachable from the network"
        extra = f", {x.detail}" if x.detail else ""
        out.print(f"  {x.name:<10} {escape(where):<24} {state}, {scope}{escape(extra)}")
    if report.certificates:
        out.print("[bold]Certificates[/bold]")
        for c in report.certificates:
            out.print(
                f"  {escape(c['setting'])}: {escape(c['path'])} ({escape(c['subject'])}), "
                f"until {c['not_after'][:10]}, {c['days_left']} days left"
            )
    out.print("[bold]Findings[/bold]")
    for f in report.sorted_findings():
        style = _STYLE.get(f.severity)
        label = (
            f"[{style}]{f.severity.upper():<8}[/{style}]" if style else f"{f.severity.upper():<8}"
        )
        setting = escape(f" [setting: {f.setting}]") if f.setting else ""
        out.print(f"  {label} {escape(f.topic)}: {escape(f.message)}{setting}")
    counts = {s: sum(1 for f in report.findings if f.severity == s) for s in (CRITICAL, WARNING)}
    verdict = "critical findings: not safe to serve" if report.critical else "no critical finding"
    out.print(f"{counts[CRITICAL]} critical, {counts[WARNING]} warning(s): {verdict}")
