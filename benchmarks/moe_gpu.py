"""A real mixture-of-experts shape on one GPU (Qwen3-30B-A3B: 48 layers, hidden 2048, 128 experts, 8 active, expert
width 768, 32 heads, 4 KV heads, head_dim 128, vocab 151936), dummy bf16 weights, every figure against a baseline
measured in the same run.

    python -m benchmarks.moe_gpu --out $OUT/moe.json [--parts ceilings,kernel,decode,prefill,engine]

- ceilings: device-to-device copy rate (bytes read + written) and a bf16 8192^3 matmul rate;
- kernel:   the fused MoE kernel (routing given) against a per-expert loop of cuBLAS GEMMs at 1, 64 and 2048 tokens
            (one layer's experts): ms, bytes of the experts touched / ms, TFLOP/s; --sweep tries other tiles;
- decode:   one decode step of the whole model, captured in a CUDA graph (Triton attention), at batch 1 and 64:
            ms against the floor = (attention, norm, router and LM-head weights + the experts the step's tokens
            actually chose, counted per layer + the KV read) / the copy rate;
- prefill:  one 2048-token prompt through the whole model: TFLOP/s of the active FLOPs (each token's 8 experts,
            attention projections, router, causal attention, the LM head on the last row) against the matmul rate;
- engine:   the same decode batches through LLMEngine.step (scheduler, CUDA graphs, sampling, overlapped steps).
The model parts build the model once (61 GB of weights); the engine part builds its own after they free theirs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.gpu_bench import bench_ms, ceilings
from engine.attention.base import AttentionMetadata, get_attention_backend
from engine.config import CacheConfig, EngineConfig, ModelConfig, MoEConfig, SchedulerConfig

QWEN3_30B_A3B = ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                            num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                            max_position_embeddings=40960, architecture="qwen3_moe", qk_norm=True,
                            moe=MoEConfig(num_experts=128, num_experts_per_tok=8, intermediate_size=768),
                            bos_token_id=None, eos_token_ids=(151645,))
BF16 = 2  # bytes per weight and per KV element
SWEEP = [(16, 32, 128, 4), (16, 64, 64, 4), (16, 64, 128, 8), (32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 64, 8),
         (64, 128, 32, 4)]


# ------------------------------------------------------------------------------------------ the MoE kernel


def expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
    """The baseline: tokens sorted by expert (one host sync for the counts), then two cuBLAS GEMMs per expert."""
    E, inter, k = w13.shape[0], w13.shape[1] // 2, ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    out, start = torch.zeros_like(x), 0
    for e, n in enumerate(counts):
        if n:
            pairs = order[start : start + n]
            tokens = pairs // k
            h = F.linear(x[tokens], w13[e])
            y = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e]) * weights.flatten()[pairs, None]
            out.index_add_(0, tokens, y.to(x.dtype))
            start += n
    return out


def kernel(copy_tb_s: float, matmul_tflop_s: float, sweep: bool) -> list[dict]:
    from engine.kernels.moe import fused_moe, moe_route

    cfg, moe = QWEN3_30B_A3B, QWEN3_30B_A3B.moe
    assert moe is not None
    H, inter, E, k = cfg.hidden_size, moe.intermediate_size, moe.num_experts, moe.num_experts_per_tok
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * inter, H, device="cuda", generator=g).mul_(0.02).bfloat16()
    w2 = torch.randn(E, H, inter, device="cuda", generator=g).mul_(0.02).bfloat16()
    rows = []
    for T in (1, 64, 2048):
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        weights, ids = moe_route(torch.randn(T, E, device="cuda", generator=g), k, True)
        touched = int(ids.unique().numel())
        nbytes, flops = touched * 3 * H * inter * BF16, 2 * T * k * 3 * H * inter
        ref = expert_loop(x, w13, w2, weights, ids)
        err = (fused_moe(x, w13, w2, weights, ids) - ref).abs().max().item()
        loop_ms = bench_ms(lambda x=x, weights=weights, ids=ids: expert_loop(x, w13, w2, weights, ids))
        fused_ms = bench_ms(lambda x=x, weights=weights, ids=ids: fused_moe(x, w13, w2, weights, ids))
        graph_ms = _graph_ms(lambda x=x, weights=weights, ids=ids: fused_moe(x, w13, w2, weights, ids))
        row = {"tokens": T, "experts_touched": touched, "max_abs_diff_vs_loop": err,
               "fused_ms": round(fused_ms, 4), "fused_graph_ms": round(graph_ms, 4), "loop_ms": round(loop_ms, 4),
               "speedup_vs_loop": round(loop_ms / fused_ms, 2),
               "fused_fraction_of_copy_rate": round(nbytes / (min(fused_ms, graph_ms) * 1e-3) / (copy_tb_s * 1e12), 3),
               "fused_tflop_s": round(flops / fused_ms / 1e9, 1),
               "fused_fraction_of_matmul": round(flops / fused_ms / 1e9 / matmul_tflop_s, 3)}
        if sweep:
            row["sweep_ms"] = {str(c): round(bench_ms(lambda c=c, x=x, weights=weights, ids=ids: fused_moe(
                x, w13, w2, weights, ids, config=c)), 4) for c in SWEEP}
        rows.append(row)
        print("kernel", row, flush=True)
    return rows


def _graph_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one replay of `fn` captured in a CUDA graph (what a decode step pays)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


# ------------------------------------------------------------------------------------------ the whole model


def build_model() -> torch.nn.Module:
    from engine.model_runner import load_model

    return load_model(EngineConfig(model="qwen3-30b-a3b-dummy", load_format="dummy", dummy_model=QWEN3_30B_A3B,
                                   dtype="bfloat16", device="cuda"), torch.device("cuda"))


def batch(cfg: ModelConfig, B: int, ctx: int, q: int, dev: torch.device, block_size: int = 16
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """B sequences, each computing q new tokens after ctx cached ones, on their own blocks of a fresh KV cache."""
    nb = -(-(ctx + q) // block_size)
    kv = torch.zeros(B * nb, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16,
                     device=dev)
    tables = torch.arange(B * nb, dtype=torch.int32, device=dev).view(B, nb)
    pos = torch.arange(ctx, ctx + q, device=dev).repeat(B)
    slots = (tables.long().gather(1, (pos.view(B, q) // block_size)) * block_size + pos.view(B, q) % block_size)
    qsl = list(range(0, B * q + 1, q))
    lens = [ctx + q] * B
    meta = AttentionMetadata(query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_tables=tables,
                             slot_mapping=slots.flatten(), max_query_len=q, max_seq_len=ctx + q,
                             query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    ids = torch.randint(0, cfg.vocab_size, (B * q,), device=dev)
    return ids, pos, kv, meta


def experts_touched(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor,
                    meta: AttentionMetadata) -> list[int]:
    """Distinct experts each MoE layer's tokens chose in one eager forward of these inputs."""
    from engine.models import ops

    counts: list[int] = []
    route = ops.moe_route

    def counting(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w, chosen = route(logits, top_k, normalize)
        counts.append(int(chosen.unique().numel()))
        return w, chosen

    ops.moe_route = counting
    try:
        model(ids, pos, kv, meta, get_attention_backend("triton", ids.device))
    finally:
        ops.moe_route = route
    return counts


def decode_floor_bytes(cfg: ModelConfig, B: int, ctx: int, touched: list[int]) -> int:
    """Bytes a decode step must read: every layer's attention, norm and router weights, the experts its tokens chose
    (`touched`, per layer), the final norm and LM head, B embedding rows, and the KV of B sequences of ctx + 1."""
    assert cfg.moe is not None
    H, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = H * (q + 2 * kv) + q * H + 2 * H + 2 * cfg.head_dim + cfg.moe.num_experts * H
    experts = sum(touched) * 3 * H * cfg.moe.intermediate_size
    kv_read = B * (ctx + 1) * cfg.num_layers * 2 * kv
    return (cfg.num_layers * per_layer + experts + cfg.vocab_size * H + H + B * H + kv_read) * BF16


def decode(model: torch.nn.Module, batches: list[int], ctx: int, copy_tb_s: float) -> list[dict]:
    cfg = model.config
    attn = get_attention_backend("triton", torch.device("cuda"))
    rows = []
    for B in batches:
        ids, pos, kv, meta = batch(cfg, B, ctx, 1, torch.device("cuda"))
        with torch.inference_mode():
            touched = experts_touched(model, ids, pos, kv, meta)
            ms = _graph_ms(lambda ids=ids, pos=pos, kv=kv, meta=meta: model.compute_logits(model(ids, pos, kv, meta, attn)))
        floor_bytes = decode_floor_bytes(cfg, B, ctx, touched)
        floor = floor_bytes / (copy_tb_s * 1e12) * 1e3
        rows.append({"batch": B, "ctx": ctx, "graph_ms": round(ms, 3), "tok_s": round(B / ms * 1e3, 1),
                     "experts_touched_per_layer_mean": round(sum(touched) / len(touched), 1),
                     "floor_gb": round(floor_bytes / 1e9, 3), "floor_ms": round(floor, 3),
                     "floor_ratio": round(ms / floor, 3), "fraction_of_floor_tok_s": round(floor / ms, 3)})
        print("decode", rows[-1], flush=True)
        del kv
        torch.cuda.empty_cache()
    return rows


def prefill_flops(cfg: ModelConfig, T: int) -> int:
    """Active FLOPs of one T-token prompt: per token the attention projections, the router and its k experts; the
    causal attention (QK^T and PV over the lower triangle); the LM head once, for the last row."""
    assert cfg.moe is not None
    H, q, kv, moe = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.moe
    per_token = H * (q + 2 * kv) + q * H + moe.num_experts * H + moe.num_experts_per_tok * 3 * H * moe.intermediate_size
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T * T
    return 2 * T * cfg.num_layers * per_token + attention + 2 * cfg.vocab_size * H


def prefill(model: torch.nn.Module, T: int, matmul_tflop_s: float) -> dict:
    attn = get_attention_backend("triton", torch.device("cuda"))
    ids, pos, kv_cache, meta = batch(model.config, 1, 0, T, torch.device("cuda"))
    last = torch.tensor([T - 1], device="cuda")
    with torch.inference_mode():
        ms = bench_ms(lambda: model.compute_logits(model(ids, pos, kv_cache, meta, attn)[last]), warmup=2, iters=5)
    flops = prefill_flops(model.config, T)
    row = {"tokens": T, "ms": round(ms, 2), "active_tflop": round(flops / 1e12, 2), "tflop_s": round(flops / ms / 1e9, 1),
           "fraction_of_matmul": round(flops / ms / 1e9 / matmul_tflop_s, 3)}
    print("prefill", row, flush=True)
    return row


def engine(batches: list[int], ctx: int, steps: int = 20) -> list[dict]:
    """Decode steps through the engine's public API: B prompts of ctx tokens prefilled, then `steps` timed steps."""
    from engine.engine import LLMEngine
    from engine.request import SamplingParams

    eng = LLMEngine(EngineConfig(model="qwen3-30b-a3b-dummy", load_format="dummy", dummy_model=QWEN3_30B_A3B,
                                 dtype="bfloat16", device="cuda", cuda_graph_max_batch=max(batches),
                                 cache=CacheConfig(memory_budget_bytes=24 * 2**30),
                                 scheduler=SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=8192)))
    g, rows = torch.Generator().manual_seed(0), []
    for B in batches:
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
        rids = [f"b{B}-{i}" for i in range(B)]
        for rid in rids:  # distinct random prompts: no prefix-cache hits
            eng.add_request(rid, torch.randint(0, QWEN3_30B_A3B.vocab_size, (ctx,), generator=g).tolist(), params)
        started: set[str] = set()
        while len(started) < B:  # until every prompt is prefilled and decoding
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
        rows.append({"batch": B, "ctx": ctx, "ms_step": round(ms, 3), "tok_s": round(B / ms * 1e3, 1)})
        print("engine", rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the results (its folder is created)")
    ap.add_argument("--parts", default="all", help="comma list of kernel,decode,prefill,engine (default all; "
                                                   "ceilings always run)")
    ap.add_argument("--batches", default="1,64", help="decode batch sizes")
    ap.add_argument("--context", type=int, default=1024, help="tokens cached per sequence before the decode step")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="prompt length of the prefill part")
    ap.add_argument("--sweep", action="store_true", help="also time the MoE kernel at the tile configs in SWEEP")
    a = ap.parse_args(argv)
    known = {"kernel", "decode", "prefill", "engine"}
    parts = known if a.parts == "all" else set(a.parts.split(",")) - {"ceilings"}
    if parts - known:
        ap.error(f"unknown part(s) {', '.join(sorted(parts - known))}; choose from {', '.join(sorted(known))}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    batches = [int(b) for b in a.batches.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                 "shape": "Qwen3-30B-A3B", "ceilings": ceilings()}
    print("ceilings", res["ceilings"], flush=True)
    if "kernel" in parts:
        res["kernel"] = kernel(res["ceilings"]["copy_tb_s"], res["ceilings"]["matmul_tflop_s"], a.sweep)
    if parts & {"decode", "prefill"}:
        model = build_model()
        if "decode" in parts:
            res["decode"] = decode(model, batches, a.context, res["ceilings"]["copy_tb_s"])
        if "prefill" in parts:
            res["prefill"] = prefill(model, a.prefill_tokens, res["ceilings"]["matmul_tflop_s"])
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if "engine" in parts:
        res["engine"] = engine(batches, a.context)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
