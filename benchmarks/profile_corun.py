"""What a second busy process on the same machine or GPU costs a worker's steps (`disagg profile`'s co-run).

Over the same steps alone:
- `prefill`, `decode`: the engine as a worker runs it, beside the other role's worker: a prefill beside a process
  running this engine's decode steps (the batch and context below, rows re-added as they finish), a decode step
  beside one running its prefills back to back, both processes in one core share on a CPU (engine.cpu_share, as
  clusters start their workers). That is the pairing of a 1P+1D cluster on one machine or GPU. Against real
  1P+1D CPU runs, the older co-runner (matmuls that never pause, `--co-run-with matmul`) over-charged a prefill
  beside decode steps by 5-10% (benchmarks/RESULTS.md, 2026-12-05 evening).
  The decode step is timed at the batch below and at one row (`decode_by_batch`), the serving runs' usual batch
  (one CPU profile read 1.63x at 4 rows where those runs' 1-2-row steps ran 1.19-1.26x; the next, 1.29x and 1.25x).
- `decode_spread`, `spread_by_batch` (engine co-runner, `spread_steps`): decode steps of a few batch sizes timed
  one by one beside a prefill co-runner that idles between prompts (`paced_spread`), the spread the simulator draws
  each decode step beside a prompt from, by its rows.
- `oversubscribed_prefill`, `oversubscribed_decode` (CPU): an engine on every core beside the matmuls, which is
  what an adaptive engine without a share that looked while the machine was idle runs until its step ends. Its
  threads then outnumber the cores, and a team of threads that meets at barriers waits for whichever one was
  descheduled.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from benchmarks.co_run_spread import POINTS, spread
from benchmarks.machine_load import Alone
from benchmarks.profile_steps import Tokens, decode_ms, decode_step_spans, run_prompt
from engine.engine import LLMEngine
from simulator.profile import CoRunCosts

CO_RUNNERS = {  # a process that keeps the rest of the machine busy until killed, printing "go" once it runs
    "cpu": "import torch\ntorch.set_num_threads(1)\na = torch.randn(768, 768)\nprint('go', flush=True)\n"
           "while True:\n    a @ a\n",
    "cuda": "import torch\na = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)\nprint('go', flush=True)\n"
            "while True:\n    a @ a\n    torch.cuda.synchronize()\n",
}


BUSY_LOG_ENV = "DISAGG_CO_RUNNER_BUSY_LOG"  # where a paced prefill co-runner appends each prompt's "start end"


@contextmanager
def busy_beside(gpu: bool, engine_args: list[str] | None = None, role: str = "",
                busy_log: str = "") -> Iterator[subprocess.Popen]:
    """A co-runner process keeping the rest of the machine (or the same GPU) busy while the block runs: matmuls,
    or with `engine_args` (disagg profile's arguments) this engine running `role`'s steps (`run_role`); a paced
    prefill co-runner writes its prompts' times to `busy_log`."""
    cmd = [sys.executable, "-m", "benchmarks.profile_corun", role, *engine_args] if engine_args is not None \
        else [sys.executable, "-c", CO_RUNNERS["cuda" if gpu else "cpu"]]
    env = {**os.environ, BUSY_LOG_ENV: busy_log} if busy_log else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go", f"co-runner {cmd[2:4]} failed"
        time.sleep(0.5)  # an adaptive engine sees the co-runner's core busy
        yield proc
    finally:
        proc.kill()
        proc.wait()


def shape(device: str) -> tuple[int, int, int]:
    """(prompt tokens, decode batch, decode context) of the co-run measurements."""
    return (2048, 32, 1024) if device.startswith("cuda") else (256, 4, 256)


def co_runner_args(engine_args: list[str], eng: LLMEngine, device: str) -> list[str]:
    """disagg profile's arguments for the engine co-runner, with its KV cache cut to what its role's steps hold
    (the decode batch as it grows before rows are re-added, or one prompt; a quarter more for room): a second
    engine needs a second copy of the weights, not of the profile's whole KV budget."""
    n, batch, ctx = shape(device)
    tokens = max(n, batch * (ctx + 256 + 16)) * 5 // 4
    per_token = eng.kv_cache.numel() * eng.kv_cache.element_size() / (eng.num_kv_blocks * eng.config.cache.block_size)
    return [*engine_args, "--kv-gib", f"{tokens * per_token / 2**30:.4f}"]  # argparse keeps the last


def co_run_lengths(device: str) -> tuple[int, ...]:
    """Prompt lengths of the prefill co-run (ascending; 2,048 is `shape`'s): on a GPU a shorter prompt slows more
    beside a busy decode worker (simulator/profile.py CoRunCosts.prefill_tokens). An H200's serving prompts of
    1,024-1,279 tokens ran 2.29-2.36x their table time beside the decode worker where a co-run prompt of exactly
    1,024 read 2.03x (2,048: 1.96x co-run, 1.99-2.03x serving); the lengths between say whether the bare co-runner
    shows that too. Beside a GPU co-runner each prompt takes ~0.05-0.4 s."""
    return (512, 1024, 1280, 1536, 2048, 4096) if device.startswith("cuda") else (256,)


def co_run(eng: LLMEngine, toks: Tokens, device: str, repeat: int, alone_check: Alone,
           all_cores: Callable[[], LLMEngine] | None = None, engine_args: list[str] | None = None,
           starts: int = 1, table_ms: Callable[[int], float] | None = None,
           lengths: tuple[int, ...] = (), spread_steps: int = 0) -> CoRunCosts:
    """The multipliers (module docstring). `all_cores` builds an engine fixed on every core (CPU only);
    `engine_args` (disagg profile's arguments): the co-runner is this engine running the other role's steps, else
    matmuls. Each busy figure is the median over `starts` co-runner starts (a median of steps within each).
    `table_ms(n)`: the profile's prefill table at n tokens, the time the simulator multiplies; a prompt's multiplier
    is over it (without it, over the same prompts alone here); `lengths`: the prompt lengths (default
    `co_run_lengths`), which the table must hold. The two may differ on a GPU: prompts timed in a row
    here can meet the card's power limit (the `sustained` figure) where the table's, timed after a pause, do not
    (on one H200 they agreed within 1.3%; the note keeps the figure). `spread_steps` (engine co-runner only): that
    many decode steps timed one by one beside a paced prefill co-runner (`paced_spread`) give `decode_spread`."""
    gpu = device.startswith("cuda")
    n, batch, ctx = shape(device)
    lengths = tuple(sorted(lengths)) or co_run_lengths(device)
    n = n if n in lengths else lengths[-1]  # the length `prefill` (the profile's single figure) is taken at
    if engine_args is not None:
        engine_args = co_runner_args(engine_args, eng, device)

    def prefill(e: LLMEngine, check: Callable[[Callable[[], Any]], Any], k: int = n) -> float:
        # at least 5 prompts: a prompt beside a co-runner moves by +-10% with where the two processes' turns on
        # the device fall (two gave 1.95x and eight 2.08x on one kind of H100)
        return statistics.median(check(partial(run_prompt, e, f"co{i}-{time.monotonic_ns()}", toks.take(k), device))
                                 for i in range(max(5, repeat)))

    def decode(e: LLMEngine, check: Callable[[Callable[[], Any]], Any], rows: int = batch) -> float:
        return decode_ms(e, toks, rows, ctx, 8, device, check) or 0.0

    def plain(f: Callable[[], Any]) -> Any:
        return f()

    fixed = all_cores() if all_cores is not None and not gpu else None
    alone = {k: prefill(eng, alone_check, k) for k in lengths}
    base = {k: table_ms(k) if table_ms is not None else alone[k] for k in lengths}
    alone_decode, one_alone = decode(eng, alone_check), decode(eng, alone_check, 1)  # one row: decode_by_batch
    fixed_alone = (prefill(fixed, plain), decode(fixed, plain)) if fixed is not None else (0.0, 0.0)
    beside_decode: list[dict[int, float]] = []
    beside_prefill: list[tuple[float, float]] = []
    for _ in range(starts):
        with busy_beside(gpu, engine_args, "decode"):
            beside_decode.append({k: prefill(eng, plain, k) for k in lengths})
        with busy_beside(gpu, engine_args, "prefill"):
            beside_prefill.append((decode(eng, plain), decode(eng, plain, 1)))
    xs, spread_at_rows, spreads, spread_note = paced_spread(eng, toks, device, engine_args, spread_steps) \
        if spread_steps and engine_args else ((), (), (), "")
    over = (0.0, 0.0)
    if fixed is not None:
        with busy_beside(gpu):
            over = (prefill(fixed, plain), decode(fixed, plain))

    def ratio(busy: float, quiet: float) -> float:
        return round(max(1.0, busy / quiet), 3) if quiet else 0.0

    by_tokens = tuple(ratio(statistics.median(b[k] for b in beside_decode), base[k]) for k in lengths)
    at_n = by_tokens[lengths.index(n)]
    dec = ratio(statistics.median(d for d, _ in beside_prefill), alone_decode)
    one = ratio(statistics.median(d for _, d in beside_prefill), one_alone) if one_alone else dec
    note = co_run_note(eng, device, engine_args is not None, fixed is not None, lengths, n, alone, base,
                       beside_decode, table_ms is not None) + spread_note
    return CoRunCosts(prefill=at_n, decode=dec, oversubscribed_prefill=ratio(over[0], fixed_alone[0]),
                      oversubscribed_decode=ratio(over[1], fixed_alone[1]), decode_batch=(1, batch),
                      decode_by_batch=(one, dec), prefill_tokens=lengths, prefill_by_tokens=by_tokens,
                      decode_spread=xs, spread_batch=spread_at_rows, spread_by_batch=spreads, note=note)


SPREAD_ROWS = (1, 4, 8, 16, 32)  # the decode rows the paced spread is timed at (those up to the co-run's batch)


def paced_spread(eng: LLMEngine, toks: Tokens, device: str, engine_args: list[str], steps: int
                 ) -> tuple[tuple[float, ...], tuple[int, ...], tuple[tuple[float, ...], ...], str]:
    """`decode_spread`, `spread_batch`, `spread_by_batch` and their note: at each of SPREAD_ROWS up to the co-run's
    batch, `steps` decode steps of the co-run's context timed one by one beside a prefill co-runner that idles
    between its prompts as a serving prefill worker does (`run_role`'s "prefill-paced"); each step that ran >= 90%
    beside one of its prompts, over their mean (`decode_spread`: at the batch). Back-to-back prompts overlap a
    decode step evenly; a serving worker's begin with ~14 ms of kernel launches during which the card is mostly the
    decode worker's (co_run_spread.py --by-position: 1.0-1.3x there, 2.1-2.5x mid-prompt), and its spread is wider,
    the more so the fewer the rows (a shorter step meets fewer of the prompt's phases: on an H100 serving's p90 was
    1.20x the mean at 1-4 rows, 1.06x at 17-32)."""
    _, batch, ctx = shape(device)
    with tempfile.NamedTemporaryFile("r", suffix=".busy") as log:
        with busy_beside(device.startswith("cuda"), engine_args, "prefill-paced", busy_log=log.name):
            spans = {rows: decode_step_spans(eng, toks, rows, ctx, steps) for rows in spread_rows(batch)}
        busy = [tuple(map(float, line.split())) for line in log.read().splitlines() if line.strip()]
    ms = {rows: [(b - a) * 1e3 for a, b in got if beside_share(a, b, busy) >= 0.9] for rows, got in spans.items()}
    by_rows = {rows: xs for rows in ms if (xs := decode_spread(ms[rows]))}
    xs = by_rows.get(batch, ())
    counts = ", ".join(f"{len(ms[r])} of {len(spans[r])} at {r} rows" for r in ms)
    note = (f"; decode_spread and spread_by_batch from decode steps of {'/'.join(map(str, ms))} x {ctx} timed one by "
            f"one beside a paced prefill co-runner (>= 90% beside one of its prompts: {counts}), each over their "
            "mean") if by_rows else ""
    return xs, tuple(by_rows), tuple(by_rows.values()), note


def spread_rows(batch: int) -> tuple[int, ...]:
    """SPREAD_ROWS up to `batch`, and `batch`."""
    return tuple(sorted({r for r in SPREAD_ROWS if r < batch} | {batch}))


def beside_share(a: float, b: float, busy: list[tuple[float, ...]]) -> float:
    """The share of [a, b] that the intervals in `busy` cover (they do not overlap one another)."""
    return sum(max(0.0, min(b, e) - max(a, s)) for s, e in busy) / (b - a) if b > a else 0.0


def decode_spread(ms: list[float]) -> tuple[float, ...]:
    """The decode co-run's spread (CoRunCosts.decode_spread): the steps' times over their mean, as an inverse CDF
    over its mean; () with fewer steps than its points."""
    return spread([t / statistics.mean(ms) for t in ms]) if len(ms) >= POINTS else ()


def co_run_note(eng: LLMEngine, device: str, engine: bool, fixed: bool, lengths: tuple[int, ...], n: int,
                alone: dict[int, float], base: dict[int, float], beside: list[dict[int, float]], table: bool) -> str:
    """What the co-run measured and against what, with each co-runner start's prompt multiplier."""
    gpu, (_, batch, ctx) = device.startswith("cuda"), shape(device)
    co = "the other role's steps of this engine (prefill beside decode steps, decode beside prefills)" if engine \
        else ("bf16 8192^3 matmuls on the same GPU" if gpu else "fp32 768^3 matmuls, 1 thread")
    parts = [f"prefill of {'/'.join(map(str, lengths))} tokens and decode of {batch} (and 1) x {ctx}, alone and beside a "
             f"process running {co}" + ("" if gpu else f" (this engine's prefill on {eng.stats.cpu_threads} "
                                                       "thread(s) beside it)")]
    if table:
        parts.append("prefill over the profile's prefill table (prompts alone in a row here: "
                     + ", ".join(f"{alone[k] / base[k]:.3f}x" for k in lengths) + " of it)")
    if fixed:
        parts.append("oversubscribed: an engine fixed on every core beside matmuls")
    if len(beside) > 1:
        parts.append(f"medians over {len(beside)} co-runner starts, prefill of {n} beside each "
                     + ", ".join(f"{b[n] / base[n]:.3f}x" for b in beside))
    return "; ".join(parts)


def paced_prompt(eng: LLMEngine, toks: Tokens, rng: random.Random, rid: str, device: str) -> None:
    """One prompt of a length drawn from half the co-run's up to it (1,024-2,048 on a GPU), its times appended to
    $BUSY_LOG_ENV, then an idle of 0-2x its time (half the card's time busy, as a serving prefill worker near its
    knee)."""
    n = shape(device)[0]
    start = time.time()
    run_prompt(eng, rid, toks.take(rng.randint(n // 2, n)), device)
    end = time.time()
    with open(os.environ[BUSY_LOG_ENV], "a") as f:
        f.write(f"{start:.6f} {end:.6f}\n")
    time.sleep(rng.uniform(0.0, 2.0) * (end - start))


def run_role(role: str, argv: list[str]) -> None:
    """The engine co-runner: `role`'s steps for ever (prompts back to back, or a decode batch whose rows are
    re-added as they finish), after printing "go". Run as `python -m benchmarks.profile_corun ROLE ARGS...`
    with disagg profile's arguments; killed by the profile."""
    from benchmarks.given_kv import receive_given_kv
    from benchmarks.profiler import build_engine, parse
    from engine.request import SamplingParams

    if role not in ("prefill", "prefill-paced", "decode"):
        raise SystemExit(f"co-runner role must be prefill, prefill-paced or decode, got {role!r}")
    a = parse(argv)
    if not a.device.startswith("cuda"):
        torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 2) // 2))
    eng, _ = build_engine(a)
    toks, (n, batch, ctx) = Tokens(eng.model_config.vocab_size), shape(a.device)
    rng = random.Random(0)
    run_prompt(eng, "warm", toks.take(32), a.device)
    print("go", flush=True)
    for i in itertools.count():
        if role == "prefill":
            run_prompt(eng, f"p{i}", toks.take(n), a.device)
            continue
        if role == "prefill-paced":
            paced_prompt(eng, toks, rng, f"p{i}", a.device)
            continue
        if not eng.has_unfinished():
            # contexts stay near `ctx` (rows re-added every 256 steps), as the measured decode step's are
            params = SamplingParams(max_tokens=min(256, eng.max_model_len - ctx - 16), temperature=0, ignore_eos=True)
            for j in range(batch):
                receive_given_kv(eng, f"d{i}-{j}", toks.take(ctx), params)
        eng.step()


if __name__ == "__main__":
    run_role(sys.argv[1], sys.argv[2:])
