"""The ``stockade`` command line: serve, import, verify, node, settings.

A thin adapter: it parses arguments, calls the :class:`~stockade.archive.Archive`, and turns
errors into messages and exit codes (0 success, 1 something was refused or found wrong, 2 bad
usage or configuration).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stockade import __version__, cli_audit, cli_security, cli_tls, cli_users, cli_viewer
from stockade.app import build_archive, configure_logging
from stockade.archive import Archive
from stockade.dicom.attributes import Level
from stockade.errors import ConfigError, StockadeError
from stockade.ingest import Origin
from stockade.settings import DECLARED, Settings, load, markdown
from stockade.walk import items, walk

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Stockade: a DICOM archive you can trust.",
        epilog="Settings (also STOCKADE_<NAME> variables or a --config TOML file): "
        + ", ".join(d.name for d in DECLARED),
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the archive (DIMSE listener)")
    imp = sub.add_parser("import", help="store DICOM files, folders (recursively) and ZIPs")
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("verify", help="re-hash every stored object; check index and storage agree")
    node = sub.add_parser("node", help="manage DICOM peers")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    add = node_sub.add_parser("add", help="add a peer")
    add.add_argument("name")
    add.add_argument("--ae", required=True, help="the peer's AE title")
    add.add_argument("--host", required=True, help="the peer's IP address or host name")
    add.add_argument("--port", required=True, type=int, help="the peer's DIMSE port")
    add.add_argument(
        "--allow",
        default="echo,store",
        help="services the peer may use: echo,store,find,get,move (default echo,store)",
    )
    add.add_argument(
        "--tls",
        action="store_true",
        help="the peer talks DICOM TLS: connect to it with TLS, admit it over TLS only",
    )
    add.add_argument(
        "--cert-sha256",
        metavar="HEX",
        help="SHA-256 of the client certificate the peer must present (needs --tls): binds "
        "that certificate to its AE title",
    )
    node_sub.add_parser("list", help="list peers")
    rm = node_sub.add_parser("remove", help="remove a peer")
    rm.add_argument("name")
    send = sub.add_parser("send", help="send stored instances to a node (C-STORE)")
    send.add_argument("node", help="name of a configured node")
    _retrieve_keys(send)
    qry = sub.add_parser("query", help="query a node (C-FIND)")
    qry.add_argument("node", help="name of a configured node")
    qry.add_argument(
        "--level", default="STUDY", choices=[lv.value for lv in Level], help="query level"
    )
    qry.add_argument("--model", default="study", choices=["study", "patient"])
    qry.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="KEYWORD=VALUE",
        help="a matching or return key (repeatable), e.g. -k PatientName='DOE*' -k StudyDate=",
    )
    qry.add_argument("--limit", type=int, default=1000, help="stop after this many matches")
    qry.add_argument("--json", action="store_true", help="one JSON object per line")
    ret = sub.add_parser(
        "retrieve", help="retrieve from a node into this archive (C-GET or C-MOVE)"
    )
    ret.add_argument("node", help="name of a configured node")
    _retrieve_keys(ret)
    ret.add_argument(
        "--method",
        default="get",
        choices=["get", "move"],
        help="get: the node sends on our association (default); move: the node sends to "
        "this archive's DIMSE listener, which must be running and admit the node",
    )
    ret.add_argument("--model", default="study", choices=["study", "patient"])
    cli_security.add_commands(sub)
    cli_audit.add_commands(sub)
    cli_tls.add_commands(sub)
    cli_users.add_commands(sub)
    cli_viewer.add_commands(sub)
    st = sub.add_parser("settings", help="show the settings in force")
    st.add_argument("--markdown", action="store_true", help="print the settings reference")
    return parser


def _retrieve_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="Study Instance UID")
    parser.add_argument("--series", help="Series Instance UID (send or retrieve one series)")
    parser.add_argument("--instance", help="SOP Instance UID (one instance; needs --series)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stockade`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "settings" and args.markdown:
            sys.stdout.write(markdown())
            return 0
        settings = load(args.config)
        configure_logging(settings.log_level)
        if args.command == "serve":
            from stockade.dimse.workers import serve

            return serve(settings, args.config)
        if args.command == "scan":
            return cli_security.scan(settings, args)
        if args.command in cli_tls.COMMANDS:
            return cli_tls.run(settings, args)
        if args.command in cli_viewer.COMMANDS:
            return cli_viewer.run(settings, args)
        if args.command == "settings":
            for name, value in settings.as_dict().items():
                out.print(f"{name} = {value!s}")
            return 0
        archive = build_archive(settings)
        try:
            archive.prepare()
            if args.command == "import":
                return _import(archive, settings, args.paths, quiet=args.quiet)
            if args.command == "verify":
                return _verify(archive)
            if args.command == "send":
                return _send(archive, args)
            if args.command == "query":
                return _query(archive, args)
            if args.command == "retrieve":
                return _retrieve(archive, args)
            if args.command == "quarantine":
                return cli_security.quarantine(archive, args)
            if args.command == "user":
                return cli_users.user(archive, args)
            if args.command == "token":
                return cli_users.token(archive, args)
            if args.command in cli_audit.COMMANDS:
                return cli_audit.run(archive, args)
            return _node(archive, args)
        finally:
            archive.close()
    except ConfigError as exc:
        err.print(f"stockade: {exc.reason}")
        return 2
    except StockadeError as exc:
        err.print(f"stockade: {exc.reason}")
        return 1


# -- import ------------------------------------------------------------------------------


def _progress(label: str, *, quiet: bool = False) -> Progress:
    """A progress bar on standard error, shown only on a terminal."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
    )


