"""Prompt steps at lengths between the prefill table's points, against what the profile prices them at.

`disagg profile` times prompts at a few lengths, each warmed first and then timed back to back; the simulator
interpolates between them. A serving prefill worker sees a new length almost every request. On one H100 its
prompts of 1,200-2,000 tokens with the decode worker idle ran 1.02-1.37x the profile's price (median ~1.15): this
says whether an engine alone does the same at such lengths, the first time it meets one (`first`) and once it has
(`again`), with the device idle `--idle-s` before each prompt as in a server between requests.

    python -m benchmarks.prompt_lengths --profile benchmarks/profiles/GPU.json --device cuda \\
        --dummy llama3-8b-v49k --kv-gib 30 --lengths 1024,1100,1203,1280,1545,1738,1979,2048 --random 24

Every other argument is `disagg profile`'s (the engine is built as it builds it). Writes prompt_lengths_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.profile_steps import Tokens, run_prompt
from benchmarks.profiler import build_engine, parse
from simulator.cost_model import CostModel
from simulator.profile import Profile
from worker.step_log import StepLog


def timed_after_idle(eng: Any, toks: Tokens, n: int, device: str, idle_s: float, rid: str,
                     prefill_role: bool = False, step: Callable[[], object] | None = None) -> float:
    time.sleep(idle_s)
    return run_prompt(eng, rid, toks.take(n), device, prefill_role, step)


def roles(eng: Any, toks: Tokens, model: CostModel, lengths: list[int], device: str, idle_s: float,
          repeat: int = 5, step: Callable[[], object] | None = None) -> list[dict[str, Any]]:
    """Each length as a plain prompt, as a prefill worker runs it (a KV lease, its layers' progress tracked), and
    so on another thread (a worker steps its engine on an executor thread), in turn, median of `repeat` each: what
    the prefill role and the thread add to a prompt step in the engine itself."""
    rows = []
    with ThreadPoolExecutor(1) as pool:
        def threaded(n: int, rid: str) -> float:
            return pool.submit(timed_after_idle, eng, toks, n, device, idle_s, rid, True, step).result()

        for n in lengths:
            ms: dict[str, list[float]] = {"plain": [], "role": [], "thread": []}
            for i in range(repeat):
                ms["plain"].append(timed_after_idle(eng, toks, n, device, idle_s, f"plain{n}-{i}", False, step))
                ms["role"].append(timed_after_idle(eng, toks, n, device, idle_s, f"role{n}-{i}", True, step))
                ms["thread"].append(threaded(n, f"thread{n}-{i}"))
            plain, role, thread = (statistics.median(ms[k]) for k in ("plain", "role", "thread"))
            rows.append({"tokens": n, "plain_ms": round(plain, 3), "prefill_role_ms": round(role, 3),
                         "added_ms": round(role - plain, 3), "on_a_thread_ms": round(thread, 3),
                         "profile_ms": round(model.prefill_ms(n) - model.overhead - model.prompt_overhead, 3)})
    return rows


def measure(eng: Any, toks: Tokens, model: CostModel, lengths: list[int], draws: int, device: str, idle_s: float,
            seed: int) -> dict[str, Any]:
    """Each length's first prompt and the median of three more, and `draws` lengths drawn from 1,024-2,048 (each
    new), against the profile's price (the serving loop's overhead left out, as a step log times a step)."""
    def price(n: int) -> float:
        return model.prefill_ms(n) - model.overhead - model.prompt_overhead  # the engine alone: no serving costs

    rows = []
    for n in lengths:
        first = timed_after_idle(eng, toks, n, device, idle_s, f"f{n}")
        again = statistics.median(timed_after_idle(eng, toks, n, device, idle_s, f"a{n}-{i}") for i in range(3))
        rows.append({"tokens": n, "first_ms": round(first, 3), "again_ms": round(again, 3),
                     "profile_ms": round(price(n), 3), "first_ratio": round(first / price(n), 3),
                     "again_ratio": round(again / price(n), 3)})
    rng, seen = random.Random(seed), set(lengths)
    drawn = []
    while len(drawn) < draws:
        n = rng.randint(1024, 2048)
        if n not in seen:
            seen.add(n)
            ms = timed_after_idle(eng, toks, n, device, idle_s, f"r{n}")
            drawn.append({"tokens": n, "ms": round(ms, 3), "ratio": round(ms / price(n), 3)})
    ratios = sorted(d["ratio"] for d in drawn)
    return {"lengths": rows, "drawn": drawn,
            "drawn_ratio": {"p10": ratios[len(ratios) // 10], "p50": statistics.median(ratios),
                            "p90": ratios[len(ratios) * 9 // 10]} if ratios else {}}


def check_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[int]:
    """The lengths to time; exits with a usage error for lengths that are not positive integers, a draw count
    outside 0-1,000 (there are 1,025 lengths to draw from), a negative idle, a profile that is not a file or a
    step log that cannot be written."""
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {a.lengths!r}")
    if not lengths or min(lengths) < 1:
        p.error(f"--lengths must be positive, got {a.lengths!r}")
    if not 0 <= a.random <= 1000:
        p.error(f"--random must be 0-1000, got {a.random}")
    if a.idle_s < 0:
        p.error(f"--idle-s must be >= 0, got {a.idle_s}")
    if not os.path.isfile(a.profile):
        p.error(f"--profile {a.profile!r} is not a file")
    if a.step_log:
        try:
            open(a.step_log, "a").close()  # before the engine is built: a bad path fails now, not minutes later
        except OSError as e:
            p.error(f"--step-log {a.step_log!r}: cannot write it ({e.strerror})")
    return lengths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", required=True, help="profile JSON whose prefill table prices the prompts")
    p.add_argument("--lengths", default="1024,1100,1203,1280,1400,1545,1738,1841,1979,2008,2048",
                   help="prompt lengths to time, comma-separated")
    p.add_argument("--random", type=int, default=24, help="lengths drawn from 1,024-2,048 and timed once each")
    p.add_argument("--idle-s", type=float, default=0.3, help="seconds the device idles before each prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths")
    p.add_argument("--roles", default="", help="also time these lengths (comma-separated) as plain prompts, as a "
                   "prefill worker runs them (under a KV lease) and so on another thread, in turn: what they add")
    p.add_argument("--step-log", metavar="FILE", help="write the --roles prompts' steps here as a worker's step log "
                   "does (worker/step_log.py: time to schedule, CPU time, the calling thread's), to hold against a "
                   "serving worker's")
    p.add_argument("--out", default=".", help="folder for prompt_lengths_<name>.json")
    a, rest = p.parse_known_args(argv)
    lengths = check_arguments(p, a)
    try:
        role_lengths = [int(x) for x in a.roles.split(",") if x]
    except ValueError:
        p.error(f"--roles must be comma-separated integers, got {a.roles!r}")
    if role_lengths and min(role_lengths) < 1:
        p.error(f"--roles must be positive, got {a.roles!r}")
    prof = Profile.load(a.profile)  # before the engine: a bad profile fails in a second, not after the build
    eng_args = parse([*rest, "--out", os.path.join(a.out, "unused.json")])  # the profile's own, never written
    eng, _ = build_engine(eng_args)
    toks = Tokens(eng.model_config.vocab_size)
    run_prompt(eng, "warmup", toks.take(32), eng_args.device)
    out = {"profile": a.profile, "device": eng_args.device, "idle_s": a.idle_s,
           **measure(eng, toks, CostModel(prof), lengths, a.random,
                     eng_args.device, a.idle_s, a.seed)}
    for r in out["lengths"]:
        print(f"{r['tokens']:5d} tokens: first {r['first_ms']:.1f} ms ({r['first_ratio']:.2f}x), again "
              f"{r['again_ms']:.1f} ms ({r['again_ratio']:.2f}x) of the profile's {r['profile_ms']:.1f}")
    print(f"{len(out['drawn'])} drawn lengths, each new: ratio to the profile {out['drawn_ratio']}")
    if role_lengths:
        log = StepLog(eng, a.step_log) if a.step_log else None
        out["roles"] = roles(eng, toks, CostModel(prof), role_lengths, eng_args.device, a.idle_s,
                             step=log.step if log else None)
        if log is not None:
            log.close()
        for r in out["roles"]:
            print(f"{r['tokens']:5d} tokens: plain {r['plain_ms']:.2f} ms, as the prefill role {r['prefill_role_ms']:.2f}"
                  f" ms ({r['added_ms']:+.2f}), so on a thread {r['on_a_thread_ms']:.2f}; profile {r['profile_ms']:.2f}")
    path = os.path.join(a.out, f"prompt_lengths_{prof.name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
