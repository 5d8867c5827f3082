"""The local launcher keeps serving (issue 20, part 0): real router and worker processes under `LocalCluster` with
the restart policy `disagg serve` uses. A worker killed with -9 comes back on its port and the router takes it back
without being told; the router stays up throughout; past the restart limit the pool goes on smaller; a killed
router comes back with the same workers; after stop no process is left."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deploy.config import ClusterConfig
from deploy.local import LocalCluster, RestartPolicy
from engine.llm import LLM
from engine.request import SamplingParams
from worker.ports import free_port

pytestmark = pytest.mark.cluster  # starts real router/worker processes: not in the fast tier

PROMPT = "The three primary colors are"


def supervised_cluster(tmp_path: Path, policy: RestartPolicy, **overrides: Any) -> LocalCluster:
    cfg: dict[str, Any] = {
        "model": "smollm2", "engine": {"cache": {"num_blocks": 128}},
        "transfer": {"backend": "tcp", "timeout_s": 10, "lease_s": 30},
        "router": {"health_interval_s": 0.5, "rpc_timeout_s": 1.0},
        "pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 2}}, **overrides}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c = LocalCluster(ClusterConfig.load(str(path)), str(path), router_port=free_port(), quiet=True,
                     log_dir=str(tmp_path), restart=policy)
    c.__enter__()
    return c


def wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.2)
    return value


def router_view(c: LocalCluster) -> dict[str, dict[str, Any]]:
    try:
        return {w["address"]: w for w in httpx.get(f"{c.url}/ready", timeout=5).json()["workers"]}
    except (httpx.HTTPError, ValueError):
        return {}


def complete(c: LocalCluster, max_tokens: int = 8) -> str:
    r = httpx.post(f"{c.url}/v1/completions", json={"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens,
                                                      "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class HealthWatch:
    """Polls the router's /health every 0.2 s in a thread; `failures` counts the polls that got no 200."""

    def __init__(self, c: LocalCluster) -> None:
        self.url, self.polls, self.failures = f"{c.url}/health", 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.polls += 1
            try:
                ok = httpx.get(self.url, timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.failures += not ok

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def reference() -> str:
    return LLM("smollm2", num_blocks=64).generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = supervised_cluster(tmp_path_factory.mktemp("launcher"), RestartPolicy(max_restarts=1, backoff_s=0.5))
    try:
        yield c
    finally:
        c.stop()
        time.sleep(0.5)
        leaked = [pid for pid in c.pids if _alive(pid)]
        assert not leaked, f"processes outlived stop(): {leaked}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_worker_comes_back_on_its_port_and_the_router_never_stops(cluster: LocalCluster,
                                                                           reference: str) -> None:
    address = cluster.procs["decode-0"].address
    old_pid = cluster.procs["decode-0"].popen.pid
    health = HealthWatch(cluster)
    try:
        cluster.kill("decode-0", signal.SIGKILL)
        assert complete(cluster) == reference  # served by decode-1 while decode-0 is down
        wait_for("decode-0 restarted", lambda: cluster.procs["decode-0"].state == "up", timeout_s=120)
        assert cluster.procs["decode-0"].popen.pid != old_pid
        assert cluster.procs["decode-0"].address == address
        wait_for("the router taking decode-0 back", lambda: router_view(cluster).get(address, {}).get("healthy"),
                 timeout_s=30)
    finally:
        health.stop()
    assert health.polls > 10 and health.failures == 0, f"/health failed {health.failures} of {health.polls} polls"
    assert cluster.failed == ""
    assert complete(cluster) == reference


def test_past_the_restart_limit_the_pool_goes_on_smaller(cluster: LocalCluster, reference: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="deploy.local")
    cluster.kill("decode-0", signal.SIGKILL)  # its second exit: max_restarts=1 is spent
    wait_for("decode-0 left down", lambda: cluster.procs["decode-0"].state == "down", timeout_s=10)
    time.sleep(2)  # the supervisor does not start it again
    assert cluster.procs["decode-0"].popen.poll() is not None and cluster.procs["decode-0"].state == "down"
    assert cluster.failed == ""
    assert complete(cluster) == reference
    assert "leaving it down, the decode pool goes on with 1 worker(s)" in caplog.text


def test_a_killed_router_comes_back_with_the_same_workers(cluster: LocalCluster, reference: str) -> None:
    before = set(router_view(cluster))
    cluster.kill("router", signal.SIGKILL)
    wait_for("the router serving again", lambda: router_view(cluster), timeout_s=60)
    cluster.wait_ready(timeout_s=30)
    assert set(router_view(cluster)) == before
    assert complete(cluster) == reference
    assert cluster.failed == ""
