"""benchmarks/decode_rows.py: real decode steps timed for every row count, the engine left empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.decode_rows import main


def test_every_row_count_is_timed(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    res = main(["--dummy", "tiny", "--max-rows", "3", "--context", "20", "--steps", "2", "--repeat", "1",
                "--out", str(out)])
    assert list(res["step_ms"]) == ["1", "2", "3"] and all(v[0] > 0 for v in res["step_ms"].values())
    assert all(set(v) == {"linear", "weight_x_t", "transposed"} for v in res["lm_head_ms"].values())
    assert json.loads(out.read_text())["step_ms"] == res["step_ms"]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--dummy", "tiny", "--max-rows", "0", "--out", str(tmp_path / "x.json")])
