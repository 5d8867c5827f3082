"""How much of the KV transfer layer-wise streaming hides behind the prefill, against a whole-prompt pull.

    python -m benchmarks.kv_streaming --device cpu --backend tcp --prompt-len 1536 --requests 6 --out DIR
    python -m benchmarks.kv_streaming --device cuda --tokenizer SMOLLM2.gguf --backend cuda_ipc --prompt-len 8192

(`--tokenizer` may be the 1.7 MB metadata-only copy `scripts/tokenizer_gguf.py` writes.)

One prompt at a time (no queueing), `max_tokens` 2, on three clusters of the same machine: co-located (one worker
prefills and decodes), disaggregated with a whole-prompt pull after the prefill (`router.kv_streaming: false`),
and disaggregated with layer-wise streaming. The router streams the prefill worker's first token at once, so the
transfer shows in the second token: the decode worker's first, which needs the KV. For each: client times to the
first and second tokens (median, range) and their gap; for the disaggregated ones the
decode worker's own figures over the run: KV bytes and read seconds (the link rate of this run), and the
transfer time exposed after the prefill ended: the whole pull for the whole-prompt mode, only what was still read
after the first token for streaming (`stream_exposed_seconds`). Writes JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import httpx
import yaml

from benchmarks.serving_compare import LLAMA3_8B_SHAPE
from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from tests.cluster_util import worker_load
from worker.ports import free_port

MODES = {"colocated": (0, False), "whole": (1, False), "streaming": (1, True)}


def cluster_yaml(a: argparse.Namespace, prefill: int, streaming: bool) -> dict:
    engine: dict = {"cache": {"memory_budget_bytes": int(a.kv_gib * 2**30)},
                    "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": a.chunk}}
    model = "smollm2"
    if a.device == "cuda":
        model = a.tokenizer
        engine |= {"load_format": "dummy", "dummy_model": LLAMA3_8B_SHAPE, "dtype": "bfloat16", "device": "cuda"}
    return {"model": model, "engine": engine,
            "transfer": {"backend": a.backend, "timeout_s": 30, "lease_s": 120, "layer_groups": a.layer_groups},
            "router": {"health_interval_s": 0.5, "kv_streaming": streaming, "worker_timeout_s": 600},
            "pools": {"prefill": {"replicas": prefill}, "decode": {"replicas": 1}}}


def first_two(url: str, model: str, prompt: list[int]) -> tuple[float, float]:
    """Seconds to the first token (the prefill worker's) and to the second (the decode worker's first: it waits
    for the KV), from the request's start."""
    t0, times = time.monotonic(), []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=600,
                      json={"model": model, "prompt": prompt, "max_tokens": 2, "stream": True, "ignore_eos": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith('data: {"id"') and '"text":""' not in line:
                times.append(time.monotonic() - t0)
    if len(times) < 2:
        raise RuntimeError(f"expected two tokens, got {len(times)}")
    return times[0], times[1]


def run_mode(a: argparse.Namespace, name: str, folder: str) -> dict:
    prefill, streaming = MODES[name]
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cluster_yaml(a, prefill, streaming), f)
    with LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True,
                      log_dir=os.path.join(folder, name)) as c:
        model = "smollm2" if a.device == "cpu" else a.tokenizer
        prompts = [[1000 + (i * 7919 + j) % 40000 for j in range(a.prompt_len)] for i in range(a.requests + 1)]
        first_two(c.url, model, prompts[-1])  # warm-up (and compile on a GPU); not timed
        dec = c.procs["decode-0"].address
        before = worker_load(dec)
        times = [first_two(c.url, model, p) for p in prompts[: a.requests]]
        after = worker_load(dec)
    d = {k: after.get(k) - before.get(k) for k in ("transfer_bytes", "transfer_seconds", "stream_read_seconds",
                                                     "stream_exposed_seconds", "transfers", "recomputes")}
    firsts, seconds = [t[0] for t in times], [t[1] for t in times]
    row = {"mode": name, "ttft_ms_median": round(statistics.median(firsts) * 1e3, 1),
           "ttft_ms_range": [round(min(firsts) * 1e3, 1), round(max(firsts) * 1e3, 1)],
           "second_token_ms_median": round(statistics.median(seconds) * 1e3, 1),
           "second_token_ms_range": [round(min(seconds) * 1e3, 1), round(max(seconds) * 1e3, 1)],
           "gap_ms_median": round(statistics.median(b - f for f, b in times) * 1e3, 1), **d}
    if name != "colocated":
        read_s = d["stream_read_seconds"] if streaming else d["transfer_seconds"]
        exposed = d["stream_exposed_seconds"] if streaming else d["transfer_seconds"]
        row |= {"link_gb_s": round(d["transfer_bytes"] / read_s / 1e9, 3) if read_s else None,
                "transfer_ms_per_request": round(read_s / a.requests * 1e3, 1),
                "exposed_ms_per_request": round(exposed / a.requests * 1e3, 1),
                "exposed_fraction": round(exposed / read_s, 3) if read_s else None}
    print(name, row, flush=True)
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["mode"] for r in rows]
    ax.bar(names, [r["second_token_ms_median"] for r in rows], color=["gray", "tab:orange", "tab:green"][: len(rows)])
    for i, r in enumerate(rows):
        if "exposed_ms_per_request" in r:
            ax.text(i, r["second_token_ms_median"], f"exposed {r['exposed_ms_per_request']:.0f} ms\n"
                    f"of {r['transfer_ms_per_request']:.0f} ms", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="time to 2nd token, median (ms)", title="KV transfer hidden behind the prefill")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_streaming", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the workers run (default cpu)")
    p.add_argument("--tokenizer", help="cuda: a SmolLM2 GGUF for the router's tokenizer (dummy Llama-3-8B weights)")
    p.add_argument("--backend", default="tcp", help="KV transfer backend: tcp | nixl | cuda_ipc (default tcp)")
    p.add_argument("--prompt-len", type=int, default=1536, help="prompt tokens (default 1536)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (max_num_batched_tokens, default 512)")
    p.add_argument("--layer-groups", type=int, default=4, help="transfer.layer_groups (default 4)")
    p.add_argument("--requests", type=int, default=6, help="timed prompts per mode, one at a time (default 6)")
    p.add_argument("--kv-gib", type=float, default=1.0, help="KV cache per worker in GiB (default 1)")
    p.add_argument("--modes", default="colocated,whole,streaming", help="which clusters to run, comma-separated")
    p.add_argument("--out", default="benchmarks/out/kv_streaming.json", help="JSON output; the PNG goes beside it")
    p.add_argument("--log-dir", help="keep the clusters' configs and logs here (default: a temporary folder)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.log_dir or tmp
        os.makedirs(folder, exist_ok=True)
        for name in a.modes.split(","):
            rows.append(run_mode(a, name, folder))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "args": vars(a), "rows": rows}, f, indent=1)
    plot(rows, a.out.rsplit(".", 1)[0] + ".png")


if __name__ == "__main__":
    main()
