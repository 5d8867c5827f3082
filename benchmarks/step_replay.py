"""A trace replayed through one in-process engine, every step timed against the profile's cost model.

benchmarks/sim_validate.py holds a whole cluster (router, workers as processes, HTTP, the machine shared) against
the simulator, so where a figure misses it cannot say which part of the model is wrong. This replays the same
trace (its seeded Poisson arrivals, prompt and output lengths) through one engine in this process, at the trace's
wall-clock times, with no router, no HTTP and no other process, and records what each step computed
(`LLMEngine.observe_steps`: prompt tokens, attention pairs, decode rows, their context) and how long it took.
Then:

  * each step's time against `CostModel.step_ms` for the same shape (the worker loop's overhead left out: there
    is none here), by kind: decode-only, prompt-only, mixed;
  * the run's TTFT and ITL against the simulator's co-located replica on the same trace (hop and admission 0),
    so a miss that remains here is the engine model's, not the serving path's.

    python -m benchmarks.step_replay --profile benchmarks/profiles/cpu_smollm2.json --rate 1 --num-requests 32

Writes step_replay_<label>.json (every step: shape, measured and modelled ms) and a PNG of modelled against
measured step times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from typing import Any

from benchmarks import serving
from benchmarks.sim_validate import make_trace
from benchmarks.step_costs import by_kind, modelled
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from engine.stats import StepShape
from simulator.cost_model import CostModel
from simulator.metrics import percentile
from simulator.profile import Profile


def replay(eng: LLMEngine, trace: tuple[list[float], list[int], list[int]], vocab: int, seed: int
           ) -> tuple[list[tuple[StepShape, float]], list[list[float]]]:
    """(each step's shape and ms, each request's [arrival, token times...] in seconds from the start)."""
    rng = random.Random(seed)
    prompts = [serving.random_tokens(rng, n, vocab) for n in trace[1]]
    shapes: list[StepShape] = []
    eng.observe_steps(shapes.append)
    steps: list[tuple[StepShape, float]] = []
    times: list[list[float]] = [[t] for t in trace[0]]
    t0, i, n = time.perf_counter(), 0, len(trace[0])
    while i < n or eng.has_unfinished():
        now = time.perf_counter() - t0
        while i < n and trace[0][i] <= now:
            eng.add_request(str(i), prompts[i], SamplingParams(max_tokens=trace[2][i], temperature=0.0,
                                                               ignore_eos=True))
            i += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, trace[0][i] - now))
            continue
        before, start = len(shapes), time.perf_counter()
        outs = eng.step()
        end = time.perf_counter()
        if len(shapes) > before:
            steps.append((shapes[-1], (end - start) * 1e3))
        for o in outs:
            times[int(o.request_id)].extend([end - t0] * len(o.new_token_ids))
    eng.observe_steps(None)
    return steps, times


def figures(times: list[list[float]]) -> dict[str, float]:
    """TTFT and ITL percentiles (ms) from each request's [arrival, token times...]."""
    ttft = [t[1] - t[0] for t in times if len(t) > 1]
    itl = [b - a for t in times for a, b in zip(t[1:], t[2:], strict=False)]
    return {"ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
            "itl_p50_ms": round(percentile(itl, 50) * 1e3, 1), "itl_p99_ms": round(percentile(itl, 99) * 1e3, 1)}


def simulated(a: argparse.Namespace, trace: tuple[list[float], list[int], list[int]], prof: Profile
              ) -> dict[str, float]:
    """The simulator's co-located replica on the same trace: no hop, no admission cost, no worker loop."""
    import tempfile

    import yaml

    from benchmarks.sim_validate import simulate

    cluster = {"model": "smollm2", "engine": {"cache": {"memory_budget_bytes": int(a.kv_gib * 2**30)}},
               "pools": {"prefill": {"replicas": 0}, "decode": {"replicas": 1}}}
    sim_args = argparse.Namespace(slo_ttft_ms=1e9, slo_itl_ms=1e9, oversubscription="fair", no_cpu_share=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(cluster, f)
        f.flush()
        out = simulate(sim_args, f.name, trace, dataclasses.replace(prof, serving=None), hop_ms=0.0)
    return {k: out[k] for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for k, color in (("decode", "tab:blue"), ("prompt", "tab:green"), ("mixed", "tab:red")):
        pts = [(r["model_ms"], r["ms"]) for r in rows if r["kind"] == k]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, alpha=0.6, color=color, label=f"{k} ({len(pts)})")
    top = max(max(r["ms"], r["model_ms"]) for r in rows)
    ax.plot([0, top], [0, top], color="gray", lw=1, ls="--", label="measured = modelled")
    ax.set(xscale="log", yscale="log", xlabel="modelled step ms (profile cost model)", ylabel="measured step ms",
           title="Engine steps of a replayed trace against the cost model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="the profile whose cost model the steps are held against")
    p.add_argument("--model", default="smollm2", help="the engine's model (default: SmolLM2 from its package)")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson request rate, req/s (default 1)")
    p.add_argument("--num-requests", type=int, default=32, help="requests (default 32)")
    p.add_argument("--prompt-len", default="64:512", help="prompt tokens N or A:B (default 64:512, as sim_validate)")
    p.add_argument("--output-len", default="24", help="output tokens N or A:B (default 24, as sim_validate)")
    p.add_argument("--kv-gib", type=float, default=0.25, help="KV cache, GiB (default 0.25, as sim_validate's CPU "
                   "workers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace (default 0: sim_validate's trace)")
    p.add_argument("--label", default="", help="suffix of the output file names")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="output folder")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    prof = Profile.load(a.profile)
    trace = make_trace(a.rate, a.num_requests, a.prompt_len, a.output_len, a.seed)
    eng = LLMEngine(EngineConfig.from_dict({"model": a.model,
                                            "cache": {"memory_budget_bytes": int(a.kv_gib * 2**30)}}))
    replay(eng, ([0.0, 0.0], [32, 256], [4, 4]), eng.model_config.vocab_size, a.seed + 1)  # warm-up, not kept
    steps, times = replay(eng, trace, eng.model_config.vocab_size, a.seed)
    rows = modelled([{**dataclasses.asdict(shape), "ms": round(ms, 2)} for shape, ms in steps], CostModel(prof))
    kinds = by_kind(rows)
    real, sim = figures(times), simulated(a, trace, prof)
    out = {"profile": a.profile, "args": vars(a), "steps_by_kind": kinds, "real": real, "sim": sim,
           "sim_over_real_minus_1": {k: round(sim[k] / real[k] - 1, 3) for k in real if real[k]}, "steps": rows}
    os.makedirs(a.out, exist_ok=True)
    name = os.path.join(a.out, f"step_replay{'_' + a.label if a.label else ''}")
    with open(name + ".json", "w") as f:
        json.dump(out, f, indent=1)
    plot(rows, name + ".png")
    for k, v in kinds.items():
        print(f"{k:7s} {v['steps']:4d} steps  measured {v['ms']:7d} ms  modelled {v['model_ms']:7d} ms  "
              f"ratio p10/p50/p90 {v['ratio_p10']}/{v['ratio_p50']}/{v['ratio_p90']}")
    print("in-process run " + "  ".join(f"{k} {real[k]} (sim {sim[k]})" for k in real))
    print(f"wrote {name}.json, {name}.png")
    return out


if __name__ == "__main__":
    main()
