"""The chaos soak, small (issue 20, part 5): a few hundred requests against a supervised local cluster (real
SmolLM2 on CPU, 1 prefill + 2 decode workers) while workers are killed -9, frozen and sent SIGTERM in turn, with
client aborts, disconnects and bad inputs mixed in. benchmarks/chaos.py has the checks; the full run is
`python -m benchmarks.chaos --requests 10000` (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.chaos import SoakConfig, soak
from benchmarks.chaos_faults import FaultPlan

# Starts real router/worker processes: not in the fast tier. About 3 minutes on two idle cores; the limit leaves room
# for shared ones (workers restart after every kill, reloading the model).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

# Known bugs outside the launcher, not yet fixed; a run that hits only these is reported as an expected failure
# (with what it hit), and every other error or leak still fails the test. Delete each once it is fixed.
# - router/generation.py: Decode calls queued at a frozen decode worker reach it after the router gave up on its
#   token stream, find no subscription and fail with FAILED_PRECONDITION, which the router reports to the client
#   instead of sending the request to another worker.
KNOWN_ROUTER_RACE = "no Subscribe stream named"
# - decode_worker/kv_pull.py: a request aborted while it holds a KV reservation that no transfer will report on
#   (suspected: its Decode call cancelled between `receive_kv` and the read) leaves its blocks quarantined for good.
KNOWN_QUARANTINE_LEAK = "blocks left in quarantine"


def test_small_chaos_soak_loses_nothing(tmp_path: Path) -> None:
    report = soak(SoakConfig(requests=200, concurrency=12, faults=FaultPlan(interval_s=6.0)), str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    run = report["chaos"]
    where = f"(logs in {tmp_path})"
    known: list[str] = []
    assert sum(run["faults"].values()) >= 3 and all(run["faults"].values()), (run["fault_log"], where)
    raced = [e for e in run["errors"] if KNOWN_ROUTER_RACE in e["error"]]
    assert run["errors_to_clients"] == len(raced), (run["errors"], run["fault_log"], where)
    known += [f"{len(raced)} request(s) failed with {KNOWN_ROUTER_RACE!r}"] if raced else []
    assert run["wrong_text"] == 0, (run["wrong"], run["fault_log"], where)
    assert run["streams_without_done"] == 0
    assert run["bad_inputs_rejected"] == run["kinds"]["bad"] > 0
    assert report["leaked_processes"] == [] and report["workers_not_answering"] == []
    for name, load in report["workers_after"].items():
        quarantined = load["kv_blocks_quarantined"]
        assert load["kv_blocks_free"] + quarantined == load["kv_blocks_total"] > 0, (name, load, where)
        assert load["leased_requests"] == load["num_running"] == load["num_waiting"] == 0, (name, load)
        known += [f"{name}: {quarantined:.0f} {KNOWN_QUARANTINE_LEAK}"] if quarantined else []
    assert report["router_rss"]["growth_mib"] < 64, report["router_rss"]
    if known:
        pytest.xfail("only known bugs hit: " + "; ".join(known))
    assert report["leaked_blocks"] == 0
