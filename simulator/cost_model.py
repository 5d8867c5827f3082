"""Step times from a profile: what one engine step of a given shape costs on the profiled hardware.

A step computes `P` prompt tokens (chunks of one or more prompts) and `B` decode rows (one token each, the rows'
mean context `c`). Its time is split the way the hardware spends it:

    step(P, pairs, B, c) = decode(B, c) - dense(B) + dense(P + B) + attention_ms_per_pair * pairs + serving
                           (+ prompt_serving + extra_prompt * (prompts - 1) when P > 0)

- `decode(B, c)`: the profile's decode grid, bilinear in (batch, context), extrapolated linearly past its edges
  (a decode step reads the weights once and each row's KV, so it is linear in context);
- `dense(n)`: the part of a step that depends only on the rows it runs (the weights' matmuls or reads), from the
  decode grid extrapolated to context 0 for small n and from prefill steps less their in-prompt attention for
  large n, linear between the points;
- `pairs`: (new token, earlier token) pairs of the prompt chunks: n*(n+1)/2 within a chunk of n tokens plus n*c
  for the c tokens cached before it.

  On a measured GPU profile a step with prompt tokens runs eagerly, so `dense(P + B)` is held at or above the
  shortest profiled prompt's (its launch-bound floor) rather than following the CUDA-graph decode rows down;
- `serving`: what the worker's loop adds to every step (`profile.serving.step_overhead_ms`, 0 when not measured);
- `prompt_serving`: what a serving worker adds to a step with prompt tokens (`profile.serving.prompt_step_ms`), and
  `extra_prompt` for each further prompt the step computes (`profile.serving.extra_prompt_ms`).

With P = 0 it is the decode grid plus `serving` exactly; with B = 0 and one uncached prompt, the prefill table
plus `serving` and `prompt_serving`.
Everything here is plain Python over short lists: it runs once per simulated step.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from simulator.profile import Profile


def _segment(xs: Sequence[float], x: float) -> tuple[int, float]:
    """(i, u): x lies at xs[i] + u * (xs[i+1] - xs[i]); u outside [0, 1] extrapolates the end segments."""
    i = bisect_right(xs, x) - 1
    if i < 0:
        i = 0
    elif i > len(xs) - 2:
        i = len(xs) - 2
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly past both ends."""
    i, u = _segment(xs, x)
    return ys[i] + u * (ys[i + 1] - ys[i])


