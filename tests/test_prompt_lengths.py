"""benchmarks/prompt_lengths.py refuses bad arguments before it builds an engine."""

from __future__ import annotations

import pytest

from benchmarks.prompt_lengths import main
from worker.step_log import read_step_log

PROFILE = "benchmarks/profiles/cpu_smollm2_2026-12-06e.json"


@pytest.mark.parametrize("bad", [["--lengths", "10,x"], ["--lengths", "0"], ["--random", "5000"],
                                 ["--random", "-1"], ["--idle-s", "-1"], ["--profile", "no/such.json"],
                                 ["--roles", "16,x"], ["--roles", "0"], ["--step-log", "/no/such/folder/steps.jsonl"]])
def test_bad_arguments_are_refused_with_a_usage_error(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--profile", PROFILE, *bad] if bad[0] != "--profile" else bad
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err


@pytest.mark.slow  # 30 prompts through an engine three ways (~15 s on 2 cores)
def test_prompts_timed_plain_and_as_the_prefill_role(tmp_path: pytest.TempPathFactory) -> None:
    out = main(["--profile", PROFILE, "--lengths", "16", "--random", "0", "--idle-s", "0", "--roles", "16,40",
                "--out", str(tmp_path), "--kv-gib", "0.1", "--step-log", str(tmp_path / "steps.jsonl")])
    assert [r["tokens"] for r in out["roles"]] == [16, 40]
    for r in out["roles"]:
        assert r["plain_ms"] > 0 and r["prefill_role_ms"] > 0 and r["on_a_thread_ms"] > 0
        assert r["added_ms"] == pytest.approx(r["prefill_role_ms"] - r["plain_ms"], abs=0.002)
    steps = read_step_log(str(tmp_path / "steps.jsonl"))  # the roles' prompts, 5 x 3 ways x 2 lengths, one step each
    assert [s["prompt_tokens"] for s in steps] == [16] * 15 + [40] * 15
    assert all(0 <= s["sched_ms"] <= s["ms"] and s["cpu_ms"] > 0 for s in steps)
