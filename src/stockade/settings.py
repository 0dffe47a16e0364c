"""The one settings object.

Every setting is declared once in :data:`DECLARED` (name, type, default, help). They are loaded
from built-in defaults, then an optional TOML file, then ``STOCKADE_<NAME>`` environment
variables, validated, and frozen into a :class:`Settings`. The CLI help, ``docs/settings.md``
(``stockade settings --markdown``) and the test that fails on an undocumented setting all read
:data:`DECLARED`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stockade.dicom.uids import ae_title_problem
from stockade.errors import ConfigError

ENV_PREFIX = "STOCKADE_"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared setting."""

    name: str
    kind: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return ENV_PREFIX + self.name.upper()


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port from 1 to 65535"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than zero"


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else "must be zero or more"


def _host(value: str) -> str | None:
    if not value or any(c.isspace() for c in value) or len(value) > 253:
        return "must be an IP address or a host name"
    return None


def _port_or_off(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port from 1 to 65535, or 0 (off)"


def _pdu(value: int) -> str | None:
    # PS3.8 9.3.1: the maximum length notified must leave room for the PDV header; we keep a
    # floor that every peer handles and a ceiling that bounds per-association memory.
    return None if 4 * KiB <= value <= 16 * MiB else "must be between 4096 and 16777216 bytes"


_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)


def cors_origins(value: str) -> tuple[str, ...]:
    """The origins of ``http_cors_origins``."""
    return tuple(o.strip() for o in value.split(",") if o.strip())


def _origins(value: str) -> str | None:
    for origin in cors_origins(value):
        if not _ORIGIN.fullmatch(origin):
            return (
                f"has {origin[:64]!r}: each origin must be scheme://host[:port] "
                "(no path, no wildcard)"
            )
    return None


def _screening(value: str) -> str | None:
    from stockade.security.policy import parse_actions

    try:
        parse_actions(value)
    except ValueError as exc:
        return str(exc)
    return None


def _optional_host(value: str) -> str | None:
    return None if value == "" else _host(value)


def _transport(value: str) -> str | None:
    return None if value in {"tls", "udp"} else "must be tls or udp"


def _user_identity(value: str) -> str | None:
    return None if value in ("off", "username", "passcode") else "must be off, username or passcode"


def _jwt_algorithms(value: str) -> str | None:
    allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
    names = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in names if a not in allowed]
    if bad or not names:
        return f"must name asymmetric algorithms among {sorted(allowed)}"
    return None


def _log_level(value: str) -> str | None:
    levels = {"DEBUG", "INFO", "WARNING", "ERROR"}
    return None if value.upper() in levels else f"must be one of {sorted(levels)}"


