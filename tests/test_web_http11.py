"""The listener's HTTP/1.1 protocol (web/http11.py): llhttp with the request head bounded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from stockade.web.http11 import MAX_FIELDS, MAX_HEAD, BoundedHttpTools


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers the number of header fields and of body bytes it received."""
    body = 0
    while True:
        message = await receive()
        body += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    text = f"{len(scope['headers'])} {body}".encode()
    length = str(len(text)).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]}
    )
    await send({"type": "http.response.body", "body": text})


@pytest.fixture
def port() -> Iterator[int]:
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(echo_app, http=BoundedHttpTools, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # bounded wait for the event loop to listen
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def exchange(port: int, *pieces: bytes) -> bytes:
    """Send *pieces* one by one (stopping if the server closes), then read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for piece in pieces:
            try:
                conn.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # answered and closed before everything was sent
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
        return out


def head(fields: int = 1, value: bytes = b"x") -> bytes:
    lines = b"".join(b"X-F%d: %s\r\n" % (i, value) for i in range(fields))
    return b"GET / HTTP/1.1\r\nHost: t\r\n" + lines + b"Connection: close\r\n\r\n"


def test_an_ordinary_request_is_served(port: int) -> None:
    answer = exchange(port, head(10))
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"12 0")  # Host, 10 fields, Connection


def test_a_large_body_is_not_counted_as_head(port: int) -> None:
    body = bytes(1_000_000)
    start = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    answer = exchange(port, start % len(body), body)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b" 1000000")


def test_a_huge_header_value_is_refused(port: int) -> None:
    answer = exchange(port, head(1, b"v" * (MAX_HEAD + 1)))
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"Request head too large.")


def test_a_head_that_never_ends_is_refused_in_small_pieces(port: int) -> None:
    # Exactly one byte over the bound, a kilobyte at a time: the server reads it all, so
    # closing the connection after its answer does not reset it.
    start = b"GET / HTTP/1.1\r\nHost: t\r\nX-Long: "
    rest = MAX_HEAD + 1 - len(start)
    pieces = [start] + [b"v" * min(1024, rest - i) for i in range(0, rest, 1024)]
    assert sum(map(len, pieces)) == MAX_HEAD + 1
    answer = exchange(port, *pieces)
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"Request head too large.")


def test_too_many_fields_are_refused(port: int) -> None:
    answer = exchange(port, head(MAX_FIELDS + 5))
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"Too many header fields.")


def test_a_long_target_is_refused(port: int) -> None:
    answer = exchange(port, b"GET /" + b"a" * (MAX_HEAD + 10) + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"Request head too large.")


def test_the_connection_after_a_refusal_is_closed_and_the_server_goes_on(port: int) -> None:
    assert exchange(port, head(1, b"v" * (MAX_HEAD + 1))).startswith(b"HTTP/1.1 400")
    assert exchange(port, head(3)).startswith(b"HTTP/1.1 200")


def test_requests_on_a_kept_alive_connection_each_get_the_bound(port: int) -> None:
    first = b"GET / HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * (MAX_HEAD // 2) + b"\r\n\r\n"
    second = b"GET / HTTP/1.1\r\nHost: t\r\nX-B: " + b"b" * (MAX_HEAD // 2) + b"\r\n"
    answer = exchange(port, first, second + b"Connection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 2
