"""What a simulation measures: latency distributions, goodput under SLO, and the router's histograms.

Distributions are log-binned histograms (bins 1% wide from 10 us to 3 hours), so a 24-hour run of a thousand
replicas keeps constant memory and its percentiles are within 1% of the exact ones; `keep_requests` also keeps
every request's figures (validation runs, tests). The router's own TTFT and ITL histograms (router/metrics.py
buckets) are kept as well: the planner's latency metrics read them, as they read the real router's.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

LOG_MIN, LOG_STEP, NBINS = math.log(1e-5), math.log(1.01), 1700  # 1e-5 s * 1.01**1700 = 2.2e2 * 1e5 s


class LogHistogram:
    """Counts (or weights) in 1%-wide log bins; quantiles return the bin's geometric middle."""

    __slots__ = ("counts", "total", "sum")

    def __init__(self) -> None:
        self.counts = [0.0] * NBINS
        self.total = 0.0
        self.sum = 0.0

    def add(self, x: float, w: float = 1.0) -> None:
        i = int((math.log(x) - LOG_MIN) / LOG_STEP) if x > 1e-5 else 0
        self.counts[i if i < NBINS else NBINS - 1] += w
        self.total += w
        self.sum += x * w

    def merge(self, other: LogHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.sum += other.sum

    def sparse(self) -> dict[int, float]:
        """The non-empty bins (what crosses a process boundary)."""
        return {i: c for i, c in enumerate(self.counts) if c}

    def absorb_sparse(self, bins: dict[int, float]) -> None:
        for i, c in bins.items():
            self.counts[i] += c
            self.total += c
            self.sum += c * math.exp(LOG_MIN + (i + 0.5) * LOG_STEP)

    def quantile(self, q: float) -> float:
        """The q-quantile (NaN when empty)."""
        if self.total <= 0:
            return float("nan")
        rank, seen = q * self.total, 0.0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c > 0:
                return math.exp(LOG_MIN + (i + 0.5) * LOG_STEP)
        return math.exp(LOG_MIN + (NBINS - 0.5) * LOG_STEP)

    def fraction_above(self, x: float) -> float:
        """Share of the weight above x (to bin precision)."""
        if self.total <= 0:
            return 0.0
        i = int((math.log(x) - LOG_MIN) / LOG_STEP) + 1 if x > 1e-5 else 0
        return sum(self.counts[max(i, 0):]) / self.total

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else float("nan")


class RouterHistogram:
    """A Prometheus-style histogram with the router's buckets; `cumulative()` is what a router snapshot holds."""

    __slots__ = ("bounds", "counts")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * (len(bounds) + 1)  # the last one is +Inf

    def add(self, x: float, w: float = 1.0) -> None:
        self.counts[bisect_left(self.bounds, x)] += w

    def cumulative(self) -> list[tuple[float, float]]:
        out, run = [], 0.0
        for le, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            run += c
            out.append((le, run))
        return out


@dataclass(frozen=True)
class SLO:
    """The service-level objective goodput counts against (benchmarks/serving.py's definition)."""

    ttft_s: float  # a request's time to first token must be <= this
    itl_s: float  # and the p99 of its own inter-token gaps <= this

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.itl_s > 0):
            raise ValueError("SLO thresholds must be positive")


def percentile(xs: list[float], p: float) -> float:
    """benchmarks/serving.py's percentile: linear between order statistics."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    return xs[f] + (xs[min(f + 1, len(xs) - 1)] - xs[f]) * (k - f)


def request_itl_p99(first_gap: float, steps_ms: list[float], gaps: int, exact: bool) -> float:
    """A request's p99 inter-token gap, seconds. `steps_ms`: the step segments since its first decode step.

    Exact (one segment per step): the gaps are the first gap and every later step. Otherwise a segment stands for
    a run of steps whose longest is its value; the p99 is then taken as if its largest value occurred on every
    gap but the first, which is conservative (the top gaps of a run of at least two).
    """
    if gaps <= 0:
        return 0.0
    if exact:
        return percentile([first_gap] + [m / 1e3 for m in steps_ms[1:gaps]], 99)
    top = max(steps_ms) / 1e3 if steps_ms else first_gap
    return percentile([first_gap, top][:gaps], 99) if gaps <= 2 else _p99_with_two_tops(first_gap, top, gaps)


def _p99_with_two_tops(first_gap: float, top: float, n: int) -> float:
    """p99 of n gaps where one is `first_gap` and the rest are at most `top`, the largest two of them `top`."""
    k = (n - 1) * 0.99
    hi = max(first_gap, top)  # order statistics from the top: xs[n-1] = hi, xs[n-2] = top, below that top again
    return top + (hi - top) * (k - (n - 2)) if k >= n - 2 else top


# Where a request's handoff from prefill to decode worker stands (worker/step_log.py marks them on real workers):
# the prefill worker answers the router, Decode reaches the decode worker, its blocks are reserved, the read ends,
# the first step that decodes it starts, and ends.
HANDOFF_MARKS = ("prefill_answered", "pull_received", "pull_reserved", "pull_read", "join_start", "join_end")
HANDOFF_PHASES = ("relay_ms", "reserve_wait_ms", "read_ms", "join_wait_ms", "join_step_ms", "worker_gap_ms")


def handoff_phases(marks: list[dict[str, float]]) -> dict[str, Any]:
    """The handoffs' phases, between consecutive HANDOFF_MARKS, and the whole (`worker_gap_ms`: the first gap but
    for the legs to the client): p50 / p90 / max of each over the requests with every mark (`pulls` counts them),
    and each request's phases in `each` (HANDOFF_PHASES order, the order the marks were given)."""
    spans = list(zip(HANDOFF_MARKS, HANDOFF_MARKS[1:], strict=False)) + [(HANDOFF_MARKS[0], HANDOFF_MARKS[-1])]
    each = [[round((m[b] - m[a]) * 1e3, 2) for a, b in spans] for m in marks if all(k in m for k in HANDOFF_MARKS)]
    out: dict[str, Any] = {"pulls": len(each)}
    for i, name in enumerate(HANDOFF_PHASES):
        xs = sorted(row[i] for row in each)
        if xs:
            out[name] = {"p50": round(percentile(xs, 50), 2), "p90": round(percentile(xs, 90), 2), "max": xs[-1]}
    return out | {"each": each}
