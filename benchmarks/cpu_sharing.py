"""What two worker processes sharing a CPU machine's cores cost each other, by thread count.

    python -m benchmarks.cpu_sharing --out benchmarks/results/cpu_sharing_DATE.json

One engine (real SmolLM2, fixed threads: 2 = every core of this VM, or 1) times a prefill of 512 tokens and a
decode step of 4 rows at context 256, alone and beside a second engine process that prefills 512-token prompts
back to back on 2 or 1 threads. engine/cpu_threads.py's adaptive rule picks every core for a step that starts
while the machine is idle and keeps them to the step's end, so "2 beside 1" is what a worker's long step meets
when the other worker wakes up meanwhile (the simulator's `co_run.oversubscribed_*`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.profile_steps import Tokens, _decode_once, run_prompt
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine


def engine(threads: int) -> LLMEngine:
    torch.set_num_threads(threads)
    return LLMEngine(EngineConfig(model="smollm2", device="cpu", dtype="float32", cpu_threads=threads,
                                  cache=CacheConfig(memory_budget_bytes=2**29),
                                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)))


def co_runner(threads: int) -> None:
    """The second process: prefills back to back until killed; prints "go" once it runs."""
    eng, toks = engine(threads), Tokens(49152)
    run_prompt(eng, "w", toks.take(32), "cpu")
    print("go", flush=True)
    for i in range(10**9):
        run_prompt(eng, f"c{i}", toks.take(512), "cpu")


def measure(eng: LLMEngine, toks: Tokens) -> list[float]:
    pre = statistics.median(run_prompt(eng, f"m{time.monotonic_ns()}", toks.take(512), "cpu") for _ in range(3))
    dec = statistics.median(_decode_once(eng, toks, 4, 256, 8, "cpu") for _ in range(2))
    return [round(pre, 1), round(dec, 1)]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--co-runner", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="JSON to write")
    a = p.parse_args(argv)
    if a.co_runner:
        co_runner(a.co_runner)
    out: dict[str, list[float]] = {}
    for mine in (2, 1):
        eng, toks = engine(mine), Tokens(49152)
        run_prompt(eng, "w", toks.take(32), "cpu")
        out[f"{mine} alone"] = measure(eng, toks)
        for co in (2, 1):
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_sharing", "--co-runner", str(co)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
                time.sleep(1)
                out[f"{mine} beside {co}"] = measure(eng, toks)
            finally:
                proc.kill()
                proc.wait()
    result = {"what": "[prefill 512 tokens ms, decode step 4 x 256 ms] by 'threads of this engine [beside threads of "
                      "a co-runner prefilling back to back]'", "ms": out, "load_average_after": os.getloadavg()}
    print(json.dumps(result), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return out


if __name__ == "__main__":
    main()
