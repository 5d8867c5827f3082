"""Replicas sharing one device: a step's rate changes as co-runners start and end steps (processor sharing by the
profile's co-run multipliers), and CPU workers pick their threads as engine/cpu_threads.py's adaptive rule does."""

from __future__ import annotations

import pytest

from simulator.device import CpuCores, SharedDevice
from simulator.events import EventLoop
from simulator.profile import CoRunCosts


class Worker:
    """Runs the steps it is given back to back on the device; records when each ended."""

    def __init__(self, loop: EventLoop, device: SharedDevice, steps: list[tuple[float, bool]]) -> None:
        self.loop, self.device, self.todo = loop, device, list(steps)
        self.ends: list[float] = []
        self.threads: list[int] = []  # the threads each step started on
        self.version = 0

    def go(self, _: object = None) -> None:
        work, prompt = self.todo.pop(0)
        self.device.start(self, work, prompt)
        self.threads.append(self.device.steps[self].threads)

    def schedule_end(self, t: float) -> None:
        self.version += 1
        self.loop.at(t, self._end, self.version)

    def _end(self, version: int) -> None:
        if version != self.version:
            return
        self.device.finish(self)
        self.ends.append(self.loop.now)
        if self.todo:
            self.go()


def test_a_prefill_is_slowed_only_while_a_decode_step_runs_beside_it() -> None:
    loop = EventLoop()
    dev = SharedDevice(loop, CoRunCosts(prefill=2.0, decode=1.5))
    pre, dec = Worker(loop, dev, [(1000.0, True)]), Worker(loop, dev, [(100.0, False)])
    loop.at(0.0, pre.go)
    loop.at(0.0, dec.go)
    loop.run_until(10.0)
    assert dec.ends == [pytest.approx(0.15)]  # 100 ms of work at 1/1.5
    assert pre.ends == [pytest.approx(0.15 + 0.925)]  # 75 ms of work done beside it, 925 ms alone after


def test_without_multipliers_busy_replicas_share_the_device() -> None:
    loop = EventLoop()
    dev = SharedDevice(loop)
    a, b = Worker(loop, dev, [(100.0, False)]), Worker(loop, dev, [(100.0, False)])
    loop.at(0.0, a.go)
    loop.at(0.05, b.go)
    loop.run_until(10.0)
    assert a.ends == [pytest.approx(0.15)]  # 50 ms alone, then 50 ms at half speed
    assert b.ends == [pytest.approx(0.2)]


def test_cpu_workers_take_every_core_alone_and_their_share_beside_a_busy_one() -> None:
    loop = EventLoop()
    dev = CpuCores(loop, CoRunCosts(prefill=2.0, decode=2.0), cores=2)
    a = Worker(loop, dev, [(1000.0, True)] * 4)
    b = Worker(loop, dev, [(100.0, False)] * 2)
    loop.at(0.0, a.go)
    loop.at(0.5, b.go)
    loop.run_until(100.0)
    # b's first look has no history: both cores. 4 threads on 2 cores, half a core each: both at half speed
    assert b.threads[0] == 2 and b.ends[0] == pytest.approx(0.7)
    # its next look (0.2 s later) saw a use one core: one thread; 3 threads, 2/3 of a core each, b at 2/3 x 1/2
    assert b.threads[1] == 1 and b.ends[1] == pytest.approx(1.0)
    # a: 500 ms of work alone, 100 at half speed, 200 at 2/3 speed, the last 200 alone again
    assert a.threads[0] == 2 and a.ends[0] == pytest.approx(1.2)
    # a's next look (1.2 s after its first) saw b use 0.4 core-seconds: 0.33 cores, so both cores
    assert a.threads[1] == 2 and a.ends[1] == pytest.approx(2.2)


def test_a_cpu_worker_looks_again_only_after_the_sample_period() -> None:
    loop = EventLoop()
    dev = CpuCores(loop, CoRunCosts(prefill=2.0, decode=1.6), cores=2)
    a = Worker(loop, dev, [(1000.0, True)] * 10)
    b = Worker(loop, dev, [(10.0, False)] + [(100.0, False)] * 3)
    loop.at(0.0, a.go)
    loop.at(0.0, b.go)
    loop.run_until(100.0)
    # 10 ms at half speed; the next step starts 0.02 s after b's look: same threads, 100 ms at half speed
    assert b.threads[:2] == [2, 2] and b.ends[:2] == [pytest.approx(0.02), pytest.approx(0.22)]
    # then a look: a used one core (2 threads x 1/2): one thread, 2/3 of a core at 1/1.6 of the speed of both
    assert b.threads[2] == 1 and b.ends[2] == pytest.approx(0.22 + 0.1 * 1.6 * 1.5)
