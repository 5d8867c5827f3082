"""Tensor parallelism on one node: the Llama-3-70B shape (80 layers, hidden 8192, 64 heads, 8 KV heads, intermediate
28672, vocab 128256, 141 GB of bf16 weights) with dummy weights at TP = 2, 4, 8 (as many as the machine has GPUs),
every figure against a baseline measured in the same run.

    python -m benchmarks.tp_gpu --out $OUT/tp.json [--tp 2,4,8] [--parts allreduce,engine] [--expect]

- ceilings (GPU 0): the device-to-device copy rate (bytes read + written) and the bf16 8192^3 matmul rate;
- allreduce: N processes, one a GPU (NCCL), an all-reduce of [B, 8192] bf16 (what every layer reduces twice) for
  B = 1, 64, 2048, replayed from a CUDA graph as the engine's decode steps are: microseconds per op and bus
  bandwidth (2 (N-1)/N x bytes / time, NCCL's busbw); per decode step the engine does 2 x 80 + 1 of them;
- engine: LLMEngine(tensor_parallel_size=N) through its public API: decode steps at batch 1 and 64 (1024 tokens of
  context) against the floor of one GPU (its share of the weights without the input embedding + its KV heads' KV
  read) / the copy rate, and against that floor plus the measured all-reduce time; one 2048-token prefill against
  N GPUs' matmul rate;
- --expect prints the analytic expectation (no GPU needed): bytes all-reduced per step / the NVLink rate.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are kept, or set when missing: device/KINDS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402

from benchmarks.gpu_bench import bench_ms, ceilings
from engine.config import CacheConfig, EngineConfig, ModelConfig, RopeScaling, SchedulerConfig  # noqa: E402

LLAMA3_70B = ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                         num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(),
                         max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128009,))
BF16 = 2
NVLINK_GB_S = 450.0  # H100/H200 NVLink 4: 18 links x 25 GB/s per direction
ALLREDUCE_ROWS = (1, 64, 2048)


def weight_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters a decode step reads: layers, final norm and LM head; the input embedding's)."""
    H, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    layer = H * (q + 2 * kv) + q * H + 3 * H * inter + 2 * H
    return cfg.num_layers * layer + H + cfg.vocab_size * H, cfg.vocab_size * H


def step_allreduce_bytes(cfg: ModelConfig, rows: int, tp: int) -> dict:
    """What one forward of `rows` tokens all-reduces: 2 per layer + the embedding, each [rows, H] bf16; a ring moves
    2 (N-1)/N of that through every GPU's link; the logits all-gather of the sampled rows comes on top."""
    per_op = rows * cfg.hidden_size * BF16
    ops = 2 * cfg.num_layers + 1
    link = ops * per_op * 2 * (tp - 1) / tp
    return {"ops": ops, "bytes_per_op": per_op, "link_bytes": int(link),
            "link_ms_at_nvlink": round(link / (NVLINK_GB_S * 1e9) * 1e3, 3)}


