"""benchmarks/validation_plot.py: a sim_validate report drawn as CDFs, real beside simulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.validation_plot import cases, main


def report(real: bool) -> dict:
    rows = [[100, 8, 40.0 + i, 90.0, 12.0 + i % 3, 30.0] for i in range(20)]
    row = {"sim": {"requests_each": rows}, "real": {"requests_each": rows} if real else None}
    return {"args": {"slo_ttft_ms": 500, "slo_itl_ms": 30}, "rates": {"2": {"disaggregated": row, "colocated": row}}}


def test_each_rate_and_mode_with_both_runs_is_drawn(tmp_path: Path) -> None:
    assert [t for t, _ in cases(report(True))] == ["disaggregated at 2 req/s", "colocated at 2 req/s"]
    (tmp_path / "r.json").write_text(json.dumps(report(True)))
    main([str(tmp_path / "r.json")])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_a_simulation_alone_or_another_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "sim.json").write_text(json.dumps(report(False)))
    (tmp_path / "other.json").write_text("{}")
    bad = report(True)
    bad["rates"]["2"]["colocated"]["real"]["requests_each"] = [[1, 2]]  # rows cut short
    (tmp_path / "short.json").write_text(json.dumps(bad))
    for name in ("sim.json", "other.json", "missing.json", "short.json"):
        with pytest.raises(SystemExit):
            main([str(tmp_path / name)])
    assert not list(tmp_path.glob("*.png"))
