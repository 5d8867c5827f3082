"""The first requests a freshly started cluster serves: TTFT of one request at a time, in the order given, through
the router of a new local cluster. First-use costs (a kernel compiled at its first launch, a connection opened,
memory mapped) show as a request far slower than the next one of the same length.

    python -m benchmarks.first_requests --device cuda --tokenizer SMOLLM2.gguf --out first.json   # 8B-shaped dummy
    python -m benchmarks.first_requests --device cpu --out first.json                             # SmolLM2

Run it on a machine where the engine has not run before (an empty Triton cache, `~/.triton/cache`) to see what a
new deployment's first users see. With `--dump-after-ms T` and py-spy on the PATH, every process of the cluster is
dumped (`py-spy dump`) while a request is still unanswered T ms after it was sent: where the time goes.
benchmarks/RESULTS.md, "A fresh cluster's first requests", has a run before the engine's start-up warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from typing import Any

import httpx
import yaml

from benchmarks import serving
from benchmarks.serving_compare import cluster_yaml
from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from worker.ports import free_port


def dump_all(c: LocalCluster, tag: str) -> list[str]:
    """`py-spy dump` of every process of the cluster, each headed by `tag` and the process name."""
    out = []
    for name, p in c.procs.items():
        r = subprocess.run(["py-spy", "dump", "--pid", str(p.popen.pid)], capture_output=True, text=True, check=False)
        out.append(f"===== {tag}: {name}\n{r.stdout}{r.stderr}")
    return out


async def send_in_order(c: LocalCluster, model: str, lengths: list[int], dump_after_ms: float,
                        dumps: list[str]) -> list[dict[str, Any]]:
    rng, rows = random.Random(1), []
    async with httpx.AsyncClient(timeout=300) as client:
        for i, n in enumerate(lengths):
            prompt = [rng.randrange(1000, 40000) for _ in range(n)]  # fresh tokens: no prefix-cache hit
            task = asyncio.create_task(serving.one_request(client, c.url, model, prompt, 4, {}))
            if dump_after_ms > 0:
                done, _ = await asyncio.wait({task}, timeout=dump_after_ms / 1e3)
                if not done:
                    dumps += await asyncio.to_thread(dump_all, c, f"request {i} ({n} tokens), {dump_after_ms:g} ms in")
            r = await task
            rows.append({"request": i, "prompt_tokens": n, "ok": r.ok, "ttft_ms": round(r.ttft * 1e3, 1),
                         "error": r.error})
            print(f"request {i:2d}: {n:5d} tokens, TTFT {rows[-1]['ttft_ms']:8.1f} ms{'' if r.ok else ' ' + r.error}",
                  flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.first_requests", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cuda: 8B-shaped dummy; cpu: SmolLM2")
    p.add_argument("--tokenizer", default="", help="SmolLM2 GGUF, the router's tokenizer (cuda runs)")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated",
                   help="1 prefill + 1 decode worker, or one worker doing both (default disaggregated)")
    p.add_argument("--lengths", default="16,16,512,512,1024,1024,2048,2048,16,700,700",
                   help="prompt lengths in the order sent, one request each (default: two of each class, then 700)")
    p.add_argument("--backend", default="", help="KV transfer backend (default cuda_ipc on cuda, tcp on cpu)")
    p.add_argument("--kv-gib", type=float, default=0.0, help="KV cache per worker, GiB (default 10 on cuda, 0.25 on cpu)")
    p.add_argument("--dump-after-ms", type=float, default=0.0, help="py-spy dump every process while a request is "
                   "unanswered this long (0: never; needs py-spy)")
    p.add_argument("--out", default="first_requests.json", help="JSON output (dumps beside it, .txt)")
    a = p.parse_args(argv)
    try:
        a.lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths must be comma-separated token counts, got {a.lengths!r}")
    if not a.lengths or min(a.lengths) < 1:
        p.error("--lengths: every prompt needs at least one token")
    if a.device == "cuda" and not a.tokenizer:
        p.error("--tokenizer is required on cuda")
    if a.dump_after_ms > 0 and shutil.which("py-spy") is None:
        p.error("--dump-after-ms needs py-spy on the PATH")
    a.backend = a.backend or ("cuda_ipc" if a.device == "cuda" else "tcp")
    a.kv_gib = a.kv_gib or (10.0 if a.device == "cuda" else 0.25)
    a.nixl_progress, a.overlap = "auto", "auto"  # what cluster_yaml reads besides
    return a


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    a = parse_args(argv)
    dumps: list[str] = []
    with tempfile.TemporaryDirectory(prefix="first-requests-") as folder:  # the cluster's YAML and logs
        path = os.path.join(folder, "cluster.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cluster_yaml(a, 1 if a.mode == "disaggregated" else 0), f)
        t0 = time.perf_counter()
        with LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True,
                          log_dir=os.path.join(folder, "logs")) as c:
            started_s = time.perf_counter() - t0
            print(f"cluster ready in {started_s:.1f} s", flush=True)
            model = a.tokenizer if a.device == "cuda" else "smollm2"
            rows = asyncio.run(send_in_order(c, model, a.lengths, a.dump_after_ms, dumps))
    with open(a.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "tokenizer"}, "cluster_start_s": round(started_s, 1),
                   "requests": rows}, f, indent=1)
    if dumps:
        with open(os.path.splitext(a.out)[0] + "_dumps.txt", "w") as f:
            f.write("\n".join(dumps))
    return rows


if __name__ == "__main__":
    main()
