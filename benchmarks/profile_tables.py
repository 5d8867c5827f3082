"""The tables of a profile that `disagg profile` times on an engine alone: the prefill table by prompt length, a
chunk's cost after cached context (and the attention term fitted from it), and the decode grid by batch x context.

On a shared machine a measurement can land in a slow or a fast moment. A table out of order (a longer prompt, or a
step of more rows or context, timed more than ORDER_TOLERANCE faster than a smaller one) is timed again at both
ends of each such pair, up to RETIMES rounds; the decode grid's `envelope` then lowers what is left."""

from __future__ import annotations

import itertools
import statistics
import sys
from functools import partial

from tqdm import tqdm

from benchmarks.machine_load import Alone
from benchmarks.profile_steps import Tokens, decode_ms, run_prompt
from engine.engine import LLMEngine
from simulator.profile import ChunkCost

ORDER_TOLERANCE = 0.2  # a longer prompt timed this much faster than a shorter one: one of the two was disturbed
RETIMES = 2  # rounds of timing such pairs again


def measure_prefill(eng: LLMEngine, toks: Tokens, lengths: list[int], repeat: int, device: str,
                    alone: Alone) -> list[float]:
    """Each length's median prompt time over `repeat` prompts (after one that compiles its shape on a GPU). A table
    out of order by more than ORDER_TOLERANCE (`out_of_order`) is timed again at both lengths of each such pair (one
    of the two was disturbed, and which is not known), up to RETIMES rounds, each keeping its latest round's median:
    a busy 2-core VM once gave 512 tokens 260 ms between 592 at 256 and 5,264 at 1,024 (~1.7 s when timed again)."""
    ids = itertools.count()

    def time_at(n: int) -> float:
        return statistics.median(alone(partial(run_prompt, eng, f"p{next(ids)}", toks.take(n), device))
                                 for _ in range(repeat))

    ms: dict[int, float] = {}
    for n in tqdm(lengths, desc="prefill", leave=False):
        run_prompt(eng, f"warm{next(ids)}", toks.take(n), device)  # compiles kernels for this shape on a GPU
        ms[n] = time_at(n)
    for _ in range(RETIMES):
        bad = sorted(lengths[i] for i in out_of_order([ms[n] for n in lengths]))
        if not bad:
            break
        print(f"prefill: timing {', '.join(map(str, bad))} tokens again, out of order: "
              + ", ".join(f"{n} {ms[n]:.1f} ms" for n in lengths), file=sys.stderr)
        ms |= {n: time_at(n) for n in bad}
    return [ms[n] for n in lengths]


def out_of_order(ms: list[float], tol: float = ORDER_TOLERANCE) -> set[int]:
    """Both indices of each neighbouring pair of a prefill table (ascending lengths) whose longer prompt ran more
    than `tol` faster than the shorter: a prompt's cost does not fall with its length, so one of them is wrong."""
    return {k for i in range(len(ms) - 1) if ms[i] > (1 + tol) * ms[i + 1] for k in (i, i + 1)}


def measure_chunks(eng: LLMEngine, toks: Tokens, n: int, contexts: list[int], repeat: int,
                   device: str, alone: Alone) -> list[ChunkCost]:
    """A chunk of n new tokens after c cached: prompt A (c tokens) runs first, then A + n new ones hits the cache."""
    bs, ids, out = eng.config.cache.block_size, itertools.count(), []
    for c in tqdm(contexts, desc="chunks", leave=False):
        c -= c % bs
        times = []
        for _ in range(repeat + 1):
            head = toks.take(c)
            run_prompt(eng, f"h{next(ids)}", head, device)
            prompt = head + toks.take(n)
            if eng.cached_prefix_tokens(prompt) < c:
                raise RuntimeError(f"the prefix cache lost the {c}-token context: enlarge --kv-gib")
            times.append(alone(partial(run_prompt, eng, f"c{next(ids)}", prompt, device)))
        out.append(ChunkCost(tokens=n, context=c, ms=round(statistics.median(times[1:]), 4)))
    return out


