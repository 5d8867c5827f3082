"""A trace replayed on a real local cluster, for benchmarks/sim_validate.py: the requests sent at their times from
client processes, the figures serving.summarize reports, and what was measured around the run (a lone stream on
the idle cluster, the cores others kept busy, each process's CPU-seconds, the router's gap and GC histograms, the
workers' step logs read against the profile's cost model, the handoffs by phase). A run during which other
processes kept the machine busy is spoiled and run again (`--tries`); `--repeats` runs the trace on fresh
clusters and reports each figure's median and range.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import time
from typing import Any

import httpx

from benchmarks import serving
from benchmarks.bootstrap import figure_intervals
from benchmarks.calibration import read_probes, single_stream
from benchmarks.client_pool import ClientPool
from benchmarks.step_costs import pull_phases, serving_path, worker_steps
from benchmarks.token_delivery import brief as brief_delivery
from benchmarks.token_delivery import delivery
from deploy.config import ClusterConfig
from simulator.metrics import percentile
from simulator.profile import Profile
from worker.step_log import STEP_LOG_ENV

FIGURES = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "goodput_req_s")
GC_HISTOGRAM = "disagg_router_gc_pause_seconds"  # router/metrics.py
Trace = tuple[list[float], list[int], list[int]]  # arrival seconds, prompt tokens, output tokens


def replay(pool: ClientPool, url: str, model: str, trace: Trace, vocab: int,
           seed: int) -> tuple[list[serving.RequestResult], float]:
    """Send each request at its trace time from the pool's client processes; (results, seconds from the first
    send to the last completion)."""
    rng = random.Random(seed + 7)
    prompts = [serving.random_tokens(rng, n, vocab) for n in trace[1]]
    return pool.replay(url, model, trace, prompts)


def warm(url: str, model: str, vocab: int, seed: int) -> None:
    """Two short requests before the timed window (the first requests of a fresh cluster pay one-off costs), of
    their own random tokens: no prefix of a trace prompt is cached by them."""
    rng = random.Random(seed + 11)

    async def send() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for _ in range(2):
                await serving.one_request(client, url, model, serving.random_tokens(rng, 32, vocab), 4, {})

    asyncio.run(send())


def per_request(results: list[serving.RequestResult]) -> list[list[float]]:
    """[prompt, output tokens, TTFT ms, e2e ms, the request's p99 ITL ms, its first gap ms (first to second token:
    in a 1P+1D cluster the KV's move and the decode worker's next step)] of each request, in trace order."""
    return [[r.prompt_len, r.output_tokens, round(r.ttft * 1e3, 1), round(r.e2e * 1e3, 1),
             round(percentile(r.itls, 99) * 1e3, 1) if r.itls else 0.0, round(r.itls[0] * 1e3, 1) if r.itls else 0.0]
            for r in results]


def real_run(a: argparse.Namespace, mode: str, path: str, trace: Trace,
             rate: float, repeat: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trace on a real cluster: (serving.summarize's figures, what was measured around it). Before each try it
    waits for a quiet machine (others keeping < --max-foreign cores busy); a try during which others kept more
    busy is spoiled and run again (up to --tries, fresh prompt tokens each time: no prefix-cache hits), and its
    figures are kept beside the one reported. Around it: one stream alone on the idle cluster (the serving path's
    own cost), the cores others kept busy, each process's CPU-seconds, the load average, and each worker's steps
    against the profile's cost model (alone and beside the other worker's: step_costs.worker_steps), and the
    requests' handoffs from prefill to decode worker by phase (step_costs.pull_phases)."""
    a.concurrency = 0
    steps = os.path.join(os.path.dirname(path), f"{mode}-steps-{rate:g}-{repeat}")
    os.environ[STEP_LOG_ENV] = steps  # the workers time each step (worker/step_log.py)
    try:
        return _real_run(a, mode, path, trace, rate, steps)
    finally:
        del os.environ[STEP_LOG_ENV]


