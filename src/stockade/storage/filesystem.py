"""Blob store on a local filesystem.

Layout under the data folder::

    blobs/sha256/ab/<sha256>           published objects (mode 0600)
    staging/<pid>-<random>/            one per live process, locked with flock
        .lock
        <random>.tmp                   staged objects, fsynced before the index is touched

Every path is built from the content hash or a random token, and checked to stay under the
root (SR-12).

Durability (SR-18): a staged object and its directory entry are fsynced before the index is
touched, so an instance the index knows always has its bytes on disk. Publishing is a rename
whose directory is *not* fsynced before the sender gets its answer: if a power loss undoes
the rename, the object is still in its staging folder, and :meth:`FilesystemBlobStore.recover`
publishes it at the next start because the index knows its key. A process that ends
normally fsyncs every folder it published into before it removes its staging folder. This
saves one synchronous flush per stored object (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from stockade.errors import StorageFailure
from stockade.storage.base import RecoveryReport, Staged, StagingWriter, check_key, key_for

log = logging.getLogger(__name__)
#: Empty staging files kept ready per process (refilled in the background at half).
SPARES = 32
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
_REUSE = os.O_WRONLY | os.O_NOFOLLOW


def _write_and_sync(fd: int, views: list[memoryview]) -> None:
    for view in views:
        rest = view
        while rest:
            rest = rest[os.write(fd, rest) :]
    os.fsync(fd)


_AREA = re.compile(r"[0-9]{1,10}-[0-9a-f]{8}")
_TOKEN = re.compile(r"[0-9a-f]{32}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
    """A :class:`~stockade.storage.base.StagingWriter` on a file in the staging folder.

    A write error is kept and reported by :meth:`finish`, so that a sender still receiving
    its data set is answered with a failure status rather than cut off.
    """

    def __init__(
        self, store: FilesystemBlobStore, token: str, path: str, fd: int, fresh: bool
    ) -> None:
        self._store, self._token, self._path, self._fd, self._fresh = (
            store,
            token,
            path,
            fd,
            fresh,
        )
        self._digest = hashlib.sha256()
        self.size = 0
        self._error: OSError | None = None
        self._sync: Future[None] | None = None
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append *data* (and hash it)."""
        if self._error is not None:
            return
        if self._done or self._sync is not None:
            self._error = OSError(errno.EBADF, "write after the staging file was closed")
            return
        view = memoryview(data)
        try:
            rest = view
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        except OSError as exc:
            self._error = exc
            return
        self._digest.update(view)
        self.size += len(view)

    def start_sync(self) -> None:
        """Start making the written bytes durable, in the background."""
        if self._sync is None and self._error is None and not self._done:
            self._sync = self._store._pool().submit(os.fsync, self._fd)

    def written(self) -> Staged:
        """What the staged blob will be once :meth:`finish` returned."""
        self.start_sync()
        if self._error is not None:
            raise StorageFailure(f"cannot write to the blob store: {self._error.strerror}")
        return self._staged()

    def _staged(self) -> Staged:
        return Staged(
            token=self._token,
            sha256=self._digest.hexdigest(),
            size=self.size,
            area=self._store.area_name,
        )

    def finish(self) -> Staged:
        """Wait until the bytes are durable; the file is then a staged blob."""
        if self._done:
            raise StorageFailure("staging file already finished or abandoned")
        self.start_sync()
        try:
            if self._sync is not None:
                self._sync.result()
            if self._error is not None:
                raise self._error
            os.close(self._fd)
            self._fd = -1
            if self._fresh:
                os.fsync(self._store._area_fd)  # the new file's directory entry
        except OSError as exc:
            self.abort()
            raise StorageFailure(f"cannot write to the blob store: {exc.strerror}") from None
        self._done = True
        return self._staged()

    def abort(self) -> None:
        """Drop the file (a no-op once :meth:`finish` returned)."""
        if self._done:
            return
        self._done = True
        if self._sync is not None:
            with contextlib.suppress(OSError):
                self._sync.result()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self._path)


