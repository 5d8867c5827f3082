"""Per-run bookkeeping: every request's outcome into distributions, and an interval timeline for the plots."""

from __future__ import annotations

import math
from typing import Any

from router.metrics import ITL_BUCKETS, LATENCY_BUCKETS
from simulator.metrics import SLO, LogHistogram, RouterHistogram


class Interval:
    """What happened since the last timeline row."""

    def __init__(self) -> None:
        self.arrivals = 0  # requests that arrived
        self.prompt_tokens = 0  # their prompt tokens
        self.output_tokens = 0  # their wanted output tokens
        self.done = 0  # requests that finished
        self.good = 0  # of which met the SLO
        self.ttft = LogHistogram()  # TTFT of requests whose first token came
        self.itl = LogHistogram()  # every inter-token gap (token-weighted)


class Collector:
    """Latency distributions, SLO counts, the router's histograms and the timeline of one run."""

    def __init__(self, slo: SLO, keep_requests: bool = False) -> None:
        self.slo = slo
        self.ttft, self.e2e, self.itl, self.req_itl = LogHistogram(), LogHistogram(), LogHistogram(), LogHistogram()
        self.router = {"ttft": RouterHistogram(LATENCY_BUCKETS), "itl": RouterHistogram(ITL_BUCKETS)}
        self.arrived = self.completed = self.failed = self.good = self.ttft_ok = self.itl_ok = 0
        self.output_tokens = 0
        self.recomputes = 0
        self.requests: list[tuple[float, int, int, float, float, float]] | None = [] if keep_requests else None
        self.handoffs: list[dict[str, float]] = []  # with keep_requests: each pulled request's marks (SimRequest)
        self.iv = Interval()
        self.timeline: list[dict[str, Any]] = []
        self.keep_intervals = False  # also keep each interval's counts and histograms (to merge cells' timelines)
        self.intervals: list[dict[str, Any]] = []

    def arrival(self, prompt: int, output: int) -> None:
        self.arrived += 1
        self.iv.arrivals += 1
        self.iv.prompt_tokens += prompt
        self.iv.output_tokens += output

    def first_token(self, ttft: float) -> None:
        self.iv.ttft.add(ttft)  # the run's totals are the intervals merged (`sample`)
        self.router["ttft"].add(ttft)

    def gaps(self, seconds: float, count: float) -> None:
        """`count` inter-token gaps of `seconds` each (token-weighted ITL)."""
        if count > 0:
            self.iv.itl.add(seconds, count)
            self.router["itl"].add(seconds, count)

    def steps(self, first_ms: float, last_ms: float, rows: int, k: int, skip: int = 0) -> None:
        """k decode steps from first_ms to last_ms (linear) of `rows` rows, less `skip` gaps counted elsewhere
        (rows whose first decode step this was: their gap is their first gap)."""
        if k <= 2 or last_ms - first_ms < 0.02 * first_ms:  # one bin at the mean is within 1%
            self.gaps((first_ms + last_ms) / 2e3, rows * k - skip)
            return
        half = k // 2  # two halves, each at its mean step time
        mid = first_ms + (last_ms - first_ms) * half / (k - 1)
        self.gaps((first_ms + mid) / 2e3, rows * half - skip)
        self.gaps((mid + last_ms) / 2e3, rows * (k - half))

    def finish(self, arrival: float, prompt: int, output: int, ttft: float, e2e: float, itl_p99: float,
               first_gap: float = 0.0) -> None:
        self.completed += 1
        self.output_tokens += output
        self.e2e.add(e2e)
        if output > 1:
            self.req_itl.add(max(itl_p99, 1e-6))
        ok_ttft, ok_itl = ttft <= self.slo.ttft_s, output <= 1 or itl_p99 <= self.slo.itl_s
        self.ttft_ok += ok_ttft
        self.itl_ok += ok_itl
        self.good += ok_ttft and ok_itl
        self.iv.done += 1
        self.iv.good += ok_ttft and ok_itl
        if self.requests is not None:
            self.requests.append((arrival, prompt, output, ttft, e2e, itl_p99, first_gap))

    def fail(self) -> None:
        self.failed += 1

    def sample(self, t: float, interval_s: float, extra: dict[str, Any]) -> None:
        """Close the interval: one timeline row (rates per second over the interval, latencies in ms)."""
        iv, self.iv = self.iv, Interval()
        self.ttft.merge(iv.ttft)
        self.itl.merge(iv.itl)
        row = {"t": round(t, 3), "arrivals_s": round(iv.arrivals / interval_s, 3),
               "prompt_mean": round(iv.prompt_tokens / iv.arrivals, 1) if iv.arrivals else None,
               "output_mean": round(iv.output_tokens / iv.arrivals, 1) if iv.arrivals else None,
               "done_s": round(iv.done / interval_s, 3),
               "slo_met": round(iv.good / iv.done, 4) if iv.done else None,
               "ttft_p99_ms": _ms(iv.ttft.quantile(0.99)), "itl_p99_ms": _ms(iv.itl.quantile(0.99)), **extra}
        self.timeline.append(row)
        if self.keep_intervals:
            self.intervals.append({"arrivals": iv.arrivals, "prompt_tokens": iv.prompt_tokens, "done": iv.done,
                                   "output_tokens": iv.output_tokens, "good": iv.good, "ttft": iv.ttft.sparse(),
                                   "itl": iv.itl.sparse()})

    def absorb(self, other: Collector) -> None:
        """Add another run's (a cell's) distributions and counts to this one."""
        for mine, theirs in ((self.ttft, other.ttft), (self.itl, other.itl), (self.e2e, other.e2e),
                             (self.req_itl, other.req_itl)):
            mine.merge(theirs)
        for name, h in self.router.items():
            h.counts = [a + b for a, b in zip(h.counts, other.router[name].counts, strict=True)]
        for k in ("arrived", "completed", "failed", "good", "ttft_ok", "itl_ok", "output_tokens", "recomputes"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self, duration_s: float) -> dict[str, Any]:
        """The run's figures; call once, at its end (it folds the open interval into the totals)."""
        self.ttft.merge(self.iv.ttft)
        self.itl.merge(self.iv.itl)
        self.iv.ttft, self.iv.itl = LogHistogram(), LogHistogram()
        total = self.completed + self.failed
        out: dict[str, Any] = {
            "arrived": self.arrived, "completed": self.completed, "failed": self.failed,
            "unfinished": self.arrived - total, "duration_s": round(duration_s, 3),
            "output_tok_s": round(self.output_tokens / duration_s, 3) if duration_s else None,
            "request_rate": round(self.completed / duration_s, 4) if duration_s else None,
            "goodput_req_s": round(self.good / duration_s, 4) if duration_s else None,
            "slo": {"ttft_ms": self.slo.ttft_s * 1e3, "itl_ms": self.slo.itl_s * 1e3},
            # over every request that arrived: one failed or never finished (stuck past the drain grace) missed it
            "slo_met_fraction": round(self.good / self.arrived, 5) if self.arrived else None,
            "ttft_slo_met_fraction": round(self.ttft_ok / self.arrived, 5) if self.arrived else None,
            "itl_slo_met_fraction": round(self.itl_ok / self.arrived, 5) if self.arrived else None,
            "recomputes": self.recomputes}
        for name, h in (("ttft", self.ttft), ("itl", self.itl), ("e2e", self.e2e), ("request_itl_p99", self.req_itl)):
            for p in (50, 90, 99):
                out[f"{name}_p{p}_ms"] = _ms(h.quantile(p / 100))
        if self.requests:
            out.update(exact_percentiles(self.requests))
        return out


def exact_percentiles(requests: list[tuple[float, int, int, float, float, float]]) -> dict[str, float | None]:
    """TTFT and e2e percentiles over the kept requests, exactly (benchmarks/serving.py's percentile)."""
    from simulator.metrics import percentile

    out: dict[str, float | None] = {}
    for name, idx in (("ttft", 3), ("e2e", 4)):
        xs = [r[idx] for r in requests]
        for p in (50, 90, 99):
            out[f"{name}_p{p}_ms"] = _ms(percentile(xs, p))
    return out


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1e3, 3)
