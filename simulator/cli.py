"""`disagg simulate`: a cluster YAML on profiled hardware under a workload, in simulated time.

    disagg simulate --config deploy/configs/local.yaml --profile benchmarks/profiles/cpu_smollm2.json \\
        --arrival poisson --rate 0.3 --duration-s 600 --prompt-len 64:512 --output-len 24 --out out/sim
    disagg simulate --config fleet.yaml --profile benchmarks/profiles/h200_llama3_8b.json --trace mooncake.jsonl

The cluster YAML gives the router policies, the engine's batching limits and KV budget, the pools and their
autoscaling (the same file `disagg serve` and `disagg deploy` read); the profile gives step times, KV size, the
transfer rate and start-up time (`disagg profile`). Writes PREFIX.json (summary, per-pool replica- and GPU-hours,
every scale decision, the timeline) and PREFIX.png (load, replicas, tail latencies and SLO attainment over time).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

from deploy.config import ClusterConfig
from simulator.cluster import Chunk, Cluster
from simulator.config import SimConfig
from simulator.fleet import run_fleet
from simulator.profile import Profile
from simulator.report import plot_timeline, summary_line
from simulator.trace import trace_chunks, write_trace
from simulator.workload import Lengths, Workload


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload (a trace file, or a generator)")
    w.add_argument("--trace", help="trace file: Mooncake .jsonl, Azure CSV, or CSV timestamp,input_length,output_length")
    w.add_argument("--time-scale", type=float, default=1.0, help="replay the trace this many times faster (default 1)")
    w.add_argument("--start-s", type=float, default=0.0, help="skip the trace's first seconds")
    w.add_argument("--arrival", default="poisson", choices=["poisson", "bursty", "diurnal"],
                   help="generator: Poisson at --rate; bursty: plus bursts; diurnal: a day from --rate to --peak-rate")
    w.add_argument("--rate", type=float, default=1.0, help="requests/s (diurnal: at the daily trough; default 1)")
    w.add_argument("--peak-rate", type=float, default=0.0, help="diurnal: requests/s at the daily peak")
    w.add_argument("--duration-s", type=float, default=0.0,
                   help="seconds of arrivals (generators: required; traces: cut there, default all)")
    w.add_argument("--period-s", type=float, default=86400.0, help="diurnal: length of a day (default 86400)")
    w.add_argument("--peak-at-s", type=float, default=14 * 3600.0, help="diurnal: when the rate peaks (default 14 h)")
    w.add_argument("--prompt-len", default="32:256", help="prompt tokens: N, A:B or lognormal:MEAN:SIGMA[:MAX]")
    w.add_argument("--output-len", default="32", help="output tokens: N, A:B or lognormal:MEAN:SIGMA[:MAX]")
    w.add_argument("--burst-factor", type=float, default=1.0, help="a burst multiplies the rate by this (default 1)")
    w.add_argument("--burst-every-s", type=float, default=0.0, help="mean seconds between bursts (0: none)")
    w.add_argument("--burst-s", type=float, default=300.0, help="seconds a burst lasts (default 300)")
    w.add_argument("--mix-prompt-len", help="a second class of requests: its prompt lengths (its share follows the day)")
    w.add_argument("--mix-output-len", help="the second class's output lengths")
    w.add_argument("--mix-low", type=float, default=0.0, help="the second class's share at its daily low")
    w.add_argument("--mix-high", type=float, default=0.0, help="the second class's share at its daily high")
    w.add_argument("--mix-peak-at-s", type=float, default=20 * 3600.0, help="when its share peaks (default 20 h)")
    w.add_argument("--seed", type=int, default=0, help="seed of the generator and of routing samples")


def add_sim_flags(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("simulation")
    s.add_argument("--slo-ttft-ms", type=float, default=500.0, help="goodput SLO on a request's TTFT (default 500)")
    s.add_argument("--slo-itl-ms", type=float, default=30.0, help="goodput SLO on a request's p99 ITL (default 30)")
    s.add_argument("--hop-ms", type=float, default=1.0, help="one router <-> worker message, each way (default 1)")
    s.add_argument("--admit-ms", type=float, default=0.0, help="the router's own work on a new request before it "
                   "reaches a worker: HTTP, tokenizing, routing (default 0; sim_validate --calibrate measures it)")
    s.add_argument("--node-startup-s", type=float, default=0.0,
                   help="getting a node for a new replica before its worker starts (default 0)")
    s.add_argument("--startup-s", type=float, help="a new replica serves this long after it is asked for "
                   "(default: --node-startup-s + the profile's start-up)")
    s.add_argument("--route-sample", type=int, default=0, help="hand the routing policy this many random candidates "
                   "instead of the whole pool (power-of-d; default 0 = the whole pool, as the router does)")
    s.add_argument("--exact", action="store_true", help="one event per engine step (exact per-request gaps; slower)")
    s.add_argument("--shared-device", action="store_true", help="all replicas share one device (one GPU): "
                   "concurrent steps slow each other down")
    s.add_argument("--no-cpu-share", action="store_true", help="with --shared-device and a CPU profile: CPU workers "
                   "without a core share (each step keeps the threads it started with) instead of as clusters start "
                   "them (engine.cpu_share: the cores split among the workers in a step, re-chosen within a layer)")
    s.add_argument("--sample-s", type=float, default=60.0, help="timeline resolution, seconds (default 60)")
    s.add_argument("--keep-requests", action="store_true", help="keep every request's figures (exact percentiles)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disagg simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="cluster YAML: router, engine limits, pools, autoscaling")
    p.add_argument("--profile", required=True, help="profile JSON of one replica (disagg profile)")
    p.add_argument("--decode-profile", help="another profile for the decode pool (default --profile)")
    add_workload_flags(p)
    add_sim_flags(p)
    p.add_argument("--cells", type=int, default=1, help="split the fleet into this many cells, each a router + pools "
                   "+ planner with 1/cells of the replicas, bounds and traffic (simulator/fleet.py; default 1)")
    p.add_argument("--processes", type=int, default=1, help="simulate cells in this many processes (default 1)")
    p.add_argument("--write-trace", help="also write the workload's requests to this CSV (and simulate it)")
    p.add_argument("--out", default="benchmarks/out/sim", help="output prefix: PREFIX.json and PREFIX.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def workload_from(a: argparse.Namespace) -> tuple[Callable[[], Iterable[Chunk]], float | None]:
    """(a callable making the arrivals afresh, duration or None) from the flags."""
    if a.trace:
        return functools.partial(trace_chunks, a.trace, a.time_scale, a.start_s, a.duration_s), (a.duration_s or None)
    if a.duration_s <= 0:
        raise SystemExit("disagg simulate: a generated workload needs --duration-s")
    mix = (Lengths.parse(a.mix_prompt_len), Lengths.parse(a.mix_output_len)) if a.mix_prompt_len else (None, None)
    w = Workload(a.arrival, a.rate, a.duration_s, Lengths.parse(a.prompt_len), Lengths.parse(a.output_len),
                 peak_rate=a.peak_rate, period_s=a.period_s, peak_at_s=a.peak_at_s, burst_factor=a.burst_factor,
                 burst_every_s=a.burst_every_s, burst_s=a.burst_s, mix_prompt=mix[0], mix_output=mix[1],
                 mix_low=a.mix_low, mix_high=a.mix_high, mix_peak_at_s=a.mix_peak_at_s, seed=a.seed)
    return w.chunks, a.duration_s


def sim_config(a: argparse.Namespace) -> SimConfig:
    return SimConfig(slo_ttft_ms=a.slo_ttft_ms, slo_itl_ms=a.slo_itl_ms, hop_ms=a.hop_ms, admit_ms=a.admit_ms,
                     node_startup_s=a.node_startup_s, startup_s=a.startup_s, route_sample=a.route_sample,
                     fast_forward=not a.exact, shared_device=a.shared_device, sample_s=a.sample_s,
                     cpu_share=not a.no_cpu_share, keep_requests=a.keep_requests, seed=a.seed)


def simulate(a: argparse.Namespace) -> dict[str, Any]:
    workload, duration = workload_from(a)
    if a.write_trace:
        print(f"wrote {write_trace(a.write_trace, workload())} requests to {a.write_trace}", flush=True)
    cfg, sim = ClusterConfig.load(a.config), sim_config(a)
    prefill, decode = Profile.load(a.profile), Profile.load(a.decode_profile) if a.decode_profile else None
    t0 = time.perf_counter()
    if a.cells > 1:
        print(f"{a.cells} cells in {min(a.cells, a.processes)} processes...", flush=True)
        result = run_fleet(cfg, sim, prefill, decode, workload, duration, a.cells, a.processes)
    else:
        with tqdm(total=int(duration) if duration else None, unit="sim s", desc="simulating") as bar:
            result = Cluster(cfg, sim, prefill, decode).run(workload(), duration, bar)
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    result["command"] = "disagg simulate " + " ".join(a.argv)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv  # `disagg simulate -- --help` passes the separator on
    a = build_parser().parse_args(argv)
    a.argv = argv
    result = simulate(a)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if not a.no_plot:
        plot_timeline(result, a.out + ".png", os.path.basename(a.out))
    print(summary_line(result))
    print(f"simulated {result['end_s']:.0f} s in {result['wall_s']:.1f} s; wrote {a.out}.json"
          + ("" if a.no_plot else f" and {a.out}.png"), flush=True)
    return result


if __name__ == "__main__":
    main()
