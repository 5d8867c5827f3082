"""Timing one engine's steps through its public API: prompts (`add_request` + `step`) and decode steps on a batch
whose context KV is taken as given (benchmarks/given_kv.py). What `disagg profile` measures with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.given_kv import receive_given_kv
from benchmarks.machine_load import Alone
from engine.engine import LLMEngine
from engine.request import SamplingParams


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Tokens:
    """Fresh token ids for every prompt, so no measurement is served by the prefix cache unless it means to."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.next = vocab, 100

    def take(self, n: int) -> list[int]:
        out = [100 + (self.next + i) % (self.vocab - 100) for i in range(n)]
        self.next += n
        return out


def run_prompt(eng: LLMEngine, rid: str, prompt: list[int], device: str, prefill_role: bool = False,
               step: Callable[[], object] | None = None) -> float:
    """Milliseconds of the steps that prefill `prompt` (one step when it fits the token budget). `prefill_role`:
    as a prefill worker runs it, handing off under a KV lease (its layers' progress tracked), the lease freed after.
    `step`: what runs a step (a worker's StepLog's, to log it), else the engine's own."""
    eng.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                    lease_s=60.0 if prefill_role else None)
    sync(device)
    t0 = time.perf_counter()
    while eng.has_unfinished():
        (step or eng.step)()
    sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    if prefill_role:
        eng.release_lease(rid)
    return ms


def decode_ms(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int, device: str,
              alone: Alone | None = None) -> float | None:
    """ms per decode step of `batch` rows at context `ctx` (None when their KV does not fit)."""
    bs = eng.config.cache.block_size
    if batch * -(-(ctx + steps + 8) // bs) > eng.load().kv_blocks_free:
        return None
    return (alone or (lambda f: f()))(partial(_decode_once, eng, toks, batch, ctx, steps, device))


def _decode_once(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int, device: str) -> float:
    rids = _given_batch(eng, toks, batch, ctx, steps)
    ms = timed_steps(eng, steps, device)
    for rid in rids:
        eng.abort(rid)
    return ms


def _given_batch(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int) -> list[str]:
    """`batch` requests whose `ctx`-token KV is taken as given, joined and warm, each wanting `steps` more tokens."""
    rids = [f"d{ctx}-{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for rid in rids:
        receive_given_kv(eng, rid, toks.take(ctx), SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    for _ in range(3):  # the batch joins, graphs warm
        eng.step()
    return rids


def decode_step_spans(eng: LLMEngine, toks: Tokens, batch: int, ctx: int, steps: int) -> list[tuple[float, float]]:
    """(start, end), Unix seconds, of each of `steps` decode steps in a row at `batch` rows x `ctx`, a step from the
    previous one's return to its own (with overlapped steps on a GPU, the period a streaming client sees); [] when
    their KV does not fit."""
    if batch * -(-(ctx + steps + 8) // eng.config.cache.block_size) > eng.load().kv_blocks_free:
        return []
    rids = _given_batch(eng, toks, batch, ctx, steps)
    spans, last = [], time.time()
    for _ in range(steps):
        eng.step()
        now = time.time()
        spans.append((last, now))
        last = now
    for rid in rids:
        eng.abort(rid)
    return spans


def timed_steps(eng: LLMEngine, steps: int, device: str) -> float:
    """ms per step: on a GPU the mean over back-to-back steps (each is queued before the last one's tokens are
    read); on a CPU the median step, which a burst of other work on a shared machine moves least."""
    if device.startswith("cuda"):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync(device)
        return (time.perf_counter() - t0) / steps * 1e3
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
