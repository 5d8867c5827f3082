"""The spread of a decode step's co-run multiplier, from real runs' step logs, into a profile.

`python -m benchmarks.co_run_spread --logs DIR [DIR ...] --profile IN.json --out OUT.json`

`disagg profile` times the decode co-run as a mean over back-to-back steps beside a prompt (on a GPU, steps
queued ahead, one time for all): the simulator then charged every decode step beside a prompt that mean. Real
steps beside prompts spread around it (an H100's serving decode worker: p10 / p50 / p99 0.75 / 1.0 / 1.2x the
median), and at a knee where the KV handoffs' first gaps fill most of the top 1% of gaps the ITL p99 is the top
~0.2% of those steps. This reads the decode-only steps of every worker step log in the folders (worker/step_log.py,
as `sim_validate --keep-logs` keeps them) that ran beside another worker's step for at least 90% of their time,
takes each one's time over the cost model's for its shape, and writes their quantiles, over their mean, as the
profile's `co_run.decode_spread` (simulator/profile.py). Take the logs from runs other than those the profile
will be held against.

`--by-position` prints instead the same steps' multipliers (over the cost model) by where each began within the
other worker's step it ran beside: on an H100 a decode step in the first tenth of a prompt step ran p10 1.04-1.14x
(the prompt's kernels still being launched), the middle 2.1-2.5x, the last tenth 1.5-2.1x. `disagg profile`'s
co-runner runs its prompts back to back, so its decode steps meet the middle only and spread less.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from benchmarks.step_costs import modelled, overlaps, worker_files
from engine.config import ConfigError
from simulator.cost_model import CostModel
from simulator.metrics import percentile
from simulator.profile import Profile, spread_mean
from worker.step_log import read_step_log

POINTS = 21  # quantiles at 0, 5%, ..., 100%


def beside_ratios(folder: str, prof: Profile) -> list[tuple[int, float]]:
    """(rows, measured over modelled time) of the decode-only steps beside another worker's step (>= 90% of their
    time) in one run's step logs (a folder of one machine's workers)."""
    logs = {name: read_step_log(path) for name, path in worker_files(folder).items()}
    overlaps(logs)
    model = CostModel(prof)
    return [(r["decode_rows"], r["ms"] / r["model_ms"]) for rows in logs.values() for r in modelled(rows, model)
            if r["kind"] == "decode" and r["overlap"] >= 0.9 and r["model_ms"] > 0]


ROW_BINS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 1 << 30))


def by_rows(steps: list[tuple[int, float]]) -> tuple[tuple[int, ...], tuple[tuple[float, ...], ...], list[int]]:
    """The spread of each ROW_BINS bin holding at least POINTS of the (rows, ratio) steps, each over its own mean,
    placed at the bin's median rows: (rows, spreads, steps per bin) as co_run.spread_batch and spread_by_batch."""
    rows: list[int] = []
    spreads: list[tuple[float, ...]] = []
    counts: list[int] = []
    for lo, hi in ROW_BINS:
        mine = [(n, x) for n, x in steps if lo <= n <= hi]
        if len(mine) >= POINTS:
            rows.append(round(percentile([float(n) for n, _ in mine], 50)))
            spreads.append(spread([x for _, x in mine]))
            counts.append(len(mine))
    return tuple(rows), tuple(spreads), counts


POSITIONS = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 0.9), (0.9, 1.0))


def by_position(folder: str, prof: Profile) -> dict[str, dict[str, float]]:
    """Decode-only steps beside another worker's step (>= 90% of their time), measured over modelled, by where
    each began within that step (the fraction of it gone): count and p10 / p50 / p90 per POSITIONS bin."""
    logs = {name: read_step_log(path) for name, path in worker_files(folder).items()}
    overlaps(logs)
    model = CostModel(prof)
    found: dict[tuple[float, float], list[float]] = {b: [] for b in POSITIONS}
    for name, rows in logs.items():
        others = sorted((r["t"], r["t"] + r["ms"] / 1e3) for n, rs in logs.items() if n != name for r in rs)
        for r in modelled(rows, model):
            if r["kind"] != "decode" or r["overlap"] < 0.9 or r["model_ms"] <= 0:
                continue
            for a, b in others:
                if a <= r["t"] < b:
                    at = (r["t"] - a) / (b - a)
                    found[next(x for x in POSITIONS if x[0] <= at < x[1])].append(r["ms"] / r["model_ms"])
                    break
    return {f"{lo:.1f}-{hi:.1f}": {"steps": len(xs), **{f"p{q}": round(percentile(xs, q), 3) for q in (10, 50, 90)}}
            for (lo, hi), xs in found.items() if xs}


