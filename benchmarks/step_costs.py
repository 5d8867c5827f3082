"""Engine steps held against a profile's cost model: each step's measured time beside `CostModel.step_ms` for its
shape (engine/stats.py `StepShape`), by kind of step, and, for the workers of one machine (their step logs,
worker/step_log.py), alone and beside another worker's step, with the time between steps. Used by
benchmarks/step_replay.py (one in-process engine) and benchmarks/sim_validate.py (a real cluster's workers)."""

from __future__ import annotations

import bisect
import math
import os
import statistics
from typing import Any

from benchmarks.step_split import kind, split
from simulator.cost_model import CostModel
from simulator.metrics import handoff_phases, percentile
from simulator.profile import Profile
from worker.step_log import read_step_events, read_step_log


def modelled(rows: list[dict[str, Any]], model: CostModel) -> list[dict[str, Any]]:
    """Each step (a StepShape's fields and its measured `ms`) with its kind and the cost model's ms for its shape
    (the worker loop's overhead left out: it is not in a step's own time)."""
    return [{**r, "kind": kind(r), "model_ms": round(model.step_ms(r["prompt_tokens"], r["pairs"], r["decode_rows"],
                                                                   r["decode_context"], int(r.get("prompts") or 1))
                                                     - model.overhead, 2)}
            for r in rows]