class CostModel:
    """Step times of one replica, from its profile."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        dec = profile.decode
        self.batch = [float(b) for b in dec.batch]
        self.context = [float(c) for c in dec.context]
        self.grid = [list(r) for r in dec.ms]
        self.attn = profile.prefill.attention_ms_per_pair
        self._rows: dict[int, list[float]] = {}
        self.overhead = profile.serving.step_overhead_ms if profile.serving else 0.0
        self.prompt_overhead = profile.serving.prompt_step_ms if profile.serving else 0.0
        self.extra_prompt = profile.serving.extra_prompt_ms if profile.serving else 0.0
        self.dense_n, self.dense_ms_at = self._dense_points()
        # A step with prompt tokens runs eagerly, while a GPU replica's decode-only steps replay CUDA graphs: below
        # the shortest measured prompt, the eager forward costs at least what that prompt's did (launch-bound: 23.8
        # ms at 128 tokens and 24.8 at 1,024 on an H200), not the graph's few ms that the decode rows would give.
        measured_gpu = profile.gpus_per_replica > 0 and profile.provenance.kind == "measured"
        self.prompt_floor = self.dense_ms(profile.prefill.tokens[0]) if measured_gpu else 0.0

    def _dense_points(self) -> tuple[list[float], list[float]]:
        """(n, dense ms) from decode rows at context 0 below the shortest prompt, and from prompts above it."""
        pre = self.profile.prefill
        pts = {float(b): max(1e-6, self._grid_at(b, 0.0)[0]) for b in self.profile.decode.batch if b < pre.tokens[0]}
        for n, ms in zip(pre.tokens, pre.ms, strict=True):
            pts[float(n)] = max(1e-6, ms - self.attn * n * (n + 1) / 2)
        xs = sorted(pts)
        return xs, [pts[x] for x in xs]

    def decode_slope(self, batch: int, context: float) -> float:
        return self.decode_at(batch, context)[1]

    def dense_ms(self, n: float) -> float:
        """The row-dependent part of a step of n rows (0 for none)."""
        if n <= 0:
            return 0.0
        return max(1e-6, interp(self.dense_n, self.dense_ms_at, n))

    def _row(self, batch: int) -> list[float]:
        """The decode grid interpolated to this batch size: ms at each profiled context (cached per batch)."""
        row = self._rows.get(batch)
        if row is None:
            i, u = _segment(self.batch, batch)
            row = self._rows[batch] = [a + u * (b - a) for a, b in zip(self.grid[i], self.grid[i + 1], strict=True)]
        return row

    def decode_at(self, batch: int, context: float) -> tuple[float, float]:
        """(ms of one decode step of `batch` rows at mean context `context`, serving overhead included, d ms / d
        context there); (0, 0) for an empty batch."""
        ms, slope = self._grid_at(batch, context)
        return (ms + self.overhead, slope) if batch > 0 else (0.0, 0.0)

    def _grid_at(self, batch: int, context: float) -> tuple[float, float]:
        """The decode grid alone: bilinear in (batch, context), extended linearly past the grid."""
        if batch <= 0:
            return 0.0, 0.0
        row, ctx = self._row(batch), self.context
        j, v = _segment(ctx, context)
        return max(1e-6, row[j] + v * (row[j + 1] - row[j])), max(0.0, (row[j + 1] - row[j]) / (ctx[j + 1] - ctx[j]))

    def decode_ms(self, batch: int, context: float) -> float:
        return self.decode_at(batch, context)[0]

    def step_ms(self, prompt_tokens: int, pairs: float, batch: int, context: float, prompts: int = 1) -> float:
        """One step with `prompt_tokens` prompt tokens (`pairs` attention pairs) of `prompts` prompts and `batch`
        decode rows."""
        if prompt_tokens <= 0:
            return self.decode_ms(batch, context)
        base = self._grid_at(batch, context)[0] - self.dense_ms(batch) if batch else 0.0
        return (base + max(self.dense_ms(prompt_tokens + batch), self.prompt_floor) + self.attn * pairs + self.overhead
                + self.prompt_overhead + self.extra_prompt * max(0, prompts - 1))

    def prefill_ms(self, tokens: int, cached: int = 0) -> float:
        """One prompt of `tokens` new tokens after `cached` ones, alone in a step."""
        return self.step_ms(tokens, chunk_pairs(tokens, cached), 0, 0.0)

    # ---- runs of decode-only steps (the batch fixed, every row's context growing by one a step) ---------------
    def decode_run_ms(self, batch: int, context: float, steps: int) -> float:
        """Time of `steps` decode steps starting at mean context `context` (linear in context over the run)."""
        return run_ms(*self.decode_at(batch, context), steps)

    def decode_steps_within(self, batch: int, context: float, elapsed_ms: float) -> int:
        """How many whole steps of such a run end within `elapsed_ms` (the inverse of `decode_run_ms`)."""
        return steps_within(*self.decode_at(batch, context), elapsed_ms)


def run_ms(first_ms: float, slope: float, steps: int) -> float:
    """`steps` steps, the first taking `first_ms` and each later one `slope` more than the one before."""
    return steps * first_ms + slope * steps * (steps - 1) / 2


def steps_within(first_ms: float, slope: float, elapsed_ms: float) -> int:
    """How many whole steps of `run_ms(first_ms, slope, .)` end within `elapsed_ms`."""
    if elapsed_ms <= 0:
        return 0
    if slope < 1e-12:
        n = int(elapsed_ms / first_ms + 1e-9)
    else:  # slope/2 n^2 + (first - slope/2) n - elapsed = 0
        b = first_ms - slope / 2
        n = int((-b + math.sqrt(b * b + 2 * slope * elapsed_ms)) / slope + 1e-9)
    # the float root may land one off either way: settle it against the forward formula
    while n > 0 and run_ms(first_ms, slope, n) > elapsed_ms + 1e-9:
        n -= 1
    while run_ms(first_ms, slope, n + 1) <= elapsed_ms + 1e-9:
        n += 1
    return n


def chunk_pairs(tokens: int, cached: int) -> float:
    """Attention pairs of a chunk of `tokens` new tokens after `cached` ones (each token sees itself too)."""
    return tokens * (tokens + 1) / 2 + tokens * cached
