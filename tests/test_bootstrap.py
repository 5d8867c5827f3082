"""The bootstrap interval of a measured percentile (benchmarks/bootstrap.py)."""

from __future__ import annotations

import math
import random

from benchmarks.bootstrap import count_interval, figure_intervals, percentile_interval
from simulator.metrics import percentile


def test_the_interval_holds_the_estimate_and_narrows_with_more_requests() -> None:
    rng = random.Random(1)
    many = [[rng.lognormvariate(4, 0.5)] for _ in range(2000)]
    few = many[:32]
    for samples in (few, many):
        lo, hi = percentile_interval(samples, 99)
        assert lo <= percentile([x for s in samples for x in s], 99) <= hi
    (lo_few, hi_few), (lo_many, hi_many) = percentile_interval(few, 50), percentile_interval(many, 50)
    assert (hi_many - lo_many) < (hi_few - lo_few) / 4  # ~ 1 / sqrt(n): 8x fewer requests, ~3-8x wider
    # a p99 of 32 requests lives on its largest few: the interval's top is among them
    _, top = percentile_interval(few, 99)
    assert sorted(x for s in few for x in s)[-4] < top <= max(x for s in few for x in s)


def test_requests_are_resampled_whole_and_the_seed_fixes_the_answer() -> None:
    # one request of 99 short gaps and one of a single long gap: resampling gaps one by one would almost never
    # draw the long one twice, resampling requests draws it in half the draws: the p99's interval reaches it
    reqs = [[1.0] * 99, [500.0]]
    lo, hi = percentile_interval(reqs, 99, draws=400)
    assert lo == 1.0 and hi == 500.0
    assert percentile_interval(reqs, 99, draws=400) == (lo, hi)
    assert all(math.isnan(x) for x in percentile_interval([[], []], 50))


def test_figure_intervals_names_the_figures_it_can_judge() -> None:
    out = figure_intervals([10.0, 20.0, 30.0], [[1.0, 2.0], [3.0]])
    assert set(out) == {"ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"}
    assert set(figure_intervals([10.0, 20.0])) == {"ttft_p50_ms", "ttft_p99_ms"}
    assert all(lo <= hi for lo, hi in out.values())


def test_a_count_of_requests_gets_its_interval_and_goodput_is_named_with_a_duration() -> None:
    """Half of 64 requests meeting an SLO: the count moves by about +-6-7 (a binomial's 1.645 sd is 6.6) from one
    draw to the next; none or all: it cannot move. Goodput's interval is that count over the run's duration."""
    lo, hi = count_interval([True, False] * 32)
    assert 24 <= lo <= 27 and 37 <= hi <= 40
    assert count_interval([True] * 10) == (10, 10) and count_interval([]) == (0, 0)
    out = figure_intervals([10.0, 20.0], good=[True, False] * 32, duration_s=2.0)
    assert out["goodput_req_s"] == [lo / 2.0, hi / 2.0]
    assert "goodput_req_s" not in figure_intervals([10.0, 20.0], good=[True])  # no duration: no rate
