"""The ``Archive`` facade: the only thing adapters (DIMSE, web, CLI) talk to.

It owns the blob store, the index and the audit sink, and offers the operations of the
archive: store, verify, peer (node) management and the association admission policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from stockade import metacache
from stockade.audit.events import (
    Actor,
    ApplicationActivity,
    AssociationRejected,
    AuditEvent,
    AuditLogUsed,
    InstancesDeleted,
    IntegrityChecked,
    NodeChanged,
    QuarantineChanged,
    QueryPerformed,
    UserLogin,
)
from stockade.audit.sink import AuditSink, Exporter
from stockade.audit.trail import AuditTrail, TrailCheck
from stockade.auth.admin import Accounts
from stockade.auth.service import Authenticator
from stockade.auth.users import UserStore
from stockade.dicom.attributes import Level
from stockade.dicom.sandbox import Decoder, open_decoder
from stockade.dicom.uids import ae_title_problem, uid_problem
from stockade.errors import (
    ConfigError,
    IntegrityError,
    InvalidQuery,
    NotAuthenticated,
    NotAuthorized,
    NotFound,
    StockadeError,
    StorageFailure,
    TooManyMatches,
)
from stockade.index.base import Index, Node, StoredInstance
from stockade.ingest import Buffer, Ingest, Origin, Prepared, Receiving, StoreResult
from stockade.query import Found, Scope, build
from stockade.retrieve import Retrieval, refused, retrieve_query
from stockade.security.quarantine import QuarantineEntry
from stockade.settings import Settings, is_loopback
from stockade.storage.base import BlobStore, RecoveryReport

log = logging.getLogger(__name__)

__all__ = ["SERVICES", "Archive", "Node", "Peer", "VerifyReport"]

#: DIMSE services a node may be allowed to use.
SERVICES = frozenset({"echo", "store", "find", "get", "move"})


@dataclass(frozen=True)
class Peer:
    """An admitted association's peer: the node it matched, or an open loopback peer."""

    ae_title: str
    address: str
    node: str | None
    allow: frozenset[str]
    #: The Stockade user of its User Identity negotiation (PS3.7 D.3.3.7), if any.
    user: str | None = None

    def check(self, service: str) -> None:
        """Raise NotAuthorized unless the peer may use *service*."""
        if service not in self.allow:
            raise NotAuthorized(f"node {self.node} is not allowed to {service}")


@dataclass
class VerifyReport:
    """Outcome of :meth:`Archive.verify`."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if index and storage agree and every hash matched."""
        return not self.problems


def _node(
    name: str,
    ae_title: str,
    host: str,
    port: int,
    allow: frozenset[str],
    tls: bool,
    cert_sha256: str | None,
) -> Node:
    """A checked :class:`Node` (a peer's configuration).

    Raises
    ------
    ConfigError
        A value is not acceptable.
    """
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError("node name must be 1 to 64 letters, digits, '-' or '_'")
    problem = ae_title_problem(ae_title)
    if problem:
        raise ConfigError(f"AE title {problem}")
    if not 1 <= port <= 65535:
        raise ConfigError("port must be from 1 to 65535")
    if not host or len(host) > 253 or any(c.isspace() for c in host):
        raise ConfigError("host must be an IP address or a host name")
    unknown = allow - SERVICES
    if unknown:
        raise ConfigError(f"unknown service(s) {sorted(unknown)}; use {sorted(SERVICES)}")
    if cert_sha256 is not None:
        cert_sha256 = cert_sha256.replace(":", "").strip().lower()
        if len(cert_sha256) != 64 or any(c not in "0123456789abcdef" for c in cert_sha256):
            raise ConfigError("a certificate fingerprint is 64 hexadecimal digits (SHA-256)")
        if not tls:
            raise ConfigError("a certificate fingerprint needs a DICOM TLS node (--tls)")
    return Node(name, ae_title, host, port, allow, tls, cert_sha256)


def _actor_of(peer: Peer | None, via: str) -> Actor:
    """The audit actor of a DIMSE peer, or of *via* (this process, the CLI) without one."""
    if peer is None:
        return Actor(via=via)
    return Actor(ae_title=peer.ae_title, address=peer.address, user=peer.user, via="dimse")


