"""Coverage-guided fuzz target (atheris) for the DICOMweb multipart reader.

Input format (``fuzz/make_corpus.py`` writes seeds in it)::

    byte 0      chunk size - 1 (the body is fed in chunks of 1 to 256 bytes)
    byte 1      profile: bit 0 small limits (parts of 256 bytes, header blocks of 128
                bytes, 4 parts), bit 1 keep only application/dicom parts
    boundary    up to the first CRLF (checked by check_boundary)
    body        the rest

The body is parsed three ways: in one piece, in chunks of the chosen size and, when short,
one byte at a time. A crash is any exception other than the reader's declared ones
(:class:`~stockade.web.multipart.MalformedMultipart`, :class:`~stockade.errors.ObjectTooLarge`),
an outcome that depends on how the body was cut, a buffer or a kept body larger than its
bound, a hang or memory past ``-rss_limit_mb``. Run it (see ``fuzz/README.md``)::

    .venv/bin/python fuzz/multipart_target.py fuzz/corpus/multipart -max_total_time=300
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import atheris

with atheris.instrument_imports(include=["stockade"]):
    from stockade.errors import ObjectTooLarge
    from stockade.web.multipart import (
        MAX_HEADER_SIZE,
        MAX_PARTS,
        MalformedMultipart,
        MultipartParser,
        check_boundary,
    )

#: Bodies up to this size are also parsed one byte at a time.
BYTEWISE_UP_TO = 2048
Outcome = tuple[str, tuple[tuple[object, ...], ...]]


class InvariantBroken(Exception):
    """The reader did something impossible (a crash for the fuzzer)."""


def require(condition: bool, what: str) -> None:
    """Raise :class:`InvariantBroken` unless *condition* holds (unlike assert, never skipped)."""
    if not condition:
        raise InvariantBroken(what)


def dicom_only(headers: Mapping[str, str]) -> bool:
    """The ``keep`` predicate STOW-RS uses, in spirit: application/dicom parts only."""
    return headers.get("content-type", "").split(";")[0].strip().lower() == "application/dicom"


def parse(boundary: bytes, body: bytes, chunk: int, profile: int) -> Outcome:
    """Parse *body* in chunks of *chunk* bytes; return the parts, or the error's name."""
    small = bool(profile & 1)
    max_part_size = 256 if small else 1 << 20
    max_header_size = 128 if small else MAX_HEADER_SIZE
    parser = MultipartParser(
        boundary,
        max_part_size=max_part_size,
        keep=dicom_only if profile & 2 else None,
        max_parts=4 if small else MAX_PARTS,
        max_header_size=max_header_size,
    )
    # What the parser may hold between two chunks: one header block or one delimiter.
    bound = max_header_size + len(boundary) + 8
    parts: list[tuple[object, ...]] = []
    try:
        for at in range(0, len(body), chunk):
            piece = body[at : at + chunk]
            for part in parser.feed(piece):
                require(part.size >= len(part.body), "a part's body is larger than its size")
                require(len(part.body) <= max_part_size, "a part kept past max_part_size")
                if part.kept and not part.too_large:
                    require(part.size == len(part.body), "a kept part lost bytes")
                parts.append((part.headers, bytes(part.body), part.size, part.kept, part.too_large))
            held = len(parser._buf)  # the parser's private buffer: this is the memory bound
            require(held <= bound + len(piece), f"parser holds {held} bytes after a chunk")
        parser.close()
    except (MalformedMultipart, ObjectTooLarge) as exc:
        return type(exc).__name__, ()
    require(parser.done, "close() accepted a body without its close delimiter")
    return "ok", tuple(parts)


def test_one_input(data: bytes) -> None:
    """One input: see the module docstring for its layout."""
    if len(data) < 2:
        return
    chunk, profile = data[0] + 1, data[1]
    boundary_end = data.find(b"\r\n", 2)
    if boundary_end < 0:
        return
    try:
        boundary = check_boundary(data[2:boundary_end].decode("latin-1"))
    except MalformedMultipart:
        return
    body = data[boundary_end + 2 :]
    whole = parse(boundary, body, max(len(body), 1), profile)
    chunked = parse(boundary, body, chunk, profile)
    require(whole == chunked, f"in one piece {whole[0]}, in chunks of {chunk} {chunked[0]}")
    if len(body) <= BYTEWISE_UP_TO:
        bytewise = parse(boundary, body, 1, profile)
        require(whole == bytewise, f"in one piece {whole[0]}, byte by byte {bytewise[0]}")


def input_function() -> Callable[[bytes], None]:
    """The function libFuzzer calls with each input."""
    return test_one_input


def main(argv: list[str]) -> None:
    """Start libFuzzer on this target (arguments as for any libFuzzer binary)."""
    atheris.Setup(argv, input_function())
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
