"""The incremental multipart/related parser (RFC 2046 5.1): any chunking, limits, errors."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Iterable

import pytest

from stockade.errors import ObjectTooLarge
from stockade.web.multipart import (
    MalformedMultipart,
    MultipartParser,
    Part,
    check_boundary,
    read_parts,
)

BOUNDARY = b"b0UNd-ary"


def body(
    parts: Iterable[bytes],
    *,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    close: bool = True,
    content_type: bytes = b"application/dicom",
) -> bytes:
    out = preamble + (b"\r\n" if preamble else b"")
    for data in parts:
        out += b"--" + BOUNDARY + b"\r\nContent-Type: " + content_type + b"\r\n\r\n"
        out += data + b"\r\n"
    if close:
        out += b"--" + BOUNDARY + b"--" + epilogue
    return out


def parse(chunks: Iterable[bytes], *, max_part_size: int = 1 << 20, **kwargs: int) -> list[Part]:
    parser = MultipartParser(BOUNDARY, max_part_size=max_part_size, **kwargs)  # type: ignore[arg-type]
    out: list[Part] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    parser.close()
    return out


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# Binary bodies that look like delimiters without being one.
TRICKY = [
    b"",
    b"--",
    b"\r\n--",
    b"\r\n--" + BOUNDARY[:-1],
    b"--" + BOUNDARY,  # not at the start of a line: data
    b"x\r\n-" + BOUNDARY + b"\r\n",
    bytes(range(256)) * 3,
    b"\r\n\r\n--\r\n--" + BOUNDARY[:-1] + b"\r",
    b"\r",
]


def test_one_part_in_one_chunk() -> None:
    parts = parse([body([b"hello"])])
    assert len(parts) == 1
    assert bytes(parts[0].body) == b"hello"
    assert parts[0].content_type == "application/dicom"
    assert parts[0].size == 5


def test_every_split_point_and_byte_by_byte() -> None:
    data = body(TRICKY, preamble=b"pre\r\n--amble", epilogue=b"\r\nafter --" + BOUNDARY)
    expected = [bytes(p.body) for p in parse([data])]
    assert expected == TRICKY
    for cut in range(len(data) + 1):
        assert [bytes(p.body) for p in parse(split_at(data, [cut]))] == TRICKY, cut
    assert [bytes(p.body) for p in parse([data[i : i + 1] for i in range(len(data))])] == TRICKY


def test_random_splits() -> None:
    rng = random.Random(7)
    for _ in range(300):
        parts = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 6))]
        parts = [p.replace(b"--" + BOUNDARY, b"--" + BOUNDARY[:-1]) for p in parts]
        data = body(parts, preamble=rng.randbytes(rng.randrange(0, 40)).replace(b"-", b"x"))
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 20))]
        assert [bytes(p.body) for p in parse(split_at(data, cuts))] == parts


def test_large_parts_in_chunks_of_any_size() -> None:
    """Chunks that lie wholly inside a body are taken without buffering; the result is the
    same whatever the chunking, with delimiter look-alikes on any chunk boundary."""
    large = [bytes(range(256)) * 40, b"\r\n--" + BOUNDARY[:-1] + b"\r\n" * 500, *TRICKY]
    data = body(large * 2, preamble=b"pre", epilogue=b"after")
    rng = random.Random(11)
    for _ in range(300):
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 40))]
        assert [bytes(p.body) for p in parse(split_at(data, cuts))] == large * 2


def test_first_delimiter_without_crlf_and_transport_padding() -> None:
    data = b"--" + BOUNDARY + b" \t\r\nA: 1\r\n\r\nx\r\n--" + BOUNDARY + b"--"
    (part,) = parse([data])
    assert bytes(part.body) == b"x"
    assert part.headers == {"a": "1"}


def test_part_without_headers_and_folded_header() -> None:
    data = (
        b"--" + BOUNDARY + b"\r\n\r\nno headers\r\n--" + BOUNDARY + b"\r\n"
        b"Content-Type: application/dicom;\r\n\ttransfer-syntax=1.2\r\n\r\nx\r\n"
        b"--" + BOUNDARY + b"--\r\n"
    )
    first, second = parse([data])
    assert first.headers == {} and bytes(first.body) == b"no headers"
    assert second.content_type == "application/dicom; transfer-syntax=1.2"


def test_missing_close_delimiter() -> None:
    with pytest.raises(MalformedMultipart, match="close delimiter"):
        parse([body([b"a", b"b"], close=False)])
    with pytest.raises(MalformedMultipart, match="close delimiter"):
        parse([b"no parts at all"])
    with pytest.raises(MalformedMultipart, match="close delimiter"):
        parse([b""])


def test_delimiter_followed_by_junk() -> None:
    with pytest.raises(MalformedMultipart, match="other than CRLF"):
        parse([b"--" + BOUNDARY + b"X\r\n\r\nbody\r\n--" + BOUNDARY + b"--"])
    with pytest.raises(MalformedMultipart, match="not a header field"):
        parse([b"--" + BOUNDARY + b"\r\nno colon\r\n\r\nbody\r\n--" + BOUNDARY + b"--"])


def test_header_too_long() -> None:
    big = b"--" + BOUNDARY + b"\r\nX: " + b"a" * 20_000 + b"\r\n\r\nx\r\n--" + BOUNDARY + b"--"
    with pytest.raises(ObjectTooLarge, match="header block"):
        parse([big])
    # Fed in small chunks, it stops once the limit is passed, before the end arrives.
    parser = MultipartParser(BOUNDARY, max_part_size=100, max_header_size=1000)
    with pytest.raises(ObjectTooLarge, match="header block"):
        for i in range(0, len(big), 100):
            parser.feed(big[i : i + 100])
            assert i < 1200


def test_part_too_large_is_discarded_and_reported() -> None:
    data = body([b"x" * 100, b"y" * 101, b"z" * 10])
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        small, large, after = parse(chunks, max_part_size=100)
        assert bytes(small.body) == b"x" * 100 and not small.too_large
        assert large.too_large and large.body == b"" and large.size == 101
        assert bytes(after.body) == b"z" * 10


def test_keep_predicate_discards_body() -> None:
    parser = MultipartParser(
        BOUNDARY,
        max_part_size=1000,
        keep=lambda headers: headers.get("content-type") == "application/dicom",
    )
    data = body([b"a"])[: -len(b"--" + BOUNDARY + b"--")]
    data += b"--" + BOUNDARY + b"\r\nContent-Type: text/html\r\n\r\n<html>\r\n"
    data += b"--" + BOUNDARY + b"--"
    first, second = parser.feed(data)
    parser.close()
    assert first.kept and bytes(first.body) == b"a"
    assert not second.kept and second.body == b"" and second.size == 6
    assert second.content_type == "text/html"


def test_too_many_parts() -> None:
    data = body([b"p"] * 11)
    assert len(parse([data], max_parts=11)) == 11
    with pytest.raises(ObjectTooLarge, match="more than 10 parts"):
        parse([data], max_parts=10)


def test_epilogue_is_ignored_and_feed_after_close_delimiter() -> None:
    parser = MultipartParser(BOUNDARY, max_part_size=100)
    assert len(parser.feed(body([b"a"], epilogue=b"\r\n--" + BOUNDARY + b"\r\n"))) == 1
    assert parser.done
    assert parser.feed(b"--" + BOUNDARY + b"\r\n\r\nmore\r\n") == []
    parser.close()


def test_check_boundary() -> None:
    assert check_boundary("abc'()+_,-./:=? x") == b"abc'()+_,-./:=? x"
    for bad in ("", "a" * 71, "ends with space ", "bad\r\n", "é"):
        with pytest.raises(MalformedMultipart):
            check_boundary(bad)


def test_read_parts_bounds_the_whole_body() -> None:
    data = body([b"a" * 50, b"b" * 50])

    async def stream(size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    async def collect(limit: int) -> list[bytes]:
        parser = MultipartParser(BOUNDARY, max_part_size=100)
        return [bytes(p.body) async for p in read_parts(stream(16), parser, limit)]

    assert asyncio.run(collect(len(data))) == [b"a" * 50, b"b" * 50]
    with pytest.raises(ObjectTooLarge, match="http_max_body_size"):
        asyncio.run(collect(len(data) - 1))
