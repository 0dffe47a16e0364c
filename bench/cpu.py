"""CPU accounting from /proc: what the server, the clients and everything else used.

The benchmark machine may be shared (tests, other servers). A run's figures are only
comparable if the rest of the machine was quiet, so every run records the CPU time used
during the timed window by the archive's process group, by the storescu clients, and by
*other* processes (``foreign``: system busy time minus ours). Runs with noticeable foreign
load are flagged in the report, and :func:`wait_until_quiet` holds a run back (bounded) while
something else keeps the CPUs busy.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _cpu_line() -> list[int]:
    with (PROC / "stat").open(encoding="ascii") as fh:
        return [int(v) for v in fh.readline().split()[1:9]]


def system_busy() -> float:
    """CPU seconds spent busy (user, nice, system, irq, softirq) on all cores since boot."""
    user, nice, system, _idle, _iowait, irq, softirq, _steal = _cpu_line()
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def system_steal() -> float:
    """CPU seconds the hypervisor gave to others while this machine wanted to run."""
    return _cpu_line()[7] / CLOCK_TICKS


def group_cpu(pgid: int, also: str | None = None) -> tuple[float, float]:
    """CPU seconds used by process group *pgid*, and by processes named *also* outside it.

    Each process counts its own user and system time plus that of the children it waited
    for (``cutime``/``cstime``), so short-lived children (``storescp --fork``, PostgreSQL
    backends reaped by the postmaster) are included once their parent reaped them. *also*
    names (by ``comm``) a separate server the archive uses, e.g. ``postgres``.
    """
    group = extra = 0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:  # the process exited meanwhile
            continue
        # The command name is in parentheses and may hold spaces; fields follow it.
        comm = raw[raw.find("(") + 1 : raw.rfind(")")]
        rest = raw[raw.rfind(")") + 2 :].split()
        ticks = sum(int(v) for v in rest[11:15])  # fields 14-17: utime stime cutime cstime
        if int(rest[2]) == pgid:  # field 5, pgrp
            group += ticks
        elif also is not None and comm == also:
            extra += ticks
    return group / CLOCK_TICKS, extra / CLOCK_TICKS


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used during a timed window."""

    wall: float
    server: float
    #: The separate database server the archive uses (PostgreSQL), if any.
    database: float
    clients: float
    foreign: float
    steal: float

    @property
    def foreign_cores(self) -> float:
        """Average number of cores other processes kept busy during the window."""
        return self.foreign / self.wall if self.wall else 0.0


class CpuMeter:
    """Measures a window: call :meth:`start` just before the clients start, :meth:`stop`
    right after the last one was reaped (the clients must be our direct children).

    *database* names the processes of a separate database server (``postgres``) whose CPU
    time counts as the archive's, not as foreign load. On a shared machine that also takes in
    other users of the same database server.
    """

    def __init__(self, server_pgid: int, database: str | None = None) -> None:
        self.server_pgid = server_pgid
        self.database = database
        self._start: tuple[float, ...] | None = None

    def _sample(self) -> tuple[float, ...]:
        group, database = group_cpu(self.server_pgid, self.database)
        return (
            time.perf_counter(),
            system_busy(),
            group,
            database,
            _children_cpu(),
            time.process_time(),
            system_steal(),
        )

    def start(self) -> None:
        """Take the first sample."""
        self._start = self._sample()

    def stop(self) -> CpuUse:
        """Take the second sample and return the use in between."""
        assert self._start is not None, "start() first"
        end = self._sample()
        wall, busy, server, database, clients, me, steal = (
            b - a for a, b in zip(self._start, end, strict=True)
        )
        foreign = max(0.0, busy - server - database - clients - me)
        return CpuUse(
            wall=wall,
            server=server,
            database=database,
            clients=clients,
            foreign=foreign,
            steal=steal,
        )


def busy_cores(interval: float = 1.0) -> float:
    """Average number of busy cores over *interval* seconds."""
    before = system_busy()
    time.sleep(interval)
    return (system_busy() - before) / interval


def wait_until_quiet(threshold: float, limit: float) -> tuple[float, float]:
    """Wait (at most *limit* seconds) until fewer than *threshold* cores are busy.

    Returns the seconds waited and the last busy-cores sample.
    """
    start = time.monotonic()
    while True:
        busy = busy_cores()
        waited = time.monotonic() - start
        if busy < threshold or waited >= limit:
            return waited, busy
