"""How much of a shared machine's CPU other people's work took while a benchmark ran.

The load average mixes our own processes with everyone else's and lags by a minute. Here: the machine's busy
CPU-seconds (/proc/stat, every process of the kernel) less the CPU-seconds of the processes we name (this one and
the cluster it started, from /proc/PID/stat), per second of wall time: the cores *others* kept busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from engine.cpu_threads import CLK_TCK, machine_busy_seconds


def process_cpu_s(pid: int) -> float:
    """User + system CPU-seconds of a live process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of proc(5))


class ForeignCpu:
    """Cores kept busy by processes other than `pids` (and this one) between `start` and `stop`."""

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = [os.getpid(), *pids]
        self._t0 = self._machine0 = self._own0 = 0.0

    def _own(self) -> float:
        return sum(process_cpu_s(p) for p in self.pids)

    def start(self) -> ForeignCpu:
        self._t0, self._machine0, self._own0 = time.monotonic(), machine_busy_seconds(), self._own()
        return self

    def stop(self) -> float:
        """Cores others kept busy since `start` (0 = nobody else ran; 2 = both cores of a 2-core machine)."""
        wall = max(1e-6, time.monotonic() - self._t0)
        foreign = (machine_busy_seconds() - self._machine0) - (self._own() - self._own0)
        return round(max(0.0, foreign) / wall, 3)


def wait_for_quiet(max_cores: float, wait_s: float, window_s: float = 5.0, pids: Iterable[int] = ()) -> float:
    """Wait (at most `wait_s`) for a `window_s` window in which others kept fewer than `max_cores` busy; returns
    the last window's figure."""
    deadline = time.monotonic() + wait_s
    while True:
        probe = ForeignCpu(pids).start()
        time.sleep(window_s)
        cores = probe.stop()
        if cores < max_cores or time.monotonic() >= deadline:
            return cores
