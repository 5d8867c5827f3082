"""Does the router keep up with a real decode worker? Client-seen tokens/s against the worker's own.

    python -m benchmarks.router_gpu --tokenizer SMOLLM2.gguf --streams 64,256 --processes 1,2,4 --out router_gpu.json

One real decode worker (`python -m worker --role decode`, Llama-3-8B-shaped dummy bf16 weights with SmolLM2's
vocabulary on CUDA, or the real SmolLM2 on the CPU with `--device cpu`) is started once; for each router
process count a router (`python -m router --processes N`) is started in front of it, and client processes open
`streams` concurrent `/v1/completions` streams (`ignore_eos`, one token per SSE chunk) for `--duration` seconds.
The worker's own rate is read from the worker itself: its `generation_tokens` counter (the Load RPC) at the start
and end of the same window. Reported per run: the worker's tok/s, the client-seen tok/s and their ratio (issue
goal at batch 256: >= 0.95), client ITL p50/p99, router CPU-seconds per token (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.pool
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc
import yaml
from tqdm import tqdm

from benchmarks.router_capacity import Procs, client, cpu_seconds, router_pids, wait_ready
from benchmarks.serving import percentile
from benchmarks.serving_compare import LLAMA3_8B_SHAPE
from proto import disagg_pb2, disagg_pb2_grpc
from worker.ports import free_port


@dataclass
class GpuRun:
    streams: int
    processes: int
    wall_s: float
    worker_tok_s: float
    client_tok_s: float
    ratio: float
    itl_p50_ms: float
    itl_p99_ms: float
    ttft_p50_ms: float
    router_cpu_s: float
    router_us_per_token: float
    worker_running_mean: float
    errors: int
    error_samples: list[str]


def worker_yaml(a: argparse.Namespace) -> dict:
    cache = {"memory_budget_bytes": int(a.kv_gib * 2**30)}
    sched = {"max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": 8192}
    transfer = {"backend": "tcp"}  # no KV moves (no prefill worker): the worker needs no NIXL package
    if a.device == "cpu":
        return {"model": "smollm2", "engine": {"cache": cache, "scheduler": sched}, "transfer": transfer}
    return {"model": a.tokenizer, "engine": {"load_format": "dummy", "dummy_model": LLAMA3_8B_SHAPE,
                                             "dtype": "bfloat16", "device": "cuda", "cache": cache,
                                             "scheduler": sched}, "transfer": transfer}


def drain(p: subprocess.Popen) -> None:
    """Read a child's output from now on, so a full pipe never blocks it."""
    threading.Thread(target=lambda: [None for _ in p.stdout or ()], daemon=True).start()


def worker_stats(address: str) -> dict[str, float]:
    with grpc.insecure_channel(address) as ch:
        rep = disagg_pb2_grpc.WorkerStub(ch).Load(disagg_pb2.LoadRequest(), timeout=10)
    return dict(rep.stats)


def client_proc(args: tuple[str, int, int, float]) -> tuple[list[list[float]], list[float], int, list[str]]:
    url, streams, tokens, duration = args
    return asyncio.run(client(url, streams, tokens, duration))


