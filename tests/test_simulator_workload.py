"""Workloads and fleets for the simulator: trace files in the public layouts, generators' rates and mixes, and a
fleet split into cells that loses no request and divides its pools and bounds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.config import ClusterConfig
from engine.config import ConfigError
from simulator.config import SimConfig
from simulator.fleet import cell_config, run_fleet
from simulator.trace import read_trace, write_trace
from simulator.workload import Lengths, Workload
from tests.test_simulator import cluster_cfg, profile


def test_traces_in_mooncake_azure_and_our_layout_read_alike(tmp_path) -> None:  # noqa: ANN001
    rows = [(0.0, 120, 7), (0.25, 3000, 40), (1.5, 64, 1)]
    moon = tmp_path / "m.jsonl"
    moon.write_text("".join(json.dumps({"timestamp": int(t * 1000) + 5000, "input_length": i, "output_length": o,
                                        "hash_ids": [1, 2]}) + "\n" for t, i, o in rows))
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{46 + t:09.6f}0,{i},{o}\n" for t, i, o in rows))
    ours = tmp_path / "o.csv"
    assert write_trace(str(ours), [([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])]) == 3
    for path in (moon, azure, ours):
        times, ins, outs = read_trace(str(path))
        assert times == pytest.approx([0.0, 0.25, 1.5], abs=1e-6), path
        assert (ins, outs) == ([120, 3000, 64], [7, 40, 1])
    times, _, _ = read_trace(str(ours), time_scale=2.0, duration_s=0.5)
    assert times == pytest.approx([0.0, 0.125])
    bad = tmp_path / "b.csv"
    bad.write_text("when,in,out\n1,2,3\n")
    with pytest.raises(ConfigError):
        read_trace(str(bad))


def test_generators_make_their_rate_their_day_and_their_mix() -> None:
    w = Workload("diurnal", 20.0, 86400.0, Lengths.parse("1000"), Lengths.parse("100"), peak_rate=60.0,
                 mix_prompt=Lengths.parse("50"), mix_output=Lengths.parse("500"), mix_low=0.1, mix_high=0.9, seed=3)
    chunks = list(w.chunks(3600.0))
    per_hour = [len(c[0]) / 3600 for c in chunks]
    assert sum(len(c[0]) for c in chunks) == pytest.approx(w.expected_requests(), rel=0.01)
    assert per_hour[14] == pytest.approx(60.0, rel=0.05) and per_hour[2] == pytest.approx(20.0, rel=0.08)
    share_b = [np.mean(np.array(c[1]) == 50) for c in chunks]
    assert share_b[20] == pytest.approx(0.9, abs=0.03) and share_b[8] == pytest.approx(0.1, abs=0.03)
    times = [t for c in chunks for t in c[0]]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 86400
    bursty = Workload("bursty", 10.0, 20000.0, Lengths.parse("lognormal:500:0.8:4000"), Lengths.parse("10:20"),
                      burst_factor=3.0, burst_every_s=2000.0, burst_s=200.0, seed=1)
    n = sum(len(c[0]) for c in bursty.chunks())
    assert n == pytest.approx(bursty.expected_requests(), rel=0.02) and n > 10.0 * 20000 * 1.05
    lengths = Lengths.parse("lognormal:500:0.8:4000").sample(np.random.default_rng(0), 200_000)
    assert lengths.mean() == pytest.approx(500, rel=0.02) and lengths.max() <= 4000


def test_a_fleet_in_cells_divides_pools_and_bounds_and_loses_no_request() -> None:
    cfg = ClusterConfig.from_dict({**_dict(cluster_cfg(5, 3)), "autoscaling": {
        "interval_s": 5, "prefill": {"min_replicas": 2, "max_replicas": 9, "metric": "queued_tokens", "target": 4000,
                                     "max_step": 4},
        "decode": {"min_replicas": 1, "max_replicas": 4, "metric": "kv_usage", "target": 0.5}}})
    cell = cell_config(cfg, 2)
    assert (cell.prefill.replicas, cell.decode.replicas) == (3, 2)
    assert (cell.autoscaling.prefill.min_replicas, cell.autoscaling.prefill.max_replicas,
            cell.autoscaling.prefill.max_step) == (1, 5, 2)
    w = Workload("poisson", 40.0, 120.0, Lengths.parse("200:2000"), Lengths.parse("5:50"), seed=2)
    one = run_fleet(cfg, SimConfig(sample_s=10.0), profile(), None, w.chunks, 120.0, cells=1, processes=1)
    two = run_fleet(cfg, SimConfig(sample_s=10.0), profile(), None, w.chunks, 120.0, cells=2, processes=2)
    assert one["summary"]["arrived"] == two["summary"]["arrived"] == two["summary"]["completed"]
    assert sum(r["arrivals_s"] for r in two["timeline"]) * 10 == pytest.approx(two["summary"]["arrived"], abs=1)
    assert two["cells"] == 2 and two["pools"]["prefill"]["started"] >= 6


def _dict(cfg: ClusterConfig) -> dict[str, object]:
    return {"model": cfg.model, "engine": cfg.engine, "pools": {"prefill": {"replicas": cfg.prefill.replicas},
                                                                "decode": {"replicas": cfg.decode.replicas}}}
