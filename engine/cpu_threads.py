"""How many threads a CPU engine uses (`engine.cpu_threads`): with `adaptive`, the cores the rest of the machine
leaves idle, shared with the machine's other engine processes through a `CoreShare`.

On one machine the prefill and decode workers share the cores. A fixed split (`disagg serve` gives each worker
cores // 2 through OMP_NUM_THREADS) leaves half the machine idle whenever one worker is: a single stream then
decodes on one core while the prefill worker sleeps. Before each step that runs the model, `LLMEngine.step` calls
`CpuThreads.apply()` on its own thread, which looks at how much CPU everything else on the machine used since its
last look (busy time from /proc/stat, at most every `period_s`) and sets torch's thread count from it.

Alone, that choice held for a whole step: a step that started on every core and was still running when the other
worker woke ran oversubscribed to its end, its threads waiting at every barrier for one the OS had descheduled
(on 2 cores a prefill 3.3-6.2x slower than alone, a decode step 9-14x: benchmarks/cpu_sharing.py). With a share
(`engine.cpu_share`, or $DISAGG_CPU_SHARE, which `disagg serve` sets to one file per cluster) every engine process
of the machine holds a slot in one shared-memory file: its pid, whether it has work (busy from `apply` until
`idle`) and a heartbeat. A forward pre-hook on every decoder layer calls `poll()`, an mmap read and write, and
re-chooses the count, so a worker that wakes gets its cores back within one layer of the other's step. The rule:

    threads = max(floor, min(cores, int(cores - outside + 0.3) // (1 + busy peers)))

`outside` is the cores the machine kept busy over the last period less this process and its peers (by the CPU
time each publishes in its slot): the router, clients, engines outside the share. A core counts as free while
they use less than 0.3 of it. `floor` is the fixed share (the starting OMP_NUM_THREADS), `cores` those this process
may run on. A peer counts as busy while its flag is set, its heartbeat is younger than STALE_S and its pid lives;
a layer that runs longer than STALE_S lets the peers take its cores (the oversubscription above, for that layer).
Without a share (offline `LLM()`, by default) there are no peers and the count is re-chosen only between steps.
Measured on 2 cores (`benchmarks/cpu_sharing.py --wake`, benchmarks/RESULTS.md): a 512-token prefill that the
other worker's decode wakes into 2,550 -> 1,529 ms (alone 810: it gives one core away), the worst decode step
that the other's prefill wakes into 737 -> 137 ms (alone 67).

The thread count changes float32 results only in summation order (about 1e-6 in SmolLM2's logprobs); greedy tokens
stay the same (tests/test_cpu_threads.py). torch's thread count is per calling thread under OpenMP: `apply` runs on
the engine's step thread and the pre-hooks on the thread that runs the forward, the same one.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from engine.config import EngineConfig

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
SHARE_ENV = "DISAGG_CPU_SHARE"  # the share's file when engine.cpu_share is empty (set by `disagg serve`)
SLOTS = 16  # engine processes one share holds; more run without it
PID, BUSY, BEAT, CPU = range(4)  # a slot's fields, float64 each (pid 0: a free slot)
FIELDS = 4
TABLE = struct.Struct(f"@{SLOTS * FIELDS}d")  # native doubles: each field is one aligned 8-byte load or store
STALE_S = 1.0  # a busy slot whose heartbeat is older counts as idle (a stopped or hung process)


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


def threads_for(cores: int, others: float, floor: int, busy_peers: int = 0) -> int:
    """Threads to use when the rest of the machine keeps `others` cores busy and `busy_peers` engines of the share
    have work: the idle cores (a core counts as idle while others use less than 0.3 of it) split evenly between
    the busy engines, at least `floor`, at most `cores`."""
    return max(floor, min(cores, int(cores - others + 0.3) // (1 + busy_peers)))


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreShare:
    """This process's slot in the file the engine processes of one machine share their cores through.

    Only the owner writes a slot after claiming it; readers take no lock. Each field is an aligned 8-byte store, so
    a reader sees a field whole, old or new; claims write the pid last (and releases first), so a reader never
    pairs a new pid with the previous owner's busy flag. Claims hold an fcntl lock on the file."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.path, self._clock, self._cpu = path, clock, cpu
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < TABLE.size:  # sized under the lock: nobody maps a short file
                    os.ftruncate(fd, TABLE.size)
                self._mm = mmap.mmap(fd, TABLE.size)
                self._v = memoryview(self._mm).cast("d")
                self.slot = self._claim()
            finally:  # explicitly: mmap keeps a dup of fd, which would hold the lock for the mapping's life
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self._base = self.slot * FIELDS
        self._release = weakref.finalize(self, _release, self._v, self._base)

    def _claim(self) -> int:
        vals = TABLE.unpack_from(self._mm)
        for slot in range(SLOTS):
            base = slot * FIELDS
            if not pid_alive(int(vals[base + PID])):  # free, or its process died (kill -9) without releasing
                self._v[base + BUSY], self._v[base + BEAT], self._v[base + CPU] = 0.0, self._clock(), self._cpu()
                self._v[base + PID] = float(os.getpid())
                return slot
        raise RuntimeError(f"all {SLOTS} slots of {self.path} are held by live processes")

    def set_busy(self, busy: bool) -> None:
        self._v[self._base + BEAT], self._v[self._base + CPU] = self._clock(), self._cpu()
        self._v[self._base + BUSY] = float(busy)

    def poll(self) -> int:
        """Refresh this slot's heartbeat; the busy peers. 2.5-3.3 us with 16 slots, one busy (a loaded 2-core VM;
        the pre-hook around it the same), mostly the loop below: pids are checked only for fresh busy slots."""
        now = self._clock()
        self._v[self._base + BEAT], self._v[self._base + CPU] = now, self._cpu()
        vals = TABLE.unpack_from(self._mm)
        return sum(1 for b in range(0, SLOTS * FIELDS, FIELDS)
                   if b != self._base and vals[b + BUSY] and now - vals[b + BEAT] < STALE_S
                   and pid_alive(int(vals[b + PID])))

    def peer_cpu(self) -> dict[tuple[int, int], float]:
        """The CPU-seconds each live peer published at its last heartbeat, by (slot offset, pid)."""
        vals = TABLE.unpack_from(self._mm)
        return {(b, int(vals[b + PID])): vals[b + CPU] for b in range(0, SLOTS * FIELDS, FIELDS)
                if b != self._base and pid_alive(int(vals[b + PID]))}

    def close(self) -> None:
        self._release()


