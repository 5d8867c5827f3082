"""Speculative decoding on the real SmolLM2-135M (CPU): acceptance, tokens per step and wall-clock speedup.

    python -m benchmarks.spec_decode [--new-tokens 64] [--k 4] [--self-layers 8] [--draft-layers 8]
                                     [--repeats 2] [--threads 1] [--modes sequential,batched]

Workloads (chat template, greedy, ignore_eos), three prompts each:
  copy  "Repeat the following text exactly: <paragraph>"
  open  open-ended questions
Modes: sequential runs the prompts one at a time (batch 1: the latency case speculation is for); batched runs
the three together (continuous batching).
Proposers:
  none   the baseline
  ngram  prompt lookup (n from 4 down to 2)
  self   SmolLM2's first --self-layers layers + final norm + LM head, on the target's own KV cache
  draft  a separate draft model with its own KV cache. Only SmolLM2-135M ships with the packages here, so the
         draft is SmolLM2 cut to its first --draft-layers layers, saved as its own checkpoint: an untrained early
         exit, not an independently trained small model.
One engine serves every run (proposers are switched with LLMEngine.set_speculative). Each (workload, proposer)
runs --repeats times, interleaved, and the best wall time counts: the machine may be shared. Greedy outputs are
compared with the baseline's. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

COPY_TEXTS = [
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, the members "
    "agreed to increase funding for public libraries and to reduce spending on new office furniture.",
    "To make the bread, mix the flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes, "
    "let it rise for two hours, then shape it into a loaf and bake it at two hundred degrees for forty minutes.",
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
    "            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n"
    "    return out + a[i:] + b[j:]",
]
OPEN_QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation, and how do central banks respond to it?",
    "Describe your ideal weekend in the mountains.",
]


def truncated_smollm2(folder: str, layers: int) -> str:
    """SmolLM2 with only its first `layers` decoder layers, as a Hugging Face folder the engine can load."""
    from safetensors.torch import save_file

    from engine.loader import iter_weights, load_model_config, resolve_source

    fmt, path = resolve_source("smollm2", "auto")
    cfg = load_model_config(fmt, path)
    keep = {name: t.contiguous() for name, t in iter_weights(fmt, path, cfg, torch.float32)
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    save_file(keep, os.path.join(folder, "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": layers, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
          "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
          "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    return folder


def generate(engine, prompts: list[list[int]], new_tokens: int, batched: bool = True  # noqa: ANN001
             ) -> tuple[float, list[list[int]], dict]:
    from engine.request import SamplingParams

    before = dict(vars(engine.stats))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ids = [f"{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    t0 = time.perf_counter()
    for group in [list(zip(ids, prompts, strict=True))] if batched else [[x] for x in zip(ids, prompts, strict=True)]:
        for rid, p in group:
            engine.add_request(rid, p, params)
        while engine.has_unfinished():
            for so in engine.step():
                out[so.request_id].extend(so.new_token_ids)
    wall = time.perf_counter() - t0
    delta = {k: v - before[k] for k, v in vars(engine.stats).items()}
    return wall, [out[rid] for rid in ids], delta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--self-layers", type=int, default=8)
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0: torch's default); one avoids OpenMP stalls on a busy machine")
    ap.add_argument("--modes", default="sequential,batched")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    from engine.config import CacheConfig, EngineConfig, SpeculativeConfig
    from engine.engine import LLMEngine
    from engine.loader import smollm2_gguf_path
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf_path())

    def chat(text: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))

    workloads = {"copy": [chat(f"Repeat the following text exactly: {t}") for t in COPY_TEXTS],
                 "open": [chat(q) for q in OPEN_QUESTIONS]}
    tmp = tempfile.TemporaryDirectory(prefix="spec_draft_")
    draft_dir = truncated_smollm2(tmp.name, args.draft_layers)
    proposers = {
        "none": None,
        "ngram": SpeculativeConfig("ngram", args.k, ngram_min=2, ngram_max=4),
        "self": SpeculativeConfig("self", args.k, self_draft_layers=args.self_layers),
        "draft": SpeculativeConfig("draft", args.k, draft_model=draft_dir),
    }
    engine = LLMEngine(EngineConfig(model="smollm2", cache=CacheConfig(num_blocks=512)))
    best: dict[tuple[str, str, str], dict] = {}
    baseline: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        for name, spec in proposers.items():
            engine.set_speculative(spec)
            generate(engine, [workloads["copy"][0]], 4)  # warm-up: first-call allocations
            for wl, prompts in workloads.items():
                for mode in modes:
                    wall, outs, d = generate(engine, prompts, args.new_tokens, batched=mode == "batched")
                    if name == "none":
                        baseline.setdefault(wl, outs)
                    row = {"workload": wl, "mode": mode, "proposer": name, "wall_s": wall,
                           "tokens": d["generation_tokens"],
                           "acceptance_rate": d["spec_accepted_tokens"] / d["spec_proposed_tokens"]
                           if d["spec_proposed_tokens"] else None,
                           "tokens_per_step": d["generation_tokens"] / max(1, d["sampling_request_steps"]),
                           "engine_steps": d["steps"], "same_output_as_none": outs == baseline[wl]}
                    if (wl, mode, name) not in best or wall < best[(wl, mode, name)]["wall_s"]:
                        best[(wl, mode, name)] = row
                    print(f"[repeat {rep}] {wl:4s} {mode:10s} {name:5s} {wall:6.2f}s", flush=True)
        engine.set_speculative(None)
    tmp.cleanup()

    rows = []
    order = {n: i for i, n in enumerate(proposers)}
    for (wl, mode, _name), r in sorted(best.items(), key=lambda kv: (kv[0][0], modes.index(kv[0][1]),
                                                                      order[kv[0][2]])):
        base = best[(wl, mode, "none")]["wall_s"]
        rows.append({**r, "wall_s": round(r["wall_s"], 3), "tok_per_s": round(r["tokens"] / r["wall_s"], 1),
                     "speedup": round(base / r["wall_s"], 2), "tokens_per_step": round(r["tokens_per_step"], 2),
                     "acceptance_rate": None if r["acceptance_rate"] is None else round(r["acceptance_rate"], 3)})
    head = f"{'workload':8s} {'mode':10s} {'proposer':8s} {'accept':>7s} {'tok/step':>8s} {'steps':>6s} " \
           f"{'wall s':>7s} {'tok/s':>7s} {'speedup':>7s}  same"
    print(f"\nSmolLM2-135M fp32, CPU, {torch.get_num_threads()} thread(s), k={args.k}, {args.new_tokens} new tokens x "
          f"3 prompts per workload, best of {args.repeats}; self = first {args.self_layers} layers, draft = SmolLM2 "
          f"truncated to {args.draft_layers} layers (separate checkpoint and KV cache)\n")
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        print(f"{r['workload']:8s} {r['mode']:10s} {r['proposer']:8s} {acc:>7s} {r['tokens_per_step']:8.2f} "
              f"{r['engine_steps']:6d} {r['wall_s']:7.2f} {r['tok_per_s']:7.1f} {r['speedup']:6.2f}x  "
              f"{r['same_output_as_none']}")
    print(json.dumps({"benchmark": "spec_decode", "model": "smollm2", "device": "cpu", "threads": torch.get_num_threads(),
                      "k": args.k, "new_tokens": args.new_tokens, "self_layers": args.self_layers,
                      "draft": f"smollm2 truncated to {args.draft_layers} layers", "rows": rows}))


if __name__ == "__main__":
    main()
