"""What a worker's serving loop adds to each engine step: the same decode batch stepped by `engine.step` in a plain
loop and by the worker's `AsyncEngine` (worker/async_engine.py: the step on its executor thread, outputs handed
to per-request sinks on the event loop, the load snapshot read between steps). `disagg profile` records the
difference as `serving.step_overhead_ms`; the simulator adds it to every step a replica runs.

The one-GPU serving comparison showed why it matters (benchmarks/RESULTS.md, issue 21): every real ITL p50 was
1.1-1.5 ms above the profile's decode step, which `engine.step` alone does not see.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from benchmarks.given_kv import receive_given_kv
from benchmarks.profile_steps import Tokens, sync, timed_steps
from engine.engine import LLMEngine, StepOutput
from engine.request import SamplingParams
from worker.async_engine import AsyncEngine

WARM_STEPS = 3  # steps before timing: the batch joins, graphs warm


def batch_requests(toks: Tokens, batch: int, ctx: int, steps: int, tag: str) -> list[tuple[str, list[int]]]:
    """`batch` (request id, `ctx`-token prompt) pairs; each request will want `steps` more tokens."""
    return [(f"{tag}-{batch}-{ctx}-{i}-{time.monotonic_ns()}", toks.take(ctx)) for i in range(batch)]


def params_for(steps: int) -> SamplingParams:
    return SamplingParams(max_tokens=steps + WARM_STEPS + 8, temperature=0, ignore_eos=True)


def plain_step_ms(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int, device: str) -> float:
    """ms per step when `engine.step` runs in a plain loop (what the decode grid measures)."""
    reqs = batch_requests(toks, batch, ctx, steps, "plain")
    for rid, prompt in reqs:
        receive_given_kv(eng, rid, prompt, params_for(steps))
    for _ in range(WARM_STEPS):
        eng.step()
    ms = timed_steps(eng, steps, device)
    for rid, _ in reqs:
        eng.abort(rid)
    return ms


async def _served_step_ms(eng: LLMEngine, reqs: list[tuple[str, list[int]]], steps: int, device: str) -> float:
    aeng = AsyncEngine(eng)
    arrivals: list[float] = []
    done = asyncio.Event()

    def first(out: StepOutput) -> None:  # the first request's outputs mark the steps
        arrivals.append(time.perf_counter())
        if len(arrivals) >= steps + WARM_STEPS + 1:
            done.set()

    await aeng.start()
    try:
        for i, (rid, prompt) in enumerate(reqs):  # as a decode worker takes a request whose KV it pulled
            req = eng.make_request(rid, prompt, params_for(steps), output_token_ids=[2])
            if await aeng.receive_kv(req, len(prompt), 3600.0, first if i == 0 else lambda _out: None) is None:
                raise RuntimeError(f"no KV blocks for {rid}")
            aeng.kv_received(rid)
        await asyncio.wait_for(done.wait(), timeout=600)
    finally:
        await aeng.stop()
    gaps = [b - a for a, b in zip(arrivals[WARM_STEPS:], arrivals[WARM_STEPS + 1:], strict=False)]
    # the statistic timed_steps uses on that device: the mean of back-to-back GPU steps, the median CPU step
    return (statistics.mean(gaps) if device.startswith("cuda") else statistics.median(gaps)) * 1e3


def served_step_ms(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int, device: str) -> float:
    """ms between a request's outputs when the worker's AsyncEngine steps the batch."""
    reqs = batch_requests(toks, batch, ctx, steps, "served")
    sync(device)
    ms = asyncio.run(_served_step_ms(eng, reqs, steps, device))
    for rid, _ in reqs:  # the loop is stopped: the engine is ours again
        eng.abort(rid)
    return ms


def step_overhead_ms(eng: LLMEngine, toks: Tokens, batches: list[int], ctx: int, steps: int, device: str,
                     repeat: int = 3) -> dict[str, dict[str, float]]:
    """Per batch size: the plain and the served ms per step (medians over `repeat` alternating runs) and the
    overhead, the median of their differences (clipped at 0)."""
    out: dict[str, dict[str, float]] = {}
    for b in batches:
        plain, served = [], []
        for _ in range(repeat):
            plain.append(plain_step_ms(eng, toks, b, ctx, steps, device))
            served.append(served_step_ms(eng, toks, b, ctx, steps, device))
        diff = statistics.median(s - p for p, s in zip(plain, served, strict=True))
        out[str(b)] = {"plain_ms": round(statistics.median(plain), 4), "served_ms": round(statistics.median(served), 4),
                       "overhead_ms": round(max(0.0, diff), 4)}
    return out
