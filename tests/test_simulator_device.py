"""Replicas sharing one device: a step's rate changes as co-runners start and end steps (processor sharing by the
profile's co-run multipliers), and CPU workers pick their threads as engine/cpu_threads.py's adaptive rule does."""

from __future__ import annotations

from functools import partial

import pytest

from simulator.device import CpuCores, SharedDevice
from simulator.events import EventLoop
from simulator.link import Link
from simulator.profile import CoRunCosts, SustainedCosts, TransferCosts


class Worker:
    """Runs the steps it is given back to back on the device; records when each ended."""

    def __init__(self, loop: EventLoop, device: SharedDevice, steps: list[tuple[float, bool]],
                 tokens: int = 0, rows: int = 0) -> None:
        self.loop, self.device, self.todo, self.tokens, self.rows = loop, device, list(steps), tokens, rows
        self.ends: list[float] = []
        self.threads: list[int] = []  # the threads each step started on
        self.version = 0

    def go(self, _: object = None) -> None:
        work, prompt = self.todo.pop(0)
        self.device.start(self, work, prompt, rows=0 if prompt else self.rows, tokens=self.tokens if prompt else 0)
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


def test_cpu_workers_take_every_core_alone_and_one_beside_a_busy_one() -> None:
    loop = EventLoop()
    dev = CpuCores(loop, CoRunCosts(prefill=2.0, decode=2.0), cores=2)  # no oversubscription measured: fair shares
    a = Worker(loop, dev, [(1000.0, True)] * 4)
    b = Worker(loop, dev, [(100.0, False)] * 2)
    loop.at(0.0, a.go)
    loop.at(0.5, b.go)
    loop.run_until(100.0)
    # b's first look has no history: both cores. 4 threads on 2 cores, half a core each: both at half speed
    assert b.threads[0] == 2 and b.ends[0] == pytest.approx(0.7)
    # its next look (0.2 s later) saw a use one core: one thread, at co_run's speed (1/2)
    assert b.threads[1] == 1 and b.ends[1] == pytest.approx(0.9)
    # a: 500 ms of work alone, 100 at half speed, 133 at 2/3 (3 threads on 2 cores), the rest alone again
    assert a.threads[0] == 2 and a.ends[0] == pytest.approx(0.9 + (1000 - 500 - 100 - 400 / 3) / 1e3)
    # a's next look saw b use 1/3 of a core since its first: both cores again
    assert a.threads[1] == 2 and a.ends[1] == pytest.approx(a.ends[0] + 1.0)


def test_a_team_of_threads_beside_a_busy_worker_runs_as_oversubscribed_as_measured() -> None:
    loop = EventLoop()
    dev = CpuCores(loop, CoRunCosts(prefill=2.0, decode=2.0, oversubscribed_prefill=6.0, oversubscribed_decode=14.0),
                   cores=2)
    a = Worker(loop, dev, [(1000.0, True)])
    b = Worker(loop, dev, [(100.0, False)])
    loop.at(0.0, a.go)
    loop.at(0.5, b.go)
    loop.run_until(100.0)
    assert a.threads == b.threads == [2]
    assert b.ends == [pytest.approx(0.5 + 1.4)]  # 100 ms at 1/14
    assert a.ends == [pytest.approx(1.9 + (500 - 1400 / 6) / 1e3)]  # 1/6 beside b, then alone


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
    # then a look: a used one core (2 threads x 1/2): one thread, 1.6 times slower than on both cores
    assert b.threads[2] == 1 and b.ends[2] == pytest.approx(0.22 + 0.1 * 1.6)


def test_with_a_share_the_cores_are_split_while_both_step_and_given_back_at_once() -> None:
    # engine.cpu_share (how clusters start their CPU workers): a worker re-chooses its threads within a layer when
    # another starts or ends a step. The prefill runs on both cores alone, on one (co_run: 2x slower) while the
    # decode step runs, and on both again the moment it ends; the decode step, one core beside it (1.6x).
    loop = EventLoop()
    dev = CpuCores(loop, CoRunCosts(prefill=2.0, decode=1.6), cores=2, share=True)
    pre, dec = Worker(loop, dev, [(1000.0, True)]), Worker(loop, dev, [(100.0, False)])
    loop.at(0.0, pre.go)
    loop.at(0.5, dec.go)
    loop.run_until(100.0)
    assert dec.threads == [1] and dec.ends == [pytest.approx(0.5 + 0.16)]
    assert pre.ends == [pytest.approx(0.66 + (500 - 160 / 2) / 1e3)]  # 80 ms of work done beside it
    assert dev.steps == {}


