"""disagg profile's `sustained` figure (benchmarks/profile_sustained.py): prompts back to back against the same
prompt after a rest, on a real engine; the profiler writes it on GPUs only and can skip it."""

from __future__ import annotations

import pytest

from benchmarks.profile_steps import Tokens
from benchmarks.profile_sustained import sustained_costs
from benchmarks.profiler import build_engine, parse


def test_back_to_back_prompts_give_a_multiplier_of_at_least_one_and_say_what_was_timed() -> None:
    a = parse(["--dummy", "tiny", "--kv-gib", "0.05", "--out", "unused.json"])
    eng, _ = build_engine(a)
    costs = sustained_costs(eng, Tokens(eng.model_config.vocab_size), "cpu", 64, warm_s=0.1, measure_s=0.2,
                            rest_s=0.01)
    assert costs.prompt >= 1.0
    assert "prompts of 64 tokens back to back" in costs.note
    assert not eng.has_unfinished()  # every timed prompt ran to its end


def test_the_profiler_measures_it_unless_told_not_to() -> None:
    assert parse(["--out", "p.json"]).sustained
    assert not parse(["--out", "p.json", "--no-sustained"]).sustained
    with pytest.raises(AssertionError):
        sustained_costs(None, Tokens(100), "cpu", 0)  # type: ignore[arg-type]