def by_kind(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured / modelled step time by kind of step: the sums and the ratio's p10 / p50 / p90."""
    out: dict[str, Any] = {}
    for k in ("decode", "prompt", "mixed"):
        mine = [r for r in rows if r["kind"] == k]
        if not mine:
            continue
        ratios = sorted(r["ms"] / r["model_ms"] for r in mine)
        ms = sorted(r["ms"] for r in mine)
        out[k] = {"steps": len(mine), "ms": round(sum(ms)), "ms_p50": round(percentile(ms, 50), 1),
                  "ms_p99": round(percentile(ms, 99), 1), "ms_max": round(ms[-1], 1),
                  "model_ms": round(sum(r["model_ms"] for r in mine)),
                  "ratio_p10": round(percentile(ratios, 10), 3), "ratio_p50": round(statistics.median(ratios), 3),
                  "ratio_p90": round(percentile(ratios, 90), 3)}
    return out


def overlaps(logs: dict[str, list[dict[str, Any]]]) -> None:
    """Set each step's `overlap`: the share of its time during which another worker of the machine was in a step
    (step logs of one machine: `t` in Unix seconds)."""
    spans = {name: sorted((r["t"], r["t"] + r["ms"] / 1e3) for r in rows) for name, rows in logs.items()}
    for name, rows in logs.items():
        others = sorted(s for other, ss in spans.items() if other != name for s in ss)
        starts = [a for a, _ in others]
        for r in rows:
            a, b = r["t"], r["t"] + r["ms"] / 1e3
            i = max(0, bisect.bisect_left(starts, a) - len(logs))  # a step of each other worker may span a
            busy = 0.0
            while i < len(others) and others[i][0] < b:
                busy += max(0.0, min(b, others[i][1]) - max(a, others[i][0]))
                i += 1
            r["overlap"] = round(busy / (b - a), 3) if b > a else 0.0


def worker_steps(folder: str, since: float, until: float, prof: Profile) -> dict[str, Any]:
    """Each worker's step log (worker/step_log.py) over [since, until] (Unix seconds) against the cost model, by
    kind of step: all of them, those that ran alone (another worker in a step < 10% of the time) and those beside
    another worker's step (>= 50%); and by kind of step, where their time went (`time_split`)."""
    files = worker_files(folder)
    logs = {name: [r for r in read_step_log(path) if since <= r["t"] <= until] for name, path in files.items()}
    overlaps(logs)
    model = CostModel(prof)
    out = {}
    for name, rows in logs.items():
        rows = modelled(rows, model)
        # From one step's end to the next one's start while requests were running (the serving loop's own time:
        # outputs to the streams, new requests in, KV pulls), beside the steps'.
        between = [((b["t"] - a["t"]) * 1e3 - a["ms"], a, b) for a, b in zip(rows, rows[1:], strict=False)
                   if a.get("running_after", 1)]
        gaps = sorted(g for g, _, _ in between)
        out[name] = {"all": by_kind(rows), "alone": by_kind([r for r in rows if r["overlap"] < 0.1]),
                     "beside": by_kind([r for r in rows if r["overlap"] >= 0.5]),
                     "prompts_beside_by_tokens": by_tokens([r for r in rows if r["overlap"] >= 0.5]),
                     "time_split": split(rows),  # where the steps' time went (benchmarks/step_split.py)
                     "between_steps_ms": {"p50": round(percentile(gaps, 50), 2), "p99": round(percentile(gaps, 99), 2),
                                          "max": round(gaps[-1], 2)} if gaps else {},
                     "longest_between": [{"ms": round(g, 1), "at_s": round(a["t"] + a["ms"] / 1e3 - since, 3),
                                          "before": _brief(a), "after": _brief(b)}
                                         for g, a, b in sorted(between, key=lambda x: -x[0])[:8]]}
        joins = join_steps(rows, read_step_events(files[name]))
        if joins:  # a decode worker: the steps that decoded a pulled request first, apart from the rest
            out[name]["join"] = {"alone": by_kind([r for r in joins if r["overlap"] < 0.1]),
                                 "beside": by_kind([r for r in joins if r["overlap"] >= 0.5])}
    return out


def worker_files(folder: str) -> dict[str, str]:
    """The workers' step logs in `folder` by worker (the routers' arrival logs, router/arrival_log.py, left out)."""
    return {f.removesuffix(".jsonl"): os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(".jsonl") and not f.startswith("router-")}


def by_tokens(rows: list[dict[str, Any]], width: int = 256) -> dict[str, dict[str, float]]:
    """Prompt steps (no decode rows) by prompt tokens in bins of `width`: steps and measured / modelled p50 (the
    co-run multiplier a prompt of that length ran at, beside another worker's steps; CoRunCosts.prefill_by_tokens)."""
    bins: dict[int, list[float]] = {}
    for r in rows:
        if r["kind"] == "prompt" and r["model_ms"] > 0:
            bins.setdefault(r["prompt_tokens"] // width, []).append(r["ms"] / r["model_ms"])
    return {f"{b * width}-{(b + 1) * width - 1}": {"steps": len(xs), "ratio_p50": round(statistics.median(xs), 3)}
            for b, xs in sorted(bins.items())}


def brief_co_run(prof: Profile, steps: dict[str, Any]) -> str:
    """The prompt co-run multiplier by length, the profile's (`co_run.prefill_at`) beside what each bin of the
    real prompt steps beside another worker's ran (worker_steps' `prompts_beside_by_tokens`); "" without them."""
    bins = {k: v for w in steps.values() for k, v in w.get("prompts_beside_by_tokens", {}).items() if v["steps"] >= 5}
    if prof.co_run is None or not bins:
        return ""
    return ", ".join(f"{k} {prof.co_run.prefill_at((int(k.split('-')[0]) + int(k.split('-')[1]) + 1) // 2):.2f}x / "
                     f"{v['ratio_p50']:.2f}x ({v['steps']})" for k, v in bins.items()) + " (profile / real, steps)"


def join_steps(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of a decode worker's steps (time order), those that decoded a pulled request first: the first decode step
    to start after each read ended."""
    starts = [r["t"] for r in rows]
    found = {bisect.bisect_left(starts, float(e["t"])) for e in events if e["event"] == "pull_read"}
    return [rows[i] for i in sorted(found) if i < len(rows) and rows[i]["decode_rows"]]


def prompt_step_ms(folder: str, since: float, until: float, tokens: int) -> float | None:
    """The median time of the steps that computed a lone `tokens`-token prompt (no decode rows) over [since, until]
    in any worker's log: what a short prompt took as it ran (None: no such step)."""
    ms = [r["ms"] for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")
          for r in read_step_log(os.path.join(folder, f))
          if since <= r["t"] <= until and r["prompt_tokens"] == tokens and not r["decode_rows"]]
    return round(statistics.median(ms), 3) if ms else None


def decode_step_ms(folder: str, since: float, until: float, rows: int) -> tuple[float, float] | None:
    """(median ms, mean context) of the decode-only steps of `rows` rows over [since, until] in any worker's log
    (None: no such step)."""
    found = [(r["ms"], r["decode_context"]) for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")
             for r in read_step_log(os.path.join(folder, f))
             if since <= r["t"] <= until and r["decode_rows"] == rows and not r["prompt_tokens"]]
    if not found:
        return None
    return round(statistics.median(m for m, _ in found), 3), round(statistics.fmean(c for _, c in found), 1)


def _steps_beside(folder: str, since: float, until: float) -> list[dict[str, Any]]:
    """Every worker's steps over [since, until] that ran beside another worker's step (>= 50% of their time)."""
    files = [f for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")]
    logs = {f: [r for r in read_step_log(os.path.join(folder, f)) if since <= r["t"] <= until] for f in files}
    overlaps(logs)
    return [r for rows in logs.values() for r in rows if r["overlap"] >= 0.5]


def decode_beside_ms(folder: str, since: float, until: float, rows: int) -> tuple[float, float] | None:
    """(median ms, mean context) of the decode-only steps of `rows` rows over [since, until] that ran beside
    another worker's step (>= 50% of their time; `overlaps`), in any worker's log (None: no such step)."""
    found = [(r["ms"], r["decode_context"]) for r in _steps_beside(folder, since, until)
             if r["decode_rows"] == rows and not r["prompt_tokens"]]
    if not found:
        return None
    return round(statistics.median(m for m, _ in found), 3), round(statistics.fmean(c for _, c in found), 1)


def prompt_beside_ms(folder: str, since: float, until: float, tokens: int) -> float | None:
    """The median time of the steps that computed a lone `tokens`-token prompt (no decode rows) over [since, until]
    beside another worker's step (>= 50% of their time), in any worker's log (None: no such step)."""
    ms = [r["ms"] for r in _steps_beside(folder, since, until) if r["prompt_tokens"] == tokens and not r["decode_rows"]]
    return round(statistics.median(ms), 3) if ms else None


def pull_phases(folder: str, since: float, until: float) -> dict[str, Any]:
    """The handoffs of a 1P+1D cluster's requests over [since, until], from its workers' step logs, by phase
    (simulator/metrics.py `handoff_phases`): the prefill worker's answer to the router to the decode worker's
    receipt of Decode (the router's relay), the wait for its blocks (reserved between two steps), the read, the
    wait from the read's end to the start of the step that decodes it, and that step to its output: the last step
    to end before the request's first output here (`pull_first_output`; logs without it: the first decode step to
    start after the read, which with overlapped steps is one step early)."""
    steps: list[tuple[float, float]] = []
    marks: dict[str, dict[str, float]] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".jsonl"):
            path = os.path.join(folder, f)
            steps += [(r["t"], r["ms"]) for r in read_step_log(path) if r["decode_rows"]]
            for e in read_step_events(path):
                if since <= float(e["t"]) <= until:
                    marks.setdefault(str(e["rid"]), {})[str(e["event"])] = float(e["t"])
    steps.sort()
    ends = sorted((t + ms / 1e3, t) for t, ms in steps)
    for m in marks.values():
        if "pull_first_output" in m:
            i = bisect.bisect_right(ends, (m["pull_first_output"], math.inf)) - 1
            if i >= 0:
                m["join_start"], m["join_end"] = ends[i][1], m["pull_first_output"]
            continue
        i = bisect.bisect_left(steps, (m.get("pull_read", math.inf), 0.0))
        if i < len(steps):
            m["join_start"], m["join_end"] = steps[i][0], steps[i][0] + steps[i][1] / 1e3
    return handoff_phases(list(marks.values()))


def serving_path(folder: str, since: float, until: float) -> dict[str, Any]:
    """What each worker's serving loop did beside its steps over [since, until], from the step logs' events: its
    garbage-collection pauses of 5 ms or more (engine/gc_heap.py; `gc_pause`) and, on a decode worker, its output
    batches (decode_worker/subscriber.py; `batch_sent`): how long the oldest output of a batch waited to be handed
    to gRPC, how long gRPC took it, and the share of batches carrying a request's outputs of two steps or more."""
    out: dict[str, Any] = {}
    for name, path in worker_files(folder).items():
        events = [e for e in read_step_events(path) if since <= float(e["t"]) <= until]
        pauses = [e for e in events if e["event"] == "gc_pause"]
        sent = [e for e in events if e["event"] == "batch_sent"]
        w: dict[str, Any] = {"gc_pauses": len(pauses), "gc_full": sum(e["generation"] == 2 for e in pauses),
                             "gc_ms": _spread([float(e["ms"]) for e in pauses]),
                             "gc_total_ms": round(sum(float(e["ms"]) for e in pauses), 1)}
        if sent:
            w |= {"batches": len(sent), "wait_ms": _spread([float(e["wait_ms"]) for e in sent]),
                  "write_ms": _spread([float(e["write_ms"]) for e in sent]),
                  "merged_share": round(sum(int(e["merged"]) > 0 for e in sent) / len(sent), 4)}
        out[name] = w
    return out


def _spread(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"p50": round(percentile(xs, 50), 3), "p99": round(percentile(xs, 99), 3), "max": round(max(xs), 3)}


def _brief(row: dict[str, Any]) -> str:
    return (f"{row['prompt_tokens']}p+{row['decode_rows']}d {row['ms']:.0f}ms, {row.get('running_after', '?')} running "
            f"after, overlap {row['overlap']}")