def test_with_a_share_more_one_thread_steps_than_cores_share_them() -> None:
    loop = EventLoop()
    dev = CpuCores(loop, CoRunCosts(prefill=2.0, decode=2.0), cores=2, share=True)
    ws = [Worker(loop, dev, [(100.0, False)]) for _ in range(4)]
    for w in ws:
        loop.at(0.0, w.go)
    loop.run_until(100.0)
    # one thread each (co_run: 2x) on half a core each (4 threads, 2 cores): 4x slower
    assert [w.ends[0] for w in ws] == [pytest.approx(0.4)] * 4


def test_a_prompt_step_on_a_device_kept_busy_runs_at_its_sustained_speed_and_recovers_when_idle() -> None:
    """A GPU kept busy meets its power limit and lowers its clocks (simulator/device.py): prompt steps slow towards
    `sustained.prompt` as the busy share rises, decode steps do not, and an idle device is back at the table's."""
    loop = EventLoop()
    dev = SharedDevice(loop, CoRunCosts(prefill=2.0, decode=1.5), SustainedCosts(prompt=1.2))
    busy = Worker(loop, dev, [(100.0, True)] * 20 + [(100.0, False)] * 3)  # 2 s of prompt steps, then decode
    loop.at(0.0, busy.go)
    loop.run_until(10.0)
    gaps = [b - a for a, b in zip([0.0, *busy.ends], busy.ends, strict=False)]
    assert gaps[0] == pytest.approx(0.1)  # the idle device's step: the prefill table's
    assert 0.1 < gaps[1] < gaps[2] < gaps[19]  # the busy share rising
    assert gaps[19] == pytest.approx(0.12, rel=1e-4)  # busy for ~20 time constants: the full multiplier
    assert gaps[20:] == [pytest.approx(0.1)] * 3  # decode steps keep the table's time
    rested = Worker(loop, dev, [(100.0, True)])
    loop.at(loop.now, rested.go)  # 7 s idle
    loop.run_until(20.0)
    assert rested.ends[0] - 10.0 == pytest.approx(0.1, rel=1e-4)


def test_beside_a_busy_co_runner_the_measured_multiplier_holds_the_clock_slowdown_already() -> None:
    loop = EventLoop()
    dev = SharedDevice(loop, CoRunCosts(prefill=2.0, decode=1.5), SustainedCosts(prompt=1.2))
    dec, pre = Worker(loop, dev, [(100_000.0, False)]), Worker(loop, dev, [(100.0, True)] * 10)
    loop.at(0.0, dec.go)
    loop.at(0.0, pre.go)
    loop.run_until(10.0)
    # every prompt step runs co_run.prefill times its table time, however long the device has been busy
    assert [b - a for a, b in zip([0.0, *pre.ends], pre.ends, strict=False)] == [pytest.approx(0.2)] * 10


def test_a_decode_step_beside_a_busy_co_runner_is_slowed_by_its_rows() -> None:
    """co_run.decode_by_batch: a 1-row step beside a prompt runs 1.2x, a 4-row one 1.6x, linear between them."""
    co = CoRunCosts(prefill=1.5, decode=1.6, decode_batch=(1, 4), decode_by_batch=(1.2, 1.6))
    ends = {}
    for rows in (1, 4, 2, 16):
        loop = EventLoop()
        dev = SharedDevice(loop, co)
        pre = Worker(loop, dev, [(10_000.0, True)])
        loop.at(0.0, pre.go)
        probe = _Probe(loop, dev)
        loop.at(0.0, partial(probe.go, rows))
        loop.run_until(1.0)
        ends[rows] = probe.end
    assert ends[1] == pytest.approx(0.12) and ends[4] == pytest.approx(0.16)
    assert ends[2] == pytest.approx(0.1 * (1.2 + 0.4 / 3))
    assert ends[16] == pytest.approx(0.16)  # held past the largest batch measured


