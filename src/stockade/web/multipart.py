"""An incremental ``multipart/related`` parser with hard limits (RFC 2046 5.1, RFC 2387).

STOW-RS (PS3.18 10.5, 8.6.1.2) carries its instances as the body parts of a
``multipart/related`` request. :class:`MultipartParser` is fed the request body chunk by chunk
as it arrives (``request.stream()``) and hands back each body part once it is complete, so
memory stays bounded by one part plus one chunk, never by the request (threat model SR-14):

- a part's header block is bounded (:data:`MAX_HEADER_SIZE`), and so is the transport padding
  after a delimiter;
- a part's body is accumulated up to ``max_part_size`` (``max_object_size``): past that it is
  discarded as it arrives and the part is reported :attr:`Part.too_large`; the body of a
  part refused by the ``keep`` predicate (a wrong Content-Type) is never accumulated;
- the number of parts is bounded (:data:`MAX_PARTS`, a constant rather than a setting);
- the preamble and the epilogue are discarded as they arrive.

The whole-body bound (``http_max_body_size``) belongs to the caller, which knows the declared
Content-Length; :func:`read_parts` applies it while it feeds the parser.

Grammar (RFC 2046 5.1.1): the delimiter is ``CRLF "--" boundary``; the first one may open
the body without its CRLF. After a delimiter come optional linear white space and CRLF,
then the part's header fields, an empty line and the body up to the next delimiter; the close
delimiter is the delimiter followed by ``--``, after which everything is epilogue. A delimiter
followed by anything else, a body that ends before the close delimiter, or a header field
without a colon is a :class:`MalformedMultipart` (HTTP 400). Parser state survives any split
of the input into chunks: a delimiter may be cut anywhere, even between CR and LF.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto

from stockade.errors import ObjectTooLarge, StockadeError

#: Largest header block of one part (its fields and the empty line that ends them).
MAX_HEADER_SIZE = 16 * 1024
#: Most body parts one request may carry.
MAX_PARTS = 10_000
#: Longest boundary RFC 2046 5.1.1 allows.
MAX_BOUNDARY = 70
_BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_LWSP = b" \t"


class MalformedMultipart(StockadeError):
    """The request body is not a well-formed ``multipart/related`` entity (HTTP 400)."""

    http_status = 400
    dimse_status = 0xC000
    code = "malformed-multipart"


def check_boundary(boundary: str) -> bytes:
    """The boundary as bytes, checked against RFC 2046 5.1.1 (1 to 70 characters of a
    restricted set, not ending in a space).

    Raises
    ------
    MalformedMultipart
        An empty, overlong or ill-formed boundary.
    """
    if len(boundary) > MAX_BOUNDARY or not _BOUNDARY_CHARS.fullmatch(boundary):
        raise MalformedMultipart("the multipart boundary is missing or not valid (RFC 2046 5.1.1)")
    return boundary.encode("ascii")


@dataclass
class Part:
    """One complete body part.

    Attributes
    ----------
    headers : dict of str to str
        Header fields, names lower-cased (RFC 2045 fields are case-insensitive); a repeated
        field keeps its last value.
    body : bytearray
        The body, unless it was not kept (then empty).
    size : int
        Bytes of body seen, kept or not.
    kept : bool
        False when the ``keep`` predicate refused the part: its body was discarded.
    too_large : bool
        The body was larger than ``max_part_size`` and was discarded.
    """

    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    kept: bool = True
    too_large: bool = False

    @property
    def content_type(self) -> str:
        """The part's Content-Type field ('' when absent)."""
        return self.headers.get("content-type", "")


class _State(Enum):
    PREAMBLE = auto()
    AFTER_DELIMITER = auto()
    HEADERS = auto()
    BODY = auto()
    EPILOGUE = auto()


def parse_headers(block: bytes) -> dict[str, str]:
    """Header fields of a part (RFC 5322 2.2 syntax, folded lines unfolded).

    Raises
    ------
    MalformedMultipart
        A line that is neither a field nor a continuation.
    """
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in block.split(b"\r\n"):
        if not raw:
            continue
        line = raw.decode("latin-1")
        if line[0] in " \t":
            if last is None:
                raise MalformedMultipart("a part's header block starts with a continuation line")
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or any(c in name for c in " \t"):
            raise MalformedMultipart("a part has a header line that is not a header field")
        headers[name] = value.strip()
        last = name
    return headers


