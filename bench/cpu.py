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


def group_cpu(pgid: int) -> float:
    """CPU seconds used by the live processes of process group *pgid* and their reaped children.

    Each process counts its own user and system time plus that of the children it waited
    for (``cutime``/``cstime``), so short-lived children (``storescp --fork``) are included
    once their parent reaped them.
    """
    total = 0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:  # the process exited meanwhile
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        rest = raw[raw.rfind(")") + 2 :].split()
        if int(rest[2]) != pgid:  # field 5, pgrp
            continue
        total += sum(int(v) for v in rest[11:15])  # fields 14-17: utime stime cutime cstime
    return total / CLOCK_TICKS


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used during a timed window."""

    wall: float
    server: float
    clients: float
    foreign: float
    steal: float

    @property
    def foreign_cores(self) -> float:
        """Average number of cores other processes kept busy during the window."""
        return self.foreign / self.wall if self.wall else 0.0


class CpuMeter:
    """Measures a window: call :meth:`start` just before the clients start, :meth:`stop`
    right after the last one was reaped (the clients must be our direct children)."""

    def __init__(self, server_pgid: int) -> None:
        self.server_pgid = server_pgid
        self._start: tuple[float, ...] | None = None

    @staticmethod
    def _sample(pgid: int) -> tuple[float, ...]:
        return (
            time.perf_counter(),
            system_busy(),
            group_cpu(pgid),
            _children_cpu(),
            time.process_time(),
            system_steal(),
        )

    def start(self) -> None:
        """Take the first sample."""
        self._start = self._sample(self.server_pgid)

    def stop(self) -> CpuUse:
        """Take the second sample and return the use in between."""
        assert self._start is not None, "start() first"
        end = self._sample(self.server_pgid)
        wall, busy, server, clients, me, steal = (
            b - a for a, b in zip(self._start, end, strict=True)
        )
        foreign = max(0.0, busy - server - clients - me)
        return CpuUse(wall=wall, server=server, clients=clients, foreign=foreign, steal=steal)


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