def test_a_prompt_beside_a_busy_co_runner_is_slowed_by_its_length() -> None:
    """co_run.prefill_by_tokens: a prompt of 1,024 tokens beside decode steps runs 2.25x, one of 2,048 2.0x, linear
    between them and held past both ends; a step whose length is not known takes `prefill`."""
    co = CoRunCosts(prefill=2.0, decode=1.5, prefill_tokens=(1024, 2048), prefill_by_tokens=(2.25, 2.0))
    took = {}
    for tokens in (512, 1024, 1536, 2048, 4096, 0):
        loop = EventLoop()
        dev = SharedDevice(loop, co)
        dec, pre = Worker(loop, dev, [(100_000.0, False)]), Worker(loop, dev, [(100.0, True)], tokens)
        loop.at(0.0, dec.go)
        loop.at(0.0, pre.go)
        loop.run_until(1.0)
        took[tokens] = pre.ends[0]
    assert took == {512: pytest.approx(0.225), 1024: pytest.approx(0.225), 1536: pytest.approx(0.2125),
                    2048: pytest.approx(0.2), 4096: pytest.approx(0.2), 0: pytest.approx(0.2)}
    from engine.config import ConfigError

    for bad in ({"prefill_tokens": (2048, 1024), "prefill_by_tokens": (2.0, 2.25)},
                {"prefill_tokens": (1024,), "prefill_by_tokens": (0.9,)}, {"prefill_tokens": (1024,)}):
        with pytest.raises(ConfigError, match="prefill_tokens"):
            CoRunCosts(prefill=2.0, decode=1.5, **bad)


class _Probe:
    """One 100-ms decode step of some rows and its end, as the device schedules it."""

    def __init__(self, loop: EventLoop, device: SharedDevice) -> None:
        self.loop, self.device, self.end, self.version = loop, device, -1.0, 0

    def go(self, rows: int, _: object = None) -> None:
        self.device.start(self, 100.0, False, rows)

    def schedule_end(self, t: float) -> None:
        self.version += 1
        self.loop.at(t, self._end, self.version)

    def _end(self, version: int) -> None:
        if version == self.version:
            self.end = self.loop.now
            self.device.finish(self)


def test_a_profile_without_decode_by_batch_uses_one_multiplier_and_bad_ones_are_refused() -> None:
    from engine.config import ConfigError

    assert CoRunCosts(prefill=1.5, decode=1.6).decode_at(1) == 1.6
    for bad in ({"decode_batch": (1, 4), "decode_by_batch": (1.2,)}, {"decode_batch": (4, 1),
                "decode_by_batch": (1.2, 1.6)}, {"decode_batch": (1,), "decode_by_batch": (0.9,)}):
        with pytest.raises(ConfigError):
            CoRunCosts(prefill=1.5, decode=1.6, **bad)


@pytest.mark.parametrize("cpu", [True, False])
def test_a_kv_pull_between_workers_of_one_machine_shares_its_cores_with_their_steps(cpu: bool) -> None:
    """On CPU cores a pull (the TCP backend's sender and reader threads) is work beside the steps: alone it takes
    the profile's time; beside a decode step on both cores, four threads want two cores, so each runs at half
    speed while both run. On a GPU the link moves the bytes beside the steps; pulls queue one after another."""
    loop = EventLoop()
    co = CoRunCosts(prefill=2.0, decode=1.6)
    dev = CpuCores(loop, co, cores=2, share=True) if cpu else SharedDevice(loop, co)
    link = Link("decode-0", loop, TransferCosts("tcp", gib_s=100.0), dev)  # a GiB in 10 ms
    done: list[tuple[str, float]] = []
    link.pull(2**30, lambda tag: done.append((tag, loop.now)), "alone")
    loop.run_until(1.0)
    assert done == [("alone", pytest.approx(0.010))]
    dec = Worker(loop, dev, [(100.0, False)])
    loop.at(1.0, dec.go)
    loop.at(1.0, lambda _: link.pull(2**30, lambda tag: done.append((tag, loop.now)), "beside"))
    loop.at(1.0, lambda _: link.pull(2**30, lambda tag: done.append((tag, loop.now)), "queued"))
    loop.run_until(10.0)
    if cpu:  # 10 ms of each at half speed beside the step (20 ms each); the step's last 80 ms alone after
        assert done[1:] == [("beside", pytest.approx(1.020)), ("queued", pytest.approx(1.040))]
        assert dec.ends == [pytest.approx(1.040 + 0.080)]
    else:
        assert done[1:] == [("beside", pytest.approx(1.010)), ("queued", pytest.approx(1.020))]
        assert dec.ends == [pytest.approx(1.100)]
    assert dev.steps == {}


