"""A large fleet as cells: C copies of one cluster (router + pools + planner), each serving a random C-th of the
traffic, simulated in parallel processes and merged into one result.

This is how a fleet of this code is deployed at scale: one router is one Python process (it streams every token
of every request), so thousands of GPUs sit behind several routers, each with its own deployment and planner
(`disagg deploy` per cell) and a load balancer in front that spreads requests evenly. A cell's pools and
autoscaling bounds are the fleet's divided by C (rounded up). Each process draws the whole workload from the
same seed and keeps its cells' share of it (request i goes to cell `hash(seed, i) mod C`), so cells need no
communication and the merged run is the same whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from deploy.config import ClusterConfig
from simulator.cluster import Chunk, Cluster
from simulator.collector import Collector
from simulator.config import SimConfig
from simulator.profile import Profile


def cell_config(cfg: ClusterConfig, cells: int) -> ClusterConfig:
    """The fleet's cluster config for one of `cells` cells: replicas, autoscaling bounds and steps divided (rounded
    up), so the cells' planners together move the fleet as fast as the fleet's planner would."""
    def share(n: int) -> int:
        return max(1, math.ceil(n / cells)) if n else 0

    pools = {r: dataclasses.replace(cfg.pool(r), replicas=share(cfg.pool(r).replicas)) for r in ("prefill", "decode")}
    auto = cfg.autoscaling
    scaled = {r: dataclasses.replace(p, min_replicas=share(p.min_replicas), max_replicas=share(p.max_replicas),
                                     max_step=share(p.max_step))
              for r in ("prefill", "decode") if (p := auto.pool(r)) is not None}
    return dataclasses.replace(cfg, prefill=pools["prefill"], decode=pools["decode"],
                               autoscaling=dataclasses.replace(auto, **scaled))


def cell_share(chunks: Iterable[Chunk], cell: int, cells: int, seed: int) -> Iterator[Chunk]:
    """The arrivals of one cell: each request goes to a cell drawn at random (the same draw in every process)."""
    rng = np.random.default_rng([seed, 99])
    for times, prompts, outputs in chunks:
        mine = np.flatnonzero(rng.integers(0, cells, size=len(times)) == cell) if cells > 1 else range(len(times))
        yield [times[i] for i in mine], [prompts[i] for i in mine], [outputs[i] for i in mine]


def run_cell(job: tuple[int, int, ClusterConfig, SimConfig, Profile, Profile | None, Callable[[], Iterable[Chunk]],
                        float | None]) -> tuple[dict[str, Any], Collector, list[dict[str, Any]]]:
    """Simulate one cell: (its result, its collector, its intervals' histograms for merging the timeline)."""
    cell, cells, cfg, sim, prefill, decode, workload, duration = job
    c = Cluster(cell_config(cfg, cells), sim, prefill, decode)
    c.collector.keep_intervals = True
    result = c.run(cell_share(workload(), cell, cells, sim.seed), duration)
    for d in result["decisions"]:
        d["cell"] = cell
    return result, c.collector, c.collector.intervals


def run_fleet(cfg: ClusterConfig, sim: SimConfig, prefill: Profile, decode: Profile | None,
              workload: Callable[[], Iterable[Chunk]], duration: float | None, cells: int, processes: int,
              only: int = 0) -> dict[str, Any]:
    """Every cell, `processes` at a time, merged. `workload` makes the (whole) arrivals afresh in each process.
    `only` > 0 simulates just the first `only` cells (a cheaper look at a fleet whose cells are alike)."""
    jobs = [(i, cells, cfg, sim, prefill, decode, workload, duration) for i in range(cells)][:only or cells]
    if processes > 1 and cells > 1:
        # spawned, not forked: a fork copies the parent's threads' locks (gRPC, OpenMP) mid-use, and a pool of forked
        # workers once hung in a test run for good
        with mp.get_context("spawn").Pool(min(processes, cells)) as pool:
            parts = pool.map(run_cell, jobs, chunksize=1)
    else:
        parts = [run_cell(j) for j in jobs]
    return merge(parts, sim, cells)


def merge(parts: list[tuple[dict[str, Any], Collector, list[dict[str, Any]]]], sim: SimConfig, cells: int
          ) -> dict[str, Any]:
    """One result from the cells' results: distributions and counts summed, the timeline summed row by row."""
    results, collectors = [p[0] for p in parts], [p[1] for p in parts]
    total = Collector(collectors[0].slo)
    for c in collectors:
        total.absorb(c)
    duration = max(r["summary"]["duration_s"] for r in results)
    pools: dict[str, dict[str, Any]] = {}
    for r in results:
        for role, p in r["pools"].items():
            acc = pools.setdefault(role, {**p, "started": 0, "replica_hours": 0.0, "gpu_hours": 0.0, "steps": 0,
                                          "now": {"starting": 0, "ready": 0, "draining": 0}})
            for k in ("started", "replica_hours", "gpu_hours", "steps"):
                acc[k] += p[k]
            for k in acc["now"]:
                acc["now"][k] += p["now"][k]
    decisions = sorted((d for r in results for d in r["decisions"]), key=lambda d: (d["t"], d["cell"]))
    return {"summary": total.summary(duration), "pools": pools, "profiles": results[0]["profiles"],
            "decisions": decisions, "timeline": merge_timelines([p[0]["timeline"] for p in parts],
                                                                [p[2] for p in parts], sim.sample_s),
            "gpu_hours": round(sum(p["gpu_hours"] for p in pools.values()), 4), "cells": cells,
            "still_in_flight": sum(r["still_in_flight"] for r in results),
            "end_s": max(r["end_s"] for r in results)}


def merge_timelines(timelines: list[list[dict[str, Any]]], intervals: list[list[dict[str, Any]]],
                    interval_s: float) -> list[dict[str, Any]]:
    from simulator.collector import _ms
    from simulator.metrics import LogHistogram

    rows = []
    for k in range(min(len(t) for t in timelines)):
        cell_rows, ivs = [t[k] for t in timelines], [iv[k] for iv in intervals]
        arrivals, done = sum(i["arrivals"] for i in ivs), sum(i["done"] for i in ivs)
        row: dict[str, Any] = {
            "t": cell_rows[0]["t"], "arrivals_s": round(arrivals / interval_s, 3),
            "prompt_mean": round(sum(i["prompt_tokens"] for i in ivs) / arrivals, 1) if arrivals else None,
            "output_mean": round(sum(i["output_tokens"] for i in ivs) / arrivals, 1) if arrivals else None,
            "done_s": round(done / interval_s, 3),
            "slo_met": round(sum(i["good"] for i in ivs) / done, 4) if done else None,
            "gpus": sum(r["gpus"] for r in cell_rows)}
        for name in ("ttft", "itl"):
            h = LogHistogram()
            for i in ivs:
                h.absorb_sparse(i[name])
            row[f"{name}_p99_ms"] = _ms(h.quantile(0.99))
        for role in ("prefill", "decode"):
            if cell_rows[0].get(role):
                row[role] = {k: (None if any(r[role][k] is None for r in cell_rows) else
                                 sum(r[role][k] for r in cell_rows)) for k in cell_rows[0][role]}
        rows.append(row)
    return rows
