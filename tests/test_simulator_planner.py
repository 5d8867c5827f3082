"""The planner in simulation decides what it decides in its unit tests (tests/test_planner_policy.py) on the same
metrics: the load traces of those tests go through the simulator's whole chain (replicas' Load reports, a router
snapshot, deploy/pool_metrics.py's sample, the window, deploy/planner.py's decide, the pool's start-up and drain)
and must give the same changes at the same ticks."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from deploy.autoscale import AutoscalingConfig, PoolAutoscaling
from deploy.pool_metrics import HISTOGRAM_OF, histogram_quantile
from router.config import RouterConfig
from router.metrics import ITL_BUCKETS, LATENCY_BUCKETS
from simulator.autoscaler import Autoscaler
from simulator.events import EventLoop
from simulator.metrics import RouterHistogram
from simulator.pool import Pool
from simulator.router import SimRouter
from tests.test_planner_policy import policy, simulate, step_load


class Stub:
    """A replica whose Load report the test sets."""

    def __init__(self, name: str, role: str) -> None:
        self.name, self.role, self.bs = name, role, 16
        self.value = 0.0

    def load_stats(self) -> dict[str, float]:
        return {"queued_prefill_tokens": self.value, "kv_usage": self.value, "kv_blocks_total": 100}

    def idle(self) -> bool:
        return True


def in_simulation(cfg: PoolAutoscaling, load: Callable[[float], float | None], duration: float, start: int = 1,
                  startup_s: float = 0.0, role: str = "prefill") -> list[tuple[float, int, int]]:
    """The unit tests' `simulate`, through the simulator: `load(t)` is the pool's total, spread evenly over the
    replicas serving at that tick, which report it in their Load; for a latency metric, one request of that
    latency observed in the router's histogram since the last tick (none when it is None)."""
    loop = EventLoop()
    router = SimRouter(RouterConfig())
    pool = Pool(role, lambda name: Stub(name, role), startup_s, 1, loop, router)  # type: ignore[arg-type, return-value]
    for _ in range(start):
        pool.start(ready_now=True)
    auto = Autoscaler(AutoscalingConfig(interval_s=1.0, **{role: cfg}), {role: pool}, {role: start})
    hist = {"ttft": RouterHistogram(LATENCY_BUCKETS), "itl": RouterHistogram(ITL_BUCKETS)}
    for step in range(int(duration)):
        t = float(step)
        loop.run_until(t)
        serving = [s for s in pool.live if s.state == "ready"]
        total = load(t)
        if cfg.latency and total is not None:
            hist[HISTOGRAM_OF[cfg.metric]].add(total)
        for s in serving:
            s.replica.value = 0.0 if cfg.latency or total is None else total / len(serving)  # type: ignore[attr-defined]
        router.poll()
        auto.tick(t, router.snapshot({name: h.cumulative() for name, h in hist.items()}))
    return [(d["t"], d["from"], d["to"]) for d in auto.decisions]


def as_read(metric: str, latency: float | None) -> float | None:
    """The p90 the planner reads from a router histogram holding one request of `latency` (bucket resolution)."""
    if latency is None:
        return None
    h = RouterHistogram(LATENCY_BUCKETS if metric == "ttft_p90" else ITL_BUCKETS)
    h.add(latency)
    return histogram_quantile(0.9, h.cumulative())


SCENARIOS = {  # name: (policy overrides, load, duration, start, startup_s) from tests/test_planner_policy.py
    "spike shorter than the up delay": ({"scale_up_delay_s": 20.0, "window_s": 5.0},
                                        step_load(300, 4000, at=100, until=105), 400, 1, 0.0),
    "sustained spike": ({"max_step": 2, "scale_up_delay_s": 10.0, "scale_down_delay_s": 60.0},
                        step_load(300, 3000, at=100, until=300), 600, 1, 15.0),
    "replicas still starting": ({"max_step": 4, "scale_up_delay_s": 5.0}, step_load(0, 1200, at=10), 300, 1, 60.0),
    "slow ramp": ({"scale_up_delay_s": 10.0}, lambda t: 3200 * min(1.0, t / 600), 700, 1, 10.0),
    "slow ramp down": ({"scale_down_delay_s": 30.0}, lambda t: 3200 * max(0.0, 1 - t / 400), 800, 8, 0.0),
    "fast oscillation": ({"scale_up_delay_s": 10.0, "scale_down_delay_s": 10.0, "window_s": 3.0},
                         lambda t: 1600.0 if int(t) % 12 < 6 else 100.0, 600, 2, 0.0),
    "slow oscillation": ({"scale_up_delay_s": 10.0, "scale_down_delay_s": 30.0, "window_s": 5.0, "max_step": 3},
                         lambda t: 2400.0 if int(t) % 200 < 100 else 200.0, 1000, 1, 20.0),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_queued_tokens_decisions_equal_the_unit_tests(name: str) -> None:
    overrides, load, duration, start, startup = SCENARIOS[name]
    cfg = policy(**overrides)
    expected = simulate(cfg, load, duration, start=start, startup_s=startup).changes
    assert in_simulation(cfg, load, duration, start, startup) == expected
    if name == "sustained spike":
        assert expected, "the scenario must move the pool"


def test_kv_usage_decisions_equal_the_unit_tests() -> None:
    cfg = PoolAutoscaling(metric="kv_usage", target=0.5, min_replicas=1, max_replicas=6, scale_up_delay_s=10.0,
                          scale_down_delay_s=40.0, window_s=5.0)
    load = lambda t: 0.3 + 2.2 * math.sin(math.pi * t / 600) ** 2  # noqa: E731 - total KV usage over the replicas
    expected = simulate(cfg, load, 1200, startup_s=20.0).changes
    assert expected
    assert in_simulation(cfg, load, 1200, startup_s=20.0, role="decode") == expected


@pytest.mark.parametrize("metric", ["ttft_p90", "itl_p90"])
def test_latency_decisions_equal_the_unit_tests(metric: str) -> None:
    """tests/test_planner_policy.py's latency case (slow, then no request at all) through the router's histogram
    and deploy/pool_metrics.py, as the planner reads a latency; the unit tests' policy run on the values read."""
    scale = 1.0 if metric == "ttft_p90" else 0.02
    cfg = policy(metric=metric, target=0.5 * scale, scale_up_delay_s=10.0, scale_down_delay_s=30.0, max_replicas=4)
    latency = lambda t: 1.6 * scale if t < 100 else None  # noqa: E731
    expected = simulate(cfg, lambda t: as_read(metric, latency(t)), 400).changes
    assert expected[0] == (10.0, 1, 2) and expected[-1][2] == 1
    assert in_simulation(cfg, latency, 400) == expected
