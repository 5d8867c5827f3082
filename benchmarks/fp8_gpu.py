"""FP8 weights on the GPU (issue 18 item 4), each figure beside its same-run baseline. Written before any GPU was
lent to the FP8 work: it has not run yet.

    python -m benchmarks.fp8_gpu [--parts parity,kernels,decode,prefill] [--batches 1,64] [--contexts 512,2048]
                                 [--prefill-lengths 2048,8192] [--sweep] [--smollm2 PATH] [--out DIR]

- ceilings: device-to-device copy rate (bytes read + written), and FP8 matmul rates at 8192^3 through the exact
            `torch._scaled_mm` call the engine makes (rowwise scales, bf16 out), beside the bf16 matmul rate;
- parity:   greedy tokens of the real SmolLM2 with FP8 weights through the fast path (FP8 GEMV, Triton
            quantization + _scaled_mm, Triton attention, CUDA graphs, overlapped steps) against the same FP8
            weights through the torch twin (`fp8_linear_ref`, torch attention, eager), batch 1 and 8 prompts batched;
- kernels:  at Llama-3-8B's projection shapes, `fp8_gemv` (batch 1) and per-token quantization + `_scaled_mm`
            (64 rows) checked against their torch twins on the GPU, then timed: GEMV bandwidth (FP8 weight bytes /
            time) against the copy rate, next to the bf16 GEMV. --sweep times (BLOCK_N, BLOCK_K, warps, stages)
            choices for `engine.kernels.fp8.GEMV_CONFIG`;
- decode:   Llama-3-8B shape, dummy weights quantized at load (`engine.quantization: fp8`), batch x context:
            ms/step against the FP8 floor = (weights at 1 byte per parameter, 2 for norms, 4 per row scale;
            the LM head quantized; only the B gathered rows of the bf16 input embedding + the bf16 KV read) /
            copy rate. Goals (issue 18): batch 1 <= 1.10x the floor, batch 64 >= 0.80 of its tokens/s;
- prefill:  one prompt of 2k / 8k tokens: TFLOP/s against the same run's FP8 matmul rate (LM head counted once).
Writes fp8_gpu.json into --out. GPU (sm90+) only.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
from unittest import mock

import torch

from benchmarks import kernels_gpu
from benchmarks.gpu_bench import LLAMA3_8B, bench_ms, time_steps
from benchmarks.gpu_bench import ceilings as gpu_ceilings
from benchmarks.kernels_gpu import bench, check
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.request import SamplingParams

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
TILES = [(4, 1024), (8, 512), (8, 1024), (8, 2048), (16, 512), (16, 1024), (32, 512)]


def fp8_weight_bytes(cfg: ModelConfig, batch: int) -> int:
    """Bytes an FP8 decode step of `batch` rows reads for weights: every projection and the LM head at 1 byte per
    parameter plus a float32 scale per row, norms in bf16, and the B rows of the bf16 input embedding it gathers."""
    d, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    proj_rows = (d + 2 * kv) + d + 2 * i + d  # qkv, o, gate|up, down: output rows per layer
    proj = L * (d * (d + 2 * kv) + d * d + 3 * d * i + 4 * proj_rows)
    head = v * d + 4 * v
    norms = 2 * (2 * L * d + d)
    return proj + head + norms + 2 * batch * d


def ceilings() -> dict:
    """gpu_bench's copy and bf16 matmul rates, and the FP8 row-wise matmul rate at the same 8192^3."""
    from engine.fp8 import quantize_fp8, quantize_rows_fp8_ref, scaled_mm_rowwise

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    aq, sa = quantize_rows_fp8_ref(a)
    bq, sb = quantize_fp8(b)
    fp8_ms = bench_ms(lambda: scaled_mm_rowwise(aq, sa, bq, sb))
    return {**gpu_ceilings(), "fp8_rowwise_tflop_s": 2 * 8192**3 / fp8_ms / 1e9}


