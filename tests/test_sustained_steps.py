"""benchmarks/sustained_steps.py: every phase times real prompt steps of one engine and the JSON keeps them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sustained_steps import main


def test_every_phase_times_prompt_steps(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    res = main(["--device", "cpu", "--dummy", "tiny", "--tokens", "32", "--sustained-s", "0.3", "--duty-s", "0.2",
                "--pause-ms", "1", "--burst-s", "0.1", "--rest-s", "0", "--kv-gib", "0.01", "--out", str(out)])
    phases = ("burst", "sustained", "duty", "burst_after")
    assert [r["phase"] for r in res["steps"]] == sorted((r["phase"] for r in res["steps"]), key=phases.index)
    for name in phases:
        assert res["summary"][name]["steps"] >= 1 and res["summary"][name]["ms_p50"] > 0
    assert res["summary"]["sustained"]["steps"] >= 2  # back to back: more than one prompt in 0.3 s
    assert res["summary"]["sustained_by_fifth_ms_p50"]
    assert json.loads(out.read_text())["summary"] == res["summary"]


@pytest.mark.parametrize("bad", [["--tokens", "0"], ["--sustained-s", "-1"], ["--device", "tpu"]])
def test_bad_arguments_are_refused(bad: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([*bad, "--out", str(tmp_path / "x.json")])
