"""The blob store seam (architecture: a four-method storage interface, plus staging).

Keys are chosen by the server from the content hash (:func:`key_for`), never from a value a
peer sent (threat model SR-12). Writing is two-phase so that the index can be updated between
the phases: :meth:`BlobStore.stage` makes the bytes durable in a private staging area,
:meth:`BlobStore.commit` publishes them under their key. A crash between the phases is repaired
by :meth:`BlobStore.recover`, which only needs the index to say which keys it knows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

_KEY = re.compile(r"sha256/[0-9a-f]{2}/[0-9a-f]{64}")


def key_for(sha256_hex: str) -> str:
    """The storage key of a blob with this SHA-256 (lower-case hex).

    One level of 256 folders: a new archive has them all after about 1,500 objects, and
    each holds about 40,000 objects at 10 million (ext4 and XFS index large folders).
    """
    return f"sha256/{sha256_hex[:2]}/{sha256_hex}"


def check_key(key: str) -> str:
    """Return *key* if it has the only shape Stockade ever creates, else raise ValueError."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a storage key: {key[:100]!r}")
    return key


@dataclass(frozen=True)
class Staged:
    """A blob written durably to the staging area, not yet published."""

    token: str
    sha256: str
    size: int
    area: str = ""  # the staging folder (of this process) that holds it

    @property
    def key(self) -> str:
        """The key the blob will have once committed."""
        return key_for(self.sha256)


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`BlobStore.recover` did."""

    published: int = 0
    discarded: int = 0


class StagingWriter(Protocol):
    """A staging file filled piece by piece, e.g. while a C-STORE data set arrives."""

    size: int

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append and hash *data*; an error is kept for :meth:`finish` to raise."""

    def start_sync(self) -> None:
        """Start making what was written durable (no more writes after this)."""

    def written(self) -> Staged:
        """The staged blob as it will be once durable (starts the sync if needed)."""

    def finish(self) -> Staged:
        """Wait until durable and return the staged blob (raises StorageFailure)."""

    def abort(self) -> None:
        """Drop the file; a no-op after :meth:`finish`."""


class BlobStore(Protocol):
    """Where object bytes live. Implementations: filesystem (and later S3)."""

    def stage(self, parts: Iterable[bytes | bytearray | memoryview]) -> Staged:
        """Write the concatenated *parts* durably to staging and hash them."""

    def writer(self) -> StagingWriter:
        """Open a staging file to be filled with :meth:`StagingWriter.write`."""

    def commit(self, staged: Staged) -> str:
        """Publish a staged blob under its key; return the key. Idempotent."""

    def discard(self, staged: Staged) -> None:
        """Drop a staged blob that will not be committed."""

    def open(self, key: str) -> BinaryIO:
        """Open a published blob for reading."""

    def delete(self, key: str) -> None:
        """Remove a published blob; a missing one is not an error."""

    def exists(self, key: str) -> bool:
        """True if a blob is published under *key*."""

    def keys(self) -> Iterator[str]:
        """Every published key (for verification; may be slow)."""

    def check_staged(self, area: str, token: str, sha256: str) -> bool | None:
        """Is the blob staged as *token* in *area* durable? None while that area's process
        lives; else True if it is published or its staged copy is whole, False if lost."""

    def recover(self, is_indexed: Callable[[str], bool]) -> RecoveryReport:
        """Finish or discard staging left by processes that died."""

    def close(self) -> None:
        """Release the staging area of this process."""