def parity(path: str) -> dict:
    from engine.llm import LLM

    prompts = ["The capital of France is", "def quicksort(arr):", "Once upon a time, in a land far away,",
               "1, 2, 3, 4, 5,", "The mitochondria is", "Translate to French: good morning",
               "List three colors:", "In 1969, humans"]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    # The reference keeps FP8 parameters but finds no kernels: every FP8 linear runs fp8_linear_ref on the GPU.
    with mock.patch("engine.quantization.fp8_native", return_value=True), \
            mock.patch("engine.fp8._kernels", return_value=None):
        ref_llm = LLM(path, device="cuda", dtype="bfloat16", quantization="fp8", attention_backend="torch",
                      enforce_eager=True, overlap_steps=False)
        ref = ref_llm.generate(prompts, params)
        ref1 = [ref_llm.generate(p, params)[0] for p in prompts]
    del ref_llm
    fast_llm = LLM(path, device="cuda", dtype="bfloat16", quantization="fp8")
    res = {}
    for label, want, got in (("batched", ref, fast_llm.generate(prompts, params)),
                             ("batch1", ref1, [fast_llm.generate(p, params)[0] for p in prompts])):
        first = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y), None)
                 for a, b in zip(want, got, strict=True)]
        res[label] = {"identical": f"{first.count(None)}/{len(prompts)}", "first_divergence": first,
                      "graphs": fast_llm.engine.uses_cuda_graphs, "sample": got[0].text[:60]}
        print("parity", label, res[label], flush=True)
    del fast_llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def kernels(iters: int, do_sweep: bool, copy_tb_s: float) -> list[dict]:
    from engine.fp8 import fp8_linear, fp8_linear_ref, quantize_fp8
    from engine.kernels.fp8 import GEMV_CONFIG, fp8_gemv, fp8_gemv_ref, quantize_rows_fp8, quantize_rows_fp8_ref
    from engine.kernels.gemv import gemv

    rows = []
    for name, (N, K) in SHAPES.items():
        torch.manual_seed(N + K)
        w16 = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K**0.5
        w, s = quantize_fp8(w16)
        x1, x64 = (torch.randn(m, K, dtype=torch.bfloat16, device="cuda") for m in (1, 64))
        q_ok = [torch.equal(a.float(), b.float()) for a, b in zip(quantize_rows_fp8(x64), quantize_rows_fp8_ref(x64),
                                                                  strict=True)]
        row = {"shape": name, "N": N, "K": K, "quantize_rows_bitwise": all(q_ok),
               "gemv_check": check(f"fp8_gemv {name}", fp8_gemv(x1, w, s), fp8_gemv_ref(x1, w, s), 2e-2),
               "scaled_mm_check": check(f"fp8_linear 64 {name}", fp8_linear(x64, w, s), fp8_linear_ref(x64, w, s), 3e-2)}
        if not all(q_ok):
            kernels_gpu.FAILURES.append(f"quantize_rows_fp8 {name}: not bitwise equal to its twin")
        fp8_ms, bf16_ms = bench(lambda: fp8_gemv(x1, w, s), iters), bench(lambda: gemv(x1, w16), iters)  # noqa: B023
        mm64_ms = bench(lambda: fp8_linear(x64, w, s), iters)  # noqa: B023
        row.update(gemv_ms=round(fp8_ms, 4), gemv_fraction_of_copy=round(N * K / fp8_ms / 1e9 / copy_tb_s, 3),
                   bf16_gemv_ms=round(bf16_ms, 4), linear64_ms=round(mm64_ms, 4), config=GEMV_CONFIG)
        if do_sweep:
            row["sweep"] = sweep(x1, w, s, iters)
        rows.append(row)
        print("kernels", row, flush=True)
        torch.cuda.empty_cache()
    return rows


def sweep(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, iters: int) -> list[tuple[float, str]]:
    """The 4 fastest (BLOCK_N, BLOCK_K, warps, stages) for this shape, ms each."""
    from engine.kernels.fp8 import fp8_gemv

    results = []
    for (bn, bk), warps, stages in itertools.product(TILES, [4, 8], [1, 2, 3, 4]):
        cfg = (bn, bk, warps, stages)
        try:
            results.append((round(bench(lambda cfg=cfg: fp8_gemv(x, w, s, config=cfg), iters), 4), str(cfg)))
        except Exception as e:  # noqa: BLE001 - out of resources and the like
            print(f"  sweep {cfg}: {type(e).__name__}", flush=True)
    return sorted(results)[:4]


