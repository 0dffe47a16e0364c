"""The HTTP workers' shared listening socket spreads connections opened together."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from stockade.web import server
from stockade.web.server import FairListener


@pytest.fixture
def listener() -> Iterator[FairListener]:
    plain = socket.create_server(("127.0.0.1", 0))
    shared = FairListener(fileno=plain.detach())
    shared.setblocking(False)
    yield shared
    shared.close()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits of the listener (recorded instead of slept)."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


def _connect(listener: FairListener, count: int) -> list[socket.socket]:
    clients = [socket.create_connection(listener.getsockname()) for _ in range(count)]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # every handshake done: all are pending
        if all(c.getpeername() for c in clients):
            break
    return clients


def test_one_connection_per_readiness_and_a_busy_worker_waits(
    listener: FairListener, waits: list[float]
) -> None:
    clients = _connect(listener, 3)
    first, _ = listener.accept()  # serves nothing yet: no wait
    assert waits == []
    with pytest.raises(BlockingIOError):
        listener.accept()  # the event loop's accept loop stops here; the socket stays ready
    second, _ = listener.accept()  # serves one connection: lets another worker go first
    assert waits == [server.ACCEPT_DEFER]
    with pytest.raises(BlockingIOError):
        listener.accept()
    first.close()
    second.close()
    third, _ = listener.accept()  # closed connections no longer count
    assert waits == [server.ACCEPT_DEFER]
    for conn in [third, *clients]:
        conn.close()


def test_waiting_is_bounded(listener: FairListener, waits: list[float]) -> None:
    clients = _connect(listener, 8)
    served: list[socket.socket] = []
    while len(served) < 8:
        try:
            served.append(listener.accept()[0])
        except BlockingIOError:
            continue
    assert max(waits) == 2 * server.ACCEPT_DEFER  # counting two connections at most
    # Seven accepts while serving connections, no more waiting than the budget (which
    # refills by ACCEPT_DEFER_BUDGET per second: this test takes far less than one).
    assert sum(waits) <= server.ACCEPT_DEFER_BUDGET * 1.5
    for conn in served + clients:
        conn.close()
