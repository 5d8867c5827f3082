"""Pool metrics from router snapshots: what the planner's policy reads.

A snapshot (`RouterActor.snapshot`, plain data) holds every worker the router knows with its latest Load report
and this router's requests in flight on it, and the cumulative buckets of the TTFT and inter-token-latency
histograms. Latency percentiles are taken over the requests between two snapshots, the way Prometheus'
`histogram_quantile(rate(...))` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deploy.planner import Sample

Buckets = Sequence[tuple[float, float]]  # (upper bound `le`, cumulative count), ascending, ending with +Inf

HISTOGRAM_OF = {"ttft_p90": "ttft", "itl_p90": "itl"}


def serving(snapshot: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Workers of `role` that take new requests (healthy, not draining)."""
    return [w for w in snapshot.get("workers", []) if w["role"] == role and w["healthy"] and not w["draining"]]


def queued_tokens(worker: dict[str, Any]) -> float:
    """Prompt tokens waiting for (or in) prefill on a worker: its own report, or the router's newer count."""
    load = worker.get("load") or {}
    return float(max(load.get("queued_prefill_tokens", 0), worker.get("in_flight_tokens", 0)))


def histogram_delta(prev: Buckets | None, cur: Buckets) -> list[tuple[float, float]]:
    """Per-bucket counts added since `prev`; all of `cur` if there is no `prev` or the counters restarted."""
    if not prev or len(prev) != len(cur) or any(c < p for (_, p), (_, c) in zip(prev, cur, strict=True)):
        return list(cur)
    return [(le, c - p) for (le, p), (_, c) in zip(prev, cur, strict=True)]


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of cumulative buckets, linear within a bucket; None if they count nothing."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):  # beyond the last finite bound: report that bound, as Prometheus does
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = le, count
    return lower


def pool_value(metric: str, role: str, snapshot: dict[str, Any], prev: dict[str, Any] | None) -> float | None:
    """The pool's metric now; None when nothing can be read (no serving replica, or no latency observed)."""
    workers = serving(snapshot, role)
    if metric in HISTOGRAM_OF:
        name = HISTOGRAM_OF[metric]
        before = (prev or {}).get("histograms", {}).get(name)
        return histogram_quantile(0.9, histogram_delta(before, snapshot["histograms"][name]))
    if not workers:
        return None
    if metric == "queued_tokens":
        return sum(queued_tokens(w) for w in workers) / len(workers)
    if metric == "kv_usage":
        return sum(float((w.get("load") or {}).get("kv_usage", 0.0)) for w in workers) / len(workers)
    raise ValueError(f"unknown metric {metric!r}")


def pool_sample(metric: str, role: str, snapshot: dict[str, Any], prev: dict[str, Any] | None, t: float) -> Sample:
    return Sample(t=t, value=pool_value(metric, role, snapshot, prev), ready=len(serving(snapshot, role)))