def _release(v: memoryview, base: int) -> None:
    if v[base + PID] == os.getpid():  # not in a forked child that inherited the mapping
        v[base + PID] = 0.0
        v[base + BUSY] = 0.0


class CpuThreads:
    """The engine's thread count, re-chosen at most every `period_s` from the machine's idle cores and, with a
    share, between layers from the busy peers."""

    def __init__(self, floor: int | None = None, cores: int | None = None, period_s: float = 0.1,
                 sample: Callable[[], tuple[float, float, float]] = sample_cpu,
                 clock: Callable[[], float] = time.monotonic, share: CoreShare | None = None) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self.floor = max(1, min(self.cores, floor or torch.get_num_threads()))
        self.period_s = period_s
        self.current = self.floor
        self.changes = 0
        self.share = share
        self._sample, self._clock = sample, clock
        self._last = sample()
        self._peers = share.peer_cpu() if share else {}
        self._others = float(self.cores)  # nothing measured yet: the fixed share

    def apply(self) -> int:
        """Before a step that runs the model, on its thread: mark this engine busy, set torch's thread count."""
        t0, machine0, own0 = self._last
        if self.cores > self.floor and self._clock() - t0 >= self.period_s:  # /proc read once a period, not a step
            now, machine, own = self._sample()
            peers = self.share.peer_cpu() if self.share else {}
            engines = sum(max(0.0, c - self._peers[k]) for k, c in peers.items() if k in self._peers)
            self._others = max(0.0, (machine - machine0) - (own - own0) - engines) / (now - t0)
            self._last, self._peers = (now, machine, own), peers
        if self.share is None:
            return self._set(0)
        self.share.set_busy(True)
        return self.poll()

    def poll(self) -> int:
        """Between layers (a forward pre-hook): re-choose from the peers' busy flags, with no /proc read."""
        assert self.share is not None
        return self._set(self.share.poll())

    def idle(self) -> None:
        """The engine has no work: its peers may take its cores."""
        if self.share is not None:
            self.share.set_busy(False)

    def attach(self, layers: Sequence[nn.Module]) -> None:
        """Re-choose before every decoder layer (only with a share: without one nothing changes mid-step)."""
        if self.share is not None and self.cores > self.floor:
            for layer in layers:
                layer.register_forward_pre_hook(self._pre_hook)

    def _pre_hook(self, _module: nn.Module, _args: tuple) -> None:
        self.poll()  # returning its count would replace the layer's arguments

    def close(self) -> None:
        if self.share is not None:
            self.share.close()

    def _set(self, busy_peers: int) -> int:
        self.current = threads_for(self.cores, self._others, self.floor, busy_peers)
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)
            self.changes += 1
        return self.current


def cpu_threads_for(config: EngineConfig, device: torch.device) -> CpuThreads | None:
    """The engine's thread policy: None on GPUs and with tensor parallelism (each rank keeps its own count)."""
    if device.type != "cpu" or config.tensor_parallel_size > 1:
        return None
    if config.cpu_threads != "adaptive":
        n = int(config.cpu_threads)
        return CpuThreads(floor=n, cores=n)
    path = config.cpu_share or os.environ.get(SHARE_ENV, "")
    share = None
    if path:
        try:
            share = CoreShare(path)
        except (OSError, RuntimeError) as e:  # the engine still runs, as without a share
            log.warning("cpu_share %s: %s; adaptive threads without it", path, e)
    return CpuThreads(share=share)
