"""The `cm-tasks` exit codes that need no Prefect API, as docs/operate.md lists them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cm_tasks.cli import main
from cm_tasks.watchdog import TokenState

COMMANDS = ["login", "refresh", "status", "emulator", "deploy", "serve"]


def _exit_code(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code


@pytest.fixture
def bad_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    monkeypatch.setenv("CM_TIMEOUT", "not-a-number")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_is_a_usage_error_for_every_command(command: str) -> None:
    assert _exit_code([command, "--no-such-option"]) == 64


@pytest.mark.parametrize(
    ("command", "code"),
    [("login", 1), ("refresh", 64), ("status", 4), ("deploy", 64), ("serve", 64)],
)
def test_a_bad_setting_exits_as_documented(
    bad_setting: None, command: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code([command]) == code
    assert "CM_TIMEOUT" in capsys.readouterr().err


def test_a_bad_block_name_option_is_a_usage_error() -> None:
    assert _exit_code(["status", "--token-block", "Not A Block"]) == 64


def test_status_exit_codes_are_fixed_per_state() -> None:
    codes = {state.value: state.exit_code for state in TokenState}
    assert codes == {"OK": 0, "EXPIRING": 1, "EXPIRED": 2, "MISSING": 3}


def test_the_documented_status_codes_are_the_real_ones() -> None:
    operate = (Path(__file__).parents[2] / "docs" / "operate.md").read_text(encoding="utf-8")
    for state in TokenState:
        assert f"| {state.exit_code} | `{state.value}` |" in operate, state
