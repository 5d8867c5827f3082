"""benchmarks/profile_serving.py: a decode batch stepped through the worker's AsyncEngine, against engine.step."""

from __future__ import annotations

from benchmarks.profile_serving import loop_overhead_ms, step_overhead_ms
from benchmarks.profile_steps import Tokens
from benchmarks.profiler import SHAPES
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine


def test_served_and_plain_steps_are_timed_and_the_engine_is_left_empty() -> None:
    eng = LLMEngine(EngineConfig(model="tiny-dummy", load_format="dummy", dummy_model=SHAPES["tiny"], cpu_threads=1,
                                 cache=CacheConfig(memory_budget_bytes=2**24), scheduler=SchedulerConfig(max_num_seqs=8)))
    out = step_overhead_ms(eng, Tokens(eng.model_config.vocab_size), [1, 4], 32, 6, "cpu", repeat=2)
    assert set(out) == {"1", "4"}
    for row in out.values():
        assert row["plain_ms"] > 0 and row["served_ms"] >= row["step_in_loop_ms"] > 0 and row["overhead_ms"] >= 0
    load = eng.load()
    assert not eng.has_unfinished() and load.num_running == load.num_waiting == 0
    assert load.kv_blocks_free == load.kv_blocks_total  # every request's blocks came back


def test_default_prompt_lengths_fit_the_dummy_shape_and_longer_ones_are_refused() -> None:
    import pytest

    from benchmarks.profiler import parse

    a = parse(["--device", "cuda", "--dummy", "llama3-8b-v49k", "--out", "p.json"])  # 8,192 positions
    assert max(int(n) for n in a.prefill_tokens.split(",")) < SHAPES["llama3-8b-v49k"].max_position_embeddings
    with pytest.raises(SystemExit):
        parse(["--device", "cuda", "--dummy", "llama3-8b-v49k", "--prefill-tokens", "8192", "--out", "p.json"])


def test_with_overlapped_steps_the_loop_adds_only_what_its_gap_exceeds_the_plain_step() -> None:
    """The H200 profile's own figures: the served gap is the plain step's (the loop's work hides behind the queued
    step), so nothing is added; without overlap the loop's work between steps adds to each step."""
    by_batch = {"1": {"plain_ms": 4.2912, "served_ms": 4.2845, "step_in_loop_ms": 3.8782},
                "32": {"plain_ms": 5.0714, "served_ms": 4.9174, "step_in_loop_ms": 4.3924}}
    assert loop_overhead_ms(by_batch, overlapped=True) == 0.0
    assert loop_overhead_ms(by_batch, overlapped=False) == 0.4656  # what that profile recorded (served - in loop)
    slower = {"1": {"plain_ms": 4.0, "served_ms": 4.5, "step_in_loop_ms": 4.0}}
    assert loop_overhead_ms(slower, overlapped=True) == 0.5
