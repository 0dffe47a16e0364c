"""Worker threads for the per-request staging work of STOW-RS (PS3.18 10.5).

Starlette's ``run_in_threadpool`` goes through anyio on every call (a capacity limiter, a
cancel scope, a copy of the context); STOW-RS starts a worker run whenever a request's
queue of parts fills again, so it uses one executor per process through asyncio's
``run_in_executor`` instead. Like anyio, a call whose caller is cancelled is not
abandoned: the caller waits until the thread is done with it, so that nothing the thread
still uses (a staging file) is cleaned up under it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Threads of the executor: one per STOW-RS request whose parts are being staged.
THREADS = 32


class _Pool:
    """The executor of this process (made on first use, again in a forked child)."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.pid = -1
        self.lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        executor = self.executor
        if executor is not None and self.pid == os.getpid():
            return executor
        with self.lock:
            if self.executor is None or self.pid != os.getpid():
                self.executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="web")
                self.pid = os.getpid()
            return self.executor


_POOL = _Pool()


def pool() -> ThreadPoolExecutor:
    """The executor of this process."""
    return _POOL.get()


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in a worker thread and return its result; if the caller is
    cancelled meanwhile, wait for the thread to finish before the cancellation goes on."""
    future = asyncio.get_running_loop().run_in_executor(pool(), fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if not future.done():
            await asyncio.wait([future])
        raise