def _decode_steps_beside_a_prompt(co: CoRunCosts, n: int, rows: int = 0) -> list[float]:
    """n decode steps of 10 ms alone (of `rows` rows), back to back, all beside one long prompt: each one's time."""
    loop = EventLoop()
    dev = SharedDevice(loop, co)
    pre, dec = Worker(loop, dev, [(1e9, True)]), Worker(loop, dev, [(10.0, False)] * n, rows=rows)
    loop.at(0.0, pre.go)
    loop.at(0.0, dec.go)
    loop.run_until(1e6)
    return [round((b - a) * 1e3, 6) for a, b in zip([0.0, *dec.ends], dec.ends, strict=False)]


def test_a_decode_step_beside_a_prompt_draws_its_multiplier_from_the_spread_around_the_mean() -> None:
    spread = (0.5, 1.0, 1.5)  # mean 1: (0.25 + 1.0 + 0.75) / 2
    times = _decode_steps_beside_a_prompt(CoRunCosts(prefill=2.0, decode=2.0, decode_spread=spread), 2000)
    assert min(times) >= 10.0 and max(times) <= 30.0 + 1e-6  # 2.0 x [0.5, 1.5], never faster than alone
    assert len(set(times)) > 1000 and sum(times) / len(times) == pytest.approx(20.0, rel=0.03)
    assert sum(t > 25.0 for t in times) / len(times) == pytest.approx(0.25, abs=0.04)  # u above 3/4
    # The same trace simulates the same: the draws are seeded.
    assert _decode_steps_beside_a_prompt(CoRunCosts(prefill=2.0, decode=2.0, decode_spread=spread), 50) == times[:50]
    # Without a spread every such step is charged the mean.
    assert set(_decode_steps_beside_a_prompt(CoRunCosts(prefill=2.0, decode=2.0), 20)) == {20.0}


def test_a_decode_steps_spread_is_drawn_by_its_rows_where_the_profile_has_spreads_by_rows() -> None:
    """Small steps spread more beside a prompt than large ones: with spreads at 1 and 32 rows, a 1-row step draws
    from the first, a 32-row (or larger) step from the second, and one between from both, linear in rows."""
    wide, none = (0.5, 1.0, 1.5), (1.0, 1.0, 1.0)
    co = CoRunCosts(prefill=2.0, decode=2.0, decode_spread=(0.9, 1.0, 1.1), spread_batch=(1, 32),
                    spread_by_batch=(wide, none))
    assert co.spread_draw(1, 1.0) == 1.5 and co.spread_draw(32, 1.0) == 1.0 and co.spread_draw(64, 0.0) == 1.0
    assert co.spread_draw(16.5, 1.0) == pytest.approx(1.25) and co.spread_draw(0, 0.25) == pytest.approx(0.75)
    assert CoRunCosts(prefill=2.0, decode=2.0, decode_spread=wide).spread_draw(32, 1.0) == 1.5  # no rows: one spread
    assert CoRunCosts(prefill=2.0, decode=2.0).spread_draw(1, 1.0) == 1.0
    assert set(_decode_steps_beside_a_prompt(co, 200, rows=32)) == {20.0}  # not decode_spread: the 32-row one
    small = _decode_steps_beside_a_prompt(co, 2000, rows=1)
    assert min(small) >= 10.0 and max(small) <= 30.0 + 1e-6 and len(set(small)) > 1000
    assert sum(small) / len(small) == pytest.approx(20.0, rel=0.03)


def test_spreads_by_rows_must_each_be_a_spread_at_ascending_rows() -> None:
    from simulator.profile import ConfigError

    ok = (0.5, 1.0, 1.5)
    for rows, spreads, match in (((1, 4), (ok,), "equal length"), ((4, 1), (ok, ok), "ascending"),
                                 ((0,), (ok,), "ascending"), ((1, 4), (ok, (1.2, 0.8)), "at 4 rows")):
        with pytest.raises(ConfigError, match=match):
            CoRunCosts(prefill=2.0, decode=2.0, spread_batch=rows, spread_by_batch=spreads)


def test_a_decode_spread_must_rise_and_have_mean_one() -> None:
    from simulator.profile import ConfigError

    for bad in ((1.0,), (1.2, 0.8), (0.0, 1.0, 2.0), (1.0, 1.2, 1.4)):
        with pytest.raises(ConfigError, match="decode_spread"):
            CoRunCosts(prefill=2.0, decode=2.0, decode_spread=bad)
