"""What a serving worker adds to a prompt step, from real runs' step logs, into a profile.

`python -m benchmarks.prompt_step_cost --logs DIR [DIR ...] --profile IN.json --out OUT.json [--steps beside|lone]`

`disagg profile` times prompts on the engine alone. A serving prefill worker ran the same steps slower by about a
fixed amount: on one H100 its 1,024-2,048-token prompts beside the decode worker's steps ran ~8 ms over the
profile's price, and the H100 runs' TTFT p50s came out 9-26% short. Most of it was a decode pass the engine's
lookahead queued, and waited for, after every prefill-role prompt (fixed 2026-12-07); since then these steps run at
the price (median -0.3..-1.1 ms), and this is the check that they do, for a card, a host or a serving change. This
reads the prompt-only steps of every worker step log in the folders (worker/step_log.py, as `sim_validate
--keep-logs` keeps them). By default (`--steps beside`) those that ran beside another worker's steps for >= 90% of
their time: each one's time over the co-run multiplier at its length, less the engine's price. With `--steps lone`
those that ran alone (another worker in a step < 10% of their time) with at most `--max-tokens` prompt tokens
(short, so the fixed part is most of them: sim_validate's calibration sends such prompts to the idle cluster),
each one's time less the price; the host's load shows in these (four client processes on the same 16-core host made
it 13 ms where the steps beside gave 4.2). The median is the profile's `serving.prompt_step_ms`. Take the logs from
runs with one client process, and hold the profile against other runs.

Steps of two prompts or more cost more again (an H100 prefill worker's, in a burst: 6-14 ms over the price with the
per-step cost once). With `--steps beside` the one-prompt steps give `prompt_step_ms` and the others, each's excess
less that over its further prompts, `serving.extra_prompt_ms` (the median; three such steps at least). A step's
prompts are the step log's `prompts`; older logs lack it, and a prefill worker's answers after each step stand in.
"""

from __future__ import annotations

import argparse
import bisect
import os
import statistics
from dataclasses import replace
from typing import Any

from benchmarks.step_costs import modelled, overlaps, worker_files
from engine.config import ConfigError
from simulator.cost_model import CostModel
from simulator.profile import Profile, ServingCosts
from worker.step_log import read_step_events, read_step_log

MIN_STEPS = 3


def prompt_excess(folder: str, prof: Profile, beside: bool, max_tokens: int) -> list[tuple[int, float]]:
    """Per prompt-only step of one run's step logs (a folder of one machine's workers), (prompts it computed, what
    it took over the engine's price for its shape in ms; the serving costs left out of the price: the step log
    times the step alone, without the loop's overhead). `beside`: the steps that ran beside another worker's step
    (>= 90% of their time), their time first divided by the profile's co-run multiplier at their length (the fixed
    part is slowed as the rest); else the steps of at most `max_tokens` tokens that ran alone (< 10%)."""
    files = worker_files(folder)
    logs = {name: read_step_log(path) for name, path in files.items()}
    overlaps(logs)
    model = CostModel(prof)
    co = prof.co_run
    out = []
    for name, rows in logs.items():
        counts = prompt_counts(rows, read_step_events(files[name]))
        for r, n in zip(modelled(rows, model), counts, strict=True):
            if r["kind"] != "prompt":
                continue
            # the serving terms as `modelled` priced them (the log's own count; 1 in older logs), taken out
            priced = int(r.get("prompts") or 1)
            price = r["model_ms"] - model.prompt_overhead - model.extra_prompt * (priced - 1)
            if beside and r["overlap"] >= 0.9 and co is not None:
                out.append((n, r["ms"] / co.prefill_at(r["prompt_tokens"]) - price))
            elif not beside and r["overlap"] < 0.1 and r["prompt_tokens"] <= max_tokens:
                out.append((n, r["ms"] - price))
    return out


