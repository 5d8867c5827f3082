"""The planner's policy on metric traces, without Ray: spikes, slow ramps, oscillation, latency metrics.

`simulate` replays a load trace through `decide` the way the planner actor does (one sample and one decision per
tick; a replica serves `startup_s` after it is wanted; a drained one stops counting at once). `assert_no_flapping`
is the contract: every change moves at most `max_step`, stays within [min, max], and comes at least the delay of
its own direction after the previous change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.autoscale import PoolAutoscaling
from deploy.planner import PolicyState, Sample, decide, recommend, window_value


@dataclass
class Run:
    changes: list[tuple[float, int, int]] = field(default_factory=list)  # (t, from, to)
    desired: list[int] = field(default_factory=list)  # per tick


def policy(**kw: object) -> PoolAutoscaling:
    base: dict[str, object] = {"metric": "queued_tokens", "target": 400.0, "min_replicas": 1, "max_replicas": 8,
                               "scale_up_delay_s": 10.0, "scale_down_delay_s": 60.0, "max_step": 1, "window_s": 5.0}
    return PoolAutoscaling(**{**base, **kw})  # type: ignore[arg-type]


def simulate(cfg: PoolAutoscaling, load: Callable[[float], float | None], duration: float, dt: float = 1.0,
             start: int = 1, startup_s: float = 0.0) -> Run:
    """`load(t)`: the pool's total load (queued tokens over all replicas; for latency metrics the latency itself,
    None when no request finished)."""
    run, state, window = Run(), PolicyState(), []
    desired, ready_at = start, [0.0] * start  # when each wanted replica serves
    for step in range(int(duration / dt)):
        t = step * dt
        ready = sum(1 for r in ready_at if r <= t)
        total = load(t)
        value = total if cfg.latency or total is None else (total / ready if ready else None)
        window = [s for s in window if s.t > t - cfg.window_s] + [Sample(t, value, ready)]
        d, state = decide(cfg, window, desired, ready, t, state)
        if d.replicas != desired:
            run.changes.append((t, desired, d.replicas))
            if d.replicas > desired:
                ready_at += [t + startup_s] * (d.replicas - desired)
            else:  # drain the newest first
                ready_at = sorted(ready_at)[:d.replicas]
            desired = d.replicas
        run.desired.append(desired)
    return run


def assert_no_flapping(cfg: PoolAutoscaling, run: Run) -> None:
    prev: float | None = None
    for t, a, b in run.changes:
        assert 1 <= abs(b - a) <= cfg.max_step, (t, a, b)
        assert cfg.min_replicas <= b <= cfg.max_replicas, (t, a, b)
        if prev is not None:
            delay = cfg.scale_up_delay_s if b > a else cfg.scale_down_delay_s
            assert t - prev >= delay, f"change at {t} only {t - prev}s after the previous one (delay {delay})"
        prev = t


def step_load(level0: float, level1: float, at: float, until: float = math.inf) -> Callable[[float], float]:
    return lambda t: level1 if at <= t < until else level0


# ---- spikes --------------------------------------------------------------------------------------------------
def test_spike_shorter_than_the_up_delay_changes_nothing() -> None:
    cfg = policy(scale_up_delay_s=20.0, window_s=5.0)
    run = simulate(cfg, step_load(300, 4000, at=100, until=105), duration=400)
    assert run.changes == []


def test_sustained_spike_scales_up_after_the_delay_in_steps_then_down_after_its_delay() -> None:
    cfg = policy(max_step=2, scale_up_delay_s=10.0, scale_down_delay_s=60.0)
    run = simulate(cfg, step_load(300, 3000, at=100, until=300), duration=600, startup_s=15.0)
    assert_no_flapping(cfg, run)
    ups = [c for c in run.changes if c[2] > c[1]]
    downs = [c for c in run.changes if c[2] < c[1]]
    assert 110 <= ups[0][0] <= 110 + cfg.window_s, ups[0]  # after the delay, and not much later
    assert max(run.desired) == 8 == math.ceil(3000 / 400)
    assert all(t < 300 for t, _, _ in ups) and all(t >= 300 + 60 for t, _, _ in downs)
    assert run.desired[-1] == 1


def test_replicas_still_starting_do_not_make_it_overshoot() -> None:
    cfg = policy(max_step=4, scale_up_delay_s=5.0)
    run = simulate(cfg, step_load(0, 1200, at=10), duration=300, startup_s=60.0)
    assert max(run.desired) == 3  # 1200 tokens / 400 per replica, however long the new ones take to start


# ---- ramps ---------------------------------------------------------------------------------------------------
def test_slow_ramp_only_goes_up_and_tracks_the_load() -> None:
    cfg = policy(scale_up_delay_s=10.0)
    run = simulate(cfg, lambda t: 3200 * min(1.0, t / 600), duration=700, startup_s=10.0)
    assert_no_flapping(cfg, run)
    assert all(b > a for _, a, b in run.changes)
    assert run.desired[-1] == 8
    for t, _, b in run.changes:
        assert b <= math.ceil(3200 * min(1.0, t / 600) / 400) + 1, "ahead of the load"


def test_slow_ramp_down_steps_down_no_faster_than_the_down_delay() -> None:
    cfg = policy(scale_down_delay_s=30.0)
    run = simulate(cfg, lambda t: 3200 * max(0.0, 1 - t / 400), duration=800, start=8)
    assert_no_flapping(cfg, run)
    assert all(b < a for _, a, b in run.changes) and run.desired[-1] == 1


# ---- oscillation ---------------------------------------------------------------------------------------------
def test_oscillation_faster_than_the_delays_changes_nothing() -> None:
    cfg = policy(scale_up_delay_s=10.0, scale_down_delay_s=10.0, window_s=3.0)
    square = lambda t: 1600.0 if int(t) % 12 < 6 else 100.0  # noqa: E731 - high 6 s, low 6 s
    run = simulate(cfg, square, duration=600, start=2)
    assert run.changes == []


def test_slow_oscillation_follows_the_load_but_never_flaps() -> None:
    cfg = policy(scale_up_delay_s=10.0, scale_down_delay_s=20.0, max_step=2)
    square = lambda t: 2400.0 if int(t) % 200 < 100 else 200.0  # noqa: E731 - 100 s high, 100 s low
    run = simulate(cfg, square, duration=1000, startup_s=10.0)
    assert_no_flapping(cfg, run)
    assert max(run.desired) == 6 and min(run.desired[150:]) == 1
    assert len(run.changes) <= 5 * 6  # per cycle: 3 steps of 2 up, 3 down


def test_noise_around_the_target_stays_put() -> None:
    cfg = policy(tolerance=0.1)
    noisy = lambda t: 800.0 * (1 + 0.08 * math.sin(t))  # noqa: E731 - 2 replicas at 400 +- 8 %
    run = simulate(cfg, noisy, duration=600, start=2)
    assert run.changes == []


# ---- latency metrics -----------------------------------------------------------------------------------------
def test_latency_above_target_scales_up_and_idle_scales_to_min() -> None:
    cfg = policy(metric="ttft_p90", target=0.5, scale_up_delay_s=10.0, scale_down_delay_s=30.0, max_replicas=4)
    ttft = lambda t: 1.6 if t < 100 else None  # noqa: E731 - slow, then no request at all
    run = simulate(cfg, ttft, duration=400)
    assert_no_flapping(cfg, run)
    assert run.changes[0] == (10.0, 1, 2) and max(run.desired) == 4
    assert run.desired[-1] == 1


def test_no_sample_yet_holds() -> None:
    cfg = policy()
    d, _ = decide(cfg, [], current=2, ready=0, now=0.0, state=PolicyState())
    assert d.action == "hold" and d.value is None
    d, _ = decide(cfg, [Sample(0.0, None, 0)], current=2, ready=0, now=0.0, state=PolicyState())
    assert d.action == "hold"


# ---- the pieces ----------------------------------------------------------------------------------------------
def test_window_value_weighs_each_sample_by_the_replicas_serving_then() -> None:
    cfg = policy(window_s=10.0)
    samples = [Sample(0.0, 2000.0, 1), Sample(5.0, 1000.0, 2), Sample(9.0, 1000.0, 2)]
    value, needed = window_value(cfg, samples, now=9.0)
    assert value == 4000 / 3 and needed == 5.0  # 5 replicas' worth of load each time
    assert recommend(cfg, value, needed, current=2) == 5
    assert window_value(cfg, samples, now=100.0) == (None, None)  # all outside the window


def test_a_flipping_recommendation_restarts_the_wait() -> None:
    cfg = policy(scale_up_delay_s=3.0, window_s=1.0)
    state, current = PolicyState(), 1
    for t, v in [(0, 2000), (1, 2000), (2, 100), (3, 2000), (4, 2000), (5, 2000)]:
        d, state = decide(cfg, [Sample(float(t), float(v), 1)], current, 1, float(t), state)
        assert d.action == "hold", t
    d, state = decide(cfg, [Sample(6.0, 2000.0, 1)], current, 1, 6.0, state)
    assert d.action == "up" and d.replicas == 2 and "2000" in d.reason and d.waited_s == 3.0


# ---- recorded ------------------------------------------------------------------------------------------------
# Prefill queued prompt tokens over the whole pool, one sample a second, recorded from the router of a real
# deployment of deploy/configs/ray-cpu.yaml on a 2-core CPU machine: idle, then 6 clients sending 300-token prompts
# for 45 s, then idle again. Bursty, with gaps while prompts compute; the second replica took 30 s to load.
RECORDED_QUEUED = [0, 0, 0, 0, 0, 0, 1800, 1800, 1800, 1800, 600, 900, 900, 900, 900, 900, 900, 900, 900, 900, 600,
                   300, 0, 1500, 1200, 600, 0, 1200, 600, 1200, 900, 300, 1500, 600, 1200, 600, 600, 1200, 900, 600,
                   900, 900, 900, 900, 300, 900, 600, 900, 600, 1200, 1200, 600] + [0] * 23


def test_recorded_burst_scales_up_once_and_back_down_once() -> None:
    cfg = policy(target=400.0, max_replicas=2, scale_up_delay_s=3.0, scale_down_delay_s=10.0, window_s=3.0)
    trace = lambda t: float(RECORDED_QUEUED[int(t)])  # noqa: E731
    run = simulate(cfg, trace, duration=len(RECORDED_QUEUED), startup_s=30.0)
    assert_no_flapping(cfg, run)
    assert [(a, b) for _, a, b in run.changes] == [(1, 2), (2, 1)], run.changes
    (up_t, _, _), (down_t, _, _) = run.changes
    assert 9 <= up_t <= 10 and down_t >= 52 + 10


# ---- any trace -----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(levels=st.lists(st.floats(0, 5000), min_size=1, max_size=12), seg=st.integers(1, 60),
       up=st.floats(0, 30), down=st.floats(0, 120), step=st.integers(1, 3), window=st.floats(1, 30),
       startup=st.floats(0, 30))
def test_no_trace_makes_it_flap(levels: list[float], seg: int, up: float, down: float, step: int, window: float,
                                startup: float) -> None:
    cfg = policy(scale_up_delay_s=up, scale_down_delay_s=down, max_step=step, window_s=window)
    run = simulate(cfg, lambda t: levels[min(int(t) // seg, len(levels) - 1)], duration=len(levels) * seg + 200,
                   startup_s=startup)
    assert_no_flapping(cfg, run)