def expectation(tps: list[int], copy_tb_s: float = 4.1, matmul_tflop_s: float = 750.0, ctx: int = 1024,
                op_latency_us: float = 8.0) -> list[dict]:
    """Analytic decode and prefill per TP size: floors of one GPU, all-reduce bandwidth and latency terms."""
    cfg, rows = LLAMA3_70B, []
    read, _ = weight_params(cfg)
    for tp in tps:
        for B in (1, 64):
            kv = B * (ctx + 1) * cfg.num_layers * 2 * (cfg.num_kv_heads // min(tp, cfg.num_kv_heads)) * cfg.head_dim * BF16
            floor = (read * BF16 / tp + kv) / (copy_tb_s * 1e12) * 1e3
            ar = step_allreduce_bytes(cfg, B, tp)
            latency = ar["ops"] * op_latency_us / 1e3
            expected = floor + latency + ar["link_ms_at_nvlink"]  # alpha-beta: each op's latency plus its bytes
            rows.append({"tp": tp, "phase": f"decode batch {B}", "floor_ms_per_gpu": round(floor, 2),
                         "allreduce_bandwidth_ms": ar["link_ms_at_nvlink"], "allreduce_latency_ms": round(latency, 2),
                         "expected_ms": round(expected, 2), "expected_fraction_of_floor": round(floor / expected, 2)})
        flops = prefill_flops(cfg, 2048) / tp
        compute = flops / (matmul_tflop_s * 1e12) * 1e3
        ar = step_allreduce_bytes(cfg, 2048, tp)
        rows.append({"tp": tp, "phase": "prefill 2048", "matmul_ms_per_gpu": round(compute, 1),
                     "allreduce_bandwidth_ms": ar["link_ms_at_nvlink"],
                     "allreduce_share_unoverlapped": round(ar["link_ms_at_nvlink"] / (compute + ar["link_ms_at_nvlink"]), 2)})
    return rows


def prefill_flops(cfg: ModelConfig, T: int) -> int:
    """FLOPs of one T-token prompt: the projections per token, causal attention (the lower triangle), the LM head
    once (the last row)."""
    read, _ = weight_params(cfg)
    layer_matmuls = read - cfg.vocab_size * cfg.hidden_size
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T * T
    return 2 * T * layer_matmuls + attention + 2 * cfg.vocab_size * cfg.hidden_size


def _allreduce_rank(rank: int, size: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    rows = []
    for B in ALLREDUCE_ROWS:
        x = torch.randn(B, LLAMA3_70B.hidden_size, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        graph, reps = torch.cuda.CUDAGraph(), 20
        with torch.cuda.graph(graph):
            for _ in range(reps):
                dist.all_reduce(x)
        ms = bench_ms(graph.replay) / reps
        nbytes = x.numel() * BF16
        rows.append({"rows": B, "bytes": nbytes, "us": round(ms * 1e3, 2),
                     "busbw_gb_s": round(nbytes * 2 * (size - 1) / size / (ms * 1e-3) / 1e9, 1)})
    if rank == 0:
        out["rows"] = rows
    dist.destroy_process_group()


def allreduce(tp: int) -> list[dict]:
    import torch.multiprocessing as mp

    from engine.parallel.group import host_store

    port = host_store(1, 10).port  # a free port (the store itself is dropped)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_allreduce_rank, args=(tp, port, out), nprocs=tp, join=True)
        rows = list(out["rows"])
    for r in rows:
        r["per_decode_step_ms"] = round((2 * LLAMA3_70B.num_layers + 1) * r["us"] / 1e3, 3)
        r["fraction_of_nvlink"] = round(r["busbw_gb_s"] / NVLINK_GB_S, 3)
    print("allreduce", tp, rows, flush=True)
    return rows


def engine(tp: int, ceil: dict, ar: list[dict] | None, ctx: int, steps: int = 20) -> dict:
    """Decode at batch 1 and 64 and one 2048-token prefill through LLMEngine(tensor_parallel_size=tp)."""
    from engine.engine import LLMEngine
    from engine.request import SamplingParams

    cfg = LLAMA3_70B
    eng = LLMEngine(EngineConfig(model="llama-3-70b-dummy", load_format="dummy", dummy_model=cfg, dtype="bfloat16",
                                 device="cuda", tensor_parallel_size=tp, cuda_graph_max_batch=64,
                                 cache=CacheConfig(memory_budget_bytes=16 * 2**30),
                                 scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192)))
    read, _ = weight_params(cfg)
    g, res = torch.Generator().manual_seed(0), {"tp": tp, "decode": []}
    try:
        for B in (1, 64):
            params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
            for i in range(B):
                eng.add_request(f"b{B}-{i}", torch.randint(0, cfg.vocab_size, (ctx,), generator=g).tolist(), params)
            started: set[str] = set()
            while len(started) < B:
                started |= {so.request_id for so in eng.step() if so.new_token_ids}
            for _ in range(3):
                eng.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / steps * 1e3
            while eng.has_unfinished():
                eng.step()
            kv = B * (ctx + 1) * cfg.num_layers * 2 * eng.kv_cache.shape[4] * cfg.head_dim * BF16
            floor = (read * BF16 / tp + kv) / (ceil["copy_tb_s"] * 1e12) * 1e3
            row = {"batch": B, "ctx": ctx, "ms_step": round(ms, 3), "tok_s": round(B / ms * 1e3, 1),
                   "floor_ms_per_gpu": round(floor, 3), "fraction_of_floor_tok_s": round(floor / ms, 3)}
            if ar:
                near = min(ar, key=lambda r: abs(r["rows"] - B))
                row["floor_plus_allreduce_ms"] = round(floor + near["per_decode_step_ms"], 3)
                row["fraction_of_floor_plus_allreduce"] = round((floor + near["per_decode_step_ms"]) / ms, 3)
            res["decode"].append(row)
            print("engine", tp, row, flush=True)
        res["prefill"] = prefill(eng, tp, ceil["matmul_tflop_s"])
    finally:
        eng.close()
    return res


def prefill(eng, tp: int, matmul_tflop_s: float, T: int = 2048) -> dict:  # noqa: ANN001 - LLMEngine
    from engine.request import SamplingParams

    times, g = [], torch.Generator().manual_seed(1)
    for i in range(4):
        eng.add_request(f"p{i}", torch.randint(0, LLAMA3_70B.vocab_size, (T,), generator=g).tolist(),
                        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = sorted(times[1:])[1]
    flops = prefill_flops(LLAMA3_70B, T)
    row = {"tokens": T, "ms": round(ms, 2), "tflop_s_per_gpu": round(flops / tp / ms / 1e9, 1),
           "fraction_of_matmul": round(flops / tp / ms / 1e9 / matmul_tflop_s, 3)}
    print("prefill", tp, row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file for the results (its folder is created)")
    ap.add_argument("--tp", default="2,4,8", help="tensor-parallel sizes (those above the GPU count are skipped)")
    ap.add_argument("--parts", default="allreduce,engine", help="comma list of allreduce,engine")
    ap.add_argument("--context", type=int, default=1024, help="tokens cached per sequence before the decode steps")
    ap.add_argument("--expect", action="store_true", help="print the analytic expectation and exit (no GPU)")
    a = ap.parse_args(argv)
    tps = [int(t) for t in a.tp.split(",")]
    if a.expect:
        print(json.dumps(expectation(tps, ctx=a.context), indent=1))
        return
    if not a.out or not torch.cuda.is_available():
        ap.error("needs --out and CUDA devices (or --expect)")
    tps = [t for t in tps if t <= torch.cuda.device_count()]
    res: dict = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "shape": "Llama-3-70B", "ceilings": ceilings(),
                 "expectation": expectation(tps, ctx=a.context)}
    print("ceilings", res["ceilings"], flush=True)
    parts = set(a.parts.split(","))
    for tp in tps:
        ar = allreduce(tp) if "allreduce" in parts else None
        res[f"tp{tp}"] = {"allreduce": ar}
        if "engine" in parts:
            res[f"tp{tp}"]["engine"] = engine(tp, res["ceilings"], ar, a.context)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:  # after every size: a later one running out of time keeps the earlier
            json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
