"""Prometheus metrics of one router: request latencies and counts, plus every worker's latest Load report."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.registry import WorkerRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0)

# LoadReport field -> help text; each becomes the gauge disagg_worker_<field>{worker, role}.
LOAD_GAUGES = {
    "num_waiting": "Requests queued on the worker",
    "num_running": "Requests running on the worker",
    "queued_prefill_tokens": "Prompt tokens waiting to be prefilled on the worker",
    "kv_usage": "Fraction of the worker's KV blocks in use",
    "kv_blocks_free": "Free KV blocks on the worker",
    "transfers": "KV transfers the worker has done since start",
    "transfer_bytes": "KV bytes the worker has transferred since start",
    "transfer_seconds": "Seconds the worker has spent on KV transfers since start",
    "transfer_failures": "KV transfers that failed on the worker since start",
    "recomputes": "Prompts the worker recomputed because a KV pull failed, since start",
    "leases_expired": "KV leases that expired unclaimed on the worker since start",
}


class WorkerCollector(Collector):
    """Reads the registry at scrape time, so gauges always show the latest poll (and removed workers vanish)."""

    def __init__(self, workers: WorkerRegistry) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        healthy = GaugeMetricFamily("disagg_worker_healthy", "1 if the worker answered its last poll", labels=labels)
        in_flight = GaugeMetricFamily("disagg_worker_in_flight", "Requests this router has running on the worker",
                                      labels=labels)
        gauges = {f: GaugeMetricFamily(f"disagg_worker_{f}", text, labels=labels) for f, text in LOAD_GAUGES.items()}
        for w in self._workers.workers():
            values = [w.address, w.role or "unknown"]
            healthy.add_metric(values, 1.0 if w.healthy else 0.0)
            in_flight.add_metric(values, float(w.in_flight))
            if w.load is not None:
                for f, gauge in gauges.items():
                    gauge.add_metric(values, float(getattr(w.load, f)))
        yield healthy
        yield in_flight
        yield from gauges.values()


class RouterMetrics:
    """The app's own `CollectorRegistry` (not the process-global one, so several apps can live in one process)."""

    def __init__(self, workers: WorkerRegistry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("disagg_ttft_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("disagg_inter_token_latency_seconds", "Gap between successive token chunks",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("disagg_e2e_latency_seconds", "Arrival to last token of finished requests",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("disagg_requests", "Requests by endpoint and HTTP status (499: client went away)",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("disagg_generation_tokens", "Tokens generated", registry=r)
        r.register(WorkerCollector(workers))

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
