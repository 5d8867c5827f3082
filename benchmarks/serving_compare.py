"""The cluster as processes under `disagg bench`: disaggregated (1 prefill + 1 decode worker, KV over the chosen
backend) against co-located (1 worker doing both), same machine, same load.

    python -m benchmarks.serving_compare --device cpu [--rates 0.5,1,2]                      # real SmolLM2
    python -m benchmarks.serving_compare --device cuda --tokenizer SMOLLM2.gguf --backend cuda_ipc

On CUDA the workers load dummy bf16 weights of Llama-3-8B shape (with SmolLM2's 49152-token vocabulary, so the
router's SmolLM2 tokenizer can detokenize every sampled id) and share the one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import yaml

from benchmarks import serving
from deploy.config import ClusterConfig
from deploy.local import LocalCluster
from worker.ports import free_port

LLAMA3_8B_SHAPE = {"vocab_size": 49152, "hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32,
                   "num_heads": 32, "num_kv_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                   "eos_token_ids": [2], "bos_token_id": 1}


def cluster_yaml(a: argparse.Namespace, prefill_replicas: int) -> dict:
    pools = {"prefill": {"replicas": prefill_replicas}, "decode": {"replicas": 1}}
    transfer = {"backend": a.backend, "timeout_s": 10, "lease_s": 30,
                "nixl_progress_thread": {"auto": None, "thread": True, "poll": False}[a.nixl_progress]}
    if a.device == "cpu":
        return {"model": "smollm2", "engine": {"cache": {"memory_budget_bytes": int(a.kv_gib * 2**30)}},
                "transfer": transfer, "router": {"health_interval_s": 0.5}, "pools": pools}
    tokenizer, kv_gib = a.tokenizer, a.kv_gib
    return {"model": tokenizer,
            "engine": {"load_format": "dummy", "dummy_model": LLAMA3_8B_SHAPE, "dtype": "bfloat16", "device": "cuda",
                       "overlap_steps": {"auto": None, "on": True, "off": False}[a.overlap],
                       "cache": {"memory_budget_bytes": int(kv_gib * 2**30)},
                       "scheduler": {"max_num_seqs": 128, "max_num_batched_tokens": 8192}},
            "transfer": transfer, "router": {"health_interval_s": 0.5}, "pools": pools}


def run_mode(a: argparse.Namespace, name: str, prefill_replicas: int, folder: str) -> dict:
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cluster_yaml(a, prefill_replicas), f)
    with LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True,
                      log_dir=os.path.join(folder, name)) as c:
        out = os.path.join(a.out, f"serving_{name}")
        model = "smollm2" if a.device == "cpu" else a.tokenizer
        return serving.main(["--url", c.url, "--model", model, "--rate", a.rates, "--num-requests",
                             str(a.num_requests), "--prompt-len", a.prompt_len, "--output-len", a.output_len,
                             "--slo-ttft-ms", str(a.slo_ttft_ms), "--slo-itl-ms", str(a.slo_itl_ms), "--label", name,
                             "--out", out])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cpu: real SmolLM2; cuda: 8B-shaped dummy")
    ap.add_argument("--tokenizer", default="", help="SmolLM2 GGUF, the router's tokenizer (cuda runs)")
    ap.add_argument("--slo-ttft-ms", type=float, default=500.0, help="goodput SLO on TTFT")
    ap.add_argument("--slo-itl-ms", type=float, default=30.0, help="goodput SLO on a request's p99 ITL")
    ap.add_argument("--rates", default="2,4,8", help="Poisson request rates, req/s")
    ap.add_argument("--num-requests", type=int, default=48, help="requests per rate")
    ap.add_argument("--prompt-len", default="1024:2048", help="prompt tokens N or A:B")
    ap.add_argument("--output-len", default="128", help="output tokens N or A:B")
    ap.add_argument("--nixl-progress", default="auto", choices=["auto", "thread", "poll"],
                    help="NIXL progress: its own spinning thread, a Python thread polling every 1 ms, or auto "
                         "(thread for GPU KV, poll for CPU KV)")
    ap.add_argument("--overlap", default="auto", choices=["auto", "on", "off"],
                    help="engine.overlap_steps of the GPU workers: queue each decode step before reading the last "
                         "one's tokens (auto: on for CUDA)")
    ap.add_argument("--backend", default="cuda_ipc", help="KV transfer backend for the disaggregated run")
    ap.add_argument("--kv-gib", type=float, default=10.0, help="KV cache per worker, GiB")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"), help="output folder")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not a.tokenizer:
        ap.error("--tokenizer is required on cuda")
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        res = {"disaggregated": run_mode(a, "disaggregated", 1, folder),
               "colocated": run_mode(a, "colocated", 0, folder)}
    with open(os.path.join(a.out, f"serving_compare_{a.device}.json"), "w") as f:
        json.dump(res, f, indent=1)
    for name, r in res.items():
        for run in r["runs"]:
            print(f"{name:14s} rate {run['rate']}: ok {run['completed']}/{run['requests']}, TTFT p50/p99 "
                  f"{run['ttft_p50_ms']}/{run['ttft_p99_ms']} ms, ITL p50/p99 {run['itl_p50_ms']}/{run['itl_p99_ms']} "
                  f"ms, {run['output_tok_s']} tok/s, goodput {run['goodput_req_s']} req/s")


if __name__ == "__main__":
    main()
