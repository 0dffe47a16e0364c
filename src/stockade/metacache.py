"""The per-series cache of WADO-RS metadata (PS3.18 10.4.1.1.2), kept per instance.

A series' cache file is three parts::

    <stamp>\\n
    <SOP Instance UID> <SHA-256> <length>,<SOP Instance UID> <SHA-256> <length>,...\\n
    [<object>,<object>,...]

The stamp covers the series' instances and their hashes as the index holds them now: when it
still matches, the JSON array after the second line is the answer as it is. When it does not
(an instance arrived, was replaced or deleted), the objects of the instances that are still
there with the same hash are taken from the file by their lengths, and only the others are
built again. A file that does not parse, or whose lengths do not add up, is a miss; the cache
only ever costs speed, never correctness.

The file is named from a hash of the study and series UIDs, never from a value a peer sent,
and written to a temporary name and then renamed, so a reader sees the old file or the new.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Bumped when the cached form changes; part of every validity stamp.
VERSION = "2"

#: An instance's key in the cache: (SOP Instance UID, SHA-256 of its stored file).
Key = tuple[str, str]


def place(data_dir: Path, study: str, series: str) -> str:
    """The cache file of a series (named by a hash, never by a peer value)."""
    name = hashlib.sha256(f"{study}/{series}".encode()).hexdigest()
    return str(data_dir / "cache" / "metadata" / name[:2] / f"{name}.json")


def stamp(keys: Iterable[Key]) -> str:
    """The validity stamp of a series made of the instances *keys*."""
    ordered = sorted(keys)
    digest = hashlib.sha256(VERSION.encode())
    for uid, sha in ordered:
        digest.update(f"\n{uid} {sha}".encode())
    return f"{len(ordered)}-{digest.hexdigest()}"


def join(objects: Iterable[bytes]) -> bytes:
    """Compact JSON objects as one JSON array."""
    return b"[" + b",".join(objects) + b"]"


@dataclass
class Cached:
    """A series' cache file as read: its stamp, its answer, and its objects by instance."""

    stamp: bytes
    body: bytes
    entries: list[tuple[Key, int]] = field(default_factory=list)

    def objects(self) -> dict[Key, bytes]:
        """Each instance's object, cut out of the answer by the lengths of the index line;
        empty when the lengths do not describe the answer exactly."""
        out: dict[Key, bytes] = {}
        position = 1
        for number, (key, length) in enumerate(self.entries, 1):
            out[key] = self.body[position : position + length]
            position += length
            after = self.body[position : position + 1]
            if after != (b"]" if number == len(self.entries) else b","):
                return {}
            position += 1
        expected = max(position, 2)  # "[]" when there is no object
        if len(self.body) != expected or self.body[:1] != b"[" or self.body[-1:] != b"]":
            return {}
        return out


def load(path: str) -> Cached | None:
    """The cache file at *path*, or None when it is missing or does not parse."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    head, sep, rest = raw.partition(b"\n")
    line, sep2, body = rest.partition(b"\n")
    if not sep or not sep2:
        return None
    entries: list[tuple[Key, int]] = []
    for item in line.split(b",") if line else []:
        fields = item.split(b" ")
        if len(fields) != 3 or not fields[2].isdigit():
            return None
        try:
            key = (fields[0].decode("ascii"), fields[1].decode("ascii"))
        except UnicodeDecodeError:
            return None
        entries.append((key, int(fields[2])))
    return Cached(head, body, entries)


def save(path: str, series_stamp: str, entries: Sequence[tuple[Key, bytes]]) -> bytes:
    """Write the cache of a series (tmp file, then rename) and return its answer.

    A failure to write is logged and only costs speed. Keys are validated UIDs and
    hexadecimal hashes, so neither contains the separators of the index line.
    """
    body = join(obj for _, obj in entries)
    index = b",".join(f"{uid} {sha} {len(obj)}".encode() for (uid, sha), obj in entries)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(series_stamp.encode() + b"\n" + index + b"\n" + body)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("metadata cache %s not written: %s", name, exc.strerror)
    return body
