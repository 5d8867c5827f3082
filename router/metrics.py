"""Prometheus metrics of one router: request latencies and counts, plus every worker's latest Load report.

Every figure of a worker's Load report is exported as the gauge `disagg_worker_<name>{worker, role}`, with the
help text the worker declared (engine/stats.py): no list of them is kept here.

KV-aware routing: each worker's prefix-cache hit rate (`disagg_worker_prefix_cache_hit_rate`, from the
`prefix_*_tokens` counters of its Load report), the blocks the router's index holds for it, and the router's own
prediction for what it routed (`disagg_router_predicted_*`: how many of each prompt's full blocks the chosen
worker was expected to have cached).
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from engine.gc_heap import WARN_PAUSE_S, GCPauses
from router.registry import WorkerRegistry

if TYPE_CHECKING:
    from router.policy import Placement

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0)

GC_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)

log = logging.getLogger(__name__)

OVERLAP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)


class WorkerCollector(Collector):
    """Reads the registry at scrape time, so gauges always show the latest poll (and removed workers vanish)."""

    def __init__(self, workers: WorkerRegistry) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        healthy = GaugeMetricFamily("disagg_worker_healthy", "1 if the worker answered its last poll", labels=labels)
        in_flight = GaugeMetricFamily("disagg_worker_in_flight", "Requests this router has running on the worker",
                                      labels=labels)
        gauges: dict[str, GaugeMetricFamily] = {}
        hit_rate = GaugeMetricFamily("disagg_worker_prefix_cache_hit_rate",
                                     "Prompt tokens found in the worker's prefix cache / tokens looked up, since start",
                                     labels=labels)
        indexed = GaugeMetricFamily("disagg_router_kv_index_blocks",
                                    "KV blocks the router's index says the worker caches (from its KV events)",
                                    labels=labels)
        index = self._workers.kv_index
        for w in self._workers.workers():
            values = [w.address, w.role or "unknown"]
            healthy.add_metric(values, 1.0 if w.healthy else 0.0)
            in_flight.add_metric(values, float(w.in_flight))
            indexed.add_metric(values, float(index.num_blocks(w.address)))
            if w.load is not None:
                for name, value in w.load.stats.items():
                    if name not in gauges:
                        text = self._workers.stat_help.get(name, f"{name} as the worker reports it")
                        gauges[name] = GaugeMetricFamily(f"disagg_worker_{name}", text, labels=labels)
                    gauges[name].add_metric(values, value)
                q = w.load.get("prefix_query_tokens")
                hit_rate.add_metric(values, w.load.get("prefix_hit_tokens") / q if q else 0.0)
        yield healthy
        yield in_flight
        yield from gauges.values()
        yield hit_rate
        yield indexed


class BulkHistogram(Histogram):
    """A histogram that also takes observations already counted per bucket (`HistogramTally`'s)."""

    @property
    def bounds(self) -> list[float]:
        """Every bucket's upper bound, +Inf last."""
        return list(self._upper_bounds)

    def add(self, counts: list[int], total: float) -> None:
        """Add `counts[i]` observations to bucket i (as `observe` would have) and `total` to the sum."""
        for bucket, n in zip(self._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        self._sum.inc(total)


class HistogramTally:
    """One request's observations of a histogram, added to it every `flush_every` observations and at the end.

    A streamed token then costs a bisect and two adds instead of `Histogram.observe` (a lock per value, and in
    multiprocess mode an mmap write per bucket increment). The histogram lags a stream by at most `flush_every`
    observations; `flush` must be called when the request ends (the router does so in a `finally`).
    """

    def __init__(self, histogram: BulkHistogram, flush_every: int = 64) -> None:
        self._histogram = histogram
        self._bounds = histogram.bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = 0
        self._flush_every = flush_every

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1  # Histogram.observe's rule: first bound >= amount
        self._sum += amount
        self._pending += 1
        if self._pending >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._histogram.add(self._counts, self._sum)
            self._counts = [0] * len(self._bounds)
            self._sum, self._pending = 0.0, 0


class RouterMetrics:
    """The app's own `CollectorRegistry` (not the process-global one, so several apps can live in one process)."""

    def __init__(self, workers: WorkerRegistry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("disagg_ttft_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = BulkHistogram("disagg_inter_token_latency_seconds", "Gap between successive token chunks",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("disagg_e2e_latency_seconds", "Arrival to last token of finished requests",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("disagg_requests", "Requests by endpoint and HTTP status (499: client went away)",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("disagg_generation_tokens", "Tokens generated", registry=r)
        self.migrations = Counter("disagg_router_migrations", "Requests moved to another decode worker mid-stream "
                                  "because theirs was lost", registry=r)
        self.routed = Counter("disagg_router_routed", "Requests routed, by phase and worker", ["phase", "worker"],
                              registry=r)
        self.prompt_blocks = Counter("disagg_router_prompt_blocks", "Full prompt blocks of routed requests",
                                     ["phase", "worker"], registry=r)
        self.predicted_hit_blocks = Counter(
            "disagg_router_predicted_hit_blocks",
            "Of those, blocks the router predicted the chosen worker had cached (a leading run, from its index)",
            ["phase", "worker"], registry=r)
        self.predicted_overlap = Histogram("disagg_router_predicted_overlap",
                                           "Predicted cached fraction of each routed prompt's full blocks", ["phase"],
                                           buckets=OVERLAP_BUCKETS, registry=r)
        self.gc_pause = Histogram("disagg_router_gc_pause_seconds", "Garbage collections that stopped a router process "
                                  "5 ms or longer (every stream it relays waits them out)", buckets=GC_BUCKETS,
                                  registry=r)
        self.gc_pauses = GCPauses()  # started and stopped with the app (router/app.py's lifespan)
        self._worker_collector = WorkerCollector(workers)
        r.register(self._worker_collector)

    def observe_placement(self, phase: str, placement: Placement | None) -> None:
        """Count one routing decision and its predicted prefix overlap."""
        if placement is None:
            return
        worker = placement.worker.address
        self.routed.labels(phase=phase, worker=worker).inc()
        if placement.prompt_blocks:
            self.prompt_blocks.labels(phase=phase, worker=worker).inc(placement.prompt_blocks)
            self.predicted_hit_blocks.labels(phase=phase, worker=worker).inc(placement.matched_blocks)
            self.predicted_overlap.labels(phase=phase).observe(placement.overlap)

    def take_gc_pauses(self) -> None:
        """Move this process's long collections into `gc_pause` (the app calls it every second and per scrape)."""
        for p in self.gc_pauses.take_long():
            self.gc_pause.observe(p.seconds)
            if p.seconds >= WARN_PAUSE_S:
                log.warning("a generation-%d garbage collection stopped the router for %.0f ms", p.generation,
                            p.seconds * 1e3)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type. With several router processes (`router.processes`), the
        request counters and histograms are summed over all of them (Prometheus' multiprocess mode: each process
        writes its values to files in PROMETHEUS_MULTIPROC_DIR); worker figures come from this process's polls,
        which every process makes, except `in_flight`, which counts this process's requests."""
        self.take_gc_pauses()
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        merged.register(self._worker_collector)
        return generate_latest(merged), CONTENT_TYPE_LATEST
