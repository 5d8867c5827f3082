"""`disagg <command> --help` explains the command's own flags, for the commands that hand their command line on."""

from __future__ import annotations

import pytest

from deploy import cli


@pytest.mark.parametrize("command", sorted(cli.PASSTHROUGH))
@pytest.mark.parametrize("separator", [[], ["--"]])
def test_help_of_a_passed_through_command_is_its_own(command: str, separator: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *separator, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
    assert "unrecognized arguments" not in out
