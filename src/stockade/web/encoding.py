"""HTTP request body content codings (RFC 9110 section 8.4), decoded as a stream with a cap.

A client may compress a STOW-RS body with ``Content-Encoding: gzip`` or ``deflate``. A few
kilobytes of gzip can expand to gigabytes (threat model SR-14), so the body is inflated
chunk by chunk, never more than :data:`STEP` bytes at a time, and stops with 413 as soon as
the decoded size passes ``http_max_body_size``.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

from stockade.errors import ObjectTooLarge, StockadeError

#: Most bytes one call to the inflater produces (its output is handed on before the next).
STEP = 1024 * 1024


class UnsupportedEncoding(StockadeError):
    """A Content-Encoding other than identity, gzip or deflate (RFC 9110 15.5.16: 415)."""

    http_status = 415
    dimse_status = 0xC000
    code = "unsupported-content-encoding"


class BadEncoding(StockadeError):
    """The body does not decode in its declared Content-Encoding (HTTP 400)."""

    http_status = 400
    dimse_status = 0xC000
    code = "bad-content-encoding"


def check_coding(coding: str | None) -> None:
    """Raise :class:`UnsupportedEncoding` unless *coding* is one :func:`decoded` takes."""
    _inflater(coding)


def _inflater(coding: str | None) -> zlib._Decompress | None:
    name = (coding or "identity").strip().lower()
    if name == "identity":
        return None
    if name in ("gzip", "x-gzip"):  # RFC 9110 8.4.1.3, RFC 1952
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if name == "deflate":  # RFC 9110 8.4.1.2: the zlib format of RFC 1950
        return zlib.decompressobj(zlib.MAX_WBITS)
    raise UnsupportedEncoding(
        f"Content-Encoding {name[:40]!r} is not supported; use identity, gzip or deflate "
        "(one coding, RFC 9110 8.4)"
    )


async def decoded(
    stream: AsyncIterator[bytes], coding: str | None, cap: int
) -> AsyncIterator[bytes]:
    """Yield the body of *stream* decoded from *coding*, at most *cap* bytes of it.

    Raises
    ------
    UnsupportedEncoding
        An unknown coding, or more than one.
    BadEncoding
        The body is not valid gzip/deflate, is truncated, or has bytes after its end.
    ObjectTooLarge
        The decoded body passed *cap* (decoding stops there).
    """
    inflater = _inflater(coding)
    if inflater is None:
        async for chunk in stream:
            yield chunk
        return
    total = 0
    async for chunk in stream:
        data: bytes = chunk
        while data:
            if inflater.eof:
                raise BadEncoding("bytes after the end of the compressed body")
            try:
                out = inflater.decompress(data, STEP)
            except zlib.error as exc:
                raise BadEncoding(f"the body does not decode as {coding}: {exc}") from None
            data = inflater.unconsumed_tail
            if inflater.eof and inflater.unused_data:
                raise BadEncoding("bytes after the end of the compressed body")
            total += len(out)
            if total > cap:
                raise ObjectTooLarge(
                    f"the decoded request body is larger than http_max_body_size ({cap} bytes)"
                )
            if out:
                yield out
    if not inflater.eof:
        raise BadEncoding(f"the {coding} body is truncated")
