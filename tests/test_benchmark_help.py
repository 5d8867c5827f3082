"""Every benchmark's `--help` prints its usage (argparse formats each flag's help with %-substitution, so a bare
"%" in one breaks the whole page: sim_validate's did)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py")
                 if "argparse.ArgumentParser(" in p.read_text() and "__main__" in p.read_text())


def test_the_benchmarks_with_a_command_line_are_found() -> None:
    assert "benchmarks.sim_validate" in MODULES and len(MODULES) > 20


# runpy runs a module already imported (by another test) afresh as __main__, and says so: harmless here.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", MODULES)
def test_help_prints_the_usage(module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                               ) -> None:
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