def local_actor() -> Actor:
    """The audit actor of a command run on this machine: its operating-system account."""
    try:
        user = getpass.getuser()[:64]
    except (KeyError, OSError):  # no name for this uid
        user = f"uid:{os.getuid()}"
    return Actor(via="cli", user=user)


def _addresses(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos}


def _normal(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


class Archive:
    """The facade over storage, index and audit."""

    def __init__(
        self,
        settings: Settings,
        store: BlobStore,
        index: Index,
        audit: AuditSink,
        *,
        exporter: Exporter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.audit_sink = audit
        #: Sends the audit trail to a collector; runs in the process that serves.
        self.exporter = exporter
        self.ingest = Ingest(settings, store, index, audit)
        #: Where pixel data is decoded and encoded: decoder processes, started when first
        #: needed and stopped by :meth:`close` (threat model SR-13).
        self.decoder: Decoder = open_decoder(settings)
        #: Users, tokens and sessions (in the index database), who is calling, and the
        #: administration of accounts (threat model SR-7, SR-16).
        self.users = UserStore(index.engine)
        self.auth = Authenticator(settings, self.users, self.audit)
        self.accounts = Accounts(self.users, self.audit, settings.data_dir)

    # -- life cycle ------------------------------------------------------------------------

    def prepare(self) -> RecoveryReport:
        """Migrate the index and repair what a crash left (run before serving)."""
        self.index.migrate()
        self._check_journal()
        report = self.store.recover(self.index.is_blob_indexed)
        for key in self.index.queued_deletions():
            if not self.index.is_blob_indexed(key):
                self.store.delete(key)
            self.index.forget_deletion(key)
        if report.published or report.discarded:
            log.info(
                "recovery: %d staged objects published, %d unacknowledged discarded",
                report.published,
                report.discarded,
            )
        return report

    def _check_journal(self) -> None:
        """Remove index rows of dead processes whose blob never reached the disk.

        Such a row committed while its blob was being synced, and its instance was not
        acknowledged (that waits for both); every other entry is simply dropped.
        """
        done, lost = [], 0
        for entry in self.index.staging_journal():
            state = self.store.check_staged(entry.area, entry.token, entry.sha256)
            if state is None:
                continue  # its process is alive
            if state is False and entry.sop_instance_uid:
                self.index.forget_instance(entry.sop_instance_uid)
                lost += 1
            done.append(entry.token)
        if done:
            self.index.drop_journal(done)
        if lost:
            log.warning(
                "recovery: %d unacknowledged instances removed from the index: their data "
                "never reached the disk",
                lost,
            )

    def close(self) -> None:
        """Release resources (the decoder processes too); the audit sink is flushed while
        the index is still open."""
        if self.exporter is not None:
            self.exporter.close()
        self.decoder.close()
        self.audit_sink.close()
        self.store.close()
        self.index.close()

    def audit(self, event: AuditEvent) -> None:
        """Emit an audit event."""
        self.audit_sink.emit(event)

    def started(self, via: str) -> None:
        """Record that the archive started serving; start exporting the audit trail (one
        process of a serving archive calls this)."""
        self.audit(ApplicationActivity(actor=Actor(via=via), action="start"))
        if self.exporter is not None:
            self.exporter.start()

    def stopped(self, via: str) -> None:
        """Record that the archive stopped serving."""
        self.audit(ApplicationActivity(actor=Actor(via=via), action="stop"))

    # -- storing ---------------------------------------------------------------------------

    def store_dimse(
        self,
        dataset: Buffer,
        transfer_syntax: str,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        peer: Peer,
        abstract_syntax: str | None = None,
        dropped: int = 0,
        receiving: Receiving | None = None,
    ) -> StoreResult:
        """Store a C-STORE data set (PS3.4 B.2.2) from an admitted peer.

        *receiving* is what :meth:`receive_dimse` returned for this data set, if anything.
        """
        try:
            peer.check("store")
        except NotAuthorized:
            if receiving is not None:
                receiving.abort()
            raise
        origin = Origin(via="dimse", ae_title=peer.ae_title, address=peer.address, user=peer.user)
        return self.ingest.from_dimse(
            dataset,
            transfer_syntax,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            origin=origin,
            abstract_syntax=abstract_syntax,
            dropped=dropped,
            receiving=receiving,
        )

    def receive_dimse(
        self, transfer_syntax: str, *, sop_class_uid: str, sop_instance_uid: str, peer: Peer
    ) -> Receiving | None:
        """Stage a C-STORE data set while it arrives (then pass it to :meth:`store_dimse`).

        None when the peer may not store or the request is already known to be refused.
        """
        if "store" not in peer.allow:
            return None
        origin = Origin(via="dimse", ae_title=peer.ae_title, address=peer.address, user=peer.user)
        return self.ingest.receive(
            transfer_syntax,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            origin=origin,
        )

    def store_file(self, data: Buffer, origin: Origin) -> StoreResult:
        """Store a Part 10 file (import, and later upload and STOW-RS)."""
        return self.ingest.from_file(data, origin)

    def prepare_file(self, data: Buffer, origin: Origin) -> Prepared:
        """Check and stage a Part 10 file durably without recording it yet (a refusal is
        raised, and audited); :meth:`finish_files` then records several at once (STOW-RS:
        the parts of one request share index transactions). Not acknowledged before."""
        return self.ingest.prepare_file(data, origin)

    def finish_files(self, prepared: Sequence[Prepared]) -> list[StoreResult | StockadeError]:
        """Record, publish and audit prepared files (see :meth:`Ingest.finish`): each
        result is the stored instance or the error that refused it."""
        return self.ingest.finish(prepared)

    # -- querying --------------------------------------------------------------------------

    def query(
        self,
        level: Level,
        values: Mapping[str, str | None],
        *,
        peer: Peer | None = None,
        actor: Actor | None = None,
        return_keys: Iterable[str] = (),
        limit: int | None = None,
        offset: int = 0,
        scope: Scope | None = None,
        order: Iterable[tuple[str, bool]] = (),
    ) -> Found:
        """Find entities at *level* whose attributes match *values* (PS3.4 C.2.2.2).

        The one query path of C-FIND and QIDO-RS; at most ``query_max_results``
        matches, fewer if *limit* says so. *actor* names the caller for the audit record
        when it is not a DIMSE *peer* (a web client); *scope* limits what it may see (in
        the SQL of the query, threat model SR-16).

        Raises
        ------
        InvalidQuery
            A value no matching rule accepts.
        NotAuthorized
            The peer may not query.
        """
        actor = actor or _actor_of(peer, "internal")
        keys = {k: str(v)[:256] for k, v in values.items() if v}
        try:
            if peer is not None:
                peer.check("find")
            cap = self.settings.query_max_results
            query = build(
                level,
                values,
                return_keys=return_keys,
                limit=cap if limit is None else min(limit, cap),
                offset=offset,
                case_sensitive_names=self.settings.query_case_sensitive_names,
                scope=scope,
                order=order,
            )
            found = self.index.find(query)
        except StockadeError as exc:
            self.audit(
                QueryPerformed(
                    actor=actor,
                    outcome="failure",
                    level=str(level),
                    keys=keys,
                    matches=0,
                    reason=exc.reason,
                )
            )
            raise
        self.audit(
            QueryPerformed(
                actor=actor,
                level=str(level),
                keys=keys,
                matches=len(found.rows),
                truncated=found.more,
            )
        )
        return found

    # -- retrieving -----------------------------------------------------------------------

    def retrieve(
        self,
        level: Level,
        values: Mapping[str, str | None],
        *,
        service: str,
        peer: Peer | None = None,
        destination: str | None = None,
        actor: Actor | None = None,
        scope: Scope | None = None,
    ) -> Retrieval:
        """Locate what a retrieve sends (PS3.4 C.4.2.2.1): the one retrieve path of C-GET,
        C-MOVE, ``stockade send`` and WADO. *service* is ``get``, ``move``, ``send`` or
        ``wado``; *actor* names a caller that is not a DIMSE *peer*.

        Raises
        ------
        NotAuthorized
            The peer may not use *service*.
        InvalidQuery
            The identifier lacks the level's unique key, or holds a wildcard in one.
        TooManyMatches
            More than ``retrieve_max_instances`` instances.
        """
        actor = actor or _actor_of(peer, "cli")
        keys = {k: str(v)[:256] for k, v in values.items() if v}
        try:
            if peer is not None:
                peer.check(service)
            cap = self.settings.retrieve_max_instances
            located = self.index.locate(retrieve_query(level, values, limit=cap, scope=scope))
            if len(located) > cap:
                raise TooManyMatches(
                    f"more than {cap} instances (retrieve_max_instances); retrieve series by series"
                )
        except StockadeError as exc:
            refused(self, actor, service, destination, str(level), keys, exc)
            raise
        return Retrieval(self, located, actor, service, destination, str(level), keys)

    def node_by_ae(self, ae_title: str) -> Node | None:
        """The configured node with this AE title (a C-MOVE destination), if any."""
        wanted = ae_title.strip()
        for node in self.index.nodes():
            if node.ae_title == wanted:
                return node
        return None

    def node(self, name: str) -> Node:
        """The configured node called *name*.

        Raises
        ------
        NotFound
            No node has that name.
        """
        for node in self.index.nodes():
            if node.name == name:
                return node
        raise NotFound(f"no node named {name[:64]!r} (see: stockade node list)")

    # -- association admission -------------------------------------------------------------

    def admit(
        self,
        calling_ae: str,
        called_ae: str,
        address: str,
        *,
        tls: bool = False,
        identity: tuple[int, bytes, bytes] | None = None,
        cert_sha256: str | None = None,
    ) -> Peer:
        """Decide whether a DIMSE association may proceed (threat model SR-16).

        An unknown calling AE is admitted only while the listener is on loopback and no node
        is configured; otherwise the calling AE title and the peer's address must match a
        configured node. A node marked ``tls`` is admitted only when the association came
        over the DICOM TLS listener (*tls*), and a node with a certificate fingerprint only
        when the client certificate presented in the handshake (*cert_sha256*) is that
        one. With ``dicom_user_identity`` set, the
        association must also carry a User Identity (PS3.7 D.3.3.7, *identity*: type,
        primary and secondary field) naming an enabled Stockade user: a user name alone
        (type 1, setting ``username``) or with its password as passcode (type 2, required
        by ``passcode``); it is the peer's user in the audit trail.

        Raises
        ------
        NotAuthorized
            With the reason, which is logged and audited here.
        """
        reason = None
        peer = None
        problem = ae_title_problem(calling_ae)
        if problem:
            reason = f"calling AE title {calling_ae[:32]!r} {problem}"
        elif called_ae.strip() != self.settings.dicom_ae_title.strip():
            reason = f"called AE title {called_ae.strip()[:16]!r} is not this archive's"
        else:
            nodes = self.index.nodes()
            if not nodes and self.settings.dicom_on_loopback and is_loopback(_normal(address)):
                peer = Peer(calling_ae.strip(), address, None, SERVICES)
            else:
                normal = _normal(address)
                for node in nodes:
                    if node.ae_title == calling_ae.strip() and normal in {
                        _normal(a) for a in _addresses(node.host)
                    }:
                        if node.tls and not tls:
                            reason = (
                                f"node {node.name} must use DICOM TLS (port "
                                f"{self.settings.dicom_tls_port}), not plain DIMSE"
                            )
                        elif node.cert_sha256 and node.cert_sha256 != cert_sha256:
                            reason = (
                                f"node {node.name} presented another client certificate "
                                "than the one bound to its AE title"
                            )
                        else:
                            peer = Peer(calling_ae.strip(), address, node.name, node.allow)
                        break
                if peer is None and reason is None:
                    reason = (
                        f"calling AE {calling_ae.strip()!r} from {address} is not a configured node"
                    )
        if peer is not None and self.settings.dicom_user_identity != "off":
            user, reason = self._identify(identity, address)
            peer = None if user is None else dataclasses.replace(peer, user=user)
        if peer is None:
            log.warning("association refused: %s", reason)
            self.audit(
                AssociationRejected(
                    actor=Actor(ae_title=calling_ae.strip()[:16], address=address, via="dimse"),
                    outcome="failure",
                    reason=str(reason),
                )
            )
            raise NotAuthorized(str(reason))
        return peer

    def _identify(
        self, identity: tuple[int, bytes, bytes] | None, address: str
    ) -> tuple[str | None, str | None]:
        """The Stockade user of a User Identity sub-item, or None and why not."""
        mode = self.settings.dicom_user_identity
        if identity is None:
            return None, f"user identity: required (dicom_user_identity = {mode})"
        kind, primary, secondary = identity
        if kind not in (1, 2):
            return None, "user identity: only user name and user name + passcode are accepted"
        if kind == 1 and mode == "passcode":
            return None, "user identity: a passcode is required"
        name = primary.decode("utf-8", "replace")[:64]
        try:
            if kind == 2:
                password = secondary.decode("utf-8", "replace")
                user = self.auth.check_password(name, password, address, "dimse-passcode")
            else:
                found = self.users.find(name)
                if found is None or found[0].disabled:
                    raise NotAuthenticated("unknown user")
                user = found[0]
        except NotAuthenticated:
            return None, f"user identity: {name!r} was not accepted"
        self.audit(
            UserLogin(
                actor=Actor(user=user.name, address=address, via="dimse"),
                method="dimse-passcode" if kind == 2 else "dimse-username",
            )
        )
        return user.name, None

    def refuse_connection(self, address: str, reason: str) -> None:
        """Log and audit a connection refused before its association request: a failed
        DICOM TLS handshake (an expired or unknown client certificate, TLS 1.0 or 1.1, no
        common cipher suite; PS3.15 Annex B). *reason* names what failed, never key material."""
        log.warning("connection from %s refused: %s", address, reason)
        self.audit(
            AssociationRejected(
                actor=Actor(address=address, via="dimse"),
                outcome="failure",
                reason=reason[:256],
            )
        )

    # -- nodes -----------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        allow: frozenset[str],
        *,
        tls: bool = False,
        cert_sha256: str | None = None,
        actor: Actor | None = None,
    ) -> Node:
        """Configure a DICOM peer (*tls*: it talks DICOM TLS, PS3.15 Annex B; *cert_sha256*:
        the SHA-256 of the client certificate it must present, binding it to the AE)."""
        node = _node(name, ae_title, host, port, allow, tls, cert_sha256)
        self.index.add_node(node)
        self.audit(NodeChanged(actor=actor or local_actor(), name=name, action="add"))
        return node

    def edit_node(
        self,
        old_name: str,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        allow: frozenset[str],
        *,
        tls: bool = False,
        cert_sha256: str | None = None,
        actor: Actor | None = None,
    ) -> Node:
        """Change the DICOM peer *old_name* (its name too), checked like :meth:`add_node`;
        one ``NodeChanged`` record (action ``edit``) says what changed.

        Raises
        ------
        NotFound
            No node is named *old_name*.
        ConfigError
            A value is not acceptable, or the new name is another node's.
        """
        old = next((n for n in self.index.nodes() if n.name == old_name), None)
        if old is None:
            raise NotFound(f"no node named {old_name[:64]!r}")
        node = _node(name, ae_title, host, port, allow, tls, cert_sha256)
        if not self.index.replace_node(old_name, node):
            raise NotFound(f"no node named {old_name[:64]!r}")
        changes = [
            f"{field} {before} -> {after}"
            for field, before, after in (
                ("name", old.name, node.name),
                ("ae_title", old.ae_title, node.ae_title),
                ("host", old.host, node.host),
                ("port", old.port, node.port),
                ("allow", ",".join(sorted(old.allow)), ",".join(sorted(node.allow))),
                ("tls", old.tls, node.tls),
                ("cert_sha256", old.cert_sha256, node.cert_sha256),
            )
            if before != after
        ]
        self.audit(
            NodeChanged(
                actor=actor or local_actor(),
                name=node.name,
                action="edit",
                detail="; ".join(changes) or "no change",
            )
        )
        return node

    def remove_node(self, name: str, *, actor: Actor | None = None) -> bool:
        """Remove a DICOM peer."""
        removed = self.index.remove_node(name)
        if removed:
            self.audit(NodeChanged(actor=actor or local_actor(), name=name, action="remove"))
        return removed

    # -- deleting --------------------------------------------------------------------------

    def delete(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        actor: Actor,
    ) -> list[StoredInstance]:
        """Delete a study, one series of it, or one instance of that series.

        The index rows go in one transaction, which also writes the ``InstancesDeleted``
        audit record when the sink is the trail (so the deletion and its record commit
        together); then the blobs and the cached metadata of the series are removed. A
        blob whose removal is interrupted stays queued and start-up removes it.

        Raises
        ------
        InvalidQuery
            A UID is not valid, or an instance is named without its series.
        NotFound
            Nothing matches (audited as a failure).
        """
        level = Level.IMAGE if sop_instance_uid else Level.SERIES if series_uid else Level.STUDY
        keys = {
            k: v[:256]
            for k, v in (
                ("StudyInstanceUID", study_uid),
                ("SeriesInstanceUID", series_uid),
                ("SOPInstanceUID", sop_instance_uid),
            )
            if v
        }

        def event(gone: list[StoredInstance], reason: str | None = None) -> InstancesDeleted:
            return InstancesDeleted(
                actor=actor,
                outcome="failure" if reason else "success",
                level=str(level),
                keys=keys,
                study_uids=sorted({i.study_instance_uid for i in gone} or {study_uid[:64]}),
                patient_ids=sorted({i.patient_id for i in gone if i.patient_id}),
                deleted=len(gone),
                reason=reason,
            )

        try:
            for value in (study_uid, series_uid, sop_instance_uid):
                if value is not None and uid_problem(value):
                    raise InvalidQuery(f"{value[:70]!r} is not a valid UID")
            if sop_instance_uid and not series_uid:
                raise InvalidQuery("an instance is deleted with its series (--series)")
        except StockadeError as exc:
            self.audit(event([], exc.reason))
            raise
        trail = self.audit_sink if isinstance(self.audit_sink, AuditTrail) else None

        def record(conn: object, gone: list[StoredInstance]) -> None:
            if trail is not None and gone:
                trail.append_in(conn, [event(gone)])  # type: ignore[arg-type]

        gone = self.index.delete_instances(
            study_uid, series_uid, sop_instance_uid, before_commit=record
        )
        if not gone:
            self.audit(event([], f"no {level} matches {keys}"))
            raise NotFound(f"no {level} matches {keys}")
        if trail is None:
            self.audit(event(gone))
        for key in sorted({i.blob_key for i in gone}):
            try:
                self.store.delete(key)
            except StorageFailure as exc:  # queued: start-up tries again
                log.warning("blob %s not deleted yet: %s", key, exc.reason)
                continue
            self.index.forget_deletion(key)
        for study, series in sorted({(i.study_instance_uid, i.series_instance_uid) for i in gone}):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(metacache.place(self.settings.data_dir, study, series))
        log.info("deleted %d instance(s) of %s %s", len(gone), level, keys)
        return gone

    # -- the audit trail -------------------------------------------------------------------

    def _trail(self) -> AuditTrail:
        if not isinstance(self.audit_sink, AuditTrail):
            raise ConfigError("this archive's audit sink is not the hash-chained trail")
        return self.audit_sink

    def audit_records(
        self, *, actor: Actor, limit: int = 1000, **filters: str | None
    ) -> list[dict[str, object]]:
        """Audit records matching *filters* (see :meth:`AuditTrail.records`); the reading
        is audited itself (``AuditLogUsed``)."""
        used = {k: str(v)[:256] for k, v in filters.items() if v}
        try:
            found = self._trail().records(limit=limit, **filters)
        except StockadeError as exc:
            self.audit(
                AuditLogUsed(
                    actor=actor, outcome="failure", action="list", filters=used, reason=exc.reason
                )
            )
            raise
        self.audit(AuditLogUsed(actor=actor, action="list", filters=used, records=len(found)))
        return found

    def audit_verify(self, *, actor: Actor) -> TrailCheck:
        """Verify the audit trail's hash chain (see :meth:`AuditTrail.verify`); audited."""
        check = self._trail().verify()
        self.audit(
            AuditLogUsed(
                actor=actor,
                outcome="success" if check.ok else "failure",
                action="verify",
                records=check.checked,
                reason=check.reason,
            )
        )
        return check

    def nodes(self) -> list[Node]:
        """Configured DICOM peers."""
        return self.index.nodes()

    # -- quarantine (the hidden-payload policy, PS3.10 7.5) ------------------------------

    def quarantined(self) -> list[QuarantineEntry]:
        """Objects held in quarantine, oldest first (for administrators)."""
        return list(self.ingest.quarantine.entries())

    def quarantine_entry(self, qid: str) -> QuarantineEntry:
        """One quarantined object's entry (NotFound when there is none)."""
        return self.ingest.quarantine.get(qid)

    def release(self, qid: str, *, actor: Actor) -> StoreResult:
        """Store a quarantined object after all: it runs through the ingest pipeline again,
        its findings only alerted (strips still apply), then leaves the quarantine.

        Raises
        ------
        NotFound
            No such quarantined object.
        StockadeError
            Ingest refused it for another reason (it stays in quarantine).
        """
        entry = self.ingest.quarantine.get(qid)
        data = self.ingest.quarantine.read(qid)

        def event(outcome: str = "success", reason: str | None = None) -> QuarantineChanged:
            return QuarantineChanged(
                actor=actor,
                outcome=outcome,
                action="release",
                quarantine_id=entry.id,
                sop_instance_uid=entry.sop_instance_uid,
                study_uid=entry.study_uid,
                patient_id=entry.patient_id,
                reason=reason,
            )

        origin = Origin(via="release", address=actor.address, user=actor.user)
        try:
            result = self.ingest.from_file(data, origin, release=True)
        except StockadeError as exc:
            self.audit(event("failure", exc.reason))
            raise
        self.ingest.quarantine.remove(qid)
        self.audit(event())
        return result

    def discard_quarantined(self, qid: str, *, actor: Actor) -> QuarantineEntry:
        """Delete a quarantined object for good."""
        entry = self.ingest.quarantine.remove(qid)
        self.audit(
            QuarantineChanged(
                actor=actor,
                action="delete",
                quarantine_id=entry.id,
                sop_instance_uid=entry.sop_instance_uid,
                study_uid=entry.study_uid,
                patient_id=entry.patient_id,
            )
        )
        return entry

    # -- integrity -------------------------------------------------------------------------

    def check_instance(self, inst: StoredInstance) -> None:
        """Re-hash one stored instance against the index (SR-18).

        Raises
        ------
        IntegrityError
            The blob is missing, or its size or SHA-256 differ from the index.
        """
        digest = hashlib.sha256()
        size = 0
        try:
            with self.store.open(inst.blob_key) as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except StorageFailure as exc:
            raise IntegrityError(f"{inst.sop_instance_uid}: {exc.reason}") from None
        if size != inst.size or digest.hexdigest() != inst.sha256:
            raise IntegrityError(
                f"{inst.sop_instance_uid}: content no longer matches its "
                "SHA-256 (blob corrupted or altered)"
            )

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-hash every blob and check that index and storage agree.

        Problems seen while objects are being written are checked a second time at the end,
        so that an instance committed a moment before its blob was published is not reported.
        """
        report = VerifyReport()
        suspects: list[StoredInstance] = []
        indexed: set[str] = set()
        for inst in self.index.instances():
            indexed.add(inst.blob_key)
            report.checked += 1
            try:
                self.check_instance(inst)
            except IntegrityError:
                suspects.append(inst)
            if progress:
                progress(1)
        orphans = [k for k in self.store.keys() if k not in indexed]  # noqa: SIM118
        for inst in suspects:
            try:
                self.check_instance(inst)
            except IntegrityError as exc:
                report.problems.append(exc.reason)
        for key in orphans:
            if not self.index.is_blob_indexed(key):
                report.problems.append(f"blob {key} is in storage but not in the index")
        self.audit(
            IntegrityChecked(
                actor=local_actor(),
                checked=report.checked,
                problems=len(report.problems),
                outcome="success" if report.ok else "failure",
            )
        )
        return report

    def counts(self) -> dict[str, int]:
        """Numbers of patients, studies, series and instances."""
        return self.index.counts()

    def stored_bytes(self) -> int:
        """The bytes of every stored object."""
        return self.index.stored_bytes()

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """An instance by SOP Instance UID (validated first)."""
        if uid_problem(sop_instance_uid):
            return None
        return self.index.find_instance(sop_instance_uid)

    # -- DICOMweb metadata ---------------------------------------------------------------
    # WADO-RS metadata (PS3.18 10.4.1.1.2): a per-series cache of the built DICOM JSON
    # (`metacache`), so that viewers asking again do not make every file be opened again.

    def metadata(
        self,
        level: Level,
        values: Mapping[str, str | None],
        *,
        actor: Actor,
        build: Callable[[Retrieval, list[StoredInstance]], list[bytes | None]],
        service: str = "wado",
        scope: Scope | None = None,
    ) -> bytes:
        """The metadata of a study, series or instance, per series cached, per instance built.

        The instances are located on the one retrieve path (:meth:`retrieve`, service
        ``wado``; one ``InstancesRetrieved`` record). For a study or series, each series'
        part comes from its cache file (:mod:`stockade.metacache`) when the file's stamp
        (the series' SOP Instance UIDs and SHA-256s as the index holds them now) still
        matches. Otherwise the objects of the instances the file already holds with the
        same hash are reused, *build* reads only the others (through
        :meth:`Retrieval.read`, so verified), and the file is written again unless an
        instance failed. An instance is never cached on its own.

        Parameters
        ----------
        level : Level
            ``STUDY``, ``SERIES`` or ``IMAGE``.
        values : mapping
            The unique keys of the level and above.
        actor : Actor
            The caller, for the audit record.
        build : callable
            ``build(retrieval, instances)``: each instance's compact DICOM JSON object, in
            order, None for one that failed; it calls :meth:`Retrieval.done` for each.

        Returns
        -------
        bytes
            One JSON array: the series' objects in index order.

        Raises
        ------
        NotFound
            Nothing matches.
        InvalidQuery, TooManyMatches
            See :meth:`retrieve`.
        """
        retrieval = self.retrieve(level, values, service=service, actor=actor, scope=scope)
        try:
            if not retrieval.instances:
                raise NotFound(f"no {level} matches {dict(retrieval.keys)}")
            if level is Level.IMAGE:
                built = build(retrieval, retrieval.instances)
                return metacache.join(obj for obj in built if obj is not None)
            by_series: dict[str, list[StoredInstance]] = {}
            for inst in retrieval.instances:
                by_series.setdefault(inst.series_instance_uid, []).append(inst)
            parts = [
                self._series_metadata(retrieval, instances, build)
                for instances in by_series.values()
            ]
            if len(parts) == 1:
                return parts[0]
            return metacache.join(part[1:-1] for part in parts if part != b"[]")
        finally:
            retrieval.finish()

    def _series_metadata(
        self,
        retrieval: Retrieval,
        instances: list[StoredInstance],
        build: Callable[[Retrieval, list[StoredInstance]], list[bytes | None]],
    ) -> bytes:
        """One series' JSON array: from its cache, completed by *build* where stale."""
        first = instances[0]
        path = metacache.place(
            self.settings.data_dir, first.study_instance_uid, first.series_instance_uid
        )
        keys = [(inst.sop_instance_uid, inst.sha256) for inst in instances]
        stamp = metacache.stamp(keys)
        cached = metacache.load(path)
        if cached is not None and cached.stamp == stamp.encode():
            for inst in instances:
                retrieval.done(inst, "completed")
            return cached.body
        known = cached.objects() if cached is not None else {}
        reused = [inst for inst, key in zip(instances, keys, strict=True) if key in known]
        missing = [inst for inst, key in zip(instances, keys, strict=True) if key not in known]
        for inst in reused:
            retrieval.done(inst, "completed")
        failed = len(retrieval.failed)
        built = build(retrieval, missing) if missing else []
        for inst, obj in zip(missing, built, strict=True):
            if obj is not None:
                known[(inst.sop_instance_uid, inst.sha256)] = obj
        entries = [(key, known[key]) for key in keys if key in known]
        if len(retrieval.failed) != failed:
            return metacache.join(obj for _, obj in entries)
        return metacache.save(path, stamp, entries)

    def updated_series(
        self, since: datetime | None, until: datetime
    ) -> list[tuple[str, str, datetime]]:
        """Series of the studies updated in (*since*, *until*] (for cache warming)."""
        return self.index.updated_series(since, until)
