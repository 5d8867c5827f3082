"""What a worker's serving loop adds to each engine step: a decode batch stepped by the worker's `AsyncEngine`
(worker/async_engine.py: the step on its executor thread, outputs handed to per-request sinks on the event loop,
the load snapshot read between steps), the gap between a request's outputs against the steps' own time in that
loop. `disagg profile` records the difference as `serving.step_overhead_ms`; the simulator adds it to every step
a replica runs. The plain loop's step (`engine.step` back to back, what the decode grid measures) is kept beside
it for reference.

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


def _stat(xs: list[float], device: str) -> float:
    """ms: the statistic timed_steps uses on that device (the mean of back-to-back GPU steps, the median CPU step)."""
    return (statistics.mean(xs) if device.startswith("cuda") else statistics.median(xs)) * 1e3


async def _served(eng: LLMEngine, reqs: list[tuple[str, list[int]]], steps: int) -> tuple[list[float], list[float]]:
    """(gaps between the first request's outputs, durations of the engine steps the loop ran)."""
    aeng = AsyncEngine(eng)
    arrivals: list[float] = []
    inside: list[float] = []
    done = asyncio.Event()
    step = eng.step

    def timed_step() -> list[StepOutput]:  # this measurement only: an instance attribute over LLMEngine.step
        t0 = time.perf_counter()
        out = step()
        inside.append(time.perf_counter() - t0)
        return out

    def first(out: StepOutput) -> None:  # the first request's outputs mark the steps
        arrivals.append(time.perf_counter())
        if len(arrivals) >= steps + WARM_STEPS + 1:
            done.set()

    eng.step = timed_step  # type: ignore[method-assign]
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
        del eng.step
    gaps = [b - a for a, b in zip(arrivals[WARM_STEPS:], arrivals[WARM_STEPS + 1:], strict=False)]
    return gaps, inside[-len(gaps):]


def served_step_ms(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int, device: str
                   ) -> tuple[float, float]:
    """(ms between a request's outputs when the worker's AsyncEngine steps the batch, ms of the steps themselves
    in that loop). Their difference is the loop's own cost: the step is timed on the loop's thread, which matters
    on a CPU (a second OpenMP team in the process, the plain loop's, slows it there)."""
    reqs = batch_requests(toks, batch, ctx, steps, "served")
    sync(device)
    gaps, inside = asyncio.run(_served(eng, reqs, steps))
    for rid, _ in reqs:  # the loop is stopped: the engine is ours again
        eng.abort(rid)
    return _stat(gaps, device), _stat(inside, device)


def loop_overhead_ms(by_batch: dict[str, dict[str, float]], overlapped: bool) -> float:
    """What the simulator adds to each step of the decode grid, the median over batches. Without overlapped steps
    the loop's work between steps adds to the step (served gap - step in the loop). With them (a GPU,
    engine/lookahead.py) that work runs while the device computes the queued step, so the loop adds only what its
    gap exceeds the plain loop's step, which the grid measures: on an H100 and an H200 the served gap was the
    plain step's within 1% at 1 row and 2-3% shorter at 32, where (served - in loop) had charged 0.22-0.49 ms a step
    and put the simulated ITL p50s 2-9% high (benchmarks/RESULTS.md)."""
    key = "plain_ms" if overlapped else "step_in_loop_ms"
    return round(statistics.median(max(0.0, v["served_ms"] - v[key]) for v in by_batch.values()), 4)


def step_overhead_ms(eng: LLMEngine, toks: Tokens, batches: list[int], ctx: int, steps: int, device: str,
                     repeat: int = 3) -> dict[str, dict[str, float]]:
    """Per batch size, medians over `repeat` runs: the plain loop's ms per step (for reference), the served gap,
    the steps' own time inside the served loop, and the overhead, the median of (gap - step) (clipped at 0)."""
    out: dict[str, dict[str, float]] = {}
    for b in batches:
        plain, served, inside = [], [], []
        for _ in range(repeat):
            plain.append(plain_step_ms(eng, toks, b, ctx, steps, device))
            gap, step = served_step_ms(eng, toks, b, ctx, steps, device)
            served.append(gap)
            inside.append(step)
        diff = statistics.median(g - s for g, s in zip(served, inside, strict=True))
        out[str(b)] = {"plain_ms": round(statistics.median(plain), 4), "served_ms": round(statistics.median(served), 4),
                       "step_in_loop_ms": round(statistics.median(inside), 4), "overhead_ms": round(max(0.0, diff), 4)}
    return out