def run_clients(pool: multiprocessing.pool.Pool, url: str, streams: int, tokens: int, duration: float,
                procs: int) -> tuple[list[list[float]], list[float], int, list[str]]:
    """`streams` split over `procs` client processes (one Python client cannot parse 20k+ chunks/s)."""
    shares = [streams // procs + (i < streams % procs) for i in range(procs)]
    parts = pool.map(client_proc, [(url, s, tokens, duration) for s in shares if s])
    per_request = [c for p in parts for c in p[0]]
    starts = [s for p in parts for s in p[1]]
    return per_request, starts, sum(p[2] for p in parts), [e for p in parts for e in p[3]][:3]


def sample_running(address: str, stop_at: float) -> list[float]:
    out = []
    while time.monotonic() < stop_at:
        out.append(worker_stats(address).get("num_running", 0.0))
        time.sleep(1.0)
    return out


def one_run(a: argparse.Namespace, pool: multiprocessing.pool.Pool, worker: str, streams: int,
            processes: int) -> GpuRun:
    procs = Procs()
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "router", "--port", str(port), "--worker", worker, "--log-level", "WARNING",
               "--model-name", "smollm2", "--processes", str(processes), "--max-model-len", "4096"]
        router = procs.spawn(cmd + (["--tokenizer", a.tokenizer] if a.tokenizer else []))
        url = f"http://127.0.0.1:{port}"
        drain(router)
        wait_ready(url, 300)
        run_clients(pool, url, min(streams, 32), 8, 2.0, a.client_procs)  # warm-up
        pids = router_pids(router.pid)
        cpu0, s0, t0 = sum(cpu_seconds(p) for p in pids), worker_stats(worker), time.monotonic()
        sampler = ThreadPoolExecutor(1)
        running = sampler.submit(sample_running, worker, t0 + a.duration)
        per_request, starts, errors, samples = run_clients(pool, url, streams, a.tokens, a.duration, a.client_procs)
        wall = time.monotonic() - t0
        s1 = worker_stats(worker)
        cpu = sum(cpu_seconds(p) for p in router_pids(router.pid)) - cpu0
    finally:
        procs.stop()
    itls = [b - x for c in per_request for x, b in zip(c, c[1:], strict=False)]
    ttfts = [c[0] - s for c, s in zip(per_request, starts, strict=True) if c]
    tokens = sum(len(c) for c in per_request)
    worker_tok_s = (s1["generation_tokens"] - s0["generation_tokens"]) / wall
    occupancy = running.result()
    sampler.shutdown()
    return GpuRun(streams, processes, round(wall, 2), round(worker_tok_s, 1), round(tokens / wall, 1),
                  round(tokens / wall / worker_tok_s, 4) if worker_tok_s else 0.0,
                  round(percentile(itls, 50) * 1e3, 2), round(percentile(itls, 99) * 1e3, 2),
                  round(percentile(ttfts, 50) * 1e3, 1), round(cpu, 2), round(cpu / tokens * 1e6, 1) if tokens else 0,
                  round(sum(occupancy) / len(occupancy), 1) if occupancy else 0.0, errors, samples)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cuda: 8B-shaped dummy; cpu: SmolLM2")
    p.add_argument("--tokenizer", default="", help="SmolLM2 GGUF, the router's tokenizer (required on cuda)")
    p.add_argument("--streams", default="64,256", help="concurrent streams per run, comma-separated")
    p.add_argument("--processes", default="1,2,4", help="router processes per run, comma-separated")
    p.add_argument("--tokens", type=int, default=512, help="tokens per request (max_tokens, ignore_eos)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds each run sends requests")
    p.add_argument("--client-procs", type=int, default=4, help="client processes sharing the streams")
    p.add_argument("--max-num-seqs", type=int, default=256, help="the worker's scheduler.max_num_seqs")
    p.add_argument("--kv-gib", type=float, default=40.0, help="the worker's KV cache, GiB")
    p.add_argument("--out", default="router_gpu.json", help="JSON output")
    a = p.parse_args(argv)
    for flag in ("streams", "processes"):
        try:
            ok = all(int(x) > 0 for x in getattr(a, flag).split(","))
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--{flag} must be positive integers, comma-separated, got {getattr(a, flag)!r}")
    if a.duration <= 0 or a.tokens <= 0 or a.client_procs <= 0:
        p.error("--duration, --tokens and --client-procs must be positive")
    if a.device == "cuda" and not a.tokenizer:
        p.error("--tokenizer is required on cuda")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    combos = [(int(s), int(n)) for s in a.streams.split(",") for n in a.processes.split(",")]
    procs, runs = Procs(), []
    with tempfile.TemporaryDirectory() as folder:
        cfg = os.path.join(folder, "worker.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(worker_yaml(a), f)
        wport = free_port()
        try:
            w = procs.spawn([sys.executable, "-m", "worker", "--role", "decode", "--config", cfg,
                             "--port", str(wport), "--log-level", "WARNING"])
            procs.wait_line(w, "READY", 900)
            drain(w)
            with multiprocessing.get_context("spawn").Pool(a.client_procs) as pool:
                for streams, n in tqdm(combos, desc="router in front of a real worker"):
                    r = one_run(a, pool, f"127.0.0.1:{wport}", streams, n)
                    runs.append(r)
                    tqdm.write(f"{streams:4d} streams x{n} router: worker {r.worker_tok_s:8.0f} tok/s, client "
                               f"{r.client_tok_s:8.0f} ({r.ratio:.3f}), ITL p50/p99 {r.itl_p50_ms}/{r.itl_p99_ms} "
                               f"ms, router {r.router_us_per_token} us/token, running {r.worker_running_mean}, "
                               f"errors {r.errors}")
        finally:
            procs.stop()
    with open(a.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "args": vars(a),
                   "runs": [asdict(r) for r in runs]}, f, indent=1)


if __name__ == "__main__":
    main()
