"""The chaos soak, small (issue 20, part 5): 120 requests (about 40 s of load; every kind of fault by ~20 s)
against a supervised local cluster (real SmolLM2 on CPU, 1 prefill + 2 decode workers) while workers are killed -9,
frozen and sent SIGTERM in turn, with client aborts, disconnects and bad inputs mixed in. benchmarks/chaos.py has the
checks; the full run is `python -m benchmarks.chaos --requests 10000` (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.chaos import SoakConfig, soak
from benchmarks.chaos_faults import FaultPlan

# Starts real router/worker processes: not in the fast tier. About 1-2 minutes on two idle cores; the limit leaves room
# for shared ones (workers restart after every kill, reloading the model).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

def test_small_chaos_soak_loses_nothing(tmp_path: Path) -> None:
    report = soak(SoakConfig(requests=120, concurrency=12, faults=FaultPlan(interval_s=5.0)), str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    run = report["chaos"]
    where = f"(logs in {tmp_path})"
    assert sum(run["faults"].values()) >= 3 and all(run["faults"].values()), (run["fault_log"], where)
    assert run["errors_to_clients"] == 0, (run["errors"], run["fault_log"], where)
    assert run["wrong_text"] == 0, (run["wrong"], run["fault_log"], where)
    assert run["streams_without_done"] == 0
    assert run["bad_inputs_rejected"] == run["kinds"]["bad"] > 0
    assert report["leaked_processes"] == [] and report["workers_not_answering"] == []
    for name, load in report["workers_after"].items():
        assert load["kv_blocks_free"] == load["kv_blocks_total"] > 0 == load["kv_blocks_quarantined"], (name, load, where)
        assert load["leased_requests"] == load["num_running"] == load["num_waiting"] == 0, (name, load)
    assert report["router_rss"]["growth_mib"] < 64, report["router_rss"]
    assert report["leaked_blocks"] == 0
