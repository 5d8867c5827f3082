"""disagg profile's measurements that the simulator leans on: the decode grid's envelope and the co-run of a
decode step by its rows (benchmarks/profiler.py, benchmarks/profile_tables.py, benchmarks/profile_corun.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.profile_corun import co_run, co_run_lengths, shape
from benchmarks.profile_steps import Tokens
from benchmarks.profile_tables import envelope
from benchmarks.profiler import build_engine, parse


def test_the_envelope_lowers_a_cell_read_above_a_larger_one_and_keeps_a_clean_grid() -> None:
    measured = [[53.7, 38.0, 42.0], [52.0, 43.7, 51.0], [49.4, 55.9, 62.3], [71.4, 53.2, 76.4]]
    assert envelope(measured) == [[38.0, 38.0, 42.0], [43.7, 43.7, 51.0], [49.4, 53.2, 62.3],
                                  [53.2, 53.2, 76.4]]
    clean = [[1.0, 2.0, 3.0], [2.0, 2.0, 4.0]]
    assert envelope(clean) == clean
    assert measured[0][0] == 53.7  # not changed in place


@pytest.mark.slow  # the co-run's prompts and steps, alone and beside matmuls (~4 s on 2 cores)
def test_a_prefill_table_out_of_order_is_timed_again_at_both_lengths_of_the_pair(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 512-token prompt timed faster than a 256-token one (a disturbed measurement): both are timed again and
    the new round's medians kept; an ordered table is timed once; one that stays out of order is kept after RETIMES
    more rounds."""
    import benchmarks.profile_tables as profiler

    calls: list[int] = []
    script = {256: [592.0] * 3 + [600.0, 610.0, 590.0], 512: [260.0] * 3 + [1700.0] * 3, 1024: [5264.0] * 3}

    def fake_prompt(eng: object, rid: str, prompt: list[int], device: str) -> float:
        n = len(prompt)
        if rid.startswith("warm"):
            return 0.0
        calls.append(n)
        return script[n][sum(c == n for c in calls) - 1]

    monkeypatch.setattr(profiler, "run_prompt", fake_prompt)
    got = profiler.measure_prefill(None, Tokens(1000), [256, 512, 1024], 3, "cpu", lambda f: f())  # type: ignore[arg-type]
    assert got == [600.0, 1700.0, 5264.0] and calls.count(1024) == 3 and calls.count(512) == 6
    assert profiler.out_of_order([10.0, 11.0, 12.5, 12.0]) == set()  # within 20%: a flat, launch-bound stretch
    assert profiler.out_of_order([10.0, 20.0, 15.0, 30.0]) == {1, 2}
    calls.clear()
    script = {256: [900.0] * 9, 512: [300.0] * 9}  # stays out of order: kept after two more rounds
    assert profiler.measure_prefill(None, Tokens(1000), [256, 512], 3, "cpu", lambda f: f()) == [900.0, 300.0]  # type: ignore[arg-type]
    assert calls.count(512) == 9


def test_a_decode_grid_out_of_order_is_timed_again_before_the_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 rows timed at 40 ms where 1 and 2 rows read 60 and 62 (a fast moment): the 2-row and 4-row cells are timed
    again (neighbours out of order), then, against the 2-row cell's new time, the 1-row one; the grid keeps the new
    times; KV that does not fit is no cell."""
    import benchmarks.profile_tables as profiler

    first = {(1, 64): 60.0, (2, 64): 62.0, (4, 64): 40.0, (1, 256): 70.0, (2, 256): 72.0, (4, 256): 75.0,
             (1, 1024): 80.0, (2, 1024): 82.0, (4, 1024): None}
    again = {(1, 64): 30.0, (2, 64): 33.0, (4, 64): 41.0}
    calls: list[tuple[int, int]] = []

    def fake_decode(eng: object, toks: object, b: int, ctx: int, steps: int, device: str, alone: object) -> float | None:
        calls.append((b, ctx))
        return (again if calls.count((b, ctx)) > 1 else first)[(b, ctx)]

    monkeypatch.setattr(profiler, "decode_ms", fake_decode)
    assert profiler.grid_out_of_order([[60.0, 70.0], [62.0, 72.0], [40.0, None]]) == {(1, 0), (2, 0)}
    grid = profiler.measure_decode(None, None, [1, 2, 4], [64, 256, 1024], 8, "cpu", lambda f: f())  # type: ignore[arg-type]
    assert [row[0] for row in grid] == [30.0, 33.0, 41.0] and grid[0][1] == 70.0 and grid[2][2] > 75.0
    assert len(calls) == 9 + 2 + 2


def test_the_co_run_times_a_one_row_decode_step_and_the_shapes_batch() -> None:
    """A real engine (the tiny dummy) timed alone and beside a process of matmuls: the decode multiplier is kept
    for one row and for the co-run's batch, the profile's `decode` being the latter."""
    eng, _ = build_engine(parse(["--dummy", "tiny", "--kv-gib", "0.25", "--out", "unused.json"]))

    def plain(f: Any) -> Any:
        return f()

    asked: list[int] = []

    def table_ms(n: int) -> float:  # the profile's prefill table, here a microsecond a prompt
        asked.append(n)
        return 1e-3

    c = co_run(eng, Tokens(eng.model_config.vocab_size), "cpu", 1, plain, table_ms=table_ms)
    assert c.decode_batch == (1, shape("cpu")[1]) and c.decode_by_batch[1] == c.decode
    # the prompt's multiplier is over the table's time (what the simulator multiplies), not over its time alone
    assert asked == list(co_run_lengths("cpu")) and c.prefill_tokens == co_run_lengths("cpu")
    assert c.prefill_by_tokens == (c.prefill,) and c.prefill > 100 and "over the profile's prefill table" in c.note
    assert shape("cuda")[0] in co_run_lengths("cuda") and list(co_run_lengths("cuda")) == sorted(co_run_lengths("cuda"))
    assert all(m >= 1 for m in (*c.decode_by_batch, c.prefill)) and c.decode_at(2) >= 1
    assert not eng.has_unfinished() and "(and 1)" in c.note


@pytest.mark.slow  # three co-runner starts (~7 s on 2 cores)
def test_the_co_run_takes_its_median_over_several_co_runner_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--co-run-starts N`: a fresh co-runner process per start and role, each start's prompt multiplier named."""
    from benchmarks import profile_corun

    eng, _ = build_engine(parse(["--dummy", "tiny", "--kv-gib", "0.25", "--out", "unused.json"]))
    started: list[int] = []
    real = profile_corun.busy_beside

    @contextlib.contextmanager
    def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with real(*args, **kwargs) as proc:
            started.append(proc.pid)
            yield proc

    monkeypatch.setattr(profile_corun, "busy_beside", counted)
    c = co_run(eng, Tokens(eng.model_config.vocab_size), "cpu", 1, lambda f: f(), starts=2)
    assert len(set(started)) == 4  # two starts beside each role, each its own process
    assert "medians over 2 co-runner starts, prefill of 256 beside each" in c.note and c.prefill >= 1
    assert parse(["--device", "cuda", "--co-run-with", "engine", "--out", "p.json"]).co_run_starts == 3
    assert parse(["--out", "p.json"]).co_run_starts == 1


