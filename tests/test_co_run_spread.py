"""benchmarks/co_run_spread.py: the spread of the decode steps beside another worker's, from step logs written by
hand, into a profile that the simulator loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.co_run_spread import POINTS, beside_ratios, main, spread
from simulator.cost_model import CostModel
from simulator.profile import Profile, spread_mean

PROFILE = "benchmarks/profiles/h100_llama3_8b_v49k_corun_lengths.json"


def _logs(folder: Path, prof: Profile, ratios: list[float], rows: list[int] | None = None) -> None:
    """A prefill worker in one long prompt step; a decode worker's steps (of `rows` rows each, default one) beside
    it at `ratios` x the model, then one alone at 5x (not beside: left out)."""
    folder.mkdir()
    steps, t = [], 100.0
    for r, n in zip([*ratios, 5.0], [*(rows or [1] * len(ratios)), 1], strict=True):
        model_ms = CostModel(prof).step_ms(0, 0.0, n, 512.0) - CostModel(prof).overhead
        steps.append({"t": t, "ms": model_ms * r, "prompt_tokens": 0, "pairs": 0.0, "decode_rows": n,
                      "decode_context": 512.0})
        t += model_ms * r / 1e3 + 0.0001
    long_prompt = {"t": 99.0, "ms": (t - 99.0 - steps[-1]["ms"] / 1e3 - 0.0002) * 1e3, "prompt_tokens": 2048,
                   "pairs": 2048.0 * 1024, "decode_rows": 0, "decode_context": 0.0}
    (folder / "decode-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (folder / "prefill-0.jsonl").write_text(json.dumps(long_prompt) + "\n")
    (folder / "router-1.jsonl").write_text("")  # a router's arrival log is no worker's


def test_the_steps_beside_a_prompt_give_a_spread_of_mean_one_into_the_profile(tmp_path: Path) -> None:
    prof = Profile.load(PROFILE)
    ratios = [2.0 + 0.02 * (i % 21 - 10) for i in range(63)] + [2.6]  # 1.8-2.2 evenly, and one long step
    _logs(tmp_path / "run", prof, ratios)
    got = sorted(x for _, x in beside_ratios(str(tmp_path / "run"), prof))
    assert got == pytest.approx(sorted(ratios), rel=0.005)  # the step alone after the prompt is not beside it
    xs = spread(got)
    assert len(xs) == POINTS and spread_mean(xs) == pytest.approx(1.0, abs=1e-3)
    assert xs[0] == pytest.approx(1.8 / 2.0, rel=0.01) and xs[-1] == pytest.approx(2.6 / 2.0, rel=0.01)
    main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--out", str(tmp_path / "p.json")])
    co = Profile.load(str(tmp_path / "p.json")).co_run
    assert co is not None and co.decode_spread == xs and "decode_spread from 64" in co.note
    assert co.spread_batch == ()  # by rows only when asked


def test_by_rows_each_bin_of_enough_steps_gets_its_own_spread_at_its_median_rows(tmp_path: Path) -> None:
    """1-4-row steps spread 1.6-2.4x, 17-32-row steps 1.9-2.1x, and three 9-16-row steps (too few for a spread):
    the profile gets two spreads, at 2 and 24 rows, each of mean 1, the small steps' the wider."""
    prof = Profile.load(PROFILE)
    wide = [2.0 + 0.04 * (i % 21 - 10) for i in range(42)]
    narrow = [2.0 + 0.01 * (i % 21 - 10) for i in range(42)]
    rows = [1 + i % 3 for i in range(42)] + [24] * 42 + [12] * 3
    _logs(tmp_path / "run", prof, wide + narrow + [2.0] * 3, rows)
    main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--out", str(tmp_path / "p.json"), "--by-rows"])
    co = Profile.load(str(tmp_path / "p.json")).co_run
    assert co is not None and co.spread_batch == (2, 24) and len(co.decode_spread) == POINTS
    small, large = co.spread_by_batch
    assert small[0] == pytest.approx(0.8, rel=0.01) and small[-1] == pytest.approx(1.2, rel=0.01)
    assert large[0] == pytest.approx(0.95, rel=0.01) and large[-1] == pytest.approx(1.05, rel=0.01)
    assert "42 at ~2, 42 at ~24" in co.note
    assert co.spread_draw(13, 1.0) == pytest.approx((1.2 + 1.05) / 2, rel=0.01)  # between: linear in rows


def test_too_few_steps_or_no_folder_is_a_usage_error(tmp_path: Path) -> None:
    _logs(tmp_path / "run", Profile.load(PROFILE), [2.0] * 5)
    with pytest.raises(SystemExit, match="need 21"):
        main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="--profile"):
        main(["--logs", str(tmp_path / "run"), "--profile", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--logs", str(tmp_path / "nope"), "--profile", PROFILE, "--out", str(tmp_path / "p.json")])
    (tmp_path / "run" / "decode-0.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match="not a worker step log"):
        main(["--logs", str(tmp_path / "run"), "--profile", PROFILE, "--out", str(tmp_path / "p.json")])


def test_the_steps_beside_a_prompt_by_where_they_began_in_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--by-position`: each decode step beside the prompt binned by the fraction of the prompt step gone when it
    began; the long prompt here starts 1 s before the decode steps, so they all begin in its later part."""
    from benchmarks.co_run_spread import by_position

    prof = Profile.load(PROFILE)
    _logs(tmp_path / "run", prof, [2.0] * 30)
    bins = by_position(str(tmp_path / "run"), prof)
    assert sum(b["steps"] for b in bins.values()) == 30 and "0.0-0.1" not in bins
    assert all(b["p50"] == pytest.approx(2.0, rel=0.005) for b in bins.values())
    main(["--by-position", "--logs", str(tmp_path / "run"), "--profile", PROFILE])
    assert json.loads(capsys.readouterr().out.split(" ", 1)[1]) == bins
    with pytest.raises(SystemExit) as e:
        main(["--logs", str(tmp_path / "run"), "--profile", PROFILE])  # a spread needs --out to go to
    assert e.value.code == 2
    (tmp_path / "run" / "decode-0.jsonl").write_text('{"t": 1.0}\n')  # not a step log's line
    with pytest.raises(SystemExit, match="not a worker step log"):
        main(["--by-position", "--logs", str(tmp_path / "run"), "--profile", PROFILE])