def _import(archive: Archive, settings: Settings, paths: list[Path], *, quiet: bool) -> int:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {missing[0]}")
    total = sum(1 for _ in walk(paths))
    tally: Counter[str] = Counter()
    rejected: list[tuple[str, str]] = []
    logging.getLogger("stockade.ingest").setLevel(logging.ERROR)
    origin = Origin(via="import", user=os.environ.get("USER"))
    progress = _progress("importing", quiet=quiet)
    with progress:
        task = progress.add_task("import", total=total)
        last = ""
        for label, item in items(paths, settings.max_object_size):
            top = label.split("!", 1)[0]
            if top != last:
                progress.advance(task)
                last = top
            if isinstance(item, StockadeError):
                rejected.append((label, item.reason))
                continue
            try:
                result = archive.store_file(item, origin)
            except StockadeError as exc:
                rejected.append((label, exc.reason))
                continue
            tally[result.outcome.value] += 1
    for label, reason in rejected:
        err.print(f"rejected {label}: {reason}", markup=False)
    out.print(
        f"stored {tally['stored'] + tally['replaced']}, duplicate {tally['duplicate']}, "
        f"rejected {len(rejected)}"
    )
    return 1 if rejected else 0


# -- verify, nodes -----------------------------------------------------------------------


def _verify(archive: Archive) -> int:
    total = archive.counts()["instances"]
    progress = _progress("verifying")
    with progress:
        task = progress.add_task("verify", total=total)
        report = archive.verify(lambda n: progress.advance(task, n))
    for problem in report.problems:
        err.print(f"problem: {problem}", markup=False)
    out.print(
        f"verified {report.checked} instances: "
        + ("all intact" if report.ok else f"{len(report.problems)} problem(s)")
    )
    return 0 if report.ok else 1


def _node(archive: Archive, args: argparse.Namespace) -> int:
    if args.node_command == "add":
        allow = frozenset(a.strip() for a in args.allow.split(",") if a.strip())
        node = archive.add_node(
            args.name,
            args.ae,
            args.host,
            args.port,
            allow,
            tls=args.tls,
            cert_sha256=args.cert_sha256,
        )
        out.print(
            f"added node {node.name}: {node.ae_title} at {node.host}:{node.port} "
            f"allowed {','.join(sorted(node.allow)) or 'nothing'}"
            + (" over DICOM TLS" if node.tls else ""),
            markup=False,
        )
        return 0
    if args.node_command == "remove":
        if archive.remove_node(args.name):
            out.print(f"removed node {args.name}", markup=False)
            return 0
        err.print(f"stockade: no node named {args.name!r}", markup=False)
        return 1
    for node in archive.nodes():
        out.print(
            f"{node.name}\t{node.ae_title}\t{node.host}\t{node.port}\t"
            f"{','.join(sorted(node.allow))}" + ("\ttls" if node.tls else ""),
            markup=False,
        )
    return 0


