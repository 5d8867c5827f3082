"""The chaos soak on Ray, small (issue 20, part 5): a few dozen requests against a deploy/ray deployment on a
single-node Ray head (1 prefill + 2 decode workers, two router replicas on one port, real SmolLM2 on CPU) while a
worker is killed -9, a router replica is killed (Ray restarts it) and a worker is frozen. benchmarks/chaos_ray.py
has the deployment, benchmarks/chaos.py the checks; the full run is `python -m benchmarks.chaos --ray ...`
(benchmarks/RESULTS.md)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from benchmarks.chaos import SoakConfig
from benchmarks.chaos_faults import ROUTER_KILL, FaultPlan
from benchmarks.chaos_ray import soak_ray  # sets Ray's loopback environment before Ray is imported

# A Ray head, router replicas, planner and workers on the machine: the slow tier. About 2 minutes on two idle
# cores (deploy, model loads, a replacement worker); the limit leaves room for shared ones.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

CONCURRENCY = 8


def test_small_chaos_soak_on_ray_loses_only_the_killed_routers_connections(tmp_path: Path) -> None:
    # kill -9 of the prefill worker first, then a router replica, then a SIGSTOP (of a decode worker, since the
    # prefill worker's replacement is still loading): three faults in about 12 s of load.
    plan = FaultPlan(interval_s=4.0, actions=("kill9", ROUTER_KILL, "stop"), stop_s=(1.0, 4.0))
    report = soak_ray(SoakConfig(requests=60, concurrency=CONCURRENCY, faults=plan), str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    run = report["chaos"]
    where = f"(report and actor logs in {tmp_path})"
    assert sum(run["faults"].values()) >= 3 and run["faults"][ROUTER_KILL] >= 1, (run["fault_log"], where)
    # Every killed replica came back and serves (a restarted router that never served again was a bug).
    assert report["routers_serving_after"] == {"router": True, "router-1": True}, (run["router_kills"], where)
    # No router raised into uvicorn (which closes the connection unanswered: in a kill's window that would pass
    # for a cut connection), and no replica died but of the kills: each replica's processes, as its watcher saw
    # them (it reads every replica every 2 s; none seen means the watcher itself broke).
    assert report["router_errors_logged"] == [], (report["router_errors_logged"], where)
    lives = collections.Counter(p["replica"] for p in report["router_rss"]["processes"])
    kills = collections.Counter(k["name"] for k in run["router_kills"])
    assert set(lives) == {"router", "router-1"}, (report["router_rss"], where)
    assert all(lives[n] - 1 <= kills[n] for n in lives), (lives, kills, where)
    # The one loss: the connections the killed replica held when it died (at most every client's one).
    assert run["cut_by_router_kill"] <= CONCURRENCY * run["faults"][ROUTER_KILL], (run["router_cut_log"], where)
    assert run["errors_to_clients"] == 0, (run["errors"], run["fault_log"], where)
    assert not [e for e in run["errors"] if e["kind"] == "bad"], run["errors"]
    assert run["wrong_text"] == 0, (run["wrong"], run["fault_log"], where)
    assert run["streams_without_done"] == 0
    assert report["leaked_processes"] == [] and report["workers_not_answering"] == [], where
    assert sorted(n.split("-")[0] for n in report["workers_after"]) == ["decode", "decode", "prefill"], \
        report["workers_after"]
    for name, load in report["workers_after"].items():
        assert load["kv_blocks_free"] == load["kv_blocks_total"] > 0 == load["kv_blocks_quarantined"], (name, load)
        assert load["leased_requests"] == load["num_running"] == load["num_waiting"] == 0, (name, load)
    assert report["leaked_blocks"] == 0
    assert report["routers_in_flight_after"] == {"router": 0, "router-1": 0}, report["routers_in_flight_after"]
    assert report["replaced"]["prefill"] >= 1, report["replaced"]
