"""benchmarks/step_split.py: a step log's time, split by kind of step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.step_split import main


def test_steps_split_by_kind_with_time_off_the_cpu(tmp_path: Path) -> None:
    log = tmp_path / "prefill-0.jsonl"
    rows = [{"t": i, "ms": 20.0 + i, "prompt_tokens": 16, "decode_rows": 0, "sched_ms": 0.1, "launch_ms": 15.0,
             "wait_ms": 4.0 + i, "cpu_ms": 18.0 + i, "loop_cpu_ms": 0.5, "gc_ms": 0.0} for i in range(10)]
    rows += [{"t": 20, "ms": 6.0, "prompt_tokens": 0, "decode_rows": 4}]  # an older line: no split fields
    rows += [{"t": 21, "event": "prefill_answered", "rid": "a"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = main(["--logs", str(log), "--out", str(tmp_path / "split.json")])
    short = out[str(log)]["short prompts (< 300 tokens)"]
    assert short["steps"] == 10 and short["ms"] == {"p10": 20.9, "p50": 24.5, "p90": 28.1}
    assert short["off_cpu_ms"]["p50"] == 2.0 and short["launch_ms"]["p50"] == 15.0
    assert short["after_wait_ms"]["p50"] == pytest.approx(0.9)  # 20 + i - 0.1 - 15 - (4 + i)
    assert out[str(log)]["decode only"] == {"steps": 1, "ms": {"p10": 6.0, "p50": 6.0, "p90": 6.0}}
    assert json.loads((tmp_path / "split.json").read_text()) == out


def test_a_file_that_is_not_a_step_log_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"rows": 3}\n')
    with pytest.raises(SystemExit) as e:
        main(["--logs", str(bad)])
    assert e.value.code == 2 and "not a step log" in capsys.readouterr().err
    bad.write_text("not json\n")
    with pytest.raises(SystemExit) as e:
        main(["--logs", str(bad)])
    assert e.value.code == 2 and "not a readable step log" in capsys.readouterr().err


def test_a_runs_worker_steps_carry_their_time_split(tmp_path: Path) -> None:
    """sim_validate records each worker's steps against the cost model (step_costs.worker_steps) and, with them,
    where their time went."""
    from benchmarks.step_costs import worker_steps
    from simulator.profile import Profile

    def write(name: str, rows: list[dict]) -> None:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("prefill-0", [{"t": 10.0 + i, "ms": 30.0, "prompt_tokens": 1200, "pairs": 720600, "decode_rows": 0,
                         "decode_context": 0, "prompts": 1, "sched_ms": 0.2, "launch_ms": 18.0, "wait_ms": 11.0,
                         "cpu_ms": 29.9, "loop_cpu_ms": 0.4, "gc_ms": 0.0} for i in range(4)])
    write("decode-0", [{"t": 10.5 + i, "ms": 6.0, "prompt_tokens": 0, "pairs": 0, "decode_rows": 2,
                        "decode_context": 900.0, "prompts": 0} for i in range(4)])
    out = worker_steps(str(tmp_path), 0.0, 100.0, Profile.load("benchmarks/profiles/h100_llama3_8b_v49k_handoff_fix.json"))
    long = out["prefill-0"]["time_split"]["long prompts (>= 1,000 tokens)"]
    assert long["steps"] == 4 and long["launch_ms"]["p50"] == 18.0 and long["off_cpu_ms"]["p50"] == pytest.approx(0.1)
    assert out["decode-0"]["time_split"]["decode only"]["steps"] == 4