# -- send, query, retrieve ---------------------------------------------------------------


def _target(args: argparse.Namespace) -> tuple[Level, dict[str, str | None]]:
    """The retrieve level and unique keys of --study / --series / --instance."""
    if args.instance and not args.series:
        raise ConfigError("--instance needs --series")
    values: dict[str, str | None] = {"StudyInstanceUID": args.study}
    level = Level.STUDY
    if args.series:
        values["SeriesInstanceUID"] = args.series
        level = Level.SERIES
    if args.instance:
        values["SOPInstanceUID"] = args.instance
        level = Level.IMAGE
    return level, values


def _send(archive: Archive, args: argparse.Namespace) -> int:
    from stockade.dimse.requestor import AssociationFailed
    from stockade.dimse.retrieve import send_to_node

    node = archive.node(args.node)
    level, values = _target(args)
    retrieval = archive.retrieve(level, values, service="send", destination=node.ae_title)
    if not retrieval.instances:
        retrieval.finish()
        err.print("stockade: nothing stored matches", markup=False)
        return 1
    progress = _progress("sending")
    with progress:
        task = progress.add_task("send", total=len(retrieval.instances))
        try:
            send_to_node(
                archive,
                retrieval,
                node.host,
                node.port,
                node.ae_title,
                pending=lambda r: progress.update(task, completed=len(r.instances) - r.remaining),
            )
        except AssociationFailed as exc:
            retrieval.fail_rest(exc.reason)
        finally:
            retrieval.finish()
    for reason in retrieval.reasons:
        err.print(f"failed {reason}", markup=False)
    out.print(
        f"sent {retrieval.completed}, warning {retrieval.warning}, failed {len(retrieval.failed)}"
        f" to {node.name} ({node.ae_title})",
        markup=False,
    )
    return 1 if retrieval.failed else 0


def _query(archive: Archive, args: argparse.Namespace) -> int:
    import json

    from stockade.dimse.scu import query

    node = archive.node(args.node)
    keys: dict[str, str] = {}
    for item in args.key:
        keyword, sep, value = item.partition("=")
        if not sep or not keyword.strip():
            raise ConfigError(f"-k takes KEYWORD=VALUE, not {item[:64]!r}")
        keys[keyword.strip()] = value
    rows, status, cut = query(
        archive, node, Level(args.level), keys, model=args.model, limit=max(1, args.limit)
    )
    if args.json:
        for row in rows:
            out.print(json.dumps(row, ensure_ascii=False), markup=False)
    elif rows:
        names = list(rows[0])
        out.print("\t".join(names), markup=False)
        for row in rows:
            out.print("\t".join(row[n] for n in names), markup=False)
    note = f" (stopped at --limit {args.limit})" if cut else ""
    err.print(f"{len(rows)} match(es), final status {status:#06x}{note}", markup=False)
    return 0 if status in (0x0000, 0xFE00) else 1


def _retrieve(archive: Archive, args: argparse.Namespace) -> int:
    from stockade.archive import Peer
    from stockade.dimse.scu import retrieve_get, retrieve_move

    node = archive.node(args.node)
    level, values = _target(args)
    keys = {k: str(v) for k, v in values.items() if v}
    if args.method == "move":
        report = retrieve_move(archive, node, level, keys, model=args.model)
    else:
        peer = Peer(node.ae_title, node.host, node.name, frozenset({"store"}))
        report = retrieve_get(archive, node, peer, level, keys, model=args.model)
    for reason in report.rejected[:20]:
        err.print(f"rejected: {reason}", markup=False)
    if report.comment:
        err.print(f"{node.name}: {report.comment}", markup=False)
    out.print(
        f"retrieved {report.completed}, warning {report.warning}, failed {report.failed} "
        f"from {node.name} (final status {report.status:#06x})",
        markup=False,
    )
    ok = report.status == 0x0000 and not report.rejected
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
