"""The planner at fleet scale: 1,000 GPUs, a 24-hour diurnal trace with bursts and a shifting prompt/output mix.

    python -m benchmarks.sim_fleet --model 8b                    # Llama-3-8B, 1 GPU per replica (H200 profile)
    python -m benchmarks.sim_fleet --model 70b                   # Llama-3-70B, tensor parallel 4 (analytic profile)
    python -m benchmarks.sim_fleet --model 8b --timing-only      # wall time of one simulated peak hour

Traffic: two classes of requests. Long-context ones (retrieval, agents: prompts ~12k tokens, outputs ~300, the
shape of Mooncake's traces) dominate in the day; chat (prompts ~2.5k, outputs ~600) rises to 80% in the evening.
The rate follows a day (trough at 02:00, peak at 14:00) with bursts of 1.5x for 10 minutes every 3 hours on
average. The fleet runs as cells (simulator/fleet.py), each a router + pools + planner with 1/cells of the fleet.

It writes, for the model: the autoscaled run (JSON + timeline PNG); the GPU-hours of a fixed fleet sized for the
peak (the planner's largest pools, checked by simulating the busiest hour with them) and of the best fixed
prefill:decode ratio (a fleet that scales both pools together and must give each pool what the planner gave it);
and a PNG of the ratio the planner chose against the prompt/output mix.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from typing import Any

import yaml

from deploy.config import ClusterConfig
from simulator.config import SimConfig
from simulator.fleet import run_fleet
from simulator.profile import Profile
from simulator.workload import Lengths, Workload

DATE = datetime.date.today().isoformat()
MODELS: dict[str, dict[str, Any]] = {
    "8b": {"profile": "benchmarks/profiles/h200_llama3_8b.json", "peak_rate": 1700.0, "trough_rate": 500.0,
           "slo_ttft_ms": 3000.0, "slo_itl_ms": 50.0, "kv_gib": 100, "max_seqs": 256,
           "prefill": (220, 40, 900, 16000), "decode": (140, 20, 500, 0.015),  # (start, min, max, target)
           "peak_pools": (640, 300)},  # the planner's pools at 13:30 (from the 24-hour run), to time the peak hour
    "70b": {"profile": "benchmarks/profiles/h200_llama3_70b_tp4.json", "peak_rate": 150.0, "trough_rate": 45.0,
            "slo_ttft_ms": 6000.0, "slo_itl_ms": 60.0, "kv_gib": 384, "max_seqs": 256,
            "prefill": (70, 10, 260, 8000), "decode": (20, 4, 70, 0.02), "peak_pools": (200, 45)},
}


def fleet_yaml(m: dict[str, Any], cells: int, kv_streaming: bool = False) -> dict[str, Any]:
    """The fleet's cluster YAML (whole-fleet figures; simulator/fleet.py divides them among the cells);
    `kv_streaming`: decode workers pull each prompt's KV layer group by layer group while it is computed."""
    def pool(spec: tuple[float, ...], metric: str) -> dict[str, Any]:
        start, lo, hi, target = spec
        return {"min_replicas": int(lo), "max_replicas": int(hi), "metric": metric, "target": target,
                "scale_up_delay_s": 20, "scale_down_delay_s": 300, "max_step": max(1, int(hi) // 10), "window_s": 40}

    return {"model": "llama3", "engine": {"dtype": "bfloat16", "cache": {"block_size": 16,
                                                                          "memory_budget_bytes": m["kv_gib"] * 2**30},
                                          "scheduler": {"max_num_seqs": m["max_seqs"], "max_num_batched_tokens": 8192}},
            "router": {"prefill_policy": "least_loaded", "decode_policy": "least_loaded", "health_interval_s": 1.0,
                       "kv_streaming": kv_streaming},
            "pools": {"prefill": {"replicas": int(m["prefill"][0])}, "decode": {"replicas": int(m["decode"][0])}},
            "autoscaling": {"interval_s": 10, "prefill": pool(m["prefill"], "queued_tokens"),
                            "decode": pool(m["decode"], "itl_p90")}}


def workload(m: dict[str, Any], hours: float, start_h: float = 0.0, seed: int = 0) -> Workload:
    return Workload("diurnal", m["trough_rate"], hours * 3600, Lengths.parse("lognormal:12000:0.7:32000"),
                    Lengths.parse("lognormal:300:0.8:2000"), peak_rate=m["peak_rate"],
                    peak_at_s=(14 - start_h) * 3600, burst_factor=1.5, burst_every_s=3 * 3600, burst_s=600,
                    mix_prompt=Lengths.parse("lognormal:2500:0.8:16000"), mix_output=Lengths.parse("lognormal:600:0.7:4000"),
                    mix_low=0.2, mix_high=0.8, mix_peak_at_s=(20 - start_h) * 3600, seed=seed)


def sim_config(m: dict[str, Any], seed: int = 0) -> SimConfig:
    return SimConfig(slo_ttft_ms=m["slo_ttft_ms"], slo_itl_ms=m["slo_itl_ms"], node_startup_s=180.0, sample_s=60.0,
                     route_sample=2, seed=seed)


def run(m: dict[str, Any], cfg: dict[str, Any], hours: float, start_h: float, cells: int, processes: int,
        seed: int = 0, only: int = 0) -> dict[str, Any]:
    prof = Profile.load(m["profile"])
    w = workload(m, hours, start_h, seed)
    t0 = time.perf_counter()
    result = run_fleet(ClusterConfig.from_dict(copy.deepcopy(cfg)), sim_config(m, seed), prof, None, w.chunks,
                       hours * 3600, cells, processes, only)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["window_h"] = [start_h, start_h + hours]
    return result


def fixed(cfg: dict[str, Any], prefill: int, decode: int) -> dict[str, Any]:
    """The same fleet with fixed pools (no planner)."""
    out = copy.deepcopy(cfg)
    out.pop("autoscaling")
    out["pools"] = {"prefill": {"replicas": prefill}, "decode": {"replicas": decode}}
    return out


def needs(result: dict[str, Any]) -> list[tuple[float, int, int]]:
    """(hour, prefill, decode) replicas the planner wanted at each timeline row."""
    return [(r["t"] / 3600, r["prefill"]["desired"], r["decode"]["desired"]) for r in result["timeline"]]


def best_fixed_ratio(result: dict[str, Any], gpus: int) -> dict[str, Any]:
    """A fleet that keeps prefill:decode fixed and scales both together must, at every moment, give each pool at
    least what the planner gave it: N(t) = max(P(t) / share, D(t) / (1 - share)). The share with the fewest
    GPU-hours over the day, and those hours (a lower bound for any such fleet: it assumes it reacts as fast)."""
    rows = needs(result)
    dt_h = (rows[1][0] - rows[0][0]) if len(rows) > 1 else 0.0
    best: dict[str, Any] = {}
    for share in (x / 200 for x in range(1, 200)):
        hours = sum(max(p / share, d / (1 - share)) for _, p, d in rows) * dt_h * gpus
        if not best or hours < best["gpu_hours"]:
            best = {"prefill_share": round(share, 3), "ratio_p_to_d": round(share / (1 - share), 3),
                    "gpu_hours": round(hours, 1)}
    return best


def timing(m: dict[str, Any], cfg: dict[str, Any], cells: int, processes: int) -> dict[str, Any]:
    """One simulated hour around the daily peak (13:30-14:30), the pools starting at the planner's size then."""
    cfg = copy.deepcopy(cfg)
    for role, n in zip(("prefill", "decode"), m["peak_pools"], strict=True):
        cfg["pools"][role]["replicas"] = n
    from benchmarks.machine_load import machine_busy_seconds

    # Others' load is the machine's busy time less this process's and its cell processes' (children that have
    # ended by the time `run` returns, so RUSAGE_CHILDREN holds them).
    cpu0, busy0, t0 = cpu_seconds(), machine_busy_seconds(), time.monotonic()
    r = run(m, cfg, 1.0, 13.5, cells, processes)
    cpu = cpu_seconds() - cpu0
    others = max(0.0, machine_busy_seconds() - busy0 - cpu) / max(1e-6, time.monotonic() - t0)
    return {"simulated_h": 1.0, "window_h": [13.5, 14.5], "requests": r["summary"]["arrived"], "wall_s": r["wall_s"],
            "cells": cells, "processes": processes, "gpus_start": sum(m["peak_pools"]) * r["pools"]["prefill"][
                "gpus_per_replica"], "slo_met_fraction": r["summary"]["slo_met_fraction"],
            "load_average": os.getloadavg(), "cpu_s": round(cpu, 1), "others_kept_cores_busy": round(others, 3),
            "wall_s_on_idle_cores": round(cpu / min(processes, cells), 1), "date": DATE}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the cell processes)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def plot_ratio(result: dict[str, Any], best: dict[str, Any], peak_gpus: int, gpus: int, path: str, title: str) -> None:
    """Top: the prefill:decode ratio the planner chose against the mix; bottom: GPUs of the three fleets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["timeline"] if r["decode"]["desired"]]
    hours = [r["t"] / 3600 for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    a.plot(hours, [r["prefill"]["desired"] / r["decode"]["desired"] for r in rows], label="prefill : decode (planner)")
    a.axhline(best["ratio_p_to_d"], color="C0", ls=":", label=f"best fixed ratio {best['ratio_p_to_d']:.2f}")
    a.set(ylabel="prefill replicas per decode replica", title=title)
    mix = a.twinx()
    mix.plot(hours, [r["prompt_mean"] for r in rows], "g--", lw=1, label="mean prompt tokens")
    mix.plot(hours, [(r["output_mean"] or 0) * 10 for r in rows], "m--", lw=1, label="mean output tokens x10")
    mix.set(ylabel="tokens")
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = mix.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    share = best["prefill_share"]
    b.plot(hours, [r["gpus"] for r in rows], label="planner (both pools sized apart)")
    b.plot(hours, [max(r["prefill"]["desired"] / share, r["decode"]["desired"] / (1 - share)) * gpus for r in rows],
           label="best fixed ratio (lower bound)")
    b.axhline(peak_gpus, color="k", ls="--", lw=1, label="fixed fleet sized for the peak")
    b.set(xlabel="hour of the day", ylabel="GPUs")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def study(a: argparse.Namespace) -> dict[str, Any]:
    from simulator.report import plot_timeline, summary_line

    m, base = MODELS[a.model], os.path.join(a.out, f"sim_fleet_{a.model}_{DATE}" + ("_kv_streaming" if a.kv_streaming
                                                                                     else ""))
    cfg = fleet_yaml(m, a.cells, a.kv_streaming)
    with open(base + "_cluster.yaml", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    gpus = Profile.load(m["profile"]).gpus_per_replica
    auto = scale_to_fleet(run(m, cfg, a.hours, 0.0, a.cells, a.processes, only=a.only_cells),
                          a.cells / (a.only_cells or a.cells))
    print("autoscaled:", summary_line(auto), f"wall {auto['wall_s']} s", flush=True)
    plot_timeline(auto, base + "_timeline.png", f"Llama-3-{a.model.upper()}: planner, {a.hours:g} h")
    peak_p = max(r["prefill"]["desired"] for r in auto["timeline"])
    peak_d = max(r["decode"]["desired"] for r in auto["timeline"])
    busiest = max(range(len(auto["timeline"])), key=lambda i: auto["timeline"][i]["arrivals_s"])
    start_h = max(0.0, auto["timeline"][busiest]["t"] / 3600 - 0.5)
    check = run(m, fixed(cfg, peak_p, peak_d), 1.0, start_h, a.cells, a.processes, only=a.only_cells)
    best = best_fixed_ratio(auto, gpus)
    out = {"model": a.model, "profile": auto["profiles"], "cluster": cfg, "hours": a.hours, "cells": a.cells,
           "cells_simulated": a.only_cells or a.cells,
           "autoscaled": {k: auto[k] for k in ("summary", "pools", "gpu_hours", "wall_s", "still_in_flight")},
           "decisions": len(auto["decisions"]),
           "fixed_for_peak": {"prefill": peak_p, "decode": peak_d, "gpus": (peak_p + peak_d) * gpus,
                              "gpu_hours": (peak_p + peak_d) * gpus * a.hours,
                              "busiest_hour_check": {"window_h": check["window_h"], **check["summary"]}},
           "best_fixed_ratio": best, "timeline": auto["timeline"]}
    plot_ratio(auto, best, (peak_p + peak_d) * gpus, gpus, base + "_ratio.png",
               f"Llama-3-{a.model.upper()}: the ratio the planner chose as the mix shifted")
    if not a.no_timing:
        out["timing"] = timing(m, cfg, a.cells, a.processes)
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1)
    print(f"fixed for the peak: {peak_p} P + {peak_d} D = {out['fixed_for_peak']['gpu_hours']:.0f} GPU-h "
          f"(busiest hour SLO met {check['summary']['slo_met_fraction']}); best fixed ratio {best}; planner "
          f"{auto['gpu_hours']:.0f} GPU-h; wrote {base}.json", flush=True)
    return out


def scale_to_fleet(result: dict[str, Any], factor: float) -> dict[str, Any]:
    """A run of some of the cells as the whole fleet's: replica counts and hours times `factor` (cells are alike:
    each serves an independent, equal share of the traffic with the same settings); latencies and SLO fractions
    are the simulated cells' own."""
    if factor == 1:
        return result
    result["gpu_hours"] *= factor
    for p in result["pools"].values():
        for k in ("started", "replica_hours", "gpu_hours", "steps"):
            p[k] *= factor
    for row in result["timeline"]:
        row["gpus"] = round(row["gpus"] * factor)
        row["arrivals_s"], row["done_s"] = round(row["arrivals_s"] * factor, 3), round(row["done_s"] * factor, 3)
        for role in ("prefill", "decode"):
            row[role] = {k: (round(v * factor) if v is not None else None) for k, v in row[role].items()}
    result["scaled_to_fleet_by"] = factor
    return result