def fit_attention(chunks: list[ChunkCost], alone_ms: float) -> float:
    """ms per (new token, cached token) pair: least squares of (chunk ms - same chunk uncached) on n * c."""
    xs = [c.tokens * c.context for c in chunks]
    ys = [c.ms - alone_ms for c in chunks]
    den = sum(x * x for x in xs)
    return max(0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / den) if den else 0.0


def measure_decode(eng: LLMEngine, toks: Tokens, batches: list[int], contexts: list[int], steps: int,
                   device: str, alone: Alone) -> list[list[float]]:
    """ms per decode step at each batch x context (None where the KV does not fit). Cells out of order by more than
    ORDER_TOLERANCE against a neighbour of more rows or more context (`grid_out_of_order`) are timed again, both
    of each such pair, up to RETIMES rounds, before `envelope` lowers what is left to the least cell at or beyond it:
    on a VM whose speed moves within seconds, one cell timed in a fast moment would pull every smaller one down to
    it (one 2-core VM's grid read 61.7 ms at 4 rows x 64 and the same at 1-3 rows, which had read more; its serving
    decode worker then ran one-row steps at 71-90 ms)."""
    grid: list[list[float | None]] = [[None] * len(contexts) for _ in batches]

    def time_at(i: int, j: int) -> None:
        grid[i][j] = decode_ms(eng, toks, batches[i], contexts[j], steps, device, alone)

    with tqdm(total=len(batches) * len(contexts), desc="decode", leave=False) as bar:
        for j in range(len(contexts)):
            for i in range(len(batches)):
                time_at(i, j)
                bar.update(1)
    for _ in range(RETIMES):
        bad = sorted(grid_out_of_order(grid))
        if not bad:
            break
        print("decode: timing " + ", ".join(f"{batches[i]} x {contexts[j]} ({grid[i][j]:.1f} ms)" for i, j in bad)
              + " again, out of order", file=sys.stderr)
        for i, j in bad:
            time_at(i, j)
    return fill_grid(grid, contexts)


def grid_out_of_order(grid: list[list[float | None]], tol: float = ORDER_TOLERANCE) -> set[tuple[int, int]]:
    """Both cells of each pair of neighbours (one more batch size, or one more context) whose larger step was timed
    more than `tol` faster than the smaller: one of them was disturbed."""
    bad: set[tuple[int, int]] = set()
    for i, row in enumerate(grid):
        for j, m in enumerate(row):
            for k, n in ((i + 1, j), (i, j + 1)):
                if k < len(grid) and n < len(row) and m is not None and (o := grid[k][n]) is not None \
                        and m > (1 + tol) * o:
                    bad |= {(i, j), (k, n)}
    return bad


def envelope(grid: list[list[float]]) -> list[list[float]]:
    """The grid made non-decreasing in batch and context: each cell the least of those at or beyond it. A step
    with more rows or more context reads more and cannot be faster; what makes a cell read above a larger one is
    the machine (a shared VM's noise only adds time: a CPU profile's first cell, 1 row at context 64, read 53.7 ms
    where context 256 read 38.0)."""
    out = [row[:] for row in grid]
    for i in reversed(range(len(out))):
        for j in reversed(range(len(out[i]))):
            later = [out[i][j + 1]] if j + 1 < len(out[i]) else []
            later += [out[i + 1][j]] if i + 1 < len(out) else []
            out[i][j] = min([out[i][j], *later])
    return out


def fill_grid(grid: list[list[float | None]], contexts: list[int]) -> list[list[float]]:
    """Cells whose KV did not fit, extended linearly in context from the row's measured cells (a decode step is
    linear in the KV it reads); a row with fewer than two measured cells is an error."""
    out = []
    for row in grid:
        known = [(c, m) for c, m in zip(contexts, row, strict=True) if m is not None]
        if len(known) < 2:
            raise RuntimeError("a decode batch size has < 2 contexts that fit the KV budget: raise --kv-gib")
        (c0, m0), (c1, m1) = known[-2], known[-1]
        slope = (m1 - m0) / (c1 - c0)
        out.append([round(m if m is not None else m1 + slope * (c - c1), 4) for c, m in zip(contexts, row, strict=True)])
    return out
