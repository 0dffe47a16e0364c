"""Files to read: folders walked, ZIP archives opened, every read bounded (SR-12, SR-14, SR-19).

Used by ``stockade import`` and ``stockade scan``. Nothing is ever extracted to disk: a ZIP
entry's name is a label, never a path, so ``../../x.dcm`` cannot write anywhere (zip-slip).
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

from stockade.errors import StockadeError

#: ZIP archives: most entries read from one archive (SR-14).
MAX_ZIP_ENTRIES = 100_000
ZIP_MAGIC = b"PK\x03\x04"


def walk(paths: list[Path]) -> Iterator[Path]:
    """Every file under *paths*, folders walked in name order; symbolic links to folders
    are not followed (a loop or a link out of the tree cannot be walked into)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def read(path: Path, cap: int) -> bytes:
    """Read a regular file of at most *cap* bytes (checked before reading)."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise StockadeError("not a regular file")
    if info.st_size > cap:
        raise StockadeError(f"file of {info.st_size} bytes exceeds max_object_size ({cap})")
    with path.open("rb") as fh:
        return fh.read(cap + 1)


def zip_members(path: Path, cap: int) -> Iterator[tuple[str, bytes | StockadeError]]:
    """Yield (label, bytes or error) for each file in a ZIP, with SR-14/SR-19 limits.

    Entry names are used as labels only, never as paths: nothing is extracted to disk, so a
    name like ``../../x.dcm`` cannot write anywhere.
    """
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            yield (
                str(path),
                StockadeError(f"ZIP has {len(infos)} entries (limit {MAX_ZIP_ENTRIES})"),
            )
            return
        for info in infos:
            if info.is_dir():
                continue
            label = f"{path}!{info.filename[:200]}"
            if info.file_size > cap:
                yield (
                    label,
                    StockadeError(
                        f"entry of {info.file_size} bytes exceeds max_object_size ({cap})"
                    ),
                )
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(cap + 1)  # the declared size may lie: read is capped
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
                yield label, StockadeError(f"unreadable ZIP entry: {exc}")
                continue
            if len(data) > cap:
                yield label, StockadeError(f"entry exceeds max_object_size ({cap})")
                continue
            yield label, data


def items(paths: list[Path], cap: int) -> Iterator[tuple[str, bytes | StockadeError]]:
    """Yield (label, bytes or error) for every file under *paths*, with each ZIP archive's
    entries in place of the archive (a Part 10 file that is also a ZIP is a file)."""
    for path in walk(paths):
        try:
            data = read(path, cap)
        except StockadeError as exc:
            yield str(path), exc
            continue
        except OSError as exc:
            yield str(path), StockadeError(f"cannot read: {exc.strerror}")
            continue
        is_dicom = len(data) >= 132 and data[128:132] == b"DICM"
        if not is_dicom and data[:4] == ZIP_MAGIC and zipfile.is_zipfile(path):
            try:
                yield from zip_members(path, cap)
            except (zipfile.BadZipFile, OSError) as exc:
                yield str(path), StockadeError(f"broken ZIP: {exc}")
            continue
        yield str(path), data
