"""Prompt steps on a GPU kept busy against the profile's way of timing them (`disagg profile`'s `sustained`).

The prefill table times one prompt at a time, the GPU idle in between, so each runs at the clocks of an idle
card. A serving GPU is rarely idle: back to back, an H100's 2,048-token prompt steps drew its 700 W limit within
2-3 steps, its SM clock fell from 1,980 to ~1,550 MHz and the steps took 12% longer (benchmarks/sustained_steps.py,
benchmarks/RESULTS.md). Measured here: prompts back to back for `warm_s` (the clocks settle), then timed for
`measure_s`, over the same prompt timed after `rest_s` idle. The simulator slows prompt steps by the ratio as the
device's busy share rises (simulator/device.py).
"""

from __future__ import annotations

import statistics
import time

from benchmarks.profile_steps import Tokens, run_prompt
from engine.engine import LLMEngine
from simulator.profile import SustainedCosts


def sustained_costs(eng: LLMEngine, toks: Tokens, device: str, tokens: int, warm_s: float = 1.0,
                    measure_s: float = 2.0, rest_s: float = 0.5, idle_prompts: int = 3) -> SustainedCosts:
    """The multiplier of a `tokens`-token prompt step on a busy device over the same step after a rest."""
    assert tokens > 0 and warm_s >= 0 and measure_s > 0 and rest_s >= 0 and idle_prompts > 0
    idle = []
    for i in range(idle_prompts):
        time.sleep(rest_s)
        idle.append(run_prompt(eng, f"idle{i}-{time.monotonic_ns()}", toks.take(tokens), device))
    busy: list[float] = []
    start = time.monotonic()
    while time.monotonic() - start < warm_s + measure_s:
        ms = run_prompt(eng, f"busy-{time.monotonic_ns()}", toks.take(tokens), device)
        if time.monotonic() - start > warm_s:
            busy.append(ms)
    alone, loaded = statistics.median(idle), statistics.median(busy)
    return SustainedCosts(prompt=round(max(1.0, loaded / alone), 4),
                          note=f"prompts of {tokens} tokens back to back ({len(busy)} timed after {warm_s:g} s, "
                               f"median {loaded:.2f} ms) over the same after {rest_s:g} s idle (median of "
                               f"{idle_prompts}, {alone:.2f} ms)")