class MultipartParser:
    """Incremental parser of one ``multipart/related`` body.

    Parameters
    ----------
    boundary : bytes
        The boundary parameter of the request's Content-Type (see :func:`check_boundary`).
    max_part_size : int
        Largest body kept per part; a larger one is discarded and reported too large.
    keep : callable, optional
        Called with a part's headers once they are complete; a part for which it returns
        False has its body discarded (and reported with ``kept=False``).
    max_parts, max_header_size : int
        Limits, :data:`MAX_PARTS` and :data:`MAX_HEADER_SIZE` by default.
    """

    def __init__(
        self,
        boundary: bytes,
        *,
        max_part_size: int,
        keep: Callable[[Mapping[str, str]], bool] | None = None,
        max_parts: int = MAX_PARTS,
        max_header_size: int = MAX_HEADER_SIZE,
    ) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._max_part_size = max_part_size
        self._keep = keep
        self._max_parts = max_parts
        self._max_header_size = max_header_size
        # The first delimiter may open the body without a CRLF: pretend one was there.
        self._buf = bytearray(b"\r\n")
        self._state = _State.PREAMBLE
        self._part: Part | None = None
        self.parts = 0

    @property
    def done(self) -> bool:
        """True once the close delimiter was seen."""
        return self._state is _State.EPILOGUE

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Part]:
        """Parse the next chunk of the body; return the parts it completed.

        Raises
        ------
        MalformedMultipart
            The body breaks RFC 2046 5.1.1.
        ObjectTooLarge
            A part's header block or the number of parts is over its limit.
        """
        if self._state is _State.EPILOGUE:
            return []
        if self._state is _State.BODY and self._body_only(chunk):
            return []
        self._buf += chunk
        done: list[Part] = []
        while self._step(done):
            pass
        return done

    def _body_only(self, chunk: bytes | bytearray | memoryview) -> bool:
        """Take *chunk* as body without copying it into the buffer, if no delimiter starts
        in what is buffered or in the chunk (the common case for a large part); False, with
        nothing consumed, otherwise."""
        delimiter = self._delimiter
        keep = len(delimiter) - 1
        if len(chunk) <= keep:
            return False
        view = memoryview(chunk)
        carry = self._buf  # shorter than the delimiter between chunks in the body
        if carry and (bytes(carry) + bytes(view[:keep])).find(delimiter) >= 0:
            return False
        data = bytes(view) if isinstance(chunk, memoryview) else chunk
        if data.find(delimiter) >= 0:
            return False
        safe = len(chunk) - keep
        self._body(memoryview(carry))
        self._body(view[:safe])
        self._buf = bytearray(view[safe:])
        return True

    def close(self) -> None:
        """The body has ended.

        Raises
        ------
        MalformedMultipart
            The close delimiter never came (a truncated body, or no parts at all).
        """
        if self._state is not _State.EPILOGUE:
            raise MalformedMultipart(
                "the multipart body ends without its close delimiter (RFC 2046 5.1.1)"
            )

    # -- the state machine: each step consumes from the buffer, or returns False -----------

    def _step(self, done: list[Part]) -> bool:
        buf = self._buf
        state = self._state
        if state is _State.EPILOGUE:
            buf.clear()
            return False
        if state is _State.PREAMBLE or state is _State.BODY:
            at = buf.find(self._delimiter)
            if at < 0:
                # Everything except a possible start of the delimiter is body (or preamble).
                safe = len(buf) - (len(self._delimiter) - 1)
                if safe > 0:
                    self._body(memoryview(buf)[:safe])
                    del buf[:safe]
                return False
            self._body(memoryview(buf)[:at])
            del buf[: at + len(self._delimiter)]
            if self._part is not None:
                done.append(self._part)
                self._part = None
            self._state = _State.AFTER_DELIMITER
            return True
        if state is _State.AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = _State.EPILOGUE
                buf.clear()
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                pending = bytes(buf[:-1]) if buf.endswith(b"\r") else bytes(buf)
                if pending.strip(_LWSP) or len(pending) > self._max_header_size:
                    raise MalformedMultipart(
                        "a multipart delimiter is followed by something other than CRLF"
                    )
                return False
            # Padding is bounded whether or not its CRLF came in the same chunk.
            if buf[:end].strip(_LWSP) or end > self._max_header_size:
                raise MalformedMultipart(
                    "a multipart delimiter is followed by something other than CRLF"
                )
            del buf[: end + 2]
            self.parts += 1
            if self.parts > self._max_parts:
                raise ObjectTooLarge(f"the request has more than {self._max_parts} parts")
            self._state = _State.HEADERS
            return True
        # HEADERS: an empty line ends them; with no fields at all it comes first.
        if buf[:2] == b"\r\n":
            block = b""
            del buf[:2]
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_header_size:
                    raise ObjectTooLarge(
                        f"a part's header block is longer than {self._max_header_size} bytes"
                    )
                return False
            if end + 4 > self._max_header_size:
                raise ObjectTooLarge(
                    f"a part's header block is longer than {self._max_header_size} bytes"
                )
            block = bytes(buf[:end])
            del buf[: end + 4]
        headers = parse_headers(block)
        keep = self._keep(headers) if self._keep is not None else True
        self._part = Part(headers, kept=keep)
        self._state = _State.BODY
        return True

    def _body(self, data: memoryview) -> None:
        part = self._part
        if part is None or not len(data):  # preamble, or nothing
            return
        part.size += len(data)
        if not part.kept or part.too_large:
            return
        if part.size > self._max_part_size:
            part.too_large = True
            part.body = bytearray()
            return
        part.body += data


async def read_parts(
    stream: AsyncIterator[bytes], parser: MultipartParser, max_body_size: int
) -> AsyncGenerator[Part, None]:
    """Feed *stream* to *parser* and yield each part as soon as it is complete.

    Raises
    ------
    ObjectTooLarge
        The body grew past *max_body_size* (reading stops there).
    MalformedMultipart
        As :meth:`MultipartParser.feed` and :meth:`MultipartParser.close`.
    """
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > max_body_size:
            raise ObjectTooLarge(
                f"the request body is larger than http_max_body_size ({max_body_size} bytes)"
            )
        for part in parser.feed(chunk):
            yield part
    parser.close()
