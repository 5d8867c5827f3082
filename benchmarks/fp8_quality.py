"""FP8 weights' quality on the real SmolLM2-135M, against bf16: greedy agreement and logprob drift (CPU).

    python -m benchmarks.fp8_quality [--new-tokens 64] [--variants bf16,fp8-w8a8,fp8-weight-only,float32]
                                     [--out benchmarks/results/fp8_quality_cpu_<date>.json]

Variants (the packaged SmolLM2; FP8 quantizes every projection and the LM head per output channel at load):
  bf16             the reference
  fp8-w8a8         what a Hopper GPU computes for more than one row (engine/fp8.py): FP8 weights, activations
                   quantized to FP8 per token, exact products accumulated in float32, bf16 out. The CPU has no FP8
                   matmul, so the FP8 parameters are kept (`fp8_native` forced) and the path's torch twin runs:
                   the GPU's arithmetic, not its speed
  fp8-weight-only  FP8-rounded weights, bf16 activations: the GPU's batch-1 GEMV, and `engine.quantization: fp8`
                   on a CPU (the fallback)
  fp8-w8a8-bf16-head  fp8-w8a8 with the LM head left in bf16 (FP8 checkpoints usually leave it so; vLLM's
                   online fp8 does too): how much of the drift the quantized head adds. SmolLM2's head is tied:
                   dropping the quantized copy reads the bf16 embedding table
  float32          a noise floor: how far bf16 itself is from float32 by the same measures
Prompts: three "repeat this text" prompts and three open questions (benchmarks/spec_decode.py), chat template,
run together (every decode step has 6 rows: the W8A8 path throughout), greedy, ignore_eos, --new-tokens each.
Measures against bf16:
  greedy      per prompt, how many leading tokens equal bf16's; the prompts equal over all --new-tokens
  teacher     bf16's continuation scored by each variant in one prefill (prompt_logprobs): the mean |logprob
              difference| over those tokens, and top-1 agreement (positions where the variant's argmax is bf16's
              token)
Speed is not measured here (no GPU; the CPU runs FP8 by dequantizing). Prints a table; writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from typing import Any
from unittest import mock

import torch

from benchmarks.spec_decode import COPY_TEXTS, OPEN_QUESTIONS
from engine.llm import LLM
from engine.request import SamplingParams

FP8 = {"dtype": "bfloat16", "quantization": "fp8"}
VARIANTS = {"bf16": {"dtype": "bfloat16"}, "fp8-w8a8": FP8, "fp8-weight-only": FP8, "fp8-w8a8-bf16-head": FP8,
            "float32": {"dtype": "float32"}}


def prompts(llm: LLM) -> list[list[int]]:
    tok = llm.tokenizer
    assert tok is not None
    texts = [f"Repeat the following text exactly: {t}" for t in COPY_TEXTS] + OPEN_QUESTIONS
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts]


def load(variant: str) -> LLM:
    """The variant's engine; fp8-w8a8* keep FP8 parameters on the CPU (the GPU path's twin runs)."""
    with mock.patch("engine.quantization.fp8_native", return_value=True) if variant.startswith("fp8-w8a8") \
            else contextlib.nullcontext():
        llm = LLM("smollm2", max_num_seqs=8, **VARIANTS[variant])
    if variant == "fp8-w8a8-bf16-head":
        model = llm.engine._runner.model
        assert model.lm_head is None, "SmolLM2's LM head is tied"
        model.head_weight = None  # the LM head reads the bf16 embedding table again
    return llm


def greedy(llm: LLM, ids: list[list[int]], n: int) -> list[list[int]]:
    outs = llm.generate([list(p) for p in ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


def teacher_forced(llm: LLM, ids: list[list[int]], conts: list[list[int]]) -> list[list[tuple[float, int]]]:
    """(logprob, rank) of each continuation token given everything before it, one prefill per prompt."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([p + c for p, c in zip(ids, conts, strict=True)], params)
    return [[(r[0], r[1]) for r in o.prompt_logprobs[-len(c):]] for o, c in zip(outs, conts, strict=True)]


def compare(ref: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The variant's measures against the reference's greedy tokens and teacher-forced logprobs."""
    lead = [next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
            for r, g in zip(ref["tokens"], run["tokens"], strict=True)]
    diffs = [abs(a[0] - b[0]) for ra, rb in zip(ref["scored"], run["scored"], strict=True)
             for a, b in zip(ra, rb, strict=True)]
    top1 = [b[1] == 1 for rb in run["scored"] for b in rb]
    return {"leading_tokens_equal": lead, "prompts_identical": sum(n == len(r) for n, r in zip(lead, ref["tokens"],
                                                                                             strict=True)),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs), "max_abs_logprob_diff": max(diffs),
            "top1_agreement": sum(top1) / len(top1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="bf16,fp8-w8a8,fp8-weight-only,float32")
    ap.add_argument("--out", default=f"benchmarks/results/fp8_quality_cpu_{datetime.date.today()}.json")
    args = ap.parse_args()
    names = args.variants.split(",")
    assert names[0] == "bf16" and all(v in VARIANTS for v in names), f"bf16 first, then some of {list(VARIANTS)}"
    runs: dict[str, dict[str, Any]] = {}
    ids: list[list[int]] = []
    for name in names:
        t0 = time.perf_counter()
        llm = load(name)
        ids = ids or prompts(llm)
        tokens = greedy(llm, ids, args.new_tokens)
        scored = teacher_forced(llm, ids, runs["bf16"]["tokens"] if runs else tokens)
        runs[name] = {"tokens": tokens, "scored": scored, "seconds": round(time.perf_counter() - t0, 1)}
        llm.close()
        print(f"{name}: {runs[name]['seconds']} s", file=sys.stderr)
    result = {"date": str(datetime.date.today()), "command": "python -m benchmarks.fp8_quality " + " ".join(sys.argv[1:]),
              "model": "SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized)", "new_tokens": args.new_tokens,
              "prompts": len(ids), "prompt_tokens": [len(p) for p in ids], "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "variants": {n: {**({} if n == "bf16" else compare(runs["bf16"], r)), "seconds": r["seconds"],
                               "tokens": r["tokens"]} for n, r in runs.items()}}
    print(f"{'variant':16} {'identical':>9} {'leading equal':>24} {'mean|dlp|':>9} {'max|dlp|':>8} {'top1':>6}")
    for n, v in result["variants"].items():
        if n != "bf16":
            print(f"{n:16} {v['prompts_identical']:>5}/{len(ids):<3} {str(v['leading_tokens_equal']):>24} "
                  f"{v['mean_abs_logprob_diff']:9.4f} {v['max_abs_logprob_diff']:8.3f} {v['top1_agreement']:6.3f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}))


if __name__ == "__main__":
    main()
