"""Router unit tests without servers: worker-picking policies and config parsing."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import ConfigError
from proto.convert import WorkerLoad
from router.config import RouterConfig
from router.policy import make_policy
from router.registry import WorkerState


def _state(address: str, **load: Any) -> WorkerState:
    return WorkerState(address, role="both", healthy=True, load=WorkerLoad(load))


def test_round_robin_cycles() -> None:
    workers = [_state("b"), _state("a"), _state("c")]
    rr = make_policy("round_robin", "decode")
    assert [rr.choose(workers).address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert rr.choose(workers[:1]).address == "b"


def test_least_loaded_prefill_counts_queue_and_in_flight() -> None:
    a, b = _state("a", queued_prefill_tokens=500, num_waiting=1), _state("b", queued_prefill_tokens=100, num_waiting=9)
    ll = make_policy("least_loaded", "prefill")
    assert ll.choose([a, b]) is b  # fewer queued tokens wins over fewer waiting requests
    b.load = WorkerLoad({**b.load.stats, "queued_prefill_tokens": 500})
    assert ll.choose([a, b]) is a  # tokens tie: fewer waiting
    with b.dispatched(1000):  # a burst the next Load report does not show yet
        assert ll.choose([a, b]) is a
    with a.dispatched(100), b.dispatched(50):
        assert ll.choose([a, b]) is b


def test_least_loaded_decode_prefers_free_kv_then_fewest_running() -> None:
    a, b = _state("a", kv_usage=0.6, num_running=1), _state("b", kv_usage=0.2, num_running=8)
    ll = make_policy("least_loaded", "decode")
    assert ll.choose([a, b]) is b
    a.load = WorkerLoad({**a.load.stats, "kv_usage": 0.21})  # within one step of b: running decides
    assert ll.choose([a, b]) is a
    idle = [_state("x"), _state("y")]
    picked = []
    for _ in range(4):  # a burst with no new Load report spreads through the in-flight counts
        w = ll.choose(idle)
        w.in_flight += 1
        picked.append(w.address)
    assert sorted(picked) == ["x", "x", "y", "y"]
    with pytest.raises(ValueError):
        make_policy("random", "decode")


def test_router_config_from_dict() -> None:
    cfg = RouterConfig.from_dict({"port": 9000, "api_keys": ["k"], "decode_policy": "round_robin"})
    assert cfg.api_keys == ("k",) and cfg.port == 9000
    for bad in ({"prot": 1}, {"prefill_policy": "random"}, {"health_interval_s": 0}, {"port": "x"}):
        with pytest.raises(ConfigError):
            RouterConfig.from_dict(bad)
