"""The token lifetime's bounds, defined once in settings, hold for the setting, the refresh and
the flow's run form alike."""

from __future__ import annotations

import pytest

from cm_tasks.errors import ConfigurationError
from cm_tasks.flows import refresh_stac_token
from cm_tasks.refresh import resolve_request
from cm_tasks.settings import MAX_LIFETIME_DAYS, MIN_LIFETIME_DAYS, load_settings


@pytest.mark.parametrize("days", [MIN_LIFETIME_DAYS - 1, MAX_LIFETIME_DAYS + 1])
def test_out_of_bounds_fails_as_a_setting_and_as_a_parameter(days: int) -> None:
    with pytest.raises(ConfigurationError, match="CM_TOKEN_LIFETIME_DAYS"):
        load_settings(token_lifetime_days=days)
    with pytest.raises(
        ConfigurationError, match=f"from {MIN_LIFETIME_DAYS} to {MAX_LIFETIME_DAYS} days"
    ):
        resolve_request(load_settings(), lifetime_days=days)


@pytest.mark.parametrize("days", [MIN_LIFETIME_DAYS, MAX_LIFETIME_DAYS])
def test_the_bounds_themselves_are_accepted(days: int) -> None:
    assert load_settings(token_lifetime_days=days).token_lifetime_days == days
    assert resolve_request(load_settings(), lifetime_days=days).lifetime_days == days


def test_the_run_form_shows_the_same_bounds() -> None:
    schema = refresh_stac_token.parameters.properties["lifetime_days"]
    assert (schema["minimum"], schema["maximum"]) == (MIN_LIFETIME_DAYS, MAX_LIFETIME_DAYS)
