"""Helpers for tests that start real clusters: YAML configs, worker load over gRPC, the reference engine."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import grpc
import yaml

from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from proto import disagg_pb2, disagg_pb2_grpc
from proto.convert import WorkerLoad, load_from_proto
from worker.ports import free_port


def start_cluster(tmp_path, name: str, **overrides: Any) -> LocalCluster:  # noqa: ANN001
    """Write a cluster YAML (SmolLM2, small KV pool) with overrides, start it, wait until /ready."""
    cfg: dict[str, Any] = {
        "model": "smollm2",
        "engine": {"cache": {"num_blocks": 192}, "scheduler": {"max_num_seqs": 32, "max_num_batched_tokens": 1024}},
        "transfer": {"backend": "nixl", "timeout_s": 10, "lease_s": 30},
        "router": {"health_interval_s": 0.5},
        "pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cluster = LocalCluster(ClusterConfig.load(str(path)), str(path), router_port=free_port(), quiet=True,
                           log_dir=str(tmp_path))
    cluster.__enter__()
    return cluster


def worker_load(address: str) -> WorkerLoad:
    async def call() -> disagg_pb2.LoadReport:
        async with grpc.aio.insecure_channel(address) as ch:
            return await disagg_pb2_grpc.WorkerStub(ch).Load(disagg_pb2.LoadRequest(), timeout=5)

    return load_from_proto(asyncio.run(call()))


def wait_blocks_free(address: str, timeout_s: float = 5.0) -> WorkerLoad:
    """Poll until the worker holds no KV blocks and no leases (or the timeout passes); returns the last report."""
    deadline = time.monotonic() + timeout_s
    while True:
        rep = worker_load(address)
        idle = rep.kv_blocks_free == rep.kv_blocks_total and rep.leased_requests == 0 and rep.num_running == 0
        if idle or time.monotonic() > deadline:
            return rep
        time.sleep(0.1)


def rank_pids(pid: int) -> list[int]:
    """The worker's rank processes: its children that run engine.parallel.rank."""
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(k) for k in f.read().split()]
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"engine.parallel.rank" in f.read():
                    out.append(k)
        except FileNotFoundError:
            continue
    return sorted(out)
