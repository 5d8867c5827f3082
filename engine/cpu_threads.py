"""How many threads a CPU engine uses for its next step (`engine.cpu_threads`): with `adaptive`, the cores the rest
of the machine leaves idle.

On one machine the prefill and decode workers share the cores. A fixed split (`disagg serve` gives each worker
cores // 2 through OMP_NUM_THREADS) leaves half the machine idle whenever one worker is: a single stream then
decodes on one core while the prefill worker sleeps. Before each step that runs the model, `LLMEngine.step` calls
`CpuThreads.apply()` on its own thread, which looks at how much CPU everything else on the machine used since its
last look (busy time from /proc/stat, less this process's own) and sets torch's thread count to the cores left
over, never below `floor` (the fixed share) nor above the cores this process may run on.

Two workers doing this converge: when both are busy each sees the other's cores in use and falls back to its fixed
share; when one goes idle the other takes its cores within one `period_s`. The choice holds for a whole step,
though: a step that started on every core and is still running when the other worker wakes runs oversubscribed
to its end, and its threads then wait at every barrier for one the OS has descheduled. Measured on 2 cores
(benchmarks/cpu_sharing.py, results/cpu_sharing_2026-12-05.json): such a prefill runs 3.3-6.2x slower than alone,
a decode step 9-14x. On average it still pays (benchmarks/RESULTS.md "Single stream": throughput under overload
25.8 -> 28.0 tok/s, a lone stream's ITL 62.6 -> 48.5 ms), but it widens the latency tail; `cpu_threads: N` avoids
it. Not yet done: re-choosing between layers of a long step.

The thread count changes float32 results only in summation order (about 1e-6 in SmolLM2's logprobs, as between a
one-thread worker and a two-thread offline engine today); greedy tokens stay the same (tests/test_cpu_threads.py).
torch's thread count is per calling thread under OpenMP, so `apply` must run on the engine's step thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from engine.config import EngineConfig

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds all cores have spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu", f"unexpected /proc/stat line {fields!r}"
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_busy_seconds() -> float:
    t = os.times()
    return t.user + t.system


def sample_cpu() -> tuple[float, float, float]:
    """(monotonic time, machine busy CPU-seconds, this process's CPU-seconds)."""
    return time.monotonic(), machine_busy_seconds(), own_busy_seconds()


def threads_for(cores: int, others: float, floor: int) -> int:
    """Threads to use when the rest of the machine keeps `others` cores busy: the idle cores (a core counts as idle
    while others use less than 0.3 of it), at least `floor`, at most `cores`."""
    return max(floor, min(cores, int(cores - others + 0.3)))


class CpuThreads:
    """The engine's thread count, re-chosen at most every `period_s` from the machine's idle cores."""

    def __init__(self, floor: int | None = None, cores: int | None = None, period_s: float = 0.1,
                 sample: Callable[[], tuple[float, float, float]] = sample_cpu,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self.floor = max(1, min(self.cores, floor or torch.get_num_threads()))
        self.period_s = period_s
        self.current = self.floor
        self.changes = 0
        self._sample, self._clock = sample, clock
        self._last = sample()

    def apply(self) -> int:
        """Set torch's thread count for the step about to run on this thread; returns it."""
        t0, machine0, own0 = self._last
        if self.cores > self.floor and self._clock() - t0 >= self.period_s:  # /proc read once a period, not a step
            now, machine, own = self._sample()
            others = max(0.0, (machine - machine0) - (own - own0)) / (now - t0)
            self._last = (now, machine, own)
            self.current = threads_for(self.cores, others, self.floor)
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)
            self.changes += 1
        return self.current


def cpu_threads_for(config: EngineConfig, device: torch.device) -> CpuThreads | None:
    """The engine's thread policy: None on GPUs and with tensor parallelism (each rank keeps its own count)."""
    if device.type != "cpu" or config.tensor_parallel_size > 1:
        return None
    if config.cpu_threads == "adaptive":
        return CpuThreads()
    n = int(config.cpu_threads)
    return CpuThreads(floor=n, cores=n)