@pytest.mark.slow  # an engine co-runner process beside this one's (~12 s on 2 cores)
def test_the_co_run_times_decode_steps_beside_a_paced_co_runner_for_the_spread() -> None:
    """`spread_steps` with the engine co-runner: decode steps timed one by one beside a prefill co-runner that
    idles between prompts, at one row and at the co-run's batch; those beside one of its prompts become
    `co_run.spread_by_batch` and (the batch's) `decode_spread` (ascending inverse CDFs with mean 1, which the
    profile validates). With the matmul co-runner (no prompts), none."""
    from benchmarks.profile_corun import beside_share, decode_spread, spread_rows
    from simulator.profile import spread_mean

    args = ["--dummy", "tiny", "--kv-gib", "0.25", "--out", "unused.json"]
    eng, _ = build_engine(parse(args))
    c = co_run(eng, Tokens(eng.model_config.vocab_size), "cpu", 1, lambda f: f(), engine_args=args, spread_steps=400)
    xs = c.decode_spread
    assert len(xs) == 21 and list(xs) == sorted(xs) and abs(spread_mean(xs) - 1) < 0.02 and xs[0] > 0
    assert "decode steps of 1/4 x 256 timed one by one beside a paced prefill co-runner" in c.note
    assert c.spread_batch == (1, 4) and c.spread_by_batch[1] == xs  # by rows, the batch's the one decode_spread
    assert all(len(ys) == 21 and abs(spread_mean(ys) - 1) < 0.02 for ys in c.spread_by_batch)
    assert not eng.has_unfinished()
    assert co_run(eng, Tokens(eng.model_config.vocab_size), "cpu", 1, lambda f: f(), spread_steps=50).decode_spread == ()
    assert beside_share(1.0, 2.0, [(0.5, 1.25), (1.5, 1.75), (3.0, 4.0)]) == 0.5
    assert decode_spread([2.0] * 21) == (1.0,) * 21 and decode_spread([1.0] * 20) == ()
    assert spread_rows(32) == (1, 4, 8, 16, 32) and spread_rows(4) == (1, 4) and spread_rows(12) == (1, 4, 8, 12)
    assert parse(["--device", "cuda", "--out", "p.json"]).co_run_spread_steps == 256
    assert parse(["--out", "p.json"]).co_run_spread_steps == 0
    with pytest.raises(SystemExit):
        parse(["--co-run-spread-steps", "-3", "--out", "p.json"])


@pytest.mark.slow  # a whole `disagg profile` of the tiny model (~15 s on 2 cores)
def test_disagg_profile_writes_a_profile_the_simulator_loads(tmp_path: Path) -> None:
    """The command end to end: its tables in order (a prompt's time and a decode step's do not fall with length,
    rows or context), KV capacity, a transfer rate and start-up time, saved where asked and loaded back."""
    from deploy.cli import main
    from simulator.profile import Profile

    out = tmp_path / "p.json"
    main(["profile", "--dummy", "tiny", "--kv-gib", "0.25", "--prefill-tokens", "16,64,128", "--chunk", "64",
          "--decode-batch", "1,2,4", "--decode-context", "64,128", "--repeat", "2", "--no-co-run", "--no-serving",
          "--no-sustained", "--out", str(out)])
    prof = Profile.load(str(out))
    assert prof.prefill.tokens[:3] == (16, 64, 128) and all(m > 0 for m in prof.prefill.ms)
    grid = prof.decode.ms
    assert all(a <= b for row in grid for a, b in zip(row, row[1:], strict=False))
    assert all(a <= b for col in zip(*grid, strict=True) for a, b in zip(col, col[1:], strict=False))
    assert prof.kv.capacity_tokens > 0 and prof.transfer.gib_s > 0 and prof.startup.engine_s > 0
    assert prof.co_run is None