DECLARED: tuple[Declared, ...] = (
    Declared(
        "data_dir",
        Path,
        Path("./stockade-data"),
        "Folder for stored objects, the embedded SQLite index and logs.",
    ),
    Declared(
        "database_url",
        str,
        "",
        "SQLAlchemy URL of the index. Empty means SQLite in the data folder "
        "(`sqlite:///<data_dir>/index.sqlite3`); PostgreSQL is "
        "`postgresql+psycopg://user@host/db`.",
    ),
    Declared(
        "dicom_host",
        str,
        "127.0.0.1",
        "Address the DIMSE listener binds to. Loopback unless you say otherwise.",
        _host,
    ),
    Declared(
        "dicom_port",
        int,
        11112,
        "TCP port of the plain DIMSE listener (see `dicom_plain`).",
        _port,
    ),
    Declared(
        "dicom_plain",
        bool,
        True,
        "Run the plain (unencrypted) DIMSE listener on `dicom_port`. Beyond loopback it "
        "also needs `allow_plain_beyond_loopback`; otherwise `stockade serve` refuses to start.",
    ),
    Declared(
        "dicom_tls_port",
        int,
        2762,
        "TCP port of the DICOM TLS listener (PS3.15 Annex B, BCP 195 RFC 8996 profile); it runs "
        "when `dicom_tls_cert_file` is set. 0: no TLS listener.",
        _port_or_off,
    ),
    Declared(
        "dicom_tls_cert_file",
        str,
        "",
        "PEM certificate (chain) of the DICOM TLS listener, also presented when Stockade "
        "connects to a node with TLS; `stockade certs init` makes one. Empty: no DICOM TLS.",
    ),
    Declared(
        "dicom_tls_key_file",
        str,
        "",
        "PEM private key of `dicom_tls_cert_file` (unencrypted; keep it mode 0600).",
    ),
    Declared(
        "dicom_tls_client_ca_file",
        str,
        "",
        "PEM file of the certificate authorities that may sign client certificates on the "
        "DICOM TLS listener (mutual TLS); empty: clients are not asked for a certificate.",
    ),
    Declared(
        "dicom_tls_require_client_cert",
        bool,
        True,
        "With `dicom_tls_client_ca_file`: refuse a client without a valid certificate. Off: "
        "a certificate is asked for and checked if presented, but not required.",
    ),
    Declared(
        "dicom_tls_peer_ca_file",
        str,
        "",
        "PEM file of the certificate authorities that may sign the certificates of nodes "
        "Stockade connects to with TLS (`stockade node add --tls`); empty: the system's.",
    ),
    Declared(
        "dicom_ae_title", str, "STOCKADE", "AE title of the archive (called AE).", ae_title_problem
    ),
    Declared(
        "dicom_workers",
        int,
        0,
        "DIMSE worker processes sharing the listening socket; 0 means one per CPU core "
        "(at most 8).",
        _non_negative,
    ),
    Declared(
        "max_associations",
        int,
        32,
        "Concurrent DIMSE associations per worker process; more are rejected "
        "(transient, local limit exceeded).",
        _positive,
    ),
    Declared(
        "max_pdu_size",
        int,
        256 * KiB,
        "Maximum PDU length Stockade receives (PS3.8 D.1), announced to peers; a larger "
        "PDU aborts the association.",
        _pdu,
    ),
    Declared(
        "dicom_idle_timeout",
        float,
        60.0,
        "Seconds an association may stay silent before it is aborted.",
        _positive,
    ),
    Declared(
        "dicom_acse_timeout",
        float,
        30.0,
        "Seconds a peer has to send its association request after connecting (ARTIM).",
        _positive,
    ),
    Declared(
        "max_object_size",
        int,
        1 * GiB,
        "Largest DICOM object accepted, in bytes (data set as received, or file size).",
        _positive,
    ),
    Declared(
        "max_nesting_depth", int, 32, "Deepest sequence nesting accepted in a data set.", _positive
    ),
    Declared(
        "max_elements",
        int,
        500_000,
        "Most data elements (nested ones included) accepted in one data set.",
        _positive,
    ),
    Declared(
        "max_inflated_size",
        int,
        256 * MiB,
        "Largest size a Deflated Explicit VR Little Endian data set (PS3.5 A.5) may inflate "
        "to, in bytes; inflation is streamed and stops there (deflate bombs).",
        _positive,
    ),
    Declared(
        "screening_actions",
        str,
        "",
        "Actions for hidden-payload findings that replace the defaults, as "
        "`kind=action,...` with actions alert, strip, quarantine or reject "
        "(see docs/security.md for the finding types and their defaults).",
        _screening,
    ),
    Declared(
        "keep_tiff_preamble",
        bool,
        False,
        "Keep a TIFF header found in a file's preamble (dual-format whole-slide images); "
        "off: every stored file has a zero preamble (PS3.10 7.5).",
    ),
    Declared(
        "max_associations_per_peer",
        int,
        8,
        "Concurrent DIMSE associations one peer address may hold in each worker process; "
        "more are rejected (transient, local limit exceeded).",
        _positive,
    ),
    Declared(
        "allow_replace",
        bool,
        False,
        "Let a different object replace a stored one with the same SOP Instance UID "
        "(audited). Off: such an object is refused.",
    ),
    Declared(
        "query_max_results",
        int,
        1000,
        "Most matches one query returns (C-FIND, and the largest QIDO-RS page). A C-FIND "
        "that matches more gets the first ones, then status A700 with an Error Comment "
        "asking to refine the query.",
        _positive,
    ),
    Declared(
        "query_case_sensitive_names",
        bool,
        False,
        "Match person names (PatientName, ReferringPhysicianName) case-sensitively. Off: "
        "`doe^j*` finds `DOE^JANE` (PS3.4 C.2.2.2.1 leaves this to the archive).",
    ),
    Declared(
        "retrieve_max_instances",
        int,
        100_000,
        "Most instances one retrieve (C-GET, C-MOVE, `stockade send`) sends; a larger one "
        "is refused with status A700 and a comment asking to retrieve less at a time.",
        _positive,
    ),
    Declared(
        "max_decoded_size",
        int,
        1 * GiB,
        "Largest decoded pixel data, in bytes (Rows x Columns x Samples per Pixel x Bits "
        "Allocated x Number of Frames), that transcoding may decode; checked from the "
        "header before any decoder runs.",
        _positive,
    ),
    Declared(
        "decode_workers",
        int,
        2,
        "Decoder processes per server process: compressed pixel data is decoded and encoded "
        "(transcoding, rendering) in them, never in the server, so that a codec that crashes "
        "or runs away costs one request. Started when first needed, reused while healthy.",
        _positive,
    ),
    Declared(
        "decode_timeout",
        float,
        30.0,
        "Seconds one decode (or encode, or rendering) may take; a decoder process past it is "
        "killed and replaced, and the request fails.",
        _positive,
    ),
    Declared(
        "decode_memory_limit",
        int,
        0,
        "Bytes of address space a decoder process may take beyond what it uses at rest "
        "(RLIMIT_AS); a decode that needs more fails and the process is replaced. 0 means "
        "4 x max_decoded_size + 1 GiB.",
        _non_negative,
    ),
    Declared(
        "decode_in_process",
        bool,
        False,
        "Decode in the server process itself, without the decoder processes and their "
        "limits. For debugging only: a crashing codec then takes the server down.",
    ),
    Declared(
        "http_enabled",
        bool,
        True,
        "Run the HTTP listener (DICOMweb under `/dicomweb`) beside the DIMSE one.",
    ),
    Declared(
        "http_host",
        str,
        "127.0.0.1",
        "Address the HTTP (DICOMweb and UI) listener binds to. Another address than "
        "loopback needs HTTPS (or `allow_plain_beyond_loopback`) and at least one user.",
        _host,
    ),
    Declared("http_port", int, 8080, "TCP port of the HTTP listener.", _port),
    Declared(
        "http_tls_cert_file",
        str,
        "",
        "PEM certificate (chain) for HTTPS on `http_port` (TLS 1.2 or later, AEAD cipher "
        "suites, HSTS). Empty: plain HTTP, allowed on loopback only unless "
        "`allow_plain_beyond_loopback`.",
    ),
    Declared(
        "http_tls_key_file",
        str,
        "",
        "PEM private key of `http_tls_cert_file` (unencrypted; keep it mode 0600).",
    ),
    Declared(
        "allow_plain_beyond_loopback",
        bool,
        False,
        "Let plain DIMSE and plain HTTP listen on an address other than loopback (for "
        "a trusted network or a TLS-terminating proxy). `stockade check` flags it.",
    ),
    Declared(
        "http_workers",
        int,
        0,
        "HTTP worker processes sharing the HTTP listening socket; 0 means one per CPU core "
        "(at most 8).",
        _non_negative,
    ),
    Declared(
        "metadata_warm_delay",
        float,
        5.0,
        "Seconds a study must stay unchanged before its series' WADO-RS metadata is built "
        "in the background (so that a viewer's first request is served from the cache); "
        "0 turns the background build off.",
        _non_negative,
    ),
    Declared(
        "http_cors_origins",
        str,
        "",
        "Origins (scheme://host[:port], comma-separated) whose pages may call DICOMweb from a "
        "browser (CORS). Empty: no CORS header is ever sent. `*` is refused.",
        _origins,
    ),
    Declared(
        "dicom_user_identity",
        str,
        "off",
        "User Identity negotiation (PS3.7 D.3.3.7) required of DIMSE peers: `off`; "
        "`username` (a Stockade user name, with its password as passcode when given); "
        "`passcode` (user name and password required). The user is recorded in the audit "
        "trail.",
        _user_identity,
    ),
    Declared(
        "session_max_age",
        int,
        12 * 3600,
        "Seconds a browser session lasts at most after login (absolute expiry).",
        _positive,
    ),
    Declared(
        "session_idle_timeout",
        int,
        30 * 60,
        "Seconds a browser session may stay unused before it ends (idle expiry).",
        _positive,
    ),
    Declared(
        "oidc_issuer",
        str,
        "",
        "Issuer (`iss`) of OIDC/JWT bearer tokens from an external identity provider; "
        "empty: such tokens are not accepted.",
    ),
    Declared(
        "oidc_audience",
        str,
        "",
        "Audience (`aud`) that OIDC/JWT bearer tokens must name (Stockade's client id).",
    ),
    Declared(
        "oidc_jwks_file",
        str,
        "",
        "JSON Web Key Set (RFC 7517) file of the identity provider's signing keys; Stockade "
        "never fetches keys from a URL a token names.",
    ),
    Declared(
        "oidc_algorithms",
        str,
        "RS256,ES256",
        "Signature algorithms accepted on OIDC/JWT tokens (comma-separated; `none` and HMAC "
        "algorithms are refused).",
        _jwt_algorithms,
    ),
    Declared(
        "oidc_username_claim",
        str,
        "preferred_username",
        "Claim of an OIDC/JWT token that names the Stockade user (whose role and scope apply).",
    ),
    Declared(
        "http_max_body_size",
        int,
        2 * GiB,
        "Largest HTTP request body accepted (a STOW-RS upload), in bytes; a larger declared "
        "Content-Length is refused with 413 before anything is read, and a body that grows "
        "past it is cut off with 413.",
        _positive,
    ),
    Declared(
        "viewer_dir",
        str,
        "",
        "Folder of the OHIF viewer installed by `stockade viewer install` and served under "
        "`/ohif/`. Empty: `<data_dir>/viewer`.",
    ),
    Declared("log_level", str, "INFO", "Log level: DEBUG, INFO, WARNING or ERROR.", _log_level),
    Declared(
        "audit_syslog_host",
        str,
        "",
        "Audit record repository (syslog collector) that receives every audit record as "
        "DICOM PS3.15 A.5 XML over RFC 5424 syslog. Empty: no export (the trail is kept "
        "in the index either way).",
        _optional_host,
    ),
    Declared(
        "audit_syslog_port",
        int,
        6514,
        "Port of the audit collector (6514 is syslog over TLS, RFC 5425; UDP syslog uses 514).",
        _port,
    ),
    Declared(
        "audit_syslog_transport",
        str,
        "tls",
        "`tls` (RFC 5425: TLS 1.2 or later, the collector's certificate checked against "
        "`audit_syslog_ca_file`; records wait in the trail while it is down) or `udp` "
        "(RFC 5426: best effort, a datagram lost on the way is not sent again).",
        _transport,
    ),
    Declared(
        "audit_syslog_ca_file",
        str,
        "",
        "PEM file of the certificate authorities that may sign the collector's certificate "
        "(required with `tls`); the collector's name must match `audit_syslog_host`.",
    ),
    Declared(
        "audit_syslog_cert_file",
        str,
        "",
        "PEM client certificate Stockade presents to the collector (mutual TLS, as IHE "
        "ATNA asks); empty: none.",
    ),
    Declared(
        "audit_syslog_key_file",
        str,
        "",
        "PEM private key of `audit_syslog_cert_file` (unencrypted; keep it mode 0600).",
    ),
)

