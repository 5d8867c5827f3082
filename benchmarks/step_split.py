"""Where a worker's steps spent their time, from its step log (worker/step_log.py), by kind of step.

Each step line carries its wall time (`ms`) and how it went: `sched_ms` until it was scheduled, `launch_ms`
queueing its model work, `wait_ms` waiting for the results, `cpu_ms` the stepping thread's CPU time (on a GPU the
wait spins, so `ms - cpu_ms` is time off the CPU: the GIL held by another thread, or preempted), `loop_cpu_ms` the
serving loop's thread's CPU meanwhile, `gc_ms` garbage collection; and what is left after the wait
(`after_wait_ms`). Held against the engine alone's steps (`benchmarks/prompt_lengths.py --step-log`) this says
whether a serving worker's dearer prompt steps are host time (launching, off the CPU) or device time (waiting).

    python -m benchmarks.step_split --logs SERVING/prefill-0.jsonl ENGINE.jsonl [--out split.json]
"""

from __future__ import annotations

import argparse
import json
import sys

from simulator.metrics import percentile
from worker.step_log import read_step_log

FIELDS = ("ms", "sched_ms", "launch_ms", "wait_ms", "after_wait_ms", "cpu_ms", "off_cpu_ms", "loop_cpu_ms", "gc_ms")
KINDS = ("short prompts (< 300 tokens)", "long prompts (>= 1,000 tokens)", "other prompts", "decode only", "mixed")


def kind(row: dict) -> str:
    """A step's kind: decode (no prompt tokens), prompt (no decode rows) or mixed."""
    return "decode" if not row["prompt_tokens"] else "prompt" if not row["decode_rows"] else "mixed"


def split_kind(r: dict) -> str | None:
    """`kind`, prompts apart by length (a short prompt's step is bound by its kernel
    launches, a long one's by the device); None for a step with neither prompt tokens nor decode rows."""
    if not r["prompt_tokens"] and not r["decode_rows"]:
        return None
    k, n = kind(r), r["prompt_tokens"]
    if k != "prompt":
        return "decode only" if k == "decode" else "mixed"
    return KINDS[0] if n < 300 else KINDS[1] if n >= 1000 else KINDS[2]


def quantiles(xs: list[float]) -> dict[str, float]:
    """p10 / p50 / p90 (the benchmarks' percentile: linear between order statistics)."""
    return {f"p{q}": round(percentile(xs, q), 3) for q in (10, 50, 90)}


def derived(r: dict) -> dict:
    """A step with the figures its fields give: time off the CPU, and after the wait (the engine's work once the
    results are in: the scheduler's update, the outputs, a fence on queued work)."""
    out = dict(r)
    if "cpu_ms" in r:
        out["off_cpu_ms"] = r["ms"] - r["cpu_ms"]
    if all(k in r for k in ("sched_ms", "launch_ms", "wait_ms")):
        out["after_wait_ms"] = r["ms"] - r["sched_ms"] - r["launch_ms"] - r["wait_ms"]
    return out


def split(rows: list[dict]) -> dict[str, dict]:
    """Per kind of step: its count and each field's p10 / p50 / p90 (the fields the log has)."""
    out: dict[str, dict] = {}
    groups: dict[str | None, list[dict]] = {}
    for r in rows:
        groups.setdefault(split_kind(r), []).append(derived(r))
    for name in KINDS:
        steps = groups.get(name, [])
        if steps:
            out[name] = {"steps": len(steps), **{f: quantiles([s[f] for s in steps]) for f in FIELDS
                                                 if all(f in s for s in steps)}}
    return out


def show(name: str, table: dict[str, dict]) -> None:
    print(name)
    for label, row in table.items():
        cells = "  ".join(f"{f} {v['p10']:.2f}/{v['p50']:.2f}/{v['p90']:.2f}" for f, v in row.items() if f != "steps")
        print(f"  {label} ({row['steps']}): {cells}")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", nargs="+", required=True, help="step logs (JSONL) to split, each on its own")
    p.add_argument("--out", help="write the tables here as JSON (p10 / p50 / p90 of each field, by kind of step)")
    a = p.parse_args(argv)
    tables = {}
    for path in a.logs:
        try:
            rows = read_step_log(path)
        except (OSError, ValueError) as e:
            p.error(f"{path}: not a readable step log ({e})")
        if any("ms" not in r or "prompt_tokens" not in r for r in rows):
            p.error(f"{path}: not a step log (a line lacks ms or prompt_tokens)")
        tables[path] = split(rows)
        show(path, tables[path])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(tables, f, indent=1)
        print(f"wrote {a.out}", file=sys.stderr)
    return tables


if __name__ == "__main__":
    main()
