"""One precedence rule: explicit beats a CM_* setting; settings fill in the rest (case 10).

On the old code `cm-tasks refresh --token-block carbon-mapper-stac-token` with
CM_TOKEN_BLOCK=team-token renewed team-token, and `--lifetime-days 14` lost to
CM_TOKEN_LIFETIME_DAYS: the flow took an option equal to the package default for "unset".
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from typer.testing import CliRunner

from cm_tasks.blocks import load_token_block
from cm_tasks.cli import EXIT_USAGE, app
from cm_tasks.flows import refresh_stac_token
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.token_helpers import delete_token_block, utc_today

DEFAULT_BLOCK = "carbon-mapper-stac-token"
TEAM_BLOCK = "team-token"


@pytest.fixture
def team_settings(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> CarbonMapperEmulator:
    monkeypatch.setenv("CM_TOKEN_BLOCK", TEAM_BLOCK)
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", "30")
    delete_token_block(DEFAULT_BLOCK)
    delete_token_block(TEAM_BLOCK)
    return carbon_mapper_credentials


def _sent_expiry(emulator: CarbonMapperEmulator) -> str:
    return str(emulator.stac_token_requests[-1]["expiration_date"])


def test_cli_options_beat_the_settings_even_when_equal_to_the_defaults(
    team_settings: CarbonMapperEmulator,
) -> None:
    result = CliRunner().invoke(
        app, ["refresh", "--token-block", DEFAULT_BLOCK, "--lifetime-days", "14"]
    )

    assert result.exit_code == 0, result.output
    assert load_token_block(DEFAULT_BLOCK) is not None
    assert load_token_block(TEAM_BLOCK) is None
    assert _sent_expiry(team_settings) in {
        (utc_today() + timedelta(days=14)).isoformat(),
        (utc_today() + timedelta(days=15)).isoformat(),  # a run across midnight
    }


def test_settings_fill_in_what_no_option_says(team_settings: CarbonMapperEmulator) -> None:
    result = CliRunner().invoke(app, ["refresh"])

    assert result.exit_code == 0, result.output
    assert load_token_block(TEAM_BLOCK) is not None
    assert load_token_block(DEFAULT_BLOCK) is None
    assert _sent_expiry(team_settings) in {
        (utc_today() + timedelta(days=30)).isoformat(),
        (utc_today() + timedelta(days=31)).isoformat(),
    }


def test_python_callers_mark_default_values_as_explicit(
    team_settings: CarbonMapperEmulator,
) -> None:
    from cm_tasks.run_parameters import given_parameters

    with given_parameters({"token_block"}):
        refresh_stac_token(token_block=DEFAULT_BLOCK)
    assert load_token_block(DEFAULT_BLOCK) is not None
    assert load_token_block(TEAM_BLOCK) is None

    refresh_stac_token()  # nothing explicit: CM_TOKEN_BLOCK fills it in
    assert load_token_block(TEAM_BLOCK) is not None


def test_a_malformed_base_url_parameter_is_refused_before_any_call(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    requests = carbon_mapper_credentials.requests()

    state = refresh_stac_token(base_url="not a url", return_state=True)

    assert state.type.value == "FAILED"
    assert "base_url must be an http(s) URL" in str(state.message)
    assert carbon_mapper_credentials.requests() == requests


def test_cli_refresh_with_a_bad_option_exits_64(team_settings: CarbonMapperEmulator) -> None:
    result = CliRunner().invoke(app, ["refresh", "--lifetime-days", "0"])
    assert result.exit_code == EXIT_USAGE


def test_a_deployment_run_not_given_base_url_takes_the_workers_setting() -> None:
    from cm_tasks.run_parameters import ParameterConflictError, choose_values
    from cm_tasks.settings import load_settings

    worker = load_settings(base_url="http://127.0.0.1:8787/api/v1/", token_block="team-token")

    chosen = choose_values(
        worker,
        {"base_url": "https://api.carbonmapper.org/api/v1/"},
        deployment_run=True,
    )
    assert chosen == {"base_url": "http://127.0.0.1:8787/api/v1/"}
    with pytest.raises(ParameterConflictError) as raised:  # a block the form does not show
        choose_values(worker, {"token_block": DEFAULT_BLOCK}, deployment_run=True)
    assert "`CM_TOKEN_BLOCK=team-token cm-tasks deploy`" in str(raised.value)