_BY_NAME = {d.name: d for d in DECLARED}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated, frozen settings. Build it with :func:`load`."""

    data_dir: Path
    database_url: str
    dicom_host: str
    dicom_port: int
    dicom_plain: bool
    dicom_tls_port: int
    dicom_tls_cert_file: str
    dicom_tls_key_file: str
    dicom_tls_client_ca_file: str
    dicom_tls_require_client_cert: bool
    dicom_tls_peer_ca_file: str
    dicom_ae_title: str
    dicom_workers: int
    max_associations: int
    max_pdu_size: int
    dicom_idle_timeout: float
    dicom_acse_timeout: float
    max_object_size: int
    max_nesting_depth: int
    max_elements: int
    max_inflated_size: int
    screening_actions: str
    keep_tiff_preamble: bool
    max_associations_per_peer: int
    allow_replace: bool
    query_max_results: int
    query_case_sensitive_names: bool
    retrieve_max_instances: int
    max_decoded_size: int
    decode_workers: int
    decode_timeout: float
    decode_memory_limit: int
    decode_in_process: bool
    http_enabled: bool
    http_host: str
    http_port: int
    http_tls_cert_file: str
    http_tls_key_file: str
    allow_plain_beyond_loopback: bool
    http_workers: int
    metadata_warm_delay: float
    http_cors_origins: str
    dicom_user_identity: str
    session_max_age: int
    session_idle_timeout: int
    oidc_issuer: str
    oidc_audience: str
    oidc_jwks_file: str
    oidc_algorithms: str
    oidc_username_claim: str
    http_max_body_size: int
    viewer_dir: str
    log_level: str
    audit_syslog_host: str
    audit_syslog_port: int
    audit_syslog_transport: str
    audit_syslog_ca_file: str
    audit_syslog_cert_file: str
    audit_syslog_key_file: str

    @property
    def index_url(self) -> str:
        """The database URL in force (the SQLite default resolved against the data folder)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    @property
    def viewer_path(self) -> Path:
        """The folder of the installed OHIF viewer (``viewer_dir``, or under the data folder)."""
        return Path(self.viewer_dir) if self.viewer_dir else self.data_dir / "viewer"

    @property
    def worker_count(self) -> int:
        """DIMSE worker processes to start."""
        if self.dicom_workers:
            return self.dicom_workers
        return max(1, min(os.cpu_count() or 1, 8))

    @property
    def http_worker_count(self) -> int:
        """HTTP worker processes to start."""
        if self.http_workers:
            return self.http_workers
        return max(1, min(os.cpu_count() or 1, 8))

    @property
    def dicom_tls(self) -> bool:
        """True when the DICOM TLS listener runs (a certificate and a port are set)."""
        return bool(self.dicom_tls_cert_file) and self.dicom_tls_port != 0

    @property
    def http_tls(self) -> bool:
        """True when the HTTP listener speaks HTTPS."""
        return bool(self.http_tls_cert_file)

    @property
    def dicom_on_loopback(self) -> bool:
        """True when the DIMSE listener only accepts connections from this machine."""
        return is_loopback(self.dicom_host)

    def as_dict(self) -> dict[str, Any]:
        """Setting values by name, safe to print or log: a password in ``database_url`` is
        replaced by ``***`` (secrets never reach a log or a terminal, SR-7)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["database_url"] = redact_url(self.database_url)
        return values


def redact_url(url: str) -> str:
    """*url* with the password of its user part replaced by ``***``."""
    if not url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a valid URL)"


def is_loopback(host: str) -> bool:
    """Return True if *host* names the loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _convert(decl: Declared, raw: Any, source: str) -> Any:
    try:
        if decl.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if decl.kind is int and isinstance(raw, bool):
            raise ValueError(raw)
        if decl.kind is int and isinstance(raw, str):
            return int(raw.strip().replace("_", ""))
        if decl.kind is float and isinstance(raw, bool):
            raise ValueError(raw)
        return decl.kind(raw)
    except (TypeError, ValueError):
        kind = decl.kind.__name__
        raise ConfigError(f"setting {decl.name} from {source}: {raw!r} is not a {kind}") from None


