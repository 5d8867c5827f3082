"""What a profile leaves out of a real run on this machine, measured on the idle cluster just before it
(benchmarks/sim_validate.py's `--calibrate`): the machine's speed now against the profile's, for decode steps
(their weights part and their per-row part apart) and for prompts, and the serving path's fixed cost per request."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from benchmarks import serving
from benchmarks.step_costs import decode_beside_ms, decode_step_ms, prompt_beside_ms, prompt_step_ms
from simulator.cost_model import CostModel
from simulator.metrics import percentile
from simulator.profile import Profile

TINY_PROMPT = 16  # tokens of the prompts that time the serving path's fixed cost (calibrate)
STREAM_PROMPT = 256  # tokens of the lone stream's prompt, which times the machine's prompt speed (calibrate)
PROBE_ROWS = 4  # streams at once after the lone one: their decode steps time the per-row part of a step (calibrate)
LONE_PROMPTS = 3  # STREAM_PROMPT-token prompts alone (the lone stream's and more), whose median times prompts
CO_RUN_TOKENS = 64  # tokens of the co-run probe's stream, whose one-row steps run beside other prompts (calibrate)
CO_RUN_MAX_PROMPTS = 40  # prompts sent beside it at most (one at a time, 1 token each: they never reach decode)


async def single_stream(url: str, model: str, n: int = 5, co_run: bool = False) -> dict[str, float]:
    """The serving path's own cost on the idle cluster: the median TTFT of `n` 16-token prompts sent one at a time,
    and one stream alone (a 256-token prompt, 64 tokens): its TTFT and median inter-token gap, to hold against the
    profile's prefill of 256 tokens and decode step of one row, and LONE_PROMPTS - 1 more such prompts alone (one
    token each: the prompt's scale is their median step); then PROBE_ROWS such streams at once (48 tokens
    each), whose steps of PROBE_ROWS rows the caller reads from the workers' step logs after `probe_since`. With
    `co_run` (a cluster whose prefill and decode workers share the machine) a co-run probe follows from
    `co_run_since`: one more stream while 256-token prompts go to the prefill worker one after another, so its
    one-row decode steps run beside prompt steps and its prompts beside decode steps (`co_run_probe`)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        ttfts = [(await serving.one_request(client, url, model, list(range(1000, 1000 + TINY_PROMPT)), 2, {})).ttft
                 for _ in range(n)]
        one = await serving.one_request(client, url, model, list(range(2000, 2000 + STREAM_PROMPT)), 64, {})
        for i in range(LONE_PROMPTS - 1):  # more lone prompts of its length: one step moved 10-20% between runs
            start = 2300 + 300 * i
            await serving.one_request(client, url, model, list(range(start, start + STREAM_PROMPT)), 1, {})
        probe_since = time.time()
        await asyncio.gather(*(serving.one_request(client, url, model, list(range(3000 + 300 * i, 3000 + 300 * i
                                                                                    + STREAM_PROMPT)), 48, {})
                               for i in range(PROBE_ROWS)))
        co_run_since = time.time()
        if co_run:
            await co_run_probe(client, url, model)
    return {"tiny_ttft_ms": round(sorted(ttfts)[n // 2] * 1e3, 1), "stream_ttft_ms": round(one.ttft * 1e3, 1),
            "stream_itl_p50_ms": round(percentile(one.itls, 50) * 1e3, 2) if one.itls else 0.0,
            "probe_since": probe_since, "co_run_since": co_run_since}


async def co_run_probe(client: httpx.AsyncClient, url: str, model: str) -> int:
    """One stream (a 256-token prompt, CO_RUN_TOKENS tokens) while STREAM_PROMPT-token prompts of one output token
    each go out one after another until it ends: the prefill worker computes a prompt during most of the stream's
    one-row decode steps, as the profile's co-run timed them (`co_run.decode_at(1)`) on the machine it ran on.
    Returns the prompts sent."""
    stream = asyncio.create_task(serving.one_request(client, url, model, list(range(5000, 5000 + STREAM_PROMPT)),
                                                     CO_RUN_TOKENS, {}))
    sent = 0
    while not stream.done() and sent < CO_RUN_MAX_PROMPTS:
        start = 6000 + 300 * sent  # a new first block each: no prefix-cache hit
        await serving.one_request(client, url, model, list(range(start, start + STREAM_PROMPT)), 1, {})
        sent += 1
    await stream
    return sent


def read_probes(steps: str, alone: dict[str, Any], alone_since: float, since: float, co_run: bool) -> None:
    """Add to `single_stream`'s figures (`alone`, in place) what the workers' step logs (folder `steps`) timed of
    its probes, each from its own window (Unix seconds: the lone stream from `alone_since`, the rows probe, the
    co-run probe, the replay from `since`): the probes after the lone stream send STREAM_PROMPT-token prompts too,
    beside other streams' decode steps (the co-run probe on purpose), which run slower than alone."""
    probe, co_run_since = alone.pop("probe_since"), alone.pop("co_run_since")
    alone["tiny_step_ms"] = prompt_step_ms(steps, alone_since, probe, TINY_PROMPT)
    alone["stream_step_ms"] = prompt_step_ms(steps, alone_since, probe, STREAM_PROMPT)
    alone["one_row_step"] = decode_step_ms(steps, alone_since, probe, 1)
    alone["windows_s"] = [round(t - alone_since, 3) for t in (probe, co_run_since, since)]
    alone["probe_rows_step"] = decode_step_ms(steps, probe, co_run_since, PROBE_ROWS)
    if co_run:
        alone["co_run_step"] = decode_beside_ms(steps, co_run_since, since, 1)
        alone["co_run_prompt_ms"] = prompt_beside_ms(steps, co_run_since, since, STREAM_PROMPT)


def calibrate(what: str, prof: Profile, around: dict[str, Any], tiny_ttft_ms: Callable[[Profile], float]
              ) -> dict[str, float] | None:
    """What the profile leaves out, from the idle cluster just before the real run (`single_stream`), never from
    the run itself. `scale`: the machine's speed against the profile's, the lone stream's median inter-token gap (a
    256-token prompt, 64 tokens, so a mean context of 288) over the profile's decode step of one row there (serving
    loop included); `prefill_scale`: the same for prompts, the lone prompts' median step as the worker's step log
    timed it over the profile's price for 256 tokens (a VM's memory bandwidth and compute drift apart: one ran
    decode steps 3.3x a profile's and prompts 1.0x; runs recorded without it scale prompts by `scale`);
    `fixed_scale` and `row_scale`: a decode step's weights part and its per-row part apart (`rows_scale`);
    `co_run_decode_1` and `co_run_prefill`: the co-run multipliers as the co-run probe timed them (`co_run_scale`).
    `admit_ms`: the serving path's fixed cost per request, the median TTFT of a 16-token prompt
    alone less the simulated one (the router's HTTP and tokenizing), the prompt's step priced as the workers' step
    logs timed it (`tiny_step_ms`) where they did: on a GPU a prompt that short is host-bound, and one H100 timed
    it at 13-48 ms between engines and runs, so the profile's price for it would move `admit_ms` by as much.
    Runs recorded before the step logs had it: the profile's price. `what`: both | speed | admit (sim_validate's
    `--calibrate`); `tiny_ttft_ms`: the simulated TTFT p50 of one 16-token prompt on a profile. None without those
    measurements."""
    alone = (around or {}).get("alone") or {}
    real_ms = alone.get("stream_itl_p50_ms")
    if not real_ms:
        return None
    model_ms = CostModel(prof).decode_ms(1, 288.0)
    speed = what in ("both", "speed")
    out = {"scale": round(real_ms / model_ms, 4) if speed else 1.0, "alone_itl_ms": real_ms,
           "profile_step_ms": round(model_ms, 3)}
    out["prefill_scale"] = out["scale"]
    if speed and alone.get("stream_step_ms"):  # the lone prompts' median step as the worker timed it
        prefill_ms = CostModel(prof).prefill_ms(STREAM_PROMPT)
        out |= {"prefill_scale": round(alone["stream_step_ms"] / prefill_ms, 4),
                "alone_prompt_ms": alone["stream_step_ms"], "profile_prompt_ms": round(prefill_ms, 3)}
    if speed:
        out |= rows_scale(prof, alone.get("one_row_step"), alone.get("probe_rows_step"))
        out |= co_run_scale(prof, alone)
    if alone.get("tiny_ttft_ms") and what in ("both", "admit"):
        scaled = calibrated(prof, out)
        sim_ms = tiny_ttft_ms(scaled)
        if alone.get("tiny_step_ms"):  # its step as it ran, the worker loop's overhead added as the model adds it
            model = CostModel(scaled)
            sim_ms = round(sim_ms - model.prefill_ms(TINY_PROMPT) + alone["tiny_step_ms"] + model.overhead, 2)
        out |= {"admit_ms": round(max(0.0, alone["tiny_ttft_ms"] - sim_ms), 2), "alone_tiny_ttft_ms":
                alone["tiny_ttft_ms"], "sim_tiny_ttft_ms": sim_ms}
    return out


def rows_scale(prof: Profile, one: list[float] | None, rows: list[float] | None) -> dict[str, float]:
    """A decode step's two parts scaled apart, from the idle cluster's steps of one row and of PROBE_ROWS rows
    ((median ms, mean context) each, from the step logs): the profile's grid at those shapes splits a step into a
    part that does not grow with its rows (F, reading the weights) and one per row (R); the real steps then give
    each its own factor (`fixed_scale`, `row_scale`). On a VM whose memory slowed 3.3x a one-row scale priced
    4-7-row steps 20-60% high. {} (one scale for all) without both steps or when the fit is not positive."""
    if not one or not rows:
        return {}
    grid = CostModel(prof)
    g1, g4 = grid.decode_ms(1, one[1]) - grid.overhead, grid.decode_ms(PROBE_ROWS, rows[1]) - grid.overhead
    per_row = (g4 - g1) / (PROBE_ROWS - 1)
    fixed = g1 - per_row
    if per_row <= 0 or fixed <= 0:
        return {}
    row_k = (rows[0] - one[0]) / ((PROBE_ROWS - 1) * per_row)
    fixed_k = (one[0] - row_k * per_row) / fixed
    if row_k <= 0 or fixed_k <= 0:
        return {}
    return {"fixed_scale": round(fixed_k, 4), "row_scale": round(row_k, 4), "fixed_ms": round(fixed, 3),
            "one_row_step_ms": one[0], "probe_rows_step_ms": rows[0]}


def co_run_scale(prof: Profile, alone: dict[str, Any]) -> dict[str, float]:
    """The co-run multipliers on this machine now, from the co-run probe (`co_run_probe`): its one-row decode steps
    beside the prefill worker's prompts (`co_run_step`, median ms) over the lone stream's one-row steps
    (`one_row_step`), and its STREAM_PROMPT-token prompts beside those decode steps (`co_run_prompt_ms`) over the
    lone stream's own prompt (`stream_step_ms`). The profile's figures were timed on the machine as it was then; on
    one 2-core VM whose memory had slowed 3.2x since, one-row steps beside prompts ran 1.6x those alone where the
    profile said 1.37x, prompts beside them 1.6-1.7x where it said 1.5x, and the simulated first gaps (the joining
    step beside the next prompt) ran short with it. {} without the probe's steps or for a profile with no co-run."""
    co = prof.co_run
    one, beside = alone.get("one_row_step"), alone.get("co_run_step")
    if co is None or not one or not beside:
        return {}
    out = {"co_run_decode_1": round(max(1.0, beside[0] / one[0]), 4), "co_run_step_ms": beside[0],
           "profile_co_run_decode_1": round(co.decode_at(1), 4)}
    if alone.get("co_run_prompt_ms") and alone.get("stream_step_ms"):
        out |= {"co_run_prefill": round(max(1.0, alone["co_run_prompt_ms"] / alone["stream_step_ms"]), 4),
                "co_run_prompt_ms": alone["co_run_prompt_ms"],
                "profile_co_run_prefill": round(co.prefill_at(STREAM_PROMPT), 4)}
    return out


def with_co_run(prof: Profile, decode_1: float, prefill: float | None = None) -> Profile:
    """The profile with its co-run multiplier of a one-row decode step set to `decode_1`: the point at one row of
    `co_run.decode_batch` replaced or added (larger batches keep the profile's figures; a co-run of one figure for
    every batch, no `decode_batch`, becomes `decode_1` for every batch); and with `prefill` its prompt multiplier
    at STREAM_PROMPT tokens (a curve by length scaled to pass through it)."""
    co = prof.co_run
    assert co is not None
    if not co.decode_batch:
        co = replace(co, decode=decode_1)
    else:
        pairs = dict(zip(co.decode_batch, co.decode_by_batch, strict=True)) | {1: decode_1}
        rows = tuple(sorted(pairs))
        co = replace(co, decode_batch=rows, decode_by_batch=tuple(pairs[r] for r in rows))
    if prefill is not None and not co.prefill_tokens:
        co = replace(co, prefill=prefill)
    elif prefill is not None:
        k = prefill / co.prefill_at(STREAM_PROMPT)
        co = replace(co, prefill=max(1.0, co.prefill * k),
                     prefill_by_tokens=tuple(max(1.0, m * k) for m in co.prefill_by_tokens))
    return replace(prof, co_run=co)


def calibrated(prof: Profile, cal: dict[str, float]) -> Profile:
    """The profile with a calibration's scales applied (`calibrate`)."""
    if "co_run_decode_1" in cal:
        prof = with_co_run(prof, cal["co_run_decode_1"], cal.get("co_run_prefill"))
    if "row_scale" in cal:  # decode steps by their two parts; the serving loop by the lone stream's scale
        split = prof.scaled(cal["fixed_scale"], cal.get("prefill_scale"), cal["row_scale"], cal["fixed_ms"])
        return replace(split, serving=prof.scaled(cal["scale"]).serving)
    return prof.scaled(cal["scale"], cal.get("prefill_scale"))


def speed_drift(cal: dict[str, Any], steps: dict[str, Any]) -> dict[str, float] | None:
    """How far the machine's speed moved between a speed calibration's probes and the run they priced: the run's
    lone decode steps (each decode worker's median ratio to the profile's cost model, benchmarks/step_costs.py
    `worker_steps`; the median over workers) over the probes' `scale`. On the recorded CPU runs it read 0.95-1.01
    for the one that came within 15% on 19 of 20 figures, and 0.86-1.28 for three on a VM whose neighbours moved
    its speed (1-8 of 20): past ~10%, a run's figures measure the machine's change as much as the simulator. None
    without lone decode steps."""
    ratios = [w["alone"]["decode"]["ratio_p50"] for w in steps.values()
              if isinstance(w, dict) and (w.get("alone") or {}).get("decode")]
    if not ratios or not cal.get("scale"):
        return None
    run = statistics.median(ratios)
    return {"probe_scale": cal["scale"], "run_scale": round(run, 4), "drift": round(run / cal["scale"], 4)}
