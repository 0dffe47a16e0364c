"""The one error tree of Stockade.

Every error the core raises knows how it is told to a peer: its HTTP status (for the web
adapter) and its DIMSE status (for the DIMSE adapter). Exactly two places translate these into
wire answers; nothing else catches them to turn them into success.

DIMSE statuses follow PS3.4 Annex B.2.3 (Storage Service Class statuses) and PS3.7 Annex C
(general statuses). Where the standard gives a range for a failure class, Stockade uses the first
code of the range, except where the table below says otherwise.
"""

from __future__ import annotations


class StockadeError(Exception):
    """Base class of every error Stockade raises on purpose.

    Parameters
    ----------
    reason : str
        A sentence for the peer and the log: what was wrong, never a secret or a stack trace.
    """

    http_status: int = 500
    #: DIMSE status for C-STORE and friends (PS3.7 Annex C).
    dimse_status: int = 0x0110  # Failure: Processing failure
    #: Short stable code used in logs, audit records and HTTP problem documents.
    code: str = "internal"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ConfigError(StockadeError):
    """The settings or the command line are wrong; Stockade refuses to start."""

    code = "config"


class InvalidObject(StockadeError):
    """A DICOM object or its encoding is malformed (PS3.5 section 7) and cannot be parsed."""

    http_status = 400
    dimse_status = 0xC000  # Error: Cannot understand (PS3.4 B.2.3)
    code = "invalid-object"


class InvalidAttribute(InvalidObject):
    """A required attribute is missing or its value breaks PS3.5 rules (a bad UID, say)."""

    dimse_status = 0xC001  # Error: Cannot understand, sub-code for invalid attribute value
    code = "invalid-attribute"


class ObjectTooLarge(StockadeError):
    """The object, or a part of it, is larger than a configured limit."""

    http_status = 413
    dimse_status = 0xA700  # Refused: Out of Resources (PS3.4 B.2.3)
    code = "too-large"


class LimitExceeded(InvalidObject):
    """The object's structure exceeds a limit: nesting depth, element count."""

    dimse_status = 0xA700  # Refused: Out of Resources
    code = "limit-exceeded"


class InvalidQuery(StockadeError):
    """A query key or value that no matching rule accepts (PS3.4 C.2.2.2, C.4.1.1.4)."""

    http_status = 400
    dimse_status = 0xA900  # Failed: Identifier does not match SOP Class
    code = "invalid-query"


class TooManyMatches(StockadeError):
    """A query matched more entities than ``query_max_results`` allows."""

    http_status = 413
    dimse_status = 0xA700  # Refused: Out of Resources (PS3.4 C.4.1.1.4)
    code = "too-many-matches"


class SOPClassNotSupported(StockadeError):
    """The SOP class is not one the archive accepts (PS3.7 Annex C 0122H)."""

    http_status = 415
    dimse_status = 0x0122  # Refused: SOP Class not supported
    code = "sop-class-not-supported"


class DatasetMismatch(InvalidObject):
    """The data set disagrees with the command that carried it (PS3.4 B.2.3, A900H)."""

    dimse_status = 0xA900  # Error: Data Set does not match SOP Class
    code = "dataset-mismatch"


class DuplicateConflict(StockadeError):
    """A different object already holds this SOP Instance UID and replacement is off."""

    http_status = 409
    dimse_status = 0x0111  # Failure: Duplicate SOP Instance (PS3.7 Annex C)
    code = "duplicate-conflict"


class Conflict(StockadeError):
    """A change conflicts with what exists (a name taken, the last administrator, one's own
    account)."""

    http_status = 409
    code = "conflict"


class InvalidRequest(StockadeError):
    """A request body or parameter that is not acceptable (HTTP 400)."""

    http_status = 400
    code = "invalid-request"


class HierarchyConflict(StockadeError):
    """The object would move a stored study or series to another patient or study."""

    http_status = 409
    dimse_status = 0xC002  # Error: Cannot understand, sub-code for hierarchy conflict
    code = "hierarchy-conflict"


class StorageFailure(StockadeError):
    """The blob store could not write or read an object."""

    http_status = 503
    dimse_status = 0xA701  # Refused: Out of Resources, unable to store
    code = "storage-failure"


class IndexFailure(StockadeError):
    """The index (database) could not record an object."""

    http_status = 503
    dimse_status = 0xA702  # Refused: Out of Resources, unable to index
    code = "index-failure"


class NotAuthorized(StockadeError):
    """The caller may not do this (PS3.7 Annex C 0124H)."""

    http_status = 403
    dimse_status = 0x0124  # Refused: Not authorized
    code = "not-authorized"


class NotFound(StockadeError):
    """The thing asked for does not exist, or is outside the caller's scope."""

    http_status = 404
    dimse_status = 0xA801  # C-MOVE: Move destination unknown is the nearest; callers override
    code = "not-found"


class IntegrityError(StockadeError):
    """A stored blob no longer matches the hash recorded when it was stored (SR-18)."""

    http_status = 500
    dimse_status = 0xA701
    code = "integrity"


class CannotTranscode(StockadeError):
    """A stored object cannot be converted to any transfer syntax the receiver accepts
    (no codec for it, a lossy conversion would be needed, or its pixel data is over the
    decode limit)."""

    http_status = 406
    dimse_status = 0xA702  # Refused: Out of Resources, unable to perform sub-operations
    code = "cannot-transcode"


class DecodeFailure(CannotTranscode):
    """A codec crashed, ran past ``decode_timeout`` or past ``decode_memory_limit`` while
    decoding or encoding pixel data (threat model SR-13). Its worker process is replaced; the
    server carries on. A server-side failure (HTTP 500); in DIMSE retrieves the instance's
    sub-operation fails, like any instance that cannot be transcoded."""

    http_status = 500
    dimse_status = 0x0110  # Failure: Processing failure (PS3.7 Annex C)
    code = "decode-failure"


class RefusedByPolicy(InvalidObject):
    """The hidden-payload policy refuses the object (action ``reject``, PS3.10 7.5)."""

    dimse_status = 0xC003  # Error: Cannot understand, sub-code for a refused payload
    code = "refused-by-policy"


class Quarantined(StockadeError):
    """The object was kept apart for an administrator (action ``quarantine``, PS3.10 7.5):
    it is not stored in the archive, and the sender is told so."""

    http_status = 409
    dimse_status = 0xC004  # Error: Cannot understand, sub-code for a quarantined object
    code = "quarantined"


class NotAuthenticated(StockadeError):
    """No valid credentials came with the request (HTTP 401), or a login failed. The reason
    never says which of user name or password was wrong."""

    http_status = 401
    dimse_status = 0x0124  # Refused: Not authorized
    code = "not-authenticated"
