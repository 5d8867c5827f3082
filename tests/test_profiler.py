"""disagg profile's measurements that the simulator leans on: the decode grid's envelope and the co-run of a
decode step by its rows (benchmarks/profiler.py, benchmarks/profile_corun.py)."""

from __future__ import annotations

from typing import Any

from benchmarks.profile_corun import co_run, shape
from benchmarks.profile_steps import Tokens
from benchmarks.profiler import build_engine, envelope, parse


def test_the_envelope_lowers_a_cell_read_above_a_larger_one_and_keeps_a_clean_grid() -> None:
    measured = [[53.7, 38.0, 42.0], [52.0, 43.7, 51.0], [49.4, 55.9, 62.3], [71.4, 53.2, 76.4]]
    assert envelope(measured) == [[38.0, 38.0, 42.0], [43.7, 43.7, 51.0], [49.4, 53.2, 62.3],
                                  [53.2, 53.2, 76.4]]
    clean = [[1.0, 2.0, 3.0], [2.0, 2.0, 4.0]]
    assert envelope(clean) == clean
    assert measured[0][0] == 53.7  # not changed in place


def test_the_co_run_times_a_one_row_decode_step_and_the_shapes_batch() -> None:
    """A real engine (the tiny dummy) timed alone and beside a process of matmuls: the decode multiplier is kept
    for one row and for the co-run's batch, the profile's `decode` being the latter."""
    eng, _ = build_engine(parse(["--dummy", "tiny", "--kv-gib", "0.25", "--out", "unused.json"]))

    def plain(f: Any) -> Any:
        return f()

    c = co_run(eng, Tokens(eng.model_config.vocab_size), "cpu", 1, plain)
    assert c.decode_batch == (1, shape("cpu")[1]) and c.decode_by_batch[1] == c.decode
    assert all(m >= 1 for m in (*c.decode_by_batch, c.prefill)) and c.decode_at(2) >= 1
    assert not eng.has_unfinished() and "(and 1)" in c.note
