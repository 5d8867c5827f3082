"""Replicas sharing one machine or device: worker processes on one VM's cores, or on one GPU.

A step's cost in the profile is its time alone. While other replicas of the device run steps too, it goes slower,
and its rate changes whenever a co-runner starts or ends a step (so a one-second prefill overlapped by a 100 ms
decode step is slowed for those 100 ms only):

- `SharedDevice` (a GPU, or any device without a better model): beside busy co-runners a step runs the profile's
  measured `co_run.prefill_at(tokens)` / `co_run.decode_at(rows)` times slower; without those, `1 + others busy`
  times (processor sharing). A prompt step with no co-runner busy runs `1 + (sustained.prompt - 1) * load` times
  slower, `load` being the device's busy share over the last ~0.1 s (an exponential average): a GPU kept busy
  meets its power limit and lowers its clocks within a few steps, and recovers as fast when idle. The co-run
  multipliers are measured with the GPU kept busy and taken over the profile's tables, so they hold that slowdown
  already. Without a `sustained` figure (CPU profiles, older GPU ones) prompt steps run at the prefill table's
  speed.
- `CpuCores` (worker processes on one machine's cores), with a share (`share`, engine.cpu_share, as clusters
  start their workers): every step in flight re-chooses its threads whenever a replica starts or ends a step (the
  engine does so within a layer), the cores split evenly among the replicas in a step, at least one each. Without
  one, each replica picks its thread count at the start of a step as engine/cpu_threads.py's adaptive rule does
  (the cores the others left idle over the last sample period, at least one) and keeps it to the step's end.
  A step on every core alone runs at the profile's speed (the profile is measured so); on one core `co_run` times
  slower, alone or beside others (with a share: times the fair share of a core when one-thread steps outnumber
  the cores); without a share, on every core while others run too (more threads than cores) by fair shares of the
  cores, or (`measured_oversubscription`) `co_run.oversubscribed_*` times slower, as measured beside a co-runner
  that never pauses (a team of threads waits at its barriers for the one descheduled: 3-6x for a prefill on 2
  cores). Against real one-machine clusters (benchmarks/RESULTS.md, 2026-12-05) those two under- and over-predict;
  the share's rule is what the clusters run now.
  A KV pull between two workers of the machine (`start_transfer`: the TCP backend's sender and reader threads)
  is work on the same cores: `TRANSFER_THREADS` threads each wanting a core, beside the steps' threads. Alone it
  takes the profile's time (measured on the idle machine); while more threads want the cores than there are, it
  and the steps share them fairly, so a pull beside two workers' steps takes about twice its time and slows them
  while it runs. (On a GPU the bytes move by copy engines or the NIC: pulls are not device work there.)
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from simulator.events import EventLoop
from simulator.profile import CoRunCosts, SustainedCosts

# How fast a GPU's clocks follow its load: an H100's 2,048-token prompt steps reached their sustained time within
# 2-3 back-to-back steps of ~50 ms and were back at their idle-device time after one 50 ms pause
# (benchmarks/sustained_steps.py, benchmarks/RESULTS.md).
LOAD_TAU_S = 0.1
TRANSFER_THREADS = 2  # a pull on one machine's cores: the prefill worker's sender and the decode worker's reader


class Stepper(Protocol):
    """What a device needs of a replica: to move the end of its step in flight."""

    def schedule_end(self, t: float) -> None: ...


class _Step:
    """A step in flight on the device: the work left in ms of its time alone, and how fast it goes now."""

    __slots__ = ("left_ms", "prompt", "rate", "rows", "since", "spread", "threads", "tokens", "transfer")

    def __init__(self, work_ms: float, prompt: bool, now: float, threads: int = 1, rows: int = 0,
                 transfer: bool = False, tokens: int = 0) -> None:
        self.left_ms, self.prompt, self.rate, self.since, self.threads = work_ms, prompt, 1.0, now, threads
        self.rows, self.transfer, self.tokens = rows, transfer, tokens
        self.spread = 1.0  # this decode step's draw from co_run.decode_spread (it runs that much off the mean)


class SharedDevice:
    """The replicas of one machine or device and their steps in flight."""

    def __init__(self, loop: EventLoop, co_run: CoRunCosts | None = None,
                 sustained: SustainedCosts | None = None) -> None:
        self.loop = loop
        self.co_run = co_run
        self.sustained = sustained
        self.steps: dict[Stepper, _Step] = {}
        self.rng = random.Random(0)  # the draws of co_run.decode_spread: the same trace simulates the same
        self.load, self._load_at = 0.0, loop.now  # busy share, averaged over ~LOAD_TAU_S, as of _load_at

    carries_transfers = False  # whether KV pulls between its replicas are work on it (start_transfer)

    @property
    def busy(self) -> int:
        """Replicas of this device in a step now."""
        return sum(not s.transfer for s in self.steps.values())

    def slowdown(self, prompt: bool, others: int, rows: int = 0, tokens: int = 0, spread: float = 1.0) -> float:
        """How many times slower than alone a step (of `rows` decode rows, `tokens` prompt tokens; a decode step
        `spread` off the mean co-run) runs while `others` co-runners are in a step."""
        if not others:
            return 1.0 + (self.sustained.prompt - 1.0) * self.load if prompt and self.sustained else 1.0
        if self.co_run is None:
            return 1.0 + others
        return self.co_run.prefill_at(tokens) if prompt else max(1.0, self.co_run.decode_at(rows) * spread)

    def start(self, replica: Stepper, work_ms: float, prompt: bool, rows: int = 0, tokens: int = 0) -> None:
        """`replica` starts a step of `work_ms` (its time alone, `rows` decode rows, `tokens` prompt tokens);
        every step in flight gets its new end."""
        self._settle()
        step = self.steps[replica] = _Step(work_ms, prompt, self.loop.now, self._threads_for(replica), rows,
                                           tokens=tokens)
        if not prompt and self.co_run is not None and self.co_run.spreads:
            step.spread = self.co_run.spread_draw(rows, self.rng.random())
        self._reschedule()

    def start_transfer(self, link: Stepper, work_ms: float) -> None:
        """`link` starts a KV pull of `work_ms` alone (a device that `carries_transfers`); `finish` ends it."""
        raise NotImplementedError(f"{type(self).__name__} does not carry KV transfers")

    def finish(self, replica: Stepper) -> None:
        """`replica`'s step (or a link's pull) ended: the others speed up."""
        self._settle()
        del self.steps[replica]
        self._reschedule()

    def _threads_for(self, replica: Stepper) -> int:
        return 1

    def _settle(self) -> None:
        """Charge every step in flight for the time since its rate last changed."""
        now = self.loop.now
        if now > self._load_at:  # the steps in flight are still those of the interval now ending
            w = math.exp(-(now - self._load_at) / LOAD_TAU_S)
            self.load = self.load * w + (1.0 - w) * (1.0 if self.busy else 0.0)
            self._load_at = now
        for s in self.steps.values():
            s.left_ms = max(0.0, s.left_ms - (now - s.since) * 1e3 * s.rate)
            s.since = now

    def _rates(self) -> None:
        others = self.busy - 1
        for s in self.steps.values():
            s.rate = 1.0 / self.slowdown(s.prompt, others, s.rows, s.tokens, s.spread)

    def _reschedule(self) -> None:
        self._rates()
        now = self.loop.now
        for replica, s in self.steps.items():
            replica.schedule_end(now + s.left_ms / s.rate / 1e3)


class CpuCores(SharedDevice):
    """Worker processes on `cores` cores, each choosing its threads per step (engine/cpu_threads.py, adaptive)."""

    carries_transfers = True

    def __init__(self, loop: EventLoop, co_run: CoRunCosts | None, cores: int, period_s: float = 0.1,
                 measured_oversubscription: bool = True, share: bool = False) -> None:
        super().__init__(loop, co_run)
        self.share = share
        self.cores, self.period_s = max(1, cores), period_s
        self.measured_oversubscription = measured_oversubscription
        self.used: dict[Stepper, float] = {}  # core-seconds each replica has used
        self.total = 0.0  # core-seconds all of them have used (the machine's busy time)
        self.sample: dict[Stepper, tuple[float, float, float]] = {}  # (time, total, own) at its last look
        self.threads: dict[Stepper, int] = {}  # the count its last look chose

    def start_transfer(self, link: Stepper, work_ms: float) -> None:
        self._settle()
        self.steps[link] = _Step(work_ms, False, self.loop.now, TRANSFER_THREADS, transfer=True)
        self._reschedule()

    def _threads_for(self, replica: Stepper) -> int:
        """CpuThreads.apply: look again when the last look is a period old; the idle cores, at least one."""
        now = self.loop.now
        t0, total0, own0 = self.sample.get(replica, (-1e9, 0.0, 0.0))
        if now - t0 >= self.period_s:
            own = self.used.get(replica, 0.0)
            others = max(0.0, (self.total - total0) - (own - own0)) / (now - t0) if t0 > -1e9 else 0.0
            self.threads[replica] = max(1, min(self.cores, int(self.cores - others + 0.7)))
            self.sample[replica] = (now, self.total, own)
        return self.threads.get(replica, 1)

    def _settle(self) -> None:
        now = self.loop.now
        for replica, s in self.steps.items():
            dt = now - s.since
            cores_used = s.threads * self._share()
            self.used[replica] = self.used.get(replica, 0.0) + dt * cores_used
            self.total += dt * cores_used
        super()._settle()

    def _share(self) -> float:
        """Of one core, what each thread gets (all threads alike when there are more than cores)."""
        demand = sum(s.threads for s in self.steps.values())
        return min(1.0, self.cores / demand) if demand else 1.0

    def _rates(self) -> None:
        if self.share and self.busy:  # the steps in flight split the cores (and keep at least one thread each)
            for s in self.steps.values():
                if not s.transfer:
                    s.threads = max(1, self.cores // self.busy)
        share, over = self._share(), self._oversubscribed()
        for s in self.steps.values():
            if s.transfer:  # its threads get their fair share of a core each
                s.rate = share
                continue
            one = self.slowdown(s.prompt, 1, s.rows, s.tokens) if self.cores > 1 else 1.0  # one thread's time over all cores'
            if s.threads == 1 and self.cores > 1:
                # beside busy co-runners as alone: what co_run measured; with a share, more one-thread steps than
                # cores share them fairly (without one, the older model's rule stands)
                s.rate = (share if self.share else 1.0) / one
                continue
            if share < 1.0 and over is not None and not self.share:  # a team with one thread descheduled
                s.rate = 1.0 / (over[0] if s.prompt else over[1])
                continue
            frac = (s.threads - 1) / (self.cores - 1) if self.cores > 1 else 1.0
            s.rate = share * (1.0 / one + (1.0 - 1.0 / one) * frac)

    def _oversubscribed(self) -> tuple[float, float] | None:
        """The measured multipliers of a step on every core beside a busy co-runner; None: not measured."""
        c = self.co_run
        if c is None or not (self.measured_oversubscription and c.oversubscribed_prefill and c.oversubscribed_decode):
            return None
        return c.oversubscribed_prefill, c.oversubscribed_decode