class FilesystemBlobStore:
    """A :class:`~stockade.storage.base.BlobStore` on a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.blobs = self.root / "blobs"
        self.staging_root = self.root / "staging"
        for folder in (self.root, self.blobs, self.staging_root):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._blobs_prefix = f"{self.blobs}{os.sep}"
        self._area: Path | None = None
        self._area_str = ""
        self._area_fd = -1
        self._area_pid = -1
        self._lock_fd = -1
        self._area_lock = threading.Lock()
        # fsync releases the GIL: a small pool runs the fsync of a streamed object (a DIMSE
        # C-STORE) while its last bytes are hashed, and refills the spare staging files.
        self._syncer: ThreadPoolExecutor | None = None
        self._folders: set[str] = set()  # blob folders known to exist
        self._unsynced: set[str] = set()  # blob folders renamed into since their last fsync
        # Empty staging files whose directory entries are already durable: staging an object
        # into one needs no fsync of the folder on the way to the answer.
        self._spares: list[str] = []
        self._spares_lock = threading.Lock()
        self._refilling = False

    # -- staging ---------------------------------------------------------------------------

    def _staging_area(self) -> Path:
        area = self._area
        if area is not None and self._area_pid == os.getpid():
            return area
        with self._area_lock:
            if self._area is not None and self._area_pid == os.getpid():
                return self._area
            return self._new_staging_area()

    def _new_staging_area(self) -> Path:
        area = self.staging_root / f"{os.getpid()}-{secrets.token_hex(4)}"
        area.mkdir(mode=0o700)
        fd = os.open(area / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _fsync_dir(self.staging_root)
        self._area, self._area_pid, self._lock_fd = area, os.getpid(), fd
        self._area_str = str(area)
        self._area_fd = os.open(area, os.O_RDONLY | os.O_DIRECTORY)
        self._syncer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self._folders, self._unsynced, self._spares = set(), set(), []
        self._refilling = True
        self._refill()
        return area

    def _take_spare(self) -> str | None:
        with self._spares_lock:
            token = self._spares.pop() if self._spares else None
            refill = len(self._spares) < SPARES // 2 and not self._refilling
            if refill:
                self._refilling = True
        if refill and self._syncer is not None:
            self._syncer.submit(self._refill)
        return token

    def _refill(self) -> None:
        """Create empty staging files, then make their entries durable with one fsync."""
        made: list[str] = []
        try:
            for _ in range(SPARES - len(self._spares)):
                token = secrets.token_hex(16)
                os.close(os.open(self._staged_path(token), _CREATE, 0o600))
                made.append(token)
            os.fsync(self._area_fd)
        except OSError as exc:
            log.warning("cannot prepare staging files: %s", exc.strerror)
            made = []
        finally:
            with self._spares_lock:
                self._spares.extend(made)
                self._refilling = False

    def _staged_path(self, token: str) -> str:
        if len(token) != 32 or not all(c in "0123456789abcdef" for c in token):
            raise ValueError("bad staging token")
        self._staging_area()
        return f"{self._area_str}{os.sep}{token}.tmp"

    def _open_staging(self) -> tuple[str, str, int, bool]:
        """A staging file open for writing: (token, path, fd, fresh)."""
        token = self._take_spare()
        fresh = token is None
        if token is None:
            token = secrets.token_hex(16)
        path = self._staged_path(token)
        try:
            fd = os.open(path, _CREATE if fresh else _REUSE, 0o600)
        except OSError as exc:
            raise StorageFailure(f"cannot write to the blob store: {exc.strerror}") from None
        return token, path, fd, fresh

    def _pool(self) -> ThreadPoolExecutor:
        if self._syncer is None:  # pragma: no cover - created with the staging area
            raise StorageFailure("the staging area is not ready")
        return self._syncer

    def stage(self, parts: Iterable[bytes | bytearray | memoryview]) -> Staged:
        """Write *parts* to a staging file, make it durable and hash it."""
        token, path, fd, fresh = self._open_staging()
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                views = [memoryview(part) for part in parts]
                size = sum(len(view) for view in views)
                # In the calling thread: handing the write and fsync to another thread to
                # overlap them with the SHA-256 cost two thread wake-ups per object, more
                # CPU than the hash itself on a small virtual machine (docs/benchmarks.md).
                for view in views:
                    digest.update(view)
                _write_and_sync(fd, views)
            finally:
                os.close(fd)
            if fresh:
                os.fsync(self._area_fd)  # the new file's directory entry
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StorageFailure(f"cannot write to the blob store: {exc.strerror}") from None
        return Staged(token=token, sha256=digest.hexdigest(), size=size, area=self.area_name)

    def writer(self) -> StagingWriter:
        """A staging file to fill piece by piece (bytes hashed as they are written)."""
        token, path, fd, fresh = self._open_staging()
        return _Writer(self, token, path, fd, fresh)

    def commit(self, staged: Staged) -> str:
        """Move a staged blob to its published place (see the module's note on durability)."""
        key = staged.key
        # key_for() built the key from hex digits only: the path stays under blobs/ by
        # construction, which check_key() confirms without touching the filesystem.
        target = self._blobs_prefix + check_key(key)
        folder = os.path.dirname(target)
        source = self._staged_path(staged.token)
        try:
            if folder not in self._folders:
                if not os.path.isdir(folder):
                    os.makedirs(folder, mode=0o700, exist_ok=True)
                    # Made durable with the rename below, by sync() (same reasoning).
                    self._unsynced.add(os.path.dirname(folder))
                    self._unsynced.add(os.path.dirname(os.path.dirname(folder)))
                self._folders.add(folder)
            os.replace(source, target)
            self._unsynced.add(folder)
        except OSError as exc:
            raise StorageFailure(f"cannot publish a blob: {exc.strerror}") from None
        return key

    def sync(self) -> None:
        """Make every publication of this process durable (fsync the folders renamed into)."""
        while self._unsynced:
            _fsync_dir(self._unsynced.pop())

    def discard(self, staged: Staged) -> None:
        """Remove a staged blob."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._staged_path(staged.token))

    # -- published blobs -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        # check_key admits only sha256/<2 hex>/<64 hex>: the path cannot leave the blob
        # folder lexically, and blobs are opened without following a final symlink.
        return self.blobs / check_key(key)

    def open(self, key: str) -> BinaryIO:
        """Open a published blob."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            return os.fdopen(fd, "rb")
        except FileNotFoundError:
            raise StorageFailure(f"blob {key} is missing from the store") from None
        except OSError as exc:
            raise StorageFailure(f"cannot read blob {key}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        """True if *key* is published."""
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove a published blob (missing is fine)."""
        path = self._path(key)
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageFailure(f"cannot delete blob {key}: {exc.strerror}") from None

    def keys(self) -> Iterator[str]:
        """Every published key, in no particular order."""
        base = self.blobs / "sha256"
        if not base.is_dir():
            return
        for folder in os.scandir(base):
            if not folder.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(folder.path):
                with contextlib.suppress(ValueError):
                    yield check_key(f"sha256/{folder.name}/{entry.name}")

    # -- crash recovery --------------------------------------------------------------------

    @property
    def area_name(self) -> str:
        """The name of this process's staging folder."""
        return self._staging_area().name

    def check_staged(self, area: str, token: str, sha256: str) -> bool | None:
        """See :meth:`BlobStore.check_staged` (names are checked, never trusted)."""
        if not _AREA.fullmatch(area) or not _TOKEN.fullmatch(token):
            return False
        folder = self.staging_root / area
        if self._area is not None and folder == self._area:
            return None
        if folder.is_dir():
            try:
                fd = os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return None  # its process is alive
                finally:
                    os.close(fd)
            staged = folder / f"{token}.tmp"
            if staged.is_file():
                return _file_sha256(staged) == sha256
        return os.path.isfile(self._blobs_prefix + key_for(sha256))

    def recover(self, is_indexed: Callable[[str], bool]) -> RecoveryReport:
        """Finish or discard what dead processes left in staging.

        A staged blob whose key the index knows was acknowledged (or about to be) and is
        published; any other staged blob never reached the index and is removed.
        """
        published = discarded = 0
        for area in sorted(self.staging_root.iterdir()):
            if area == self._area or not area.is_dir():
                continue
            try:
                fd = os.open(area / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        continue  # its process is alive
                    raise
                for tmp in area.glob("*.tmp"):
                    if tmp.stat().st_size == 0:  # a spare never written to
                        tmp.unlink()
                        continue
                    key = key_for(_file_sha256(tmp))
                    target = self._path(key)
                    if is_indexed(key) and not target.exists():
                        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        os.replace(tmp, target)
                        _fsync_dir(target.parent)
                        published += 1
                    else:
                        tmp.unlink()
                        discarded += 1
            finally:
                os.close(fd)
            shutil.rmtree(area, ignore_errors=True)
        return RecoveryReport(published=published, discarded=discarded)

    def close(self) -> None:
        """Release this process's staging area."""
        if self._area is not None and self._area_pid == os.getpid():
            # Staged copies are the fallback for renames not yet durable: sync first.
            self.sync()
            if self._syncer is not None:
                self._syncer.shutdown()
                self._syncer = None
            shutil.rmtree(self._area, ignore_errors=True)
            os.close(self._area_fd)
            os.close(self._lock_fd)
            self._area_fd = -1
            self._area = None
            self._lock_fd = -1