def met_slo(a: argparse.Namespace, each: list[list[float]], results: list[serving.RequestResult] | None = None
            ) -> list[bool]:
    """Whether each request (`per_request`'s rows) met both SLOs, as serving.summarize counts goodput: a TTFT
    within --slo-ttft-ms and its own p99 gap within --slo-itl-ms (a request of one token: its TTFT only). Failed
    requests (`results` given) did not."""
    ok = [r.ok for r in results] if results is not None else [True] * len(each)
    return [o and q[2] <= a.slo_ttft_ms and (q[1] <= 1 or q[4] <= a.slo_itl_ms) for o, q in zip(ok, each, strict=True)]


def _real_run(a: argparse.Namespace, mode: str, path: str, trace: Trace,
              rate: float, steps: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.machine_load import ForeignCpu, wait_for_quiet
    from deploy.local import LocalCluster
    from worker.ports import free_port

    with LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True,
                      log_dir=os.path.join(os.path.dirname(path), mode)) as c, ClientPool(a.client_processes) as pool:
        model = "smollm2" if a.device == "cpu" else a.tokenizer
        around: dict[str, Any] = {"spoiled": []}
        for attempt in range(a.tries):
            quiet = wait_for_quiet(a.max_foreign, a.quiet_wait_s, pids=[*c.pids, *pool.pids])
            alone_since = time.time()
            co_run = mode == "disaggregated" and a.calibrate in ("both", "speed")  # two workers sharing the machine
            around["alone"] = asyncio.run(single_stream(c.url, model, co_run=co_run))
            warm(c.url, model, 49152, a.seed + 1000 * attempt)
            load, meter, cpu0 = os.getloadavg(), ForeignCpu([*c.pids, *pool.pids]).start(), cluster_cpu_s(c)
            itl0, gc0 = router_itl(c.url), router_itl(c.url, GC_HISTOGRAM)
            since = time.time()
            results, duration = replay(pool, c.url, model, trace, 49152, a.seed + 1000 * attempt)
            until = time.time()
            itl1, gc1 = router_itl(c.url), router_itl(c.url, GC_HISTOGRAM)
            real = {**serving.summarize(results, duration, rate, a), "requests_each": per_request(results),
                    "gaps_over": gaps_over(itl0, itl1, [g for r in results for g in r.itls]),
                    "router_gc": router_gc(gc0, gc1),
                    "interval_90": figure_intervals([r.ttft * 1e3 for r in results if r.ok],
                                                    [[g * 1e3 for g in r.itls] for r in results if r.ok],
                                                    good=met_slo(a, per_request(results), results),
                                                    duration_s=duration)}
            if a.keep_gaps:  # every request's inter-token gaps, in trace order (where in a stream long ones fall)
                real["gaps_ms"] = [[round(g * 1e3, 2) for g in r.itls] for r in results]
            figures = {"attempt": attempt, "client_processes": pool.processes, "foreign_cores_before": quiet,
                       "foreign_cores": meter.stop(),
                       "cpu_s": {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cluster_cpu_s(c).items()},
                       "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()]}
            if figures["foreign_cores"] <= a.max_foreign or attempt == a.tries - 1:
                c.stop()  # the workers close their step logs
                read_probes(steps, around["alone"], alone_since, since, co_run)
                pulls = pull_phases(steps, since, until)
                if pulls["pulls"]:
                    print(f"  {mode} rate {rate:g}: real handoffs {brief_phases(pulls)}", flush=True)
                path_figures = serving_path(steps, since, until)
                print(f"  {mode} rate {rate:g}: router GC pauses {real['router_gc']}; workers {path_figures}",
                      flush=True)
                tokens = delivery(steps, since, until)
                if tokens:
                    print(f"  {mode} rate {rate:g}: token batches {brief_delivery(tokens)}", flush=True)
                return real, {**around, **figures, "pulls": pulls, "serving_path": path_figures, "delivery": tokens,
                              "steps": worker_steps(steps, since, until, Profile.load(a.profile))}
            around["spoiled"].append({**figures, **{k: real[k] for k in FIGURES}})
            print(f"  {mode} rate {rate:g}: others kept {figures['foreign_cores']} cores busy, run again", flush=True)
    raise AssertionError("unreachable")


def router_itl(url: str, name: str = "disagg_inter_token_latency_seconds") -> dict[float, float]:
    """A histogram of the router's /metrics (its inter-token gaps unless named): cumulative count by upper bound,
    seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {float(s.labels["le"]): s.value for fam in text_string_to_metric_families(text)
            if fam.name == name for s in fam.samples if s.name.endswith("_bucket")}


def router_gc(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """The router's garbage-collection pauses of 5 ms or more between two readings of its histogram: how many, and
    how many over 20 and 50 ms."""
    def over(b: float) -> float:
        return (after.get(math.inf, 0.0) - before.get(math.inf, 0.0)) - (after.get(b, 0.0) - before.get(b, 0.0))

    return {"pauses": over(0.0), "over_20ms": over(0.02), "over_50ms": over(0.05)}


def gaps_over(before: dict[float, float], after: dict[float, float], client_s: list[float]) -> dict[str, Any]:
    """Where long inter-token gaps arise: the share of gaps over each of the router's bucket bounds as the router
    saw them (between token chunks from the decode worker) and as the client saw them (between SSE events). A
    tail the client sees and the router does not is added on the way out (the router's HTTP, the client)."""
    bounds = [b for b in sorted(after) if 0.005 <= b <= 0.2]
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    router = [round(1 - (after[b] - before.get(b, 0.0)) / total, 4) if total else None for b in bounds]
    client = [round(sum(g > b for g in client_s) / len(client_s), 4) if client_s else None for b in bounds]
    return {"bound_ms": [round(b * 1e3, 1) for b in bounds], "router_share_over": router, "client_share_over": client,
            "router_gaps": total, "client_gaps": len(client_s)}


def repeated_runs(a: argparse.Namespace, mode: str, path: str, trace: Trace,
                  rate: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """`real_run` `--repeats` times, each on a fresh cluster: (each figure's median, with every run's figures in
    `repeats` and their `range`; what was measured around each run, with the lone stream's medians in `alone`).
    The per-request figures and the bootstrap intervals are the first run's."""
    runs = [real_run(a, mode, path, trace, rate, i) for i in range(a.repeats)]
    if len(runs) == 1:
        return runs[0]
    alones = [x.get("alone") or {} for _, x in runs]
    alone = {k: round(statistics.median(x[k] for x in alones), 2) for k in alones[0] if all(k in x for x in alones)}
    return merge_repeats([r for r, _ in runs]), {"alone": alone, "repeats": [x for _, x in runs]}


def merge_repeats(reals: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's figures with each of FIGURES replaced by its median over `reals`; every run's figures in
    `repeats`, each figure's [min, max] in `range`."""
    return {**reals[0], **{k: round(statistics.median(r[k] for r in reals), 3) for k in FIGURES},
            "repeats": [{k: r[k] for k in FIGURES} for r in reals],
            "range": {k: [min(r[k] for r in reals), max(r[k] for r in reals)] for k in FIGURES}}


def cluster_cpu_s(c: Any) -> dict[str, float]:
    """CPU-seconds so far of each process of a LocalCluster, and of this one (the client)."""
    from benchmarks.machine_load import process_cpu_s

    return {**{name: process_cpu_s(p.popen.pid) for name, p in c.procs.items()}, "client": process_cpu_s(os.getpid())}


def brief_phases(pulls: dict[str, Any]) -> str:
    """A handoff's phases (handoff_phases) in one line: ms p50/p90 of each."""
    return "(ms p50/p90) " + ", ".join(f"{k.removesuffix('_ms')} {v['p50']:.0f}/{v['p90']:.0f}"
                                       for k, v in pulls.items() if k.endswith("_ms"))
