"""Chaos soak (issue 20): a supervised local cluster (`disagg serve`'s code path) under a mix of requests while
workers are killed (-9), frozen (SIGSTOP/SIGCONT) and stopped (SIGTERM) on a schedule. Then it checks that

  * every request the client did not cut itself got its whole answer: a stream ends with [DONE], no error event
    and no 5xx reached a client (errors surfaced to clients: the goal is 0);
  * every greedy and seeded answer equals the single-process engine's (engine.llm.LLM, same model);
  * every bad input got a 4xx with an error body;
  * afterwards each worker's free KV blocks equal its total, with no lease, no running request, no quarantined
    block; no process of the run outlives it; the router's memory stays flat.

    python -m benchmarks.chaos --requests 10000 --baseline 1000 --out benchmarks/results/chaos.json

The figures: requests, faults by kind, migrations (the router's counter), errors, leaked blocks, and TTFT / ITL
p50 and p99 as the clients measured them, in a phase without faults (--baseline) and in the chaos phase.
Workload: benchmarks/chaos_load.py; faults: benchmarks/chaos_faults.py; tests/test_chaos.py runs a small soak.
`--ray` deploys the same cluster on a local Ray head instead, with two router replicas, and kills router replicas
too (benchmarks/chaos_ray.py; tests/test_chaos_ray.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

from benchmarks.chaos_faults import ACTIONS, RAY_ACTIONS, Chaos, FaultPlan, LocalTarget, Target
from benchmarks.chaos_load import Mix, Result, Spec, make_specs, run_all
from benchmarks.serving import percentile
from deploy.config import ClusterConfig
from deploy.local import LocalCluster, RestartPolicy
from proto import disagg_pb2, disagg_pb2_grpc
from proto.convert import WorkerLoad, load_from_proto
from worker.ports import free_port

log = logging.getLogger("chaos")


@dataclass(frozen=True)
class SoakConfig:
    """One soak: the cluster, the load, the faults."""

    requests: int = 300  # requests of the chaos phase
    baseline: int = 0  # requests of a phase without faults first (for the latency comparison); 0: none
    concurrency: int = 16  # requests in flight at once (closed loop)
    prefill: int = 1  # prefill workers
    decode: int = 2  # decode workers (at least 2: a decode worker is hit only while another one serves)
    seed: int = 0  # the request mix and the fault schedule
    mix: Mix = field(default_factory=Mix)  # kinds of request
    faults: FaultPlan = field(default_factory=FaultPlan)  # what breaks, how often
    transfer_backend: str = "tcp"  # nixl | tcp
    settle_s: float = 60.0  # after the run: how long workers get to come back and free their blocks

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.prefill < 0 or self.decode < 2:
            raise ValueError("a soak needs requests >= 1, concurrency >= 1, prefill >= 0 and decode >= 2")


def cluster_yaml(cfg: SoakConfig) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "engine": {"cache": {"num_blocks": 256}, "scheduler": {"max_num_seqs": 32, "max_num_batched_tokens": 1024}},
        "transfer": {"backend": cfg.transfer_backend, "timeout_s": 5, "lease_s": 10, "drain_timeout_s": 5},
        "router": {"health_interval_s": 0.5, "rpc_timeout_s": 2.0, "worker_timeout_s": 30, "max_migrations": 5},
        "pools": {"prefill": {"replicas": cfg.prefill}, "decode": {"replicas": cfg.decode}},
    }


def references(specs: list[Spec]) -> dict[tuple[str, int, int | None], str]:
    """The single-process engine's text for every distinct greedy / seeded request."""
    from engine.llm import LLM
    from engine.request import SamplingParams

    keys = sorted({s.reference_key for s in specs if s.kind in ("greedy", "seeded")}, key=str)
    params = [SamplingParams(max_tokens=n, temperature=0.0) if seed is None else
              SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=seed) for _, n, seed in keys]
    outs = LLM("smollm2", num_blocks=512).generate([p for p, _, _ in keys], params)
    return {k: o.text for k, o in zip(keys, outs, strict=True)}


