"""Decode step time by rows, one row count at a time (1, 2, 3, ... N), and the LM-head GEMM alone by rows in both
weight layouts (float32, as the CPU engine runs): whether a step's cost is monotonic in its batch on this machine,
which a profile's coarse decode grid would miss (benchmarks/RESULTS.md, "A held-out CPU trace").

    python -m benchmarks.decode_rows --out benchmarks/results/decode_rows_cpu.json        # SmolLM2 on the CPU

Decode steps run on a batch whose context KV is taken as given (benchmarks/given_kv.py), every row at `--context`;
the median of `--steps` steps after 3 untimed ones, `--repeat` times per row count. The GEMM part times
`F.linear(x, W)` (W rows = outputs, as the model stores it), `(W @ x.T).T` and `x @ W.T.contiguous()` for the
model's LM head.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.given_kv import receive_given_kv
from benchmarks.profile_steps import Tokens, run_prompt, timed_steps
from benchmarks.profiler import build_engine, parse
from engine.engine import LLMEngine
from engine.request import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--dummy", default="", help="random weights of this shape (disagg profile's --dummy; default "
                   "the real SmolLM2)")
    p.add_argument("--max-rows", type=int, default=12, help="time batches of 1 to this many rows (default 12)")
    p.add_argument("--context", type=int, default=300, help="every row's context, tokens (default 300)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8)")
    p.add_argument("--repeat", type=int, default=2, help="measurements per row count (default 2)")
    p.add_argument("--out", required=True, help="JSON output")
    return p


def step_ms(eng: LLMEngine, toks: Tokens, ids: itertools.count, rows: int, a: argparse.Namespace) -> float:
    rids = [f"r{next(ids)}" for _ in range(rows)]
    for rid in rids:
        receive_given_kv(eng, rid, toks.take(a.context), SamplingParams(max_tokens=a.steps + 8, temperature=0,
                                                                         ignore_eos=True))
    for _ in range(3):
        eng.step()
    ms = timed_steps(eng, a.steps, "cpu")
    for rid in rids:
        eng.abort(rid)
    return round(ms, 2)


def gemm_ms(w: torch.Tensor, rows: int, reps: int = 10) -> dict[str, float]:
    """The LM head's product for `rows` rows three ways: F.linear on the model's layout, W x^T on it (what
    engine/models/ops.linear does for 2-32 rows on the CPU), and x times the transposed weight made contiguous."""
    wt, x = w.t().contiguous(), torch.randn(rows, w.shape[1], dtype=w.dtype)
    out = {}
    for name, f in (("linear", lambda: F.linear(x, w)), ("weight_x_t", lambda: (w @ x.t()).t().contiguous()),
                    ("transposed", lambda: x @ wt)):
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out[name] = round((time.perf_counter() - t0) / reps * 1e3, 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    if a.max_rows < 1 or a.context < 1 or a.steps < 1 or a.repeat < 1:
        build_parser().error("--max-rows, --context, --steps and --repeat must be at least 1")
    e = parse(["--decode-batch", f"1,{max(2, a.max_rows)}", "--kv-gib", "0.5", "--out", a.out,
               *(["--dummy", a.dummy] if a.dummy else [])])
    eng, _ = build_engine(e)
    toks, ids = Tokens(eng.model_config.vocab_size), itertools.count()
    run_prompt(eng, "warm", toks.take(32), "cpu")
    steps = {r: [step_ms(eng, toks, ids, r, a) for _ in range(a.repeat)] for r in range(1, a.max_rows + 1)}
    m = eng.model_config
    head = torch.randn(m.vocab_size, m.hidden_size)  # the LM head's shape (values do not change a GEMM's time)
    gemm = {r: gemm_ms(head, r) for r in range(1, min(a.max_rows, 8) + 1)}
    for r in steps:
        print(f"{r:3d} rows: step {statistics.median(steps[r]):7.1f} ms {steps[r]}"
              + (f"   LM head {gemm[r]}" if r in gemm else ""), flush=True)
    out = {"args": vars(a), "model": e.dummy or e.model, "threads": torch.get_num_threads(),
           "step_ms": {str(r): v for r, v in steps.items()}, "lm_head_ms": {str(r): v for r, v in gemm.items()}}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
