"""benchmarks/prompt_step_cost.py: what a serving worker adds to a prompt step, from step logs written by hand, into a
profile whose cost model then prices prompt steps with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.prompt_step_cost import main, prompt_counts, prompt_excess
from simulator.cost_model import CostModel, chunk_pairs
from simulator.profile import Profile

PROFILE = "benchmarks/profiles/h100_llama3_8b_v49k_corun_lengths.json"
FIXED_MS = 4.0  # what the serving worker adds to each prompt step, before a co-run slows it
EXTRA_MS = 1.5  # and for each further prompt in the step


def _logs(folder: Path, prof: Profile) -> None:
    """A decode worker in one long run of steps, beside which the prefill worker runs prompts of 1,024-2,047
    tokens at (price + FIXED_MS) x the co-run multiplier; then, alone, 16-token prompts at price + FIXED_MS and
    one long prompt alone (not short: left out of the lone steps)."""
    folder.mkdir()
    model, co = CostModel(prof), prof.co_run
    assert co is not None
    rows, t = [], 100.0
    for i in range(9):
        n = 1024 + 128 * i
        ms = (model.prefill_ms(n) - model.overhead + FIXED_MS) * co.prefill_at(n)
        rows.append({"t": t, "ms": ms, "prompt_tokens": n, "pairs": chunk_pairs(n, 0), "decode_rows": 0,
                     "decode_context": 0.0})
        t += ms / 1e3 + 0.0001
    decode = {"t": 99.9, "ms": (t - 99.9) * 1e3, "prompt_tokens": 0, "pairs": 0.0, "decode_rows": 4,
              "decode_context": 900.0}
    t += 1.0
    for n in (16, 16, 16, 2048):
        ms = model.prefill_ms(n) - model.overhead + FIXED_MS
        rows.append({"t": t, "ms": ms if n == 16 else ms * 3, "prompt_tokens": n, "pairs": chunk_pairs(n, 0),
                     "decode_rows": 0, "decode_context": 0.0})
        t += 1.0
    (folder / "prefill-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "decode-0.jsonl").write_text(json.dumps(decode) + "\n")


def test_the_fixed_part_of_prompt_steps_beside_and_alone_into_the_profile(tmp_path: Path) -> None:
    prof = Profile.load(PROFILE)
    _logs(tmp_path / "run", prof)
    beside, lone = prompt_excess(str(tmp_path / "run"), prof, True, 64), prompt_excess(str(tmp_path / "run"), prof,
                                                                                       False, 64)
    assert [n for n, _ in beside + lone] == [1] * 12  # no prompt counts, no answers: one prompt each
    assert [x for _, x in beside] == pytest.approx([FIXED_MS] * 9, abs=0.01)  # rounded ms
    assert [x for _, x in lone] == pytest.approx([FIXED_MS] * 3, abs=0.01)
    main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--out", str(tmp_path / "p.json")])
    got = Profile.load(str(tmp_path / "p.json"))
    assert got.serving is not None and got.serving.prompt_step_ms == pytest.approx(FIXED_MS, abs=0.01)
    assert "prompt_step_ms from 9 prompt steps beside" in got.provenance.note
    assert CostModel(got).prefill_ms(1024) == pytest.approx(CostModel(prof).prefill_ms(1024) + FIXED_MS, abs=0.01)
    # read again against the profile that prices it already: the same figure, not twice it
    main(["--logs", str(tmp_path / "run"), "--profile", str(tmp_path / "p.json"), "--out", str(tmp_path / "q.json"),
          "--steps", "lone"])
    again = Profile.load(str(tmp_path / "q.json")).serving
    assert again is not None and again.prompt_step_ms == pytest.approx(FIXED_MS, abs=0.01)


def test_too_few_steps_no_folder_or_a_bad_limit_is_a_usage_error(tmp_path: Path) -> None:
    _logs(tmp_path / "run", Profile.load(PROFILE))
    out = ["--out", str(tmp_path / "p.json")]
    with pytest.raises(SystemExit, match="need 3"):
        main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--steps", "lone", "--max-tokens", "8", *out])
    with pytest.raises(SystemExit, match="--profile"):
        main(["--logs", str(tmp_path / "run"), "--profile", str(tmp_path / "none.json"), *out])
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--logs", str(tmp_path / "nope"), "--profile", PROFILE, *out])
    with pytest.raises(SystemExit) as e:
        main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--max-tokens", "0", *out])
    assert e.value.code == 2


def test_steps_of_several_prompts_give_the_further_prompts_cost(tmp_path: Path) -> None:
    """Prompt steps beside a long decode run, of one to three prompts each (the step log's `prompts`)."""
    prof = Profile.load(PROFILE)
    model, co = CostModel(prof), prof.co_run
    assert co is not None
    folder = tmp_path / "run"
    folder.mkdir()
    rows, t = [], 100.0
    for i in range(12):
        n, k = 1024 + 512 * (i % 3), 1 + i % 3
        ms = (model.prefill_ms(n) - model.overhead + FIXED_MS + EXTRA_MS * (k - 1)) * co.prefill_at(n)
        rows.append({"t": t, "ms": ms, "prompt_tokens": n, "pairs": chunk_pairs(n, 0), "decode_rows": 0,
                     "decode_context": 0.0, "prompts": k})
        t += ms / 1e3 + 0.0001
    (folder / "prefill-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "decode-0.jsonl").write_text(json.dumps({"t": 99.9, "ms": (t - 99.9) * 1e3, "prompt_tokens": 0,
                                                       "pairs": 0.0, "decode_rows": 4, "decode_context": 900.0}) + "\n")
    main(["--logs", str(folder), "--profile", PROFILE, "--out", str(tmp_path / "p.json")])
    got = Profile.load(str(tmp_path / "p.json"))
    assert got.serving is not None
    assert got.serving.prompt_step_ms == pytest.approx(FIXED_MS, abs=0.01)
    assert got.serving.extra_prompt_ms == pytest.approx(EXTRA_MS, abs=0.01)
    assert CostModel(got).step_ms(2048, chunk_pairs(2048, 0), 0, 0.0, prompts=3) == pytest.approx(
        CostModel(prof).prefill_ms(2048) + FIXED_MS + 2 * EXTRA_MS, abs=0.01)
    # The same steps in an older log (no count; the prefill worker's answers after each step), read against the
    # profile that prices both terms already: the same figures, not the further prompts' twice.
    old = [{k: v for k, v in r.items() if k != "prompts"} for r in rows]
    answers = [{"t": r["t"] + r["ms"] / 1e3 + 0.00005, "event": "prefill_answered", "rid": f"r{i}-{j}", "tokens": 1}
               for i, r in enumerate(rows) for j in range(r["prompts"])]
    (folder / "prefill-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + answers))
    main(["--logs", str(folder), "--profile", str(tmp_path / "p.json"), "--out", str(tmp_path / "q.json")])
    again = Profile.load(str(tmp_path / "q.json")).serving
    assert again is not None and again.prompt_step_ms == pytest.approx(FIXED_MS, abs=0.01)
    assert again.extra_prompt_ms == pytest.approx(EXTRA_MS, abs=0.01)
    (folder / "prefill-0.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="not a worker step log"):
        main(["--logs", str(folder), "--profile", PROFILE, "--out", str(tmp_path / "r.json")])


def test_older_logs_count_a_steps_prompts_by_the_answers_after_it() -> None:
    rows = [{"t": 10.0, "ms": 100.0}, {"t": 10.2, "ms": 100.0}, {"t": 10.4, "ms": 100.0}]
    events = [{"t": 10.15, "event": "prefill_answered"}, {"t": 10.16, "event": "prefill_answered"},
              {"t": 10.35, "event": "pull_read"}, {"t": 10.55, "event": "prefill_answered"}]
    assert prompt_counts(rows, events) == [2, 1, 1]  # the middle step finished none: a chunk, one prompt
    assert prompt_counts([{**r, "prompts": 3} for r in rows], events) == [3, 3, 3]
