"""The simulator against real runs: the same trace replayed on a real local cluster and simulated from a profile.

    python -m benchmarks.sim_validate --profile benchmarks/profiles/cpu_smollm2.json            # CPU, SmolLM2
    python -m benchmarks.sim_validate --device cuda --tokenizer SMOLLM2.gguf \\
        --profile benchmarks/profiles/GPU.json --rates 2,4,8 --num-requests 32 --prompt-len 1024:2048 --output-len 128
    python -m benchmarks.sim_validate --sim-only --recorded benchmarks/results/gpu_serving_....json ...

For each rate a Poisson trace is drawn once (seeded) and written out; each mode (disaggregated: 1 prefill + 1
decode worker; co-located: 1 worker) replays it on a real cluster (deploy/local.py, benchmarks/serving.py's
request and summary code, prompts of random token ids, `ignore_eos`; benchmarks/real_run.py) and simulates it on
the same cluster YAML (benchmarks/serving_compare.py's), step by step. Reports TTFT and ITL p50/p99 and goodput of
both, side by side. All workers of a real cluster share one machine (its cores, or its one GPU): the simulation runs them on one
shared device, each step slowed by the co-run multipliers the profile measured while another process was busy.
`--recorded` compares simulations with an earlier serving_compare JSON instead of running anything real (its
arrivals were drawn by another generator: same distribution, not the same requests).

`--repeats N` replays each trace N times, each on a fresh cluster: the same requests, so what moves between them
is the machine. The simulation is then held against each figure's median over the N runs, and the report keeps
every run's figures and their range (on a shared VM one run moved 23% from the next, ten minutes apart).

Each figure gets a verdict (`verdicts`): within 15% of the real one; "unresolved", further off but inside the real
figure's own 90% bootstrap interval (resampling the run's requests), where the run holds too few requests to tell
the two apart (a co-located goodput of 4-17 requests in 160, a TTFT p99 that is the second-largest of 160); or a miss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import tempfile
from functools import partial
from typing import Any

import yaml

from benchmarks import serving
from benchmarks.bootstrap import figure_intervals
from benchmarks.calibration import TINY_PROMPT, calibrate, calibrated, speed_drift
from benchmarks.real_run import FIGURES, Trace, brief_phases, met_slo, repeated_runs
from benchmarks.serving_compare import cluster_yaml
from benchmarks.step_costs import brief_co_run
from benchmarks.validation_plot import plot
from deploy.config import ClusterConfig
from kvtransfer.registry import known_backends
from simulator.cluster import Cluster, chunk_lists
from simulator.config import SimConfig
from simulator.metrics import RouterHistogram, handoff_phases, percentile
from simulator.profile import Profile
from simulator.trace import write_trace

MODES = {"disaggregated": 1, "colocated": 0}


def make_trace(rate: float, n: int, prompt: str, output: str, seed: int) -> Trace:
    rng = random.Random(seed)
    (plo, phi), (olo, ohi) = serving.parse_range(prompt), serving.parse_range(output)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times, [rng.randint(plo, phi) for _ in range(n)], [rng.randint(olo, ohi) for _ in range(n)]


def simulate(a: argparse.Namespace, path: str, trace: Trace, prof: Profile,
             hop_ms: float, admit_ms: float = 0.0) -> dict[str, Any]:
    sim = SimConfig(slo_ttft_ms=a.slo_ttft_ms, slo_itl_ms=a.slo_itl_ms, hop_ms=hop_ms, admit_ms=admit_ms,
                    fast_forward=False,
                    shared_device=True, keep_requests=True, sample_s=10.0, cpu_oversubscription=a.oversubscription,
                    cpu_share=not a.no_cpu_share)
    c = Cluster(ClusterConfig.load(path), sim, prof)
    result = c.run(chunk_lists(*trace))
    reqs = sorted(c.collector.requests or [])
    duration = max(r[0] + r[4] for r in reqs)  # first arrival at 0 to the last completion, as summarize counts
    good = sum(1 for r in reqs if r[3] * 1e3 <= a.slo_ttft_ms and (r[2] <= 1 or r[5] * 1e3 <= a.slo_itl_ms))
    s = result["summary"]
    return {"completed": s["completed"], "requests": s["arrived"], "duration_s": round(duration, 3),
            "ttft_p50_ms": round(percentile([r[3] for r in reqs], 50) * 1e3, 2),
            "ttft_p99_ms": round(percentile([r[3] for r in reqs], 99) * 1e3, 2),
            "itl_p50_ms": s["itl_p50_ms"], "itl_p99_ms": s["itl_p99_ms"],
            "goodput_req_s": round(good / duration, 3), "output_tok_s": round(sum(r[2] for r in reqs) / duration, 2),
            "requests_each": [[r[1], r[2], round(r[3] * 1e3, 1), round(r[4] * 1e3, 1), round(r[5] * 1e3, 1),
                               round(r[6] * 1e3, 1)] for r in reqs],
            "cpu_s": {getattr(k, "name", str(k)): round(v, 2) for k, v in getattr(c.device, "used", {}).items()},
            "pulls": handoff_phases(c.collector.handoffs), "gaps_over": sim_gaps_over(c.collector.router["itl"])}


def sim_gaps_over(h: RouterHistogram) -> dict[str, list[float]]:
    """The simulated share of inter-token gaps over each of the router's ITL bucket bounds (`gaps_over`'s, for the
    real runs): a tail held share for share, where a pooled p99 at the knee between the first gaps and the rest
    moves by 10-25% with 0.1% of the gaps."""
    cum = dict(h.cumulative())
    total = cum[math.inf]
    bounds = [b for b in h.bounds if 0.005 <= b <= 0.2]
    return {"bound_ms": [round(b * 1e3, 1) for b in bounds],
            "share_over": [round(1 - cum[b] / total, 4) if total else 0.0 for b in bounds]}


def tiny_ttft_ms(a: argparse.Namespace, path: str, prof: Profile) -> float:
    """The simulated TTFT p50 of one 16-token prompt on the cluster at `path` (calibration's fixed cost)."""
    return simulate(a, path, ([0.0], [TINY_PROMPT], [2]), prof, a.hop_ms)["ttft_p50_ms"]


def brief_gaps(real: dict[str, Any], sim: dict[str, list[float]]) -> str:
    """The share of gaps over 20, 30 and 50 ms: real at the router and the client, and simulated."""
    out = []
    for i, b in enumerate(real["bound_ms"]):
        r, c = real["router_share_over"][i], real["client_share_over"][i]
        if b in (20.0, 30.0, 50.0) and b in sim["bound_ms"] and r is not None and c is not None:
            out.append(f"{b:g} ms {r:.2%} / {c:.2%} / {sim['share_over'][sim['bound_ms'].index(b)]:.2%}")
    return ", ".join(out) + " (router / client / simulated)"


def compare(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, float | None]:
    """sim / real - 1 for each figure (None where the real one is 0 or missing)."""
    return {k: (round(sim[k] / real[k] - 1, 3) if real.get(k) else None) for k in FIGURES}


TOLERANCE = 0.15  # the criterion: a simulated figure within 15% of the real one
DRIFT_WARN = 0.10  # a run whose machine's speed moved more than this since its probes is warned of


def verdicts(diff: dict[str, float | None], inside: dict[str, bool] | None) -> dict[str, str]:
    """Each figure's verdict: "within" (sim / real - 1 within TOLERANCE), "unresolved" (further off, but inside the
    real figure's own 90% bootstrap interval: a TTFT p99 or a goodput count of 160 requests moves more than 15% on
    another draw of the same requests, so the run cannot tell the two apart), or "miss"."""
    out = {}
    for k, d in diff.items():
        if d is None:
            continue
        out[k] = "within" if abs(d) <= TOLERANCE + 5e-4 else ("unresolved" if (inside or {}).get(k) else "miss")
    return out


def tally(res: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many figures of a report's every rate and mode got each verdict."""
    counts = {"within": 0, "unresolved": 0, "miss": 0}
    for modes in res.values():
        for m in modes.values():
            for v in (m.get("verdict") or {}).values():
                counts[v] += 1
    return counts


def recorded_runs(path: str) -> dict[str, dict[float, dict[str, Any]]]:
    """Real runs by mode and rate from a serving_compare JSON, or from an earlier sim_validate JSON (its `real`
    figures and what was measured around them: the simulator re-checked against real runs already made)."""
    with open(path) as f:
        data = json.load(f)
    if "rates" in data:
        out: dict[str, dict[float, dict[str, Any]]] = {}
        for rate, modes in data["rates"].items():
            for mode, r in modes.items():
                if r.get("real"):
                    out.setdefault(mode, {})[float(rate)] = {**r["real"], "measured_around": r.get("measured_around")}
        return out
    return {mode: {r["rate"]: r for r in data[mode]["runs"]} for mode in data if mode in MODES}


def run_rate(a: argparse.Namespace, rate: float, folder: str, recorded: dict[str, Any]) -> dict[str, Any]:
    trace = make_trace(rate, a.num_requests, a.prompt_len, a.output_len, a.seed)
    write_trace(os.path.join(a.out, f"sim_validate_trace_{a.device}_rate{rate:g}.csv"), [trace])
    out: dict[str, Any] = {}
    for mode in a.modes.split(","):
        path = os.path.join(folder, f"{mode}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cluster_yaml(a, MODES[mode]), f)
        prof = Profile.load(a.profile)
        if a.sim_only:
            real = recorded.get(mode, {}).get(rate)
            around = dict(real.pop("measured_around", None) or {}) if real else {}
        else:
            real, around = repeated_runs(a, mode, path, trace, rate)
        tiny = partial(tiny_ttft_ms, a, path)
        calibration = calibrate(a.calibrate, prof, around, tiny) if a.calibrate else None
        if calibration is not None:
            prof = calibrated(prof, calibration)
        sim = simulate(a, path, trace, prof, a.hop_ms, (calibration or {}).get("admit_ms", a.admit_ms))
        if real and real.get("requests_each"):  # a recorded run: TTFTs (and goodput) from its requests
            each = real["requests_each"]
            real["interval_90"] = {**figure_intervals([q[2] for q in each], good=met_slo(a, each),
                                                      duration_s=real.get("duration_s", 0.0)),
                                   **real.get("interval_90", {})}
        out[mode] = {"sim": sim, "real": real, "sim_over_real_minus_1": compare(real, sim) if real else None}
        if real and real.get("range"):  # repeated runs: is the simulation where the real runs themselves fell?
            out[mode]["sim_inside_real_range"] = {k: lo <= sim[k] <= hi for k, (lo, hi) in real["range"].items()}
        if real and real.get("interval_90"):  # how far the real figure itself would move on another draw
            out[mode]["sim_inside_real_interval_90"] = {k: lo <= sim[k] <= hi
                                                        for k, (lo, hi) in real["interval_90"].items()}
        if real:
            out[mode]["verdict"] = verdicts(out[mode]["sim_over_real_minus_1"],
                                            out[mode].get("sim_inside_real_interval_90"))
        if calibration is not None:
            out[mode]["calibration"] = calibration
            if a.calibrate in ("both", "speed"):
                report_drift(out[mode], calibration, around, f"{mode} rate {rate:g}")
        if around:  # how busy the shared machine was
            out[mode]["measured_around"] = around
        print(f"rate {rate:g} {mode:13s} " + "  ".join(
            f"{k} sim {sim[k]} / real {real.get(k) if real else '-'}" for k in FIGURES), flush=True)
        if sim["pulls"]["pulls"]:
            print(f"  {mode} rate {rate:g}: simulated handoffs {brief_phases(sim['pulls'])}", flush=True)
        if co := brief_co_run(prof, around.get("steps") or {}):
            print(f"  {mode} rate {rate:g}: prompts beside the other worker by tokens {co}", flush=True)
        if real and real.get("gaps_over"):
            print(f"  {mode} rate {rate:g}: gaps over " + brief_gaps(real["gaps_over"], sim["gaps_over"]), flush=True)
    return out


def report_drift(out: dict[str, Any], cal: dict[str, Any], around: dict[str, Any], what: str) -> None:
    """The machine's drift between the calibration's probes and the run (calibration.speed_drift), kept and, past
    DRIFT_WARN, said: such a run's figures measure the machine's change as much as the simulator."""
    drift = speed_drift(cal, around.get("steps") or {})
    if drift is None:
        return
    out["speed_drift"] = drift
    if abs(drift["drift"] - 1.0) > DRIFT_WARN:
        print(f"  {what}: the machine's speed moved {drift['drift']:.2f}x between the probes and the run (lone "
              f"decode steps {drift['run_scale']:.2f}x the profile in the run, {drift['probe_scale']:.2f}x at the "
              "probes): its figures measure that drift too", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="the profile the simulation uses (disagg profile)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: real SmolLM2; cuda: 8B-shaped dummy")
    p.add_argument("--tokenizer", default="", help="SmolLM2 GGUF, the router's tokenizer (cuda runs)")
    p.add_argument("--rates", default="0.3,0.6", help="Poisson request rates, req/s (default 0.3,0.6)")
    p.add_argument("--num-requests", type=int, default=24, help="requests per rate (default 24)")
    p.add_argument("--prompt-len", default="64:512", help="prompt tokens N or A:B (default 64:512)")
    p.add_argument("--output-len", default="24", help="output tokens N or A:B (default 24)")
    p.add_argument("--modes", default="disaggregated,colocated", help="which clusters, comma-separated")
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0, help="goodput SLO on TTFT (default 3000)")
    p.add_argument("--slo-itl-ms", type=float, default=300.0, help="goodput SLO on a request's p99 ITL (default 300)")
    p.add_argument("--oversubscription", default="fair", choices=["fair", "measured"],
                   help="CPU workers whose threads outnumber the cores: fair shares, or the profile's measured "
                   "multipliers (default fair; see simulator/device.py)")
    p.add_argument("--no-cpu-share", action="store_true", help="simulate CPU workers without a core share (each "
                   "step keeps the threads it started with), where the real cluster runs with one (deploy/local.py)")
    p.add_argument("--hop-ms", type=float, default=1.0, help="simulated router <-> worker latency (default 1)")
    p.add_argument("--admit-ms", type=float, default=0.0, help="simulated router work per new request before it "
                   "reaches a worker (default 0; --calibrate measures it on the idle cluster)")
    p.add_argument("--backend", default="", help="KV transfer backend of the real disaggregated cluster (default: "
                   "the profile's, the one its transfer rate was measured with, so the simulation models the run)")
    p.add_argument("--nixl-progress", default="auto", choices=["auto", "thread", "poll"], help="see serving_compare")
    p.add_argument("--overlap", default="auto", choices=["auto", "on", "off"], help="GPU workers' overlap_steps")
    p.add_argument("--kv-gib", type=float, default=0.0, help="KV cache per worker, GiB (default 0.25 on cpu, 10 on cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace")
    p.add_argument("--client-processes", type=int, default=0, help="processes the real runs' requests are sent "
                   "from, request i from process i %% N (benchmarks/client_pool.py; default 0: 1 on cpu, 4 on cuda)")
    p.add_argument("--max-foreign", type=float, default=0.2, help="a real run during which others' processes kept "
                   "more cores busy than this is spoiled and run again (default 0.2)")
    p.add_argument("--repeats", type=int, default=1, help="real runs of each trace, each on a fresh cluster; the "
                   "simulation is compared with each figure's median and the runs' range is reported (default 1)")
    p.add_argument("--tries", type=int, default=3, help="real runs per case at most (default 3)")
    p.add_argument("--quiet-wait-s", type=float, default=300.0, help="how long to wait for a quiet machine before "
                   "each real run (default 300)")
    p.add_argument("--calibrate", nargs="?", const="both", default="", choices=["both", "speed", "admit"],
                   help="correct the profile at each real run from the idle cluster just before it: `speed` scales "
                   "its step times by the machine's speed (the lone stream's inter-token gap over the profile's "
                   "step: a VM's speed drifts between the profile and the run), `admit` sets --admit-ms to what a "
                   "16-token prompt's TTFT exceeds the simulated one by (the serving path's fixed cost), `both` "
                   "(the default when given) does both; reported beside the figures, with `speed` the machine's drift "
                   "from the probes to the run (its lone decode steps against the probes' scale; warned of past "
                   "10%%). On a GPU, `admit`: the card does not drift, and a lone stream's steps run faster than a "
                   "loaded card's")
    p.add_argument("--keep-gaps", action="store_true", help="keep every real request's inter-token gaps in the "
                   "JSON (`gaps_ms`, trace order)")
    p.add_argument("--keep-logs", default="", help="keep the real clusters' YAML, process logs and workers' step "
                   "logs (worker/step_log.py) in this folder (default: a temporary one, removed)")
    p.add_argument("--sim-only", action="store_true", help="simulate only; compare with --recorded if given")
    p.add_argument("--recorded", default="", help="serving_compare JSON to compare the simulations with")
    p.add_argument("--label", default="", help="suffix of the output file name")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="output folder")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so a SIGTERM stops the real cluster's processes too (LocalCluster's exit)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    signal.signal(signal.SIGTERM, _interrupt)
    a = build_parser().parse_args(argv)
    if a.repeats < 1 or a.client_processes < 0:
        raise SystemExit("--repeats must be at least 1 and --client-processes at least 0")
    a.client_processes = a.client_processes or (4 if a.device == "cuda" else 1)
    a.kv_gib = a.kv_gib or (10.0 if a.device == "cuda" else 0.25)
    if a.device == "cuda" and not a.tokenizer and not a.sim_only:
        raise SystemExit("--tokenizer is required on cuda")
    a.tokenizer = a.tokenizer or "smollm2"  # only a name for the simulated cluster's config
    a.backend = a.backend or Profile.load(a.profile).transfer.backend
    if not a.sim_only and a.backend not in known_backends():  # an analytic profile's "rdma", say
        raise SystemExit(f"--backend: the real cluster cannot move KV with {a.backend!r} (the profile's); pass one "
                         f"of {', '.join(known_backends())}")
    os.makedirs(a.out, exist_ok=True)
    recorded = recorded_runs(a.recorded) if a.recorded else {}
    if a.keep_logs:
        try:
            os.makedirs(a.keep_logs, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--keep-logs {a.keep_logs!r}: cannot make the folder: {e.strerror}") from None
    with contextlib.nullcontext(a.keep_logs) if a.keep_logs else tempfile.TemporaryDirectory() as folder:
        res = {f"{rate:g}": run_rate(a, rate, folder, recorded) for rate in (float(x) for x in a.rates.split(","))}
    out = {"profile": a.profile, "device": a.device, "args": {k: v for k, v in vars(a).items()}, "rates": res,
           "verdicts": tally(res)}
    if n := sum(out["verdicts"].values()):
        v = out["verdicts"]
        print(f"{v['within']} of {n} figures within {TOLERANCE:.0%} of the real ones; of the rest, {v['unresolved']} "
              "inside the real figure's own 90% interval (too few requests to tell), "
              f"{v['miss']} missed")
    name = f"sim_validate_{a.device}{'_' + a.label if a.label else ''}.json"
    with open(os.path.join(a.out, name), "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {os.path.join(a.out, name)}")
    picture = os.path.join(a.out, name.removesuffix(".json") + ".png")
    if plot(out, picture):  # where a real run (or a recorded one with its requests) is beside the simulation
        print(f"wrote {picture}")
    return out


if __name__ == "__main__":
    main()