def spread(ratios: list[float], points: int = POINTS) -> tuple[float, ...]:
    """The ratios' quantiles at `points` evenly spaced probabilities, over the mean of that inverse CDF."""
    assert len(ratios) >= points and points >= 2, f"{len(ratios)} steps beside prompts: too few for {points} points"
    qs = [percentile(ratios, 100 * i / (points - 1)) for i in range(points)]
    mean = spread_mean(tuple(qs))
    return tuple(round(q / mean, 4) for q in qs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", nargs="+", required=True, help="folders of one run's worker step logs each "
                   "(e.g. sim_validate --keep-logs DIR's DIR/disaggregated-steps-RATE-0)")
    p.add_argument("--profile", required=True, help="the profile to add the spread to (its cost model prices steps)")
    p.add_argument("--out", help="where to write the profile with co_run.decode_spread (required unless --by-position)")
    p.add_argument("--by-position", action="store_true", help="print the steps' multipliers by where each began within "
                   "the other worker's step it ran beside, and write nothing")
    p.add_argument("--by-rows", action="store_true", help="also write the spread by the steps' decode rows "
                   f"(co_run.spread_batch and spread_by_batch: bins 1-4, 5-8, 9-16, ... rows holding {POINTS} steps or "
                   "more, each over its own mean), which the simulator draws by a step's rows")
    p.add_argument("--source", default="", help="which runs the logs are, for the profile's co-run note")
    a = p.parse_args(argv)
    try:
        prof = Profile.load(a.profile)
    except (OSError, ConfigError) as e:
        raise SystemExit(f"--profile: {e}") from None
    if prof.co_run is None:
        raise SystemExit(f"{a.profile}: has no co_run to spread")
    missing = [d for d in a.logs if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    if a.by_position:
        try:
            tables = {d: by_position(d, prof) for d in a.logs}
        except (ValueError, KeyError, TypeError) as e:  # a line that is not a step log's JSON
            raise SystemExit(f"--logs: not a worker step log ({type(e).__name__}: {e})") from None
        for d, table in tables.items():
            print(d, json.dumps(table))
        return
    if not a.out:
        p.error("--out is required (unless --by-position)")
    try:
        steps = [x for d in a.logs for x in beside_ratios(d, prof)]
    except (ValueError, KeyError, TypeError) as e:  # a line that is not a step log's JSON
        raise SystemExit(f"--logs: not a worker step log ({type(e).__name__}: {e})") from None
    if len(steps) < POINTS:
        raise SystemExit(f"{len(steps)} decode steps beside another worker's in those logs: need {POINTS} or more")
    xs = spread([x for _, x in steps])
    co = replace(prof.co_run, decode_spread=xs, spread_batch=(), spread_by_batch=(),
                 note=f"{prof.co_run.note}; decode_spread from {len(steps)} serving decode steps beside prompts")
    print(f"{len(steps)} steps; spread {quantiles(xs)} of the mean")
    if a.by_rows:
        rows, spreads, counts = by_rows(steps)
        co = replace(co, spread_batch=rows, spread_by_batch=spreads,
                     note=co.note + " and by rows (" + ", ".join(f"{c} at ~{r}" for r, c in zip(rows, counts,
                                                                                             strict=True)) + ")")
        for r, c, ys in zip(rows, counts, spreads, strict=True):
            print(f"  ~{r} rows ({c} steps): {quantiles(ys)}")
    prof = replace(prof, co_run=replace(co, note=co.note + (f" ({a.source})" if a.source else "")))
    prof.save(a.out)
    print(f"wrote {a.out}")


def quantiles(xs: tuple[float, ...]) -> str:
    """A POINTS-point spread's p0 / p10 / p50 / p90 / p95 / p100."""
    return "p0/p10/p50/p90/p95/p100 " + "/".join(str(xs[i]) for i in (0, 2, 10, 18, 19, 20))


if __name__ == "__main__":
    main()
