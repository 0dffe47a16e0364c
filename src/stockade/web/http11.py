"""The HTTP/1.1 protocol of the listener: uvicorn's httptools (llhttp) protocol, bounded.

llhttp parses a request in C, where h11 copies each body chunk through Python buffers
about three times: a STOW-RS upload costs about 13 % less CPU with it (docs/benchmarks.md).
But neither uvicorn's protocol nor httptools bounds the request head: httptools gathers a
header value, and uvicorn the URL and the list of fields, for as long as the client sends
them (RFC 9110 leaves the limits to the server). h11, which uvicorn uses otherwise, stops
at ``h11_max_incomplete_event_size``. :class:`BoundedHttpTools` restores that bound (threat
model SR-14): a request line and fields of more than :data:`MAX_HEAD` bytes (64 KiB, as for h11), or
more than :data:`MAX_FIELDS` fields, are answered 400 and the connection closed before
anything reaches the application; so is a head still incomplete after :data:`MAX_HEAD`
bytes were received (what the parser holds meanwhile is bounded by that and one read of at
most 256 KiB).
"""

from __future__ import annotations

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Most bytes of a request head (request line and header fields).
MAX_HEAD = 64 * 1024
#: Most header fields of one request.
MAX_FIELDS = 200


class HeadTooLarge(httptools.HttpParserCallbackError):
    """A request head over :data:`MAX_HEAD` bytes or :data:`MAX_FIELDS` fields."""


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request head bounded (see the module)."""

    _in_head = True
    _head_bytes = 0  # received while the head is incomplete
    _head_size = 0  # of the request line and fields parsed
    _refusal: str | None = None

    def data_received(self, data: bytes) -> None:
        """Count the bytes of an incomplete head before the parser keeps them."""
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)  # a HeadTooLarge from a callback is answered 400
        if self._in_head and self._head_bytes > MAX_HEAD and not self.transport.is_closing():
            self._refusal = "Request head too large."
            self.logger.warning(self._refusal)
            self.send_400_response(self._refusal)

    def send_400_response(self, msg: str) -> None:
        """A 400 answer, saying why when the head was too large."""
        super().send_400_response(self._refusal or msg)

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            self._refusal = "Request head too large."
            raise HeadTooLarge(self._refusal)

    def on_message_begin(self) -> None:
        """A request starts: its head is being received."""
        self._in_head = True
        self._head_size = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        """A piece of the request target."""
        self._grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One field; too many, or too many bytes, end the request."""
        self._grow(len(name) + len(value) + 4)
        if len(self.headers) >= MAX_FIELDS:
            self._refusal = "Too many header fields."
            raise HeadTooLarge(self._refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The head is complete: the body is bounded elsewhere (``http_max_body_size``)."""
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()