class RSSWatch:
    """The router process's resident memory (MiB), sampled every `every_s` in a thread."""

    def __init__(self, cluster: LocalCluster, every_s: float = 1.0) -> None:
        self.cluster, self.every_s, self.samples = cluster, every_s, []  # (seconds since start, MiB)
        self._stop, self._began = threading.Event(), time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                status = Path(f"/proc/{self.cluster.procs['router'].popen.pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"VmRSS:\s+(\d+)", status)
            if m:  # none in a process that is exiting
                self.samples.append((round(time.monotonic() - self._began, 1), round(int(m.group(1)) / 1024, 1)))

    def stop(self) -> dict[str, Any]:
        """Growth from the end of warm-up (the first tenth of the samples) to the end."""
        self._stop.set()
        self._thread.join()
        mib = [m for _, m in self.samples]
        if len(mib) < 2:
            return {"samples": self.samples}
        warm = mib[max(1, len(mib) // 10)]
        return {"after_warmup_mib": warm, "end_mib": mib[-1], "max_mib": max(mib), "growth_mib": mib[-1] - warm,
                "samples": self.samples}


def cut_by_router_kill(r: Result, windows: Sequence[tuple[float, float]]) -> bool:
    """The request's TCP connection died while a router replica was down (Chaos.windows): the killed router process
    held it. Its client got no answer and no error from a live router; the one loss a router kill is expected to
    cause, counted apart from errors."""
    return r.connection_lost and any(a <= r.end and r.start <= b for a, b in windows)


@dataclass
class Outcome:
    """What went wrong, request by request (evaluate)."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    wrong: list[dict[str, Any]] = field(default_factory=list)
    undone: int = 0  # streams that began and never ended
    bad_ok: int = 0  # bad inputs rejected with a 4xx
    router_cut: int = 0  # connections lost to a router replica's kill
    router_cut_log: list[dict[str, Any]] = field(default_factory=list)  # each one, timed from its window's start


def classify(results: list[Result], refs: dict[tuple[str, int, int | None], str],
             windows: Sequence[tuple[float, float]]) -> Outcome:
    o = Outcome()
    for r in results:
        s = r.spec
        if cut_by_router_kill(r, windows):
            o.router_cut += 1
            a = max(a for a, _ in windows if a <= r.end)
            o.router_cut_log.append({"index": s.index, "from_s": round(r.start - a, 3), "to_s": round(r.end - a, 3),
                                     "chunks": len(r.chunk_times), "error": r.error[:160]})
        elif s.kind == "bad":
            o.bad_ok += not r.error
            if r.error:
                o.errors.append({"index": s.index, "kind": s.kind, "error": r.error})
        elif r.cut:
            continue
        elif r.error or not r.done:
            o.errors.append({"index": s.index, "kind": s.kind, "stream": s.stream, "status": r.status,
                             "error": r.error or "no [DONE]"})
            o.undone += int(s.stream and r.status == 200 and not r.done)  # a stream that began and never ended
        elif s.kind in ("greedy", "seeded") and r.text != refs[s.reference_key]:
            o.wrong.append({"index": s.index, "kind": s.kind, "max_tokens": s.max_tokens, "got": r.text,
                            "want": refs[s.reference_key]})
    return o


def evaluate(results: list[Result], refs: dict[tuple[str, int, int | None], str],
             windows: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """What the clients got, against what they should have; `windows`: when router replicas were down."""
    o = classify(results, refs, windows)
    kinds = {k: sum(1 for r in results if r.spec.kind == k) for k in ("greedy", "seeded", "abort", "disconnect",
                                                                       "bad")}
    timed = [r for r in results if r.spec.kind == "greedy" and r.spec.stream and not r.error and r.done]
    ttft = [r.ttft for r in timed if r.ttft is not None]
    itl = [x for r in timed for x in r.itls]
    return {"requests": len(results), "kinds": kinds, "cut_by_client": sum(r.cut for r in results),
            "cut_by_router_kill": o.router_cut, "router_cut_log": o.router_cut_log,
            "errors_to_clients": len([e for e in o.errors if e["kind"] != "bad"]), "bad_inputs_rejected": o.bad_ok,
            "streams_without_done": o.undone, "wrong_text": len(o.wrong), "error_kinds": error_kinds(o.errors),
            "errors": o.errors[:50], "wrong": o.wrong[:20],
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "wall_s": round(max(r.end for r in results) - min(r.start for r in results), 1)}


def error_kinds(errors: list[dict[str, Any]]) -> dict[str, int]:
    """How many errors of each kind: the message with addresses and ids taken out, most frequent first."""
    counts = collections.Counter(re.sub(r"\d+\.\d+\.\d+\.\d+:\d+|(chat)?cmpl-\w+|\d+(\.\d+)?s\b", "_", e["error"])[:200]
                                 for e in errors)
    return dict(counts.most_common())


def router_counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


LOAD_KEYS = ("kv_blocks_free", "kv_blocks_total", "kv_blocks_quarantined", "leased_requests", "num_running",
             "num_waiting", "num_receiving_kv")  # a worker's Load figures the report keeps


def idle(rep: WorkerLoad) -> bool:
    """The worker holds nothing: every KV block free, no lease, no request, no quarantined block."""
    return rep.kv_blocks_free == rep.kv_blocks_total and not (
        rep.leased_requests or rep.num_running or rep.num_waiting or rep.kv_blocks_quarantined)


def settle(cluster: LocalCluster, timeout_s: float) -> dict[str, dict[str, float]]:
    """Wait until every worker is back up and holds nothing; each worker's last Load figures."""
    deadline, out = time.monotonic() + timeout_s, {}
    for name in [n for n in cluster.procs if n != "router"]:
        while True:
            p = cluster.procs[name]
            try:
                rep = worker_load(p.address) if p.state == "up" and p.popen.poll() is None else None
            except grpc.RpcError:
                rep = None
            if (rep is not None and idle(rep)) or p.state == "down" or time.monotonic() > deadline:
                out[name] = {k: float(rep.stats.get(k, 0)) for k in LOAD_KEYS} if rep else {"state": p.state}
                break
            time.sleep(0.5)
    return out


@dataclass
class Deployment:
    """What a phase needs from the cluster under test, local (here) or on Ray (benchmarks/chaos_ray.py)."""

    url: str  # the router's base URL
    target: Target  # what the faults act on
    migrations: Callable[[], float]  # requests moved between decode workers so far (every router replica's)


def run_phase(dep: Deployment, specs: list[Spec], cfg: SoakConfig, refs: dict, faults: bool) -> dict[str, Any]:
    chaos = Chaos(dep.target, cfg.faults, seed=cfg.seed) if faults else None
    migrations = dep.migrations()
    if chaos:
        chaos.start()
    try:
        step = max(1, len(specs) // 10)

        def progress(done: int) -> None:
            if done % step == 0:
                log.info("%d of %d requests done; faults so far: %d", done, len(specs),
                         len(chaos.faults) if chaos else 0)

        results = asyncio.run(run_all(dep.url, specs, cfg.concurrency, progress=progress))
    finally:
        if chaos:
            chaos.stop()
    out = evaluate(results, refs, chaos.windows() if chaos else ())
    out["migrations"] = dep.migrations() - migrations
    if chaos:
        out["faults"] = {a: sum(1 for f in chaos.faults if f.action == a) for a in cfg.faults.actions}
        out["fault_log"] = [dataclasses.asdict(f) for f in chaos.faults]
        out["router_kills"] = [dataclasses.asdict(k) for k in chaos.router_kills]
        out["router_kills_skipped"] = chaos.router_kills_skipped
    return out


def local_deployment(cluster: LocalCluster) -> Deployment:
    return Deployment(cluster.url, LocalTarget(cluster),
                      lambda: router_counter(cluster.url, "disagg_router_migrations_total"))


def soak(cfg: SoakConfig, workdir: str) -> dict[str, Any]:
    """The whole soak (module docstring); returns the report."""
    specs = make_specs(cfg.baseline + cfg.requests, cfg.seed, cfg.mix)
    t0 = time.monotonic()
    refs = references(specs)
    log.info("%d reference outputs in %.0fs", len(refs), time.monotonic() - t0)
    path = os.path.join(workdir, "chaos.yaml")
    Path(path).write_text(yaml.safe_dump(cluster_yaml(cfg)))
    cluster = LocalCluster(ClusterConfig.load(path), path, router_port=free_port(), quiet=True, log_dir=workdir,
                           restart=RestartPolicy(max_restarts=10**6, backoff_s=0.5, max_backoff_s=5.0))
    report: dict[str, Any] = {"config": _plain(cfg), "references": len(refs)}
    with cluster:
        rss = RSSWatch(cluster)
        if cfg.baseline:
            report["baseline"] = run_phase(local_deployment(cluster), specs[:cfg.baseline], cfg, refs, faults=False)
        report["chaos"] = run_phase(local_deployment(cluster), specs[cfg.baseline:], cfg, refs, faults=True)
        report["workers_after"] = settle(cluster, cfg.settle_s)
        report["router_rss"] = rss.stop()
        report["restarts"] = {n: len(p.restarts) for n, p in cluster.procs.items()}
    time.sleep(0.5)
    report["leaked_processes"] = [pid for pid in cluster.pids if _alive(pid)]
    return tally_after(report)


def tally_after(report: dict[str, Any]) -> dict[str, Any]:
    """Add the leak figures from `workers_after` (each worker's Load once settled)."""
    after = report["workers_after"]
    report["leaked_blocks"] = sum(int(w["kv_blocks_total"] - w["kv_blocks_free"]) for w in after.values()
                                  if "kv_blocks_total" in w)
    report["workers_not_answering"] = [n for n, w in after.items() if "kv_blocks_total" not in w]
    return report


def worker_load(address: str) -> WorkerLoad:
    with grpc.insecure_channel(address) as ch:
        return load_from_proto(disagg_pb2_grpc.WorkerStub(ch).Load(disagg_pb2.LoadRequest(), timeout=10))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _plain(cfg: SoakConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="requests of the chaos phase (default 300)")
    p.add_argument("--baseline", type=int, default=0, help="requests of a fault-free phase first (default 0)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=2, help="decode workers, at least 2 (default 2)")
    p.add_argument("--interval", type=float, default=8.0, help="mean seconds between faults (default 8)")
    p.add_argument("--actions", help=f"faults to inject, in turn (default {','.join(ACTIONS)}; with --ray "
                                     f"{','.join(RAY_ACTIONS)})")
    p.add_argument("--ray", action="store_true", help="deploy on a local Ray head (deploy/ray, 2 router replicas) "
                                                      "instead of the local launcher (benchmarks/chaos_ray.py)")
    p.add_argument("--transfer-backend", choices=["nixl", "tcp"], default="tcp", help="KV transfer (default tcp)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix and the fault schedule")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--workdir", help="cluster config and process logs (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    a = parse_args(argv)
    actions = a.actions.split(",") if a.actions else RAY_ACTIONS if a.ray else ACTIONS
    cfg = SoakConfig(requests=a.requests, baseline=a.baseline, concurrency=a.concurrency, prefill=a.prefill,
                     decode=a.decode, seed=a.seed, transfer_backend=a.transfer_backend,
                     faults=FaultPlan(interval_s=a.interval, actions=tuple(actions)))
    workdir = a.workdir or tempfile.mkdtemp(prefix="chaos-")
    os.makedirs(workdir, exist_ok=True)
    if a.ray:
        from benchmarks.chaos_ray import soak_ray  # sets Ray's loopback environment before Ray is imported

        report = soak_ray(cfg, workdir)
    else:
        report = soak(cfg, workdir)
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(json.dumps(summary(report, workdir), indent=1))


def summary(report: dict[str, Any], workdir: str) -> dict[str, Any]:
    """The report without its long lists (fault log, error messages, RSS samples)."""
    long = ("fault_log", "errors", "wrong", "samples", "router_kills")
    out = {k: v for k, v in report.items() if k not in ("config", "baseline", "chaos", "router_rss")}
    for phase in ("baseline", "chaos"):
        out[phase] = {k: v for k, v in report.get(phase, {}).items() if k not in long}
    out["router_rss"] = {k: v for k, v in report["router_rss"].items() if k not in long}
    if "processes" in out["router_rss"]:  # Ray: one entry per router replica process, each with its samples
        out["router_rss"]["processes"] = [{k: v for k, v in p.items() if k != "rss"}
                                          for p in out["router_rss"]["processes"]]
    out["logs"] = workdir
    return out


if __name__ == "__main__":
    main()