def fp8_engine(max_batched: int, max_seqs: int, budget_gib: float):  # noqa: ANN201
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model="llama3-8b-dummy", load_format="dummy", dummy_model=LLAMA3_8B, dtype="bfloat16",
                                  device="cuda", quantization="fp8",
                                  cache=CacheConfig(memory_budget_bytes=int(budget_gib * 2**30)),
                                  scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched)))


def decode(eng, batches: list[int], ctxs: list[int], copy_tb_s: float) -> list[dict]:  # noqa: ANN001
    from benchmarks.given_kv import receive_given_kv

    rows, cfg = [], LLAMA3_8B
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    for ctx, B in itertools.product(ctxs, batches):
        ids = [f"d{ctx}-{B}-{i}" for i in range(B)]
        for i, rid in enumerate(ids):  # the context's KV is taken as given (decode role): only decode is timed
            receive_given_kv(eng, rid, [3 + i % 500] * ctx, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
        for _ in range(3):
            eng.step()
        ms = time_steps(eng, overlap=True)
        for rid in ids:
            eng.abort(rid)
        floor = (fp8_weight_bytes(cfg, B) + B * (ctx + 12) * kv_per_token) / (copy_tb_s * 1e12) * 1e3
        rows.append({"ctx": ctx, "batch": B, "ms_step": round(ms, 3), "tok_s": round(B / ms * 1e3, 1),
                     "fp8_floor_ms": round(floor, 3), "floor_ratio": round(ms / floor, 3),
                     "fraction_of_floor_tok_s": round(floor / ms, 3)})
        print("decode", rows[-1], flush=True)
    return rows


def prefill(eng, lengths: list[int], fp8_tflop_s: float) -> list[dict]:  # noqa: ANN001
    cfg, rows = LLAMA3_8B, []
    d, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    per_token = 2 * L * (d * (d + 2 * kv) + d * d + 3 * d * i)  # the FP8 matmul FLOPs of every layer
    for T in lengths:
        def run(T: int = T) -> None:
            eng.add_request("p", list(range(1000, 1000 + T)), SamplingParams(max_tokens=1, temperature=0))
            while eng.has_unfinished():
                eng.step()

        eng._kv.pool.enable_caching = False
        ms = bench_ms(run, warmup=2, iters=5)
        flop = T * per_token + 2 * cfg.vocab_size * d + 2 * L * cfg.num_heads * cfg.head_dim * T * T
        rows.append({"tokens": T, "ms": round(ms, 2), "tflop_s": round(flop / ms / 1e9, 1),
                     "fraction_of_fp8_matmul": round(flop / ms / 1e9 / fp8_tflop_s, 3)})
        print("prefill", rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="parity,kernels,decode,prefill")
    ap.add_argument("--smollm2", default="", help="path of the SmolLM2 GGUF for the parity part")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--prefill-lengths", default="2048,8192")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("fp8_gpu needs a CUDA GPU with FP8 tensor cores (sm90+)", file=sys.stderr)
        return 2
    parts = set(a.parts.split(","))
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                 "ceilings": ceilings()}
    print("ceilings", res["ceilings"], flush=True)
    if "parity" in parts:
        from engine.loader import smollm2_gguf_path

        res["parity"] = parity(a.smollm2 or smollm2_gguf_path())
    if "kernels" in parts:
        res["kernels"] = kernels(a.iters, a.sweep, res["ceilings"]["copy_tb_s"])
    if parts & {"decode", "prefill"}:
        eng = fp8_engine(max_batched=8192, max_seqs=256, budget_gib=40)
        if "decode" in parts:
            res["decode"] = decode(eng, [int(x) for x in a.batches.split(",")], [int(x) for x in a.contexts.split(",")],
                                   res["ceilings"]["copy_tb_s"])
        if "prefill" in parts:
            res["prefill"] = prefill(eng, [int(x) for x in a.prefill_lengths.split(",")],
                                     res["ceilings"]["fp8_rowwise_tflop_s"])
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fp8_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))
    if kernels_gpu.FAILURES:
        print("FAILED checks:\n  " + "\n  ".join(kernels_gpu.FAILURES))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
