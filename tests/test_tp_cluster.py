"""Tensor parallelism in a real cluster on the real SmolLM2 (9 heads, 3 KV heads), CPU and gloo, one cluster for
every case (its start is most of the cost):

    prefill-0: 1 rank  ->  decode-0: 3 ranks      (round-robin routing pairs them: request k goes to
    prefill-1: 3 ranks ->  decode-1: 1 rank        prefill-(k % 2) and decode-(k % 2))

- greedy output of both pairs equals the single-process engine's, with the KV pulled (no recompute), whole and
  layer group by layer group (the router restarted with `kv_streaming`), and no block held anywhere afterwards;
- kill -9 of one rank of decode-0 while it streams a request: the worker reports unhealthy and exits, the router
  stops routing to it, the request resumes on decode-1 and ends with the single-process engine's text, and no KV
  block stays held on the other workers.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from engine.llm import LLM
from engine.request import SamplingParams
from tests.cluster_util import rank_pids, wait_blocks_free, worker_load
from tests.test_tp_engine import wait_gone
from worker.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Three primary colors are"]
MAX_TOKENS = 8
LONG = 32  # the request a rank is killed under
RANKS = {"prefill-0": 1, "prefill-1": 3, "decode-0": 3, "decode-1": 1}


class MixedCluster(LocalCluster):
    """The launcher of `disagg serve`, with a tensor-parallel size per worker rather than per pool, and ports that
    sort in worker order (the round-robin policies order workers by address)."""

    ports = dict(zip(RANKS, sorted(free_port() for _ in RANKS)[:2] + sorted(free_port() for _ in RANKS)[:2],
                     strict=True))

    def worker_cmd(self, name: str, port: int) -> list[str]:
        return super().worker_cmd(name, port or self.ports[name]) + ["--tensor-parallel-size", str(RANKS[name])]


def write_config(path: Path, streaming: bool) -> None:
    cfg: dict[str, Any] = {
        "model": "smollm2",
        "engine": {"cache": {"num_blocks": 96}, "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 512}},
        "transfer": {"backend": "nixl", "timeout_s": 20, "lease_s": 60},
        "router": {"health_interval_s": 0.5, "prefill_policy": "round_robin", "decode_policy": "round_robin",
                   "kv_streaming": streaming},
        "pools": {"prefill": {"replicas": 2}, "decode": {"replicas": 2}},
    }
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The workers, loading (the router starts once they are READY, in `cluster`)."""
    tmp = tmp_path_factory.mktemp("tp_cluster")
    path = tmp / "cluster.yaml"
    write_config(path, streaming=False)
    c = MixedCluster(ClusterConfig.load(str(path)), str(path), router_port=free_port(), quiet=True,
                     log_dir=str(tmp), startup_timeout_s=600)
    try:
        for name in RANKS:
            c.start_worker(name)
        yield c
    finally:
        live = [c.procs[n].popen.pid for n in RANKS if n in c.procs and c.procs[n].popen.poll() is None]
        ranks = [r for pid in live for r in rank_pids(pid)]
        c.stop()
    wait_gone(ranks, 30)  # a stopped worker stops its ranks


@pytest.fixture(scope="module")
def reference(launched: LocalCluster) -> dict[tuple[str, int], str]:
    """The single-process engine's greedy text per (prompt, max_tokens), computed while the workers load."""
    llm = LLM("smollm2", num_blocks=64)
    return {(p, n): llm.generate(p, SamplingParams(max_tokens=n, temperature=0))[0].text
            for p in PROMPTS for n in (MAX_TOKENS, LONG)}


@pytest.fixture(scope="module")
def cluster(launched: LocalCluster, reference: dict) -> LocalCluster:
    for name in RANKS:
        launched.wait_worker(name)
    # Picked now, not when the workers started: their ranks open connections on ephemeral ports while they load,
    # and one took a port picked minutes earlier (the router then exited with "Address already in use").
    launched.router_port = free_port()
    launched.start_router()
    return launched


