"""How much of a shared machine's CPU other people's work took while a benchmark ran.

The load average mixes our own processes with everyone else's and lags by a minute. Here: the machine's busy
CPU-seconds (/proc/stat, every process of the kernel) less the CPU-seconds of the processes we name (this one and
the cluster it started, from /proc/PID/stat), per second of wall time: the cores *others* kept busy.
`Alone` makes an engine measurement again when others took its cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from engine.cpu_threads import CLK_TCK, machine_busy_seconds

if TYPE_CHECKING:
    from engine.engine import LLMEngine


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


class Alone:
    """Measurements of an engine alone on its machine. A CPU engine with adaptive threads (engine/cpu_threads.py,
    what a worker runs) takes every core only while the rest of the machine is idle: a measurement whose last step
    ran on fewer (another job took some) is made again after a pause, up to `tries` times, and counted if it
    still did."""

    def __init__(self, eng: LLMEngine, device: str, tries: int = 6, pause_s: float = 2.0) -> None:
        adaptive = not device.startswith("cuda") and eng.config.cpu_threads == "adaptive"
        self.eng, self.want = eng, len(os.sched_getaffinity(0)) if adaptive else 0
        self.tries, self.pause_s = tries, pause_s
        self.retried = self.short = 0  # measurements made again; measurements kept although short of cores

    def __call__(self, measure: Callable[[], Any]) -> Any:
        for i in range(self.tries):
            out = measure()
            if not self.want or self.eng.stats.cpu_threads >= self.want:
                return out
            if i < self.tries - 1:
                self.retried += 1
                time.sleep(self.pause_s)
        self.short += 1
        return out
