"""A worker's step log (worker/step_log.py, $DISAGG_STEP_LOG): one line per step that ran the model, with its shape
and time, for benchmarks/sim_validate.py; and the overlap of two workers' steps it computes from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.step_costs import overlaps
from engine.config import CacheConfig, EngineConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from worker.step_log import STEP_LOG_ENV, StepLog, read_step_log


def test_a_worker_engine_logs_each_step_it_runs(tiny_llama_dir: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=32)))
    assert StepLog.from_env(engine, "decode@1") is None  # off unless asked for
    monkeypatch.setenv(STEP_LOG_ENV, str(tmp_path / "steps"))
    log = StepLog.from_env(engine, "decode@1")
    assert log is not None
    engine.add_request("a", list(range(10, 30)), SamplingParams(max_tokens=3, temperature=0.0))
    while engine.has_unfinished():
        log.step()
    log.step()  # nothing to run: no line
    log.close()
    rows = read_step_log(str(tmp_path / "steps" / "decode-1.jsonl"))
    assert [(r["prompt_tokens"], r["decode_rows"], r["decode_context"]) for r in rows] == [(20, 0, 0), (0, 1, 20),
                                                                                          (0, 1, 21)]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["t"] < rows[1]["t"] < rows[2]["t"]


def test_overlap_is_the_share_of_a_step_another_worker_was_in_a_step() -> None:
    logs = {"prefill": [{"t": 10.0, "ms": 1000.0}],
            "decode": [{"t": 9.9, "ms": 100.0}, {"t": 10.5, "ms": 100.0}, {"t": 10.95, "ms": 100.0}]}
    overlaps(logs)
    assert [r["overlap"] for r in logs["decode"]] == [0.0, 1.0, 0.5]
    assert logs["prefill"][0]["overlap"] == pytest.approx(0.15)


def test_an_unwritable_step_log_folder_stops_the_worker_with_a_reason(tiny_llama_dir: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=32)))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(STEP_LOG_ENV, str(tmp_path / "file" / "steps"))  # a folder under a plain file
    with pytest.raises(SystemExit, match="cannot write the step log"):
        StepLog.from_env(engine, "decode@1")