def complete(c: LocalCluster, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    r = httpx.post(f"{c.url}/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def loads(c: LocalCluster) -> dict[str, Any]:
    return {n: worker_load(c.procs[n].address) for n in RANKS if c.procs[n].popen.poll() is None}


def assert_idle(c: LocalCluster, names: list[str]) -> None:
    for name in names:
        rep = wait_blocks_free(c.procs[name].address, timeout_s=15)
        assert rep.kv_blocks_free == rep.kv_blocks_total and rep.leased_requests == 0, f"{name} holds blocks"


def test_pairs_of_different_sizes_equal_the_single_process_engine(cluster: LocalCluster, reference: dict) -> None:
    assert [len(rank_pids(cluster.procs[n].popen.pid)) for n in RANKS] == [0, 2, 2, 0]
    before = loads(cluster)
    for p in PROMPTS:  # each prompt through both pairs: 1 -> 3 ranks, then 3 -> 1
        for _ in range(2):
            assert complete(cluster, p) == reference[p, MAX_TOKENS]
    after = loads(cluster)
    for d in ("decode-0", "decode-1"):
        assert after[d].transfers - before[d].transfers == 2, f"{d} pulled every prompt's KV"
        assert after[d].recomputes == before[d].recomputes == 0
    assert_idle(cluster, list(RANKS))


def test_layer_wise_streaming_between_pairs_of_different_sizes(cluster: LocalCluster, reference: dict) -> None:
    """The same pairs with the router sending Decode beside Prefill: each decode rank reads its heads of every layer
    group as the prefill's ranks write them (a layer done on rank 0 is done on every rank: its row-parallel
    all-reduce cannot finish before every rank has passed that layer's attention)."""
    assert cluster.config_path is not None
    write_config(Path(cluster.config_path), streaming=True)
    cluster.kill("router", signal.SIGTERM)
    cluster.start_router()  # a new rotation: request k again goes to prefill-(k % 2) and decode-(k % 2)
    before = loads(cluster)
    for p in PROMPTS:
        for _ in range(2):
            assert complete(cluster, p) == reference[p, MAX_TOKENS]
    after = loads(cluster)
    for d in ("decode-0", "decode-1"):
        assert after[d].stream_reads > before[d].stream_reads, f"{d} pulled layer-wise"
        assert after[d].transfers - before[d].transfers == 2 and after[d].recomputes == 0
    assert_idle(cluster, list(RANKS))


def stream_text(c: LocalCluster, prompt: str, on_chunk) -> str:  # noqa: ANN001 - (chunk index) -> None
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": LONG, "temperature": 0, "stream": True}
    text, n = "", 0
    with httpx.stream("POST", f"{c.url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            on_chunk(n)
            n += 1
    return text


def test_kill_9_of_a_decode_rank_moves_its_request_and_takes_the_worker_down(cluster: LocalCluster,
                                                                              reference: dict) -> None:
    victim = cluster.procs["decode-0"]
    ranks = rank_pids(victim.popen.pid)
    address = victim.address
    killed: list[int] = []

    def kill_when_running(n: int) -> None:
        if n == 3 and not killed and worker_load(address).num_running == 1:  # it runs on decode-0 (3 ranks)
            os.kill(ranks[-1], signal.SIGKILL)
            killed.append(ranks[-1])

    for p in PROMPTS:  # round-robin: one of two consecutive requests lands on decode-0
        assert stream_text(cluster, p, kill_when_running) == reference[p, LONG]
        if killed:
            break
    assert killed, "no request ran on decode-0"
    assert victim.popen.wait(timeout=60) == 1, "a worker whose rank died exits 1 (its supervisor restarts it)"
    wait_gone(ranks, 30)  # no rank outlives its worker (none hangs in a collective)
    view = {w["address"]: w for w in httpx.get(f"{cluster.url}/ready", timeout=5).json()["workers"]}
    assert not view[address]["healthy"], "the router stopped routing to it"
    metrics = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    assert any(ln.startswith("disagg_router_migrations_total") and not ln.endswith(" 0.0")
               for ln in metrics.splitlines()), "the request moved to another decode worker"
    for p in PROMPTS:  # the pool goes on with decode-1
        assert complete(cluster, p) == reference[p, MAX_TOKENS]
    assert_idle(cluster, ["prefill-0", "prefill-1", "decode-1"])


def test_kill_9_of_a_prefill_rank_sends_prompts_elsewhere(cluster: LocalCluster, reference: dict) -> None:
    """A prefill worker whose rank died refuses Prefill until it exits: the decode worker prefills instead (or the
    other prefill worker does), the text is unchanged, and nothing is left held."""
    victim = cluster.procs["prefill-1"]
    ranks = rank_pids(victim.popen.pid)
    os.kill(ranks[0], signal.SIGKILL)
    for p in PROMPTS * 2:  # round-robin sends some of these to prefill-1 until the router sees it unhealthy
        assert complete(cluster, p) == reference[p, MAX_TOKENS]
    assert victim.popen.wait(timeout=60) == 1
    wait_gone(ranks, 30)
    assert_idle(cluster, ["prefill-0", "decode-1"])
