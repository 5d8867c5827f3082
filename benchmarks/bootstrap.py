"""How sure a measured percentile is: a bootstrap interval that resamples whole requests.

A p99 over 32 requests is about their largest one, so before saying a prediction is "within 15%" of it, say how
far the measurement itself would move on another draw of the same traffic. Requests are resampled whole (their
inter-token gaps stay together: gaps of one request are not independent of each other).
"""

from __future__ import annotations

import random

from simulator.metrics import percentile


def percentile_interval(samples: list[list[float]], p: float, level: float = 0.9, draws: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """The central `level` interval of the p-th percentile of all samples, over `draws` resamplings of the
    requests (each inner list is one request's samples). (nan, nan) without samples."""
    assert 0 <= p <= 100 and 0 < level < 1 and draws > 0, (p, level, draws)
    requests = [s for s in samples if s]
    if not requests:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    stats = sorted(percentile([x for r in rng.choices(requests, k=len(requests)) for x in r], p)
                   for _ in range(draws))
    tail = (1 - level) / 2
    return stats[int(tail * (draws - 1))], stats[int(round((1 - tail) * (draws - 1)))]


def count_interval(flags: list[bool], level: float = 0.9, draws: int = 1000, seed: int = 0) -> tuple[int, int]:
    """The central `level` interval of how many requests are flagged, over `draws` resamplings of the requests:
    a goodput is such a count over a fixed duration, and at an SLO that half the requests cross, 64 requests
    move it by +-20% from one draw to the next."""
    assert 0 < level < 1 and draws > 0, (level, draws)
    rng = random.Random(seed)
    counts = sorted(sum(rng.choices(flags, k=len(flags))) for _ in range(draws)) if flags else [0]
    tail = (1 - level) / 2
    return counts[int(tail * (len(counts) - 1))], counts[int(round((1 - tail) * (len(counts) - 1)))]


def figure_intervals(ttfts_ms: list[float], itls_ms: list[list[float]] | None = None, level: float = 0.9,
                     good: list[bool] | None = None, duration_s: float = 0.0) -> dict[str, list[float]]:
    """`level` intervals of TTFT p50/p99 (one sample per request); given each request's gaps, ITL p50/p99; given
    whether each request met the SLOs and the run's duration, goodput (requests/s)."""
    out = {f"ttft_p{p}_ms": [round(x, 2) for x in percentile_interval([[t] for t in ttfts_ms], p, level)]
           for p in (50, 99)}
    if itls_ms:
        out |= {f"itl_p{p}_ms": [round(x, 3) for x in percentile_interval(itls_ms, p, level)] for p in (50, 99)}
    if good is not None and duration_s > 0:
        out["goodput_req_s"] = [round(n / duration_s, 4) for n in count_interval(good, level)]
    return out