def prompt_counts(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[int]:
    """How many prompts each step computed: the step log's `prompts` where it has them; in older logs the prompts a
    prefill worker answered after the step (each `prefill_answered` event goes to the last step ended before it),
    at least one (a chunk that did not finish its prompt answers none)."""
    if all("prompts" in r for r in rows):
        return [max(1, int(r["prompts"])) for r in rows]
    ends = [r["t"] + r["ms"] / 1e3 for r in rows]
    answered = [0] * len(rows)
    for e in events:
        i = bisect.bisect_right(ends, float(e["t"])) - 1
        if e["event"] == "prefill_answered" and i >= 0:
            answered[i] += 1
    return [max(1, a) for a in answered]


def fit(excess: list[tuple[int, float]], extra: bool) -> tuple[float, float | None]:
    """(the first prompt's cost: the median excess of one-prompt steps, or of all without any; with `extra` and
    steps of two prompts or more, each further prompt's: the median of their excess less the first's, per prompt)."""
    ones = [x for n, x in excess if n == 1] or [x for _, x in excess]
    first = max(0.0, statistics.median(ones))
    more = [(x - first) / (n - 1) for n, x in excess if n >= 2]
    return first, (max(0.0, statistics.median(more)) if extra and len(more) >= MIN_STEPS else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", nargs="+", required=True, help="folders of one run's worker step logs each "
                   "(e.g. sim_validate --keep-logs DIR's DIR/disaggregated-steps-RATE-0)")
    p.add_argument("--profile", required=True, help="the profile to set serving.prompt_step_ms in (its prefill "
                   "table prices the steps)")
    p.add_argument("--out", required=True, help="where to write the profile")
    p.add_argument("--steps", default="beside", choices=["beside", "lone"], help="which prompt steps to read: "
                   "those beside another worker's steps, over the co-run's price (default), or short ones alone")
    p.add_argument("--max-tokens", type=int, default=64, help="with --steps lone: the longest read (default 64)")
    p.add_argument("--source", default="", help="which runs the logs are, for the profile's provenance note")
    a = p.parse_args(argv)
    if a.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {a.max_tokens}")
    try:
        prof = Profile.load(a.profile)
    except (OSError, ConfigError) as e:
        raise SystemExit(f"--profile: {e}") from None
    missing = [d for d in a.logs if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    if a.steps == "beside" and prof.co_run is None:
        raise SystemExit(f"{a.profile}: has no co_run to price prompt steps beside another worker's with")
    try:
        excess = [x for d in a.logs for x in prompt_excess(d, prof, a.steps == "beside", a.max_tokens)]
    except (ValueError, KeyError, TypeError) as e:  # a line that is not a step log's JSON
        raise SystemExit(f"--logs: not a worker step log ({type(e).__name__}: {e})") from None
    what = "prompt steps beside another worker's" if a.steps == "beside" else \
        f"lone prompt steps of <= {a.max_tokens} tokens"
    if len(excess) < MIN_STEPS:
        raise SystemExit(f"{len(excess)} {what} in those logs: need {MIN_STEPS} or more")
    first, extra = fit(excess, a.steps == "beside")
    first = round(first, 3)
    base = prof.serving or ServingCosts(0.0)
    serving = replace(base, prompt_step_ms=first, extra_prompt_ms=round(extra, 3) if extra is not None else
                      base.extra_prompt_ms)
    multi = sum(n >= 2 for n, _ in excess)
    note = f"{prof.provenance.note}; serving.prompt_step_ms" + (" and extra_prompt_ms" if extra is not None else "") + \
        f" from {len(excess)} {what} ({multi} of two prompts or more)" + (f", {a.source}" if a.source else "")
    replace(prof, serving=serving, provenance=replace(prof.provenance, note=note)).save(a.out)
    xs = sorted(x for _, x in excess)
    print(f"{len(excess)} steps ({multi} of two prompts or more); over the engine's price p10/p50/p90 "
          f"{xs[len(xs) // 10]:.2f}/{statistics.median(xs):.2f}/{xs[len(xs) * 9 // 10]:.2f} ms; prompt_step_ms "
          f"{first}, extra_prompt_ms {serving.extra_prompt_ms}; wrote {a.out}")


if __name__ == "__main__":
    main()
