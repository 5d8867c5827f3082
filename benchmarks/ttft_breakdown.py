"""Where a request's time to first token goes on one machine: through the router, and (disaggregated) as a direct
Prefill RPC to the prefill worker, by prompt length, on an idle cluster and beside decoding streams.

`python -m benchmarks.ttft_breakdown --device cuda --tokenizer SMOLLM2.gguf --out ttft.json` (the 8B-shaped dummy
workers of benchmarks/serving_compare.py; `--device cpu`: SmolLM2 on this machine's cores). The router's TTFT less
the direct Prefill's is the router's share (HTTP, tokenizing, two hops, detokenizing); the direct Prefill less the
profile's prefill step is the worker's serving path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

import grpc
import httpx
import yaml

from benchmarks import serving
from benchmarks.serving_compare import cluster_yaml
from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from proto import PROTOCOL_VERSION, disagg_pb2, disagg_pb2_grpc
from worker.ports import free_port


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


async def router_ttft_ms(url: str, model: str, n: int, rng: random.Random) -> float:
    async with httpx.AsyncClient(timeout=60) as c:
        return (await serving.one_request(c, url, model, prompt(rng, n), 4, {})).ttft * 1e3


async def direct_prefill_ms(address: str, n: int, rng: random.Random) -> float:
    """One Prefill RPC straight to the prefill worker (its KV released right after)."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = disagg_pb2_grpc.WorkerStub(ch)
        rid = f"ttft-breakdown-{rng.random()}"
        t0 = time.perf_counter()
        resp = await stub.Prefill(disagg_pb2.PrefillRequest(version=PROTOCOL_VERSION, request_id=rid,
                                                             prompt_token_ids=prompt(rng, n),
                                                             params=disagg_pb2.SamplingParams(max_tokens=4,
                                                                                              temperature=0.0)))
        ms = (time.perf_counter() - t0) * 1e3
        if resp.HasField("kv"):
            await stub.ReleaseKV(disagg_pb2.ReleaseKVRequest(request_id=rid))
        return ms


async def keep_decoding(url: str, model: str, stop: asyncio.Event) -> None:
    rng = random.Random(5)
    async with httpx.AsyncClient(timeout=120) as c:
        while not stop.is_set():
            await serving.one_request(c, url, model, prompt(rng, 256), 256, {})


async def measure(c: LocalCluster, model: str, a: argparse.Namespace, busy: int, seed: int
                  ) -> dict[int, dict[str, Any]]:
    """Median (and every sample) of `a.repeat` requests per prompt length, one at a time, beside `busy` streams.
    Each pass draws its own prompts (`seed`): a prompt seen before would hit the prefix cache."""
    rng, stop, out = random.Random(seed), asyncio.Event(), {}
    background = [asyncio.create_task(keep_decoding(c.url, model, stop)) for _ in range(busy)]
    await asyncio.sleep(2.0 if busy else 0.0)
    prefill = c.procs.get("prefill-0")
    for n in map(int, a.lengths.split(",")):
        r = [await router_ttft_ms(c.url, model, n, rng) for _ in range(a.repeat)]
        row: dict[str, Any] = {"router_ttft_ms": round(statistics.median(r), 2), "router_all": [round(x, 1) for x in r]}
        if prefill is not None:
            d = [await direct_prefill_ms(prefill.address, n, rng) for _ in range(a.repeat)]
            row |= {"direct_prefill_ms": round(statistics.median(d), 2), "direct_all": [round(x, 1) for x in d]}
        out[n] = row
        print(f"{'busy' if busy else 'idle'} {n:5d} tokens: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                                        if not k.endswith("_all")), flush=True)
    stop.set()
    for t in background:
        t.cancel()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ttft_breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cuda: 8B-shaped dummy; cpu: SmolLM2")
    p.add_argument("--tokenizer", default="", help="SmolLM2 GGUF, the router's tokenizer (cuda runs)")
    p.add_argument("--backend", default="", help="KV transfer backend (default cuda_ipc on cuda, tcp on cpu)")
    p.add_argument("--lengths", default="", help="prompt lengths, comma-separated (default 16,512,1024,2048 on "
                   "cuda, 16,256 on cpu)")
    p.add_argument("--repeat", type=int, default=7, help="requests per length and case (default 7)")
    p.add_argument("--busy-streams", type=int, default=0, help="decoding streams beside the busy pass (default 16 "
                   "on cuda, 2 on cpu)")
    p.add_argument("--kv-gib", type=float, default=10.0, help="KV cache per worker, GiB (default 10)")
    p.add_argument("--out", default="ttft_breakdown.json", help="JSON output")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not a.tokenizer:
        p.error("--tokenizer is required on cuda")
    a.backend = a.backend or ("cuda_ipc" if cuda else "tcp")
    a.lengths = a.lengths or ("16,512,1024,2048" if cuda else "16,256")
    a.busy_streams = a.busy_streams or (16 if cuda else 2)
    a.nixl_progress, a.overlap = "auto", "auto"  # what cluster_yaml reads besides
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    model = a.tokenizer if a.device == "cuda" else "smollm2"
    results: dict[str, Any] = {"args": vars(a)}
    folder = tempfile.mkdtemp(prefix="ttft-breakdown-")
    for mode, prefill_replicas in (("disaggregated", 1), ("colocated", 0)):
        path = os.path.join(folder, f"{mode}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cluster_yaml(a, prefill_replicas), f)
        with LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True,
                          log_dir=os.path.join(folder, mode)) as c:
            print(f"== {mode}", flush=True)
            asyncio.run(measure(c, model, a, 0, seed=0))  # warm-up: first shapes, connections
            results[mode] = {"idle": asyncio.run(measure(c, model, a, 0, seed=1)),
                             "busy": asyncio.run(measure(c, model, a, a.busy_streams, seed=2))}
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
