"""Offline throughput: this engine vs Hugging Face `generate` on the same prompts and weights, same run.

    python -m benchmarks.offline_throughput [--num-prompts 32] [--new-tokens 64] [--device cpu]

Prompts are 8..200 tokens (uniform, seeded), every request generates exactly --new-tokens (ignore_eos),
greedy. HF runs the whole batch at once with left padding (its fastest mode). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def make_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:  # noqa: ANN001
    rng = random.Random(seed)
    with open(__file__) as f:
        text = f.read() * 4
    base = tokenizer.encode(text)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randint(0, len(base) - length - 1)
        out.append(base[start : start + length])
    return out


def run_ours(prompts: list[list[int]], new_tokens: int, device: str, dtype: str) -> tuple[float, list[list[int]]]:
    from engine.llm import LLM
    from engine.request import SamplingParams

    llm = LLM("smollm2", device=device, dtype=dtype)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def load_hf(device: str, dtype: str):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    from engine.loader import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=getattr(torch, dtype)).to(device).eval()


@torch.inference_mode()
def run_hf_sequential(model, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list]:  # noqa: ANN001
    """One prompt at a time: how `generate` is most often called."""
    out = []
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p], device=device)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return time.perf_counter() - t0, out


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list[list[int]]]:  # noqa: ANN001
    """The whole batch at once with left padding: HF's fastest mode."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF batched generation requires
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    model.generate(ids[:2, -8:].to(device), attention_mask=mask[:2, -8:].to(device), max_new_tokens=2,
                   do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[:, width:].tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32, help="prompts in the batch (default 32)")
    ap.add_argument("--min-len", type=int, default=8, help="shortest prompt in tokens (default 8)")
    ap.add_argument("--max-len", type=int, default=200, help="longest prompt in tokens (default 200)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (default float32)")
    ap.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    ap.add_argument("--no-sequential", dest="sequential", action="store_false",
                    help="skip the one-prompt-at-a-time HF baseline (slow)")
    a = ap.parse_args(argv)
    from engine.loader import smollm2_gguf_path
    from engine.tokenizer import Tokenizer

    prompts = make_prompts(Tokenizer.from_gguf(smollm2_gguf_path()), a.num_prompts, a.min_len, a.max_len, a.seed)
    total = a.num_prompts * a.new_tokens
    t_ours, toks_ours = run_ours(prompts, a.new_tokens, a.device, a.dtype)
    model = load_hf(a.device, a.dtype)
    t_hf, toks_hf = run_hf(model, prompts, a.new_tokens, a.device)
    t_seq, toks_seq = run_hf_sequential(model, prompts, a.new_tokens, a.device) if a.sequential else (0.0, [])
    same = sum(x == y for x, y in zip(toks_ours, toks_seq or toks_hf, strict=True))
    res = {"device": a.device, "dtype": a.dtype, "torch_threads": torch.get_num_threads(), "prompts": a.num_prompts,
           "new_tokens": a.new_tokens, "ours_tok_s": round(total / t_ours, 1),
           "hf_batched_tok_s": round(total / t_hf, 1),
           "speedup_vs_hf_batched": round(t_hf / t_ours, 2), "identical_greedy_outputs": f"{same}/{a.num_prompts}"}
    rows = [("engine", t_ours), ("HF batched", t_hf)] + ([("HF one-by-one", t_seq)] if t_seq else [])
    if t_seq:
        res.update(hf_sequential_tok_s=round(total / t_seq, 1), speedup_vs_hf_sequential=round(t_seq / t_ours, 2))
    print(f"\n{'':16}{'seconds':>10}{'output tok/s':>15}{'engine speedup':>16}")
    for name, t in rows:
        print(f"{name:16}{t:10.2f}{total / t:15.1f}{t / t_ours:15.2f}x")
    print(f"identical greedy outputs {same}/{a.num_prompts} (vs {'one-by-one' if t_seq else 'padded batch'} HF)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
