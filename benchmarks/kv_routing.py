"""KV-aware routing against other prefill policies, on a shared-prefix workload, one fresh local cluster per policy.

    python -m benchmarks.kv_routing [--policies least_loaded,kv_aware] [--prefill-replicas 2] [--num-blocks N] \
        -- --conversations 8 --turns 4 --prompt-len 256 --turn-len 32 --output-len 16

Everything after `--` goes to `disagg bench` (benchmarks/serving.py), which gets --url and --metrics from here.
Each cluster (router, N prefill workers, 1 decode worker, SmolLM2) first serves a few short warm-up requests.
Prints one markdown row per policy: TTFT p50/p90/p99, E2E p50, the prefill workers' prefix-cache hit rate, the
router's predicted overlap, prompt tokens the prefill workers computed, and the KV bytes the decode worker pulled.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import httpx
import yaml

from benchmarks import serving
from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from worker.ports import free_port


def cluster_config(policy: str, a: argparse.Namespace) -> dict[str, Any]:
    cache: dict[str, Any] = {"block_size": 16}
    if a.num_blocks:
        cache["num_blocks"] = a.num_blocks
    return {
        "model": "smollm2",
        "engine": {"dtype": "float32", "cache": cache,
                   "scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": a.max_num_batched_tokens}},
        "transfer": {"backend": a.transfer_backend, "timeout_s": 30, "lease_s": 120},
        "router": {"prefill_policy": policy, "decode_policy": a.decode_policy or policy, "health_interval_s": 0.5},
        "pools": {"prefill": {"replicas": a.prefill_replicas}, "decode": {"replicas": 1}},
    }


def warm_up(url: str, n: int) -> None:
    for i in range(n):
        body = {"model": "smollm2", "prompt": [200 + i] * 40, "max_tokens": 4, "ignore_eos": True}
        httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()
    time.sleep(2.0)  # let the router poll every worker, so the run's first /metrics read includes the warm-up


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="least_loaded,kv_aware",
                   help="prefill policies to compare, in order (repeat them to alternate rounds)")
    p.add_argument("--decode-policy", default="", help="decode policy for every run (default: the same as prefill)")
    p.add_argument("--prefill-replicas", type=int, default=2)
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks per worker (default: the memory budget's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--transfer-backend", default="tcp", choices=["tcp", "nixl"])
    p.add_argument("--warmup", type=int, default=4, help="short requests before each measured run")
    p.add_argument("--out", default="benchmarks/out/kv_routing", help="output prefix (JSON per policy and summary)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then `disagg bench` options")
    a = p.parse_args(argv)
    bench_args = [x for x in a.bench_args if x != "--"]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    rows = []
    for i, policy in enumerate(a.policies.split(",")):
        tmp = tempfile.mkdtemp(prefix=f"kv-{policy}-")
        path = os.path.join(tmp, "cluster.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cluster_config(policy, a), f)
        with LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True, log_dir=tmp) as c:
            warm_up(c.url, a.warmup)
            result = serving.main(["--url", c.url, "--metrics", "--label", policy, "--out", f"{a.out}-{i}-{policy}",
                                   *bench_args])
        for run in result["runs"]:
            rows.append({"policy": policy, **run})
    with open(a.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("| prefill policy | requests | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | E2E p50 ms | prefill hit rate "
          "| predicted overlap | prefill tokens computed | decode KV pulled MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kv = r.get("kv", {})
        print(f"| {r['policy']} | {r['completed']}/{r['requests']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} | "
              f"{r['ttft_p99_ms']} | {r['e2e_p50_ms']} | {kv.get('prefill_hit_rate')} | "
              f"{kv.get('prefill_predicted_overlap')} | {kv.get('prefill_computed_tokens')} | "
              f"{kv.get('decode_transfer_bytes', 0) / 2**20:.1f} |")
    return rows


if __name__ == "__main__":
    main()