def load(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load, validate and freeze the settings.

    Parameters
    ----------
    config_file : Path, optional
        A TOML file with flat ``name = value`` pairs, names as in :data:`DECLARED`.
    environ : Mapping, optional
        Environment to read ``STOCKADE_*`` variables from (default ``os.environ``).
    overrides : Mapping, optional
        Values that win over everything (used by the CLI and tests).

    Raises
    ------
    ConfigError
        On an unknown name, a value of the wrong type, or a value that fails its check.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {d.name: d.default for d in DECLARED}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        for key, raw in data.items():
            if key not in _BY_NAME:
                raise ConfigError(f"unknown setting {key!r} in {config_file}")
            values[key] = _convert(_BY_NAME[key], raw, str(config_file))
    for decl in DECLARED:
        if decl.env in env:
            values[decl.name] = _convert(decl, env[decl.env], decl.env)
    unknown_env = sorted(
        k
        for k in env
        if k.startswith(ENV_PREFIX)
        and k[len(ENV_PREFIX) :].lower() not in _BY_NAME
        and not k.startswith(ENV_PREFIX + "TEST_")
    )
    if unknown_env:
        raise ConfigError(f"unknown environment setting(s): {', '.join(unknown_env)}")
    for key, raw in (overrides or {}).items():
        if key not in _BY_NAME:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _convert(_BY_NAME[key], raw, "override")
    for decl in DECLARED:
        if decl.check is not None:
            problem = decl.check(values[decl.name])
            if problem:
                raise ConfigError(f"setting {decl.name} = {values[decl.name]!r} {problem}")
    return Settings(**values)


def markdown() -> str:
    """Render the settings reference (``docs/settings.md``) from :data:`DECLARED`."""
    lines = [
        "# Settings",
        "",
        "Generated by `stockade settings --markdown` from `src/stockade/settings.py`; a test",
        "fails when this page and the code disagree.",
        "",
        "Each setting is read, in this order (later wins), from its default, from the TOML file",
        "given with `--config` (flat `name = value` lines), and from the environment variable",
        "`STOCKADE_<NAME>`. Unknown names are an error, so a typo never goes unnoticed.",
        "",
        "| name | environment variable | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for d in DECLARED:
        default = d.default if not isinstance(d.default, bool) else str(d.default).lower()
        shown = f"`{default}`" if str(default) != "" else "(empty)"
        lines.append(f"| `{d.name}` | `{d.env}` | {d.kind.__name__} | {shown} | {d.help} |")
    return "\n".join(lines) + "\n"
