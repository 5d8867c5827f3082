"""What a second busy process on the same machine or GPU costs a worker's steps (`disagg profile`'s co-run).

Beside a process that keeps the rest of the machine busy (one core of matmuls on a CPU; bf16 matmuls on the same
GPU), over the same alone:
- `prefill`, `decode`: the engine as a worker runs it. A CPU engine with adaptive threads (engine/cpu_threads.py)
  sees the busy core and runs on the cores left.
- `oversubscribed_prefill`, `oversubscribed_decode` (CPU): an engine on every core beside it, which is what an
  adaptive engine that looked while the machine was idle runs until its step ends. Its threads then outnumber the
  cores, and a team of threads that meets at barriers waits for whichever one was descheduled.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from benchmarks.machine_load import Alone
from benchmarks.profile_steps import Tokens, decode_ms, run_prompt
from engine.engine import LLMEngine
from simulator.profile import CoRunCosts

CO_RUNNERS = {  # a process that keeps the rest of the machine busy until killed, printing "go" once it runs
    "cpu": "import torch\ntorch.set_num_threads(1)\na = torch.randn(768, 768)\nprint('go', flush=True)\n"
           "while True:\n    a @ a\n",
    "cuda": "import torch\na = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)\nprint('go', flush=True)\n"
            "while True:\n    a @ a\n    torch.cuda.synchronize()\n",
}


@contextmanager
def busy_beside(gpu: bool) -> Iterator[None]:
    """A co-runner process keeping the rest of the machine (or the same GPU) busy while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", CO_RUNNERS["cuda" if gpu else "cpu"]], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
        time.sleep(0.5)  # an adaptive engine sees the co-runner's core busy
        yield
    finally:
        proc.kill()
        proc.wait()


def co_run(eng: LLMEngine, toks: Tokens, device: str, repeat: int, alone_check: Alone,
           all_cores: Callable[[], LLMEngine] | None = None) -> CoRunCosts:
    """The multipliers (module docstring). `all_cores` builds an engine fixed on every core (CPU only)."""
    gpu = device.startswith("cuda")
    n, batch, ctx = (2048, 32, 1024) if gpu else (256, 4, 256)

    def measure(e: LLMEngine, check: Callable[[Callable[[], Any]], Any]) -> tuple[float, float]:
        pre = statistics.median(check(partial(run_prompt, e, f"co{i}-{time.monotonic_ns()}", toks.take(n), device))
                                for i in range(repeat))
        return pre, decode_ms(e, toks, batch, ctx, 8, device, check) or 0.0

    fixed = all_cores() if all_cores is not None and not gpu else None
    alone = measure(eng, alone_check)
    fixed_alone = measure(fixed, lambda f: f()) if fixed is not None else (0.0, 0.0)
    with busy_beside(gpu):
        busy = measure(eng, lambda f: f())
        threads = "" if gpu else f" (this engine on {eng.stats.cpu_threads} thread(s) beside it)"
        over = measure(fixed, lambda f: f()) if fixed is not None else (0.0, 0.0)
    ratio = [round(max(1.0, b / a), 3) if a else 0.0 for b, a in zip((*busy, *over), (*alone, *fixed_alone),
                                                                        strict=True)]
    return CoRunCosts(prefill=ratio[0], decode=ratio[1], oversubscribed_prefill=ratio[2],
                      oversubscribed_decode=ratio[3],
                      note=f"prefill of {n} tokens and decode of {batch} x {ctx}, alone and beside a process "
                           f"running {'bf16 8192^3 matmuls on the same GPU' if gpu else 'fp32 768^3 matmuls, 1 thread'}"
                           + threads + ("; oversubscribed: an engine fixed on every core beside it" if fixed else ""))