def explore(a: argparse.Namespace) -> None:
    """One autoscaled window, printed as a compact timeline (for trying planner settings)."""
    from simulator.report import summary_line

    m = dict(MODELS[a.model])
    if a.decode_metric:
        metric, _, target = a.decode_metric.partition(":")
        m["decode"] = (*m["decode"][:3], float(target))
    cfg = fleet_yaml(m, a.cells, a.kv_streaming)
    if a.decode_metric:
        cfg["autoscaling"]["decode"]["metric"] = metric
    for role, n in zip(("prefill", "decode"), a.start_pools or (), strict=False):
        cfg["pools"][role]["replicas"] = n
    r = run(m, cfg, a.hours, a.start_h, a.cells, a.processes, only=a.only_cells)
    print(summary_line(r), f"wall {r['wall_s']} s")
    for row in r["timeline"][::max(1, len(r["timeline"]) // 15)]:
        print(f"{a.start_h + row['t'] / 3600:6.2f} h  {row['arrivals_s']:8.1f} req/s  P {row['prefill']}  "
              f"D {row['decode']}  SLO met {row['slo_met']}  TTFT p99 {row['ttft_p99_ms']}  ITL p99 {row['itl_p99_ms']}")
    for d in r["decisions"][:12]:
        print(d)
    with open(os.path.join(a.out, f"sim_fleet_{a.model}_explore.json"), "w") as f:
        json.dump(r, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="8b", choices=sorted(MODELS), help="8b (one GPU a replica) or 70b (TP=4)")
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours from midnight (default 24)")
    p.add_argument("--cells", type=int, default=8, help="routing cells the fleet is split into (default 8)")
    p.add_argument("--processes", type=int, default=2, help="processes simulating cells (default 2)")
    p.add_argument("--timing-only", action="store_true", help="only time one simulated peak hour")
    p.add_argument("--explore", action="store_true", help="only the autoscaled run of --start-h + --hours, printed")
    p.add_argument("--start-h", type=float, default=0.0, help="--explore: hour of the day to start at (default 0)")
    p.add_argument("--start-pools", type=int, nargs=2, metavar=("P", "D"), help="--explore: pools at the start")
    p.add_argument("--only-cells", type=int, default=0, help="simulate only this many of the cells (cells are alike; "
                   "fleet replica counts and GPU-hours are scaled up, latencies are theirs)")
    p.add_argument("--decode-metric", default="", help="--explore: the decode pool's METRIC:TARGET instead, e.g. "
                   "kv_usage:0.6")
    p.add_argument("--no-timing", action="store_true", help="skip timing the peak hour")
    p.add_argument("--kv-streaming", action="store_true", help="the router's kv_streaming on: decode workers pull the "
                   "KV layer group by layer group while the prompt is computed (outputs get a _kv_streaming suffix)")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.explore:
        explore(a)
        return
    if a.timing_only:
        t = timing(MODELS[a.model], fleet_yaml(MODELS[a.model], a.cells, a.kv_streaming), a.cells, a.processes)
        t["command"] = "python -m benchmarks.sim_fleet " + " ".join(argv if argv is not None else sys.argv[1:])
        print(json.dumps(t), flush=True)
        with open(os.path.join(a.out, f"sim_fleet_{a.model}_{DATE}_timing.json"), "w") as f:
            json.dump(t, f, indent=1)
        return
    study(a)


if __name__ == "__main__":
    main()
