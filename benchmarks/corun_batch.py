"""A prompt's time beside a decode co-runner, by the co-runner's batch and step overlap (one GPU).

    python -m benchmarks.corun_batch --dummy llama3-8b-v49k --batches 1,8,32 --out DIR

`disagg profile` times a prompt beside one decode co-runner (32 rows at context 1,024 on a GPU) and the simulator
charges every prompt beside a busy decode worker that multiplier. A real 1P+1D cluster's prompts ran 2.19x the
profile's prompt times beside its serving decode worker, whatever its batch (benchmarks/RESULTS.md, seed 9), where
the profile read 1.95x. This asks whether the co-runner's batch or its overlapped steps (engine/lookahead.py) move
the multiplier: for each co-runner (a second process of this engine decoding B rows at the context, rows re-added as
they finish; `--no-overlap` adds one per batch without overlapped steps), the median time of `--repeat` prompts of
each length beside it, over the same prompts alone in this process. Writes `corun_batch_<device>.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.profile_steps import Tokens, run_prompt

DUMMY_NAME = "{}-dummy"


def build(dummy: str, kv_gib: float, overlap: bool | None, max_seqs: int) -> object:
    from benchmarks.profiler import SHAPES
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=DUMMY_NAME.format(dummy), load_format="dummy", dummy_model=SHAPES[dummy],
                                  device="cuda", cache=CacheConfig(memory_budget_bytes=int(kv_gib * 2**30)),
                                  scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=4096),
                                  overlap_steps=overlap))


def co_runner(dummy: str, batch: int, context: int, overlap: bool) -> None:
    """Decode `batch` rows at `context` for ever (killed by the parent), after printing "go"."""
    from benchmarks.given_kv import receive_given_kv
    from benchmarks.profiler import SHAPES
    from engine.request import SamplingParams

    m = SHAPES[dummy]
    per_token = 2 * m.num_layers * m.num_kv_heads * (m.head_dim or m.hidden_size // m.num_heads) * 2  # K and V, bf16
    # room for every row twice over: the engine keeps part of a budget back (one 6 GiB co-runner held 27 of 32 rows)
    eng = build(dummy, batch * (context + 300) * per_token * 2 / 2**30 + 1.0, None if overlap else False, batch)
    toks = Tokens(eng.model_config.vocab_size)
    run_prompt(eng, "warm", toks.take(32), "cuda")
    print("go", flush=True)
    for i in itertools.count():
        if not eng.has_unfinished():
            params = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
            for j in range(batch):
                receive_given_kv(eng, f"d{i}-{j}", toks.take(context), params)
        eng.step()


def prompts_ms(eng: object, toks: Tokens, n: int, repeat: int, tag: str) -> list[float]:
    out = []
    for i in range(repeat):
        time.sleep(0.02)  # as a worker's prompts arrive: not back to back
        out.append(run_prompt(eng, f"{tag}-{n}-{i}", toks.take(n), "cuda"))
    return out


def beside(a: argparse.Namespace, eng: object, toks: Tokens, batch: int, overlap: bool) -> dict[int, list[float]]:
    cmd = [sys.executable, "-m", "benchmarks.corun_batch", "--co-runner", str(batch), "--dummy", a.dummy,
           "--context", str(a.context)] + ([] if overlap else ["--no-overlap"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go", f"co-runner {batch} failed"
        time.sleep(1.0)  # its steps running
        ms = {n: prompts_ms(eng, toks, n, a.repeat, f"b{batch}{overlap}") for n in a.lengths}
        if proc.poll() is not None:  # it died meanwhile: these prompts ran alone, not beside it
            raise RuntimeError(f"the {batch}-row co-runner exited ({proc.returncode}) while prompts were timed")
        return ms
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.co_runner:
        co_runner(a.dummy, a.co_runner, a.context, not a.no_overlap)
        return {}
    try:
        a.lengths = [int(x) for x in a.lengths.split(",")]
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        raise SystemExit(f"--lengths and --batches take comma-separated integers, got {a.lengths!r}, {a.batches!r}") \
            from None
    if min(a.lengths + batches) < 1 or a.repeat < 1:
        raise SystemExit("--lengths, --batches and --repeat must be >= 1")
    eng = build(a.dummy, a.kv_gib, None, 8)
    toks = Tokens(eng.model_config.vocab_size)
    for n in a.lengths:
        run_prompt(eng, f"warm{n}", toks.take(n), "cuda")
    alone = {n: prompts_ms(eng, toks, n, a.repeat, "alone") for n in a.lengths}
    runs = [(b, True) for b in batches] + ([(8, False)] if a.no_overlap_too else [])
    import torch

    out = {"device": torch.cuda.get_device_name(), "args": vars(a), "alone_ms": alone, "rows": []}
    os.makedirs(a.out, exist_ok=True)
    for batch, overlap in runs:  # each co-runner builds a whole engine (~1 min): the file is rewritten after each
        ms = beside(a, eng, toks, batch, overlap)
        row = {"co_runner_rows": batch, "co_runner_overlap": overlap,
               **{f"ratio_{n}": round(statistics.median(ms[n]) / statistics.median(alone[n]), 3) for n in a.lengths},
               "beside_ms": ms}
        print({k: v for k, v in row.items() if k != "beside_ms"}, flush=True)
        out["rows"].append(row)
        with open(os.path.join(a.out, "corun_batch_cuda.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy", default="llama3-8b-v49k", help="model shape (random weights), as disagg profile's")
    p.add_argument("--lengths", default="1024,2048", help="prompt lengths, comma-separated (default 1024,2048)")
    p.add_argument("--batches", default="1,8,32", help="co-runner decode batches, comma-separated (default 1,8,32)")
    p.add_argument("--context", type=int, default=1024, help="co-runner rows' context (default 1024)")
    p.add_argument("--repeat", type=int, default=8, help="prompts of each length per co-runner (default 8)")
    p.add_argument("--kv-gib", type=float, default=4.0, help="this engine's KV budget, GiB (default 4)")
    p.add_argument("--no-overlap-too", action="store_true", help="also an 8-row co-runner without overlapped steps")
    p.add_argument("--co-runner", type=int, default=0, help=argparse.SUPPRESS)  # internal: run as the co-runner
    p.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="output folder")
    return p


if __name__ == "__main__":
    main()
