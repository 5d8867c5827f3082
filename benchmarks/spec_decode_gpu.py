"""Speculative decoding on the GPU: what verifying k drafts costs at Llama-3-8B shape, what real proposers
accept on the real SmolLM2, and the end-to-end speedup the two give.

    python -m benchmarks.spec_decode_gpu [--parts verify,accept] [--batches 1,8,32] [--context 1024]
                                         [--ks 1,2,3,4,5,6,8] [--new-tokens 128] [--out DIR]

verify  Llama-3-8B shape, dummy bf16 weights. One step of B sequences at `--context` tokens, each computing
        1 + k tokens (its own token and k drafts) with logits at all of them, as the target does when it
        verifies: input staging + forward + LM head + argmax, timed with CUDA events, both as the engine
        runs it (a CUDA graph per (batch bucket, 1 + k), engine/cuda_graph.py) and eagerly. k = 0 is a
        plain decode step.
accept  The real SmolLM2-135M (bf16) with the n-gram proposer on the copy and open-ended workloads of
        benchmarks/spec_decode.py, one request at a time: acceptance rate, tokens per verification and the
        measured wall-clock speedup over no speculation, for each k; greedy outputs are checked equal.
Projected speedup at 8B shape (batch B, k drafts) = tokens per step / (f x verify(k) / decode + 1 - f), f being
the share of steps that verified drafts: the SmolLM2 acceptance applied to the 8B graph cost curve (n-gram
proposing costs host time only).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.gpu_bench import LLAMA3_8B, bench_ms, dummy_engine


@torch.inference_mode()  # as the engine runs steps (graph buffers are inference tensors)
def verify_costs(batches: list[int], context: int, ks: list[int]) -> list[dict]:
    from engine.batch import BatchSeq, build_batch

    eng = dummy_engine(max_batched=8192, max_seqs=max(batches), budget_gib=24)
    assert eng._runner.graphs is not None, "needs CUDA graphs (triton attention on CUDA)"
    runner, kv, rows = eng._runner, eng._kv, []
    for B in batches:
        rids = [f"v{B}-{i}" for i in range(B)]
        for rid in rids:
            assert kv.allocate(rid, context + max(ks) + 1), "KV budget too small for this batch"

        def step(k: int, graph: bool = False, rids: list[str] = rids) -> None:
            seqs = [BatchSeq(rid, context, [7] * (k + 1), k + 1) for rid in rids]
            if graph:
                logits = runner.graphs.run(seqs, kv, k + 1)
            else:
                ids, pos, meta, logits_idx = build_batch(seqs, kv, runner.device)
                hidden = runner.model(ids, pos, runner.kv_cache, meta, runner.attn)
                logits = runner.model.compute_logits(hidden[logits_idx])
            logits.argmax(dim=-1)

        base_graph = bench_ms(lambda: step(0, graph=True))
        for k in [0, *ks]:
            eager = bench_ms(lambda k=k: step(k))
            graph = base_graph
            if k:
                runner.prepare_speculation(k)
                graph = bench_ms(lambda k=k: step(k, graph=True))
            rows.append({"batch": B, "context": context, "k": k, "verify_eager_ms": round(eager, 3),
                         "verify_graph_ms": round(graph, 3), "decode_graph_ms": round(base_graph, 3),
                         "cost_vs_graph_decode": round(graph / base_graph, 3),
                         "eager_cost_vs_graph_decode": round(eager / base_graph, 3)})
            print("verify", rows[-1], flush=True)
        for rid in rids:
            kv.free(rid)
    del eng
    torch.cuda.empty_cache()
    return rows


def acceptance(ks: list[int], new_tokens: int, device: str = "cuda", dtype: str = "bfloat16") -> list[dict]:
    from benchmarks.spec_decode import COPY_TEXTS, OPEN_QUESTIONS, generate
    from engine.config import CacheConfig, EngineConfig, SpeculativeConfig
    from engine.engine import LLMEngine
    from engine.loader import smollm2_gguf_path
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf_path())

    def chat(text: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))

    workloads = {"copy": [chat(f"Repeat the following text exactly: {t}") for t in COPY_TEXTS],
                 "open": [chat(q) for q in OPEN_QUESTIONS]}
    engine = LLMEngine(EngineConfig(model="smollm2", device=device, dtype=dtype, cache=CacheConfig(num_blocks=2048)))
    rows = []
    for wl, prompts in workloads.items():
        engine.set_speculative(None)
        generate(engine, prompts[:1], 8)  # warm-up
        base_wall, base_out, _ = min((generate(engine, prompts, new_tokens, batched=False) for _ in range(2)),
                                     key=lambda r: r[0])
        for k in ks:
            engine.set_speculative(SpeculativeConfig("ngram", k, ngram_min=2, ngram_max=4))
            generate(engine, prompts[:1], 8)
            wall, outs, d = min((generate(engine, prompts, new_tokens, batched=False) for _ in range(2)),
                                key=lambda r: r[0])
            rows.append({"workload": wl, "k": k,
                         "acceptance_rate": round(d["spec_accepted_tokens"] / max(1, d["spec_proposed_tokens"]), 3),
                         "tokens_per_verification": round(1 + d["spec_accepted_tokens"] / max(1, d["spec_verifications"]), 3),
                         "tokens_per_step": round(d["generation_tokens"] / max(1, d["sampling_request_steps"]), 3),
                         "verifying_fraction": round(d["spec_verifications"] / max(1, d["sampling_request_steps"]), 3),
                         "wall_s": round(wall, 3), "baseline_wall_s": round(base_wall, 3),
                         "measured_speedup": round(base_wall / wall, 3), "same_output": outs == base_out})
            print("accept", rows[-1], flush=True)
    engine.set_speculative(None)
    return rows


def projected(verify: list[dict], accept: list[dict]) -> list[dict]:
    """SmolLM2's tokens per step on the 8B cost curve: a step that verified drafts costs verify(k), one without
    drafts (no n-gram match) is a plain graph decode step."""
    cost = {(r["batch"], r["k"]): r for r in verify}
    rows = []
    for a in accept:
        for B in sorted({b for b, _ in cost}):
            c = cost.get((B, a["k"]))
            if c is None:
                continue
            f = a["verifying_fraction"]
            rows.append({"workload": a["workload"], "batch": B, "k": a["k"], "tokens_per_step": a["tokens_per_step"],
                         "cost_vs_graph_decode": c["cost_vs_graph_decode"],
                         "speedup": round(a["tokens_per_step"] / (f * c["cost_vs_graph_decode"] + 1 - f), 3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="verify,accept", help="comma list of verify,accept")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes of the verification-cost curve")
    ap.add_argument("--context", type=int, default=1024, help="tokens of context per sequence when verifying")
    ap.add_argument("--ks", default="1,2,3,4,5,6,8", help="draft tokens per step to measure")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt in the accept part")
    ap.add_argument("--dtype", default="bfloat16", help="SmolLM2's dtype in the accept part (float32: bit-exact greedy)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"), help="folder for spec_decode_gpu.json")
    a = ap.parse_args(argv)
    parts, ks = set(a.parts.split(",")), [int(k) for k in a.ks.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                 "shape": "llama3-8b dummy bf16", "hidden": LLAMA3_8B.hidden_size}
    if "verify" in parts:
        res["verify"] = verify_costs([int(b) for b in a.batches.split(",")], a.context, ks)
    if "accept" in parts:
        res["accept"] = acceptance(ks, a.new_tokens, dtype=a.dtype)
    if "verify" in res and "accept" in res:
        res["projected_8b"] = projected(res["verify"], res["accept"])
        for r in res["projected_8b"]:
            print("projected", r, flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "spec_decode_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
