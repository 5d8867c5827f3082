"""The `autoscaling:`, `resources:` and `ray:` sections: validated on load with errors that name the key; the
pool metrics the planner reads from router snapshots; the planner's Prometheus metrics. No Ray needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from deploy.autoscale import AutoscalingConfig
from deploy.config import ClusterConfig
from deploy.planner_metrics import PlannerCollector, PoolReport
from deploy.pool_metrics import histogram_delta, histogram_quantile, pool_sample, pool_value
from engine.config import ConfigError

PREFILL = {"metric": "queued_tokens", "target": 1024, "min_replicas": 1, "max_replicas": 4}


def cluster(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}}
    return {**base, **sections}


CONFIGS = sorted((Path(__file__).parents[1] / "deploy" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = ClusterConfig.load(str(path))
    if path.name.startswith("ray"):
        assert cfg.autoscaling.prefill is not None


def test_defaults_keep_disagg_serve_configs_as_they_were() -> None:
    cfg = ClusterConfig.from_dict(cluster())
    assert cfg.autoscaling == AutoscalingConfig() and cfg.autoscaling.prefill is None
    assert cfg.prefill.resources.ray_options() == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}
    assert cfg.ray.namespace == "disagg"


def test_full_sections_parse() -> None:
    cfg = ClusterConfig.from_dict(cluster(
        pools={"prefill": {"replicas": 2, "resources": {"num_gpus": 1, "custom": {"prefill_node": 1}}},
               "decode": {"replicas": 1, "resources": {"num_cpus": 4, "num_gpus": 0.5}}},
        autoscaling={"interval_s": 2, "prefill": PREFILL,
                     "decode": {"metric": "itl_p90", "target": 0.05, "max_replicas": 3, "window_s": 30}},
        ray={"namespace": "prod", "router_resources": {"num_cpus": 2, "custom": {"head": 0.5}}}))
    assert cfg.prefill.resources.ray_options() == {"num_cpus": 1.0, "num_gpus": 1, "resources": {"prefill_node": 1}}
    assert cfg.autoscaling.decode is not None and cfg.autoscaling.decode.latency
    assert cfg.ray.router_resources.custom == {"head": 0.5}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"autoscaling": {"prefill": {**PREFILL, "metric": "kv_usage"}}},
     "autoscaling.prefill.metric must be one of queued_tokens, ttft_p90, got 'kv_usage'"),
    ({"autoscaling": {"decode": {"metric": "kv_usage"}}}, "autoscaling.decode.target is required"),
    ({"autoscaling": {"prefill": {**PREFILL, "min_replicas": 3, "max_replicas": 2}}},
     "autoscaling.prefill: max_replicas (2) must be an int >= min_replicas (3)"),
    ({"autoscaling": {"prefill": {**PREFILL, "min_replicas": 0}}}, "scale to zero is not supported"),
    ({"autoscaling": {"interval_s": 10, "prefill": {**PREFILL, "window_s": 5}}},
     "autoscaling.prefill.window_s (5) must be >= interval_s (10)"),
    ({"autoscaling": {"prefill": {**PREFILL, "scale_up_delay_s": -1}}}, "scale_up_delay_s must be >= 0"),
    ({"autoscaling": {"prefill": {**PREFILL, "max_step": 0}}}, "max_step must be an int >= 1"),
    ({"autoscaling": {"decode": {"metric": "kv_usage", "target": 70}}}, "kv_usage target is a fraction in (0, 1]"),
    ({"autoscaling": {"prefill": {**PREFILL, "cooldown": 5}}}, "unknown key(s) in autoscaling.prefill: cooldown"),
    ({"autoscaling": {"prefil": PREFILL}}, "unknown key(s) in autoscaling: prefil"),
    ({"autoscaling": {"interval_s": 0}}, "autoscaling.interval_s must be positive"),
    ({"pools": {"prefill": {"replicas": 5}, "decode": {"replicas": 1}}, "autoscaling": {"prefill": PREFILL}},
     "pools.prefill.replicas (5) is where the pool starts, so it must lie within autoscaling.prefill: [1, 4]"),
    ({"pools": {"prefill": {"replicas": 0}, "decode": {"replicas": 1}}, "autoscaling": {"prefill": PREFILL}},
     "co-located cluster"),
    ({"pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1, "resources": {"num_gpus": -1}}}},
     "pools.decode.resources: num_gpus must be a number >= 0"),
    ({"pools": {"prefill": {"replicas": 1, "resources": {"custom": {"GPU": 1}}}, "decode": {"replicas": 1}}},
     "custom resource 'GPU'"),
    ({"pools": {"prefill": {"replicas": 1, "resources": {"gpus": 1}}, "decode": {"replicas": 1}}},
     "unknown key(s) in pools.prefill.resources: gpus"),
    ({"ray": {"namespace": ""}}, "ray.namespace must be a non-empty string"),
    ({"ray": {"router_resources": {"num_cpus": "two"}}}, "ray.router_resources: num_cpus must be a number"),
    ({"ray": {"drain_timeout": 5}}, "unknown key(s) in ray: drain_timeout"),
    ({"transfer": {"backend": "nixl", "nixl_progress_thread": "yes"}},
     "transfer.nixl_progress_thread must be true, false or null"),
]


@pytest.mark.parametrize(("sections", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_sections_fail_on_load_naming_the_key(tmp_path, sections: dict[str, Any], message: str) -> None:  # noqa: ANN001
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cluster(**sections)))
    with pytest.raises(ConfigError) as e:
        ClusterConfig.load(str(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


# ---- pool metrics from router snapshots ----------------------------------------------------------------------
INF = math.inf


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (INF, 100.0)]
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.9)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.9, [(0.1, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.9, [(0.1, 0.0), (1.0, 1.0), (INF, 10.0)]) == 1.0  # in +Inf: the last finite bound


def test_histogram_delta_covers_only_the_new_observations() -> None:
    prev = [(0.1, 5.0), (1.0, 10.0), (INF, 10.0)]
    cur = [(0.1, 5.0), (1.0, 20.0), (INF, 30.0)]
    assert histogram_delta(prev, cur) == [(0.1, 0.0), (1.0, 10.0), (INF, 20.0)]
    assert histogram_delta(cur, prev) == prev  # counters went backwards: the router restarted
    assert histogram_delta(None, cur) == cur


def snapshot(ttft_count: float = 0.0) -> dict[str, Any]:
    def w(address: str, role: str, healthy: bool = True, draining: bool = False, queued: int = 0,
          in_flight_tokens: int = 0, kv: float = 0.0) -> dict[str, Any]:
        return {"address": address, "role": role, "healthy": healthy, "draining": draining, "in_flight": 0,
                "in_flight_tokens": in_flight_tokens, "load": {"queued_prefill_tokens": queued, "kv_usage": kv}}
    return {"workers": [w("p0", "prefill", queued=900), w("p1", "prefill", in_flight_tokens=300, queued=100),
                        w("p2", "prefill", draining=True, queued=5000), w("p3", "prefill", healthy=False),
                        w("d0", "decode", kv=0.5), w("d1", "decode", kv=0.25)],
            "histograms": {"ttft": [(0.5, ttft_count), (1.0, ttft_count), (INF, ttft_count)],
                           "itl": [(0.05, 0.0), (INF, 0.0)]}}


def test_pool_values_count_only_replicas_that_take_requests() -> None:
    snap = snapshot()
    assert pool_value("queued_tokens", "prefill", snap, None) == (900 + 300) / 2
    assert pool_value("kv_usage", "decode", snap, None) == 0.375
    assert pool_value("itl_p90", "decode", snap, None) is None  # nothing observed
    s = pool_sample("queued_tokens", "prefill", snap, None, t=7.0)
    assert (s.t, s.value, s.ready) == (7.0, 600.0, 2)


def test_latency_is_taken_over_the_requests_since_the_previous_snapshot() -> None:
    before, after = snapshot(ttft_count=100.0), snapshot(ttft_count=100.0)
    after["histograms"]["ttft"] = [(0.5, 100.0), (1.0, 110.0), (INF, 110.0)]
    assert pool_value("ttft_p90", "prefill", after, before) == pytest.approx(0.95)
    assert pool_value("ttft_p90", "prefill", after, after) is None


def test_planner_metrics_render() -> None:
    collector, registry = PlannerCollector(), CollectorRegistry()
    registry.register(collector)
    collector.update({"prefill": PoolReport(desired=2, replicas={"ready": 1, "starting": 1}, autoscaled=True,
                                            metric="queued_tokens", value=812.5, target=400.0, recommended=3,
                                            decisions={"up": 1}),
                      "decode": PoolReport(desired=1, replicas={"ready": 1}, autoscaled=False, replaced=2)})
    text = generate_latest(registry).decode()
    for line in ['disagg_planner_replicas{pool="prefill",state="starting"} 1.0',
                 'disagg_planner_desired_replicas{pool="prefill"} 2.0',
                 'disagg_planner_metric_value{metric="queued_tokens",pool="prefill"} 812.5',
                 'disagg_planner_metric_target{metric="queued_tokens",pool="prefill"} 400.0',
                 'disagg_planner_decisions_total{action="up",pool="prefill"} 1.0',
                 'disagg_planner_replacements_total{pool="decode"} 2.0']:
        assert line in text, line


def test_prefill_workers_capture_no_decode_graphs_unless_the_engine_section_says() -> None:
    cluster = ClusterConfig.from_dict({"model": "m", "engine": {"device": "cuda"}})
    assert cluster.worker_config("prefill").engine.enforce_eager  # it runs prompt steps only
    assert not cluster.worker_config("decode").engine.enforce_eager
    assert not cluster.engine_config().enforce_eager
    explicit = ClusterConfig.from_dict({"model": "m", "engine": {"device": "cuda", "enforce_eager": False}})
    assert not explicit.worker_config("prefill").engine.enforce_eager
