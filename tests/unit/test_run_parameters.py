"""Which value a run uses: its parameter or the CM_* setting (cm_tasks.run_parameters).

The rule is checked here case by case, without Prefect runs; tests/integration/test_flow.py and
tests/integration/test_watchdog.py call the flows from Python, tests/e2e/test_run_form.py runs
deployments through a worker and looks at the run form in a browser.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cm_tasks.errors import ConfigurationError
from cm_tasks.flows import refresh_stac_token
from cm_tasks.run_parameters import (
    PAIRS,
    ParameterConflictError,
    choose_values,
    deployment_parameters,
    in_deployment_run,
)
from cm_tasks.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_EMAIL_BLOCK,
    DEFAULT_PASSWORD_BLOCK,
    DEFAULT_TOKEN_BLOCK,
    DEFAULT_TOKEN_LIFETIME_DAYS,
    CarbonMapperSettings,
    load_settings,
)
from cm_tasks.watchdog import check_stac_token

DEFAULTS: dict[str, Any] = {
    "base_url": DEFAULT_BASE_URL,
    "lifetime_days": DEFAULT_TOKEN_LIFETIME_DAYS,
    "email_block": DEFAULT_EMAIL_BLOCK,
    "password_block": DEFAULT_PASSWORD_BLOCK,
    "token_block": DEFAULT_TOKEN_BLOCK,
}
# A value other than the default for each parameter, and another one again.
X: dict[str, Any] = {
    "base_url": "https://x.example.org/api/v1/",
    "lifetime_days": 30,
    "email_block": "x-email",
    "password_block": "x-password",
    "token_block": "x-token",
}
Y: dict[str, Any] = {
    "base_url": "https://y.example.org/api/v1/",
    "lifetime_days": 20,
    "email_block": "y-email",
    "password_block": "y-password",
    "token_block": "y-token",
}


def _settings(values: dict[str, Any]) -> CarbonMapperSettings:
    """Settings as the environment would give them: the parameter's field set to the value."""
    return load_settings(**{PAIRS[name].field: value for name, value in values.items()})


def test_every_pair_shares_its_default_with_the_settings_and_the_flow_signature() -> None:
    fields = CarbonMapperSettings.model_fields
    properties = refresh_stac_token.parameters.properties
    for name, pair in PAIRS.items():
        assert fields[pair.field].default == pair.default == DEFAULTS[name]
        assert properties[name]["default"] == pair.default
    assert check_stac_token.parameters.properties["token_block"]["default"] == DEFAULT_TOKEN_BLOCK
    assert PAIRS["token_block"].variable == "CM_TOKEN_BLOCK"
    assert PAIRS["lifetime_days"].variable == "CM_TOKEN_LIFETIME_DAYS"


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("deployment_run", [False, True])
@pytest.mark.parametrize(
    ("parameter", "setting", "expected"),
    [
        ("default", "default", "default"),  # nothing set: the package default
        ("x", "default", "x"),  # a parameter set, the setting not: the parameter
        ("x", "x", "x"),  # both say the same
        ("x", "y", "x"),  # both set, differently: the parameter (with a warning)
    ],
)
def test_rule_where_the_answer_does_not_depend_on_the_caller(
    name: str, deployment_run: bool, parameter: str, setting: str, expected: str
) -> None:
    values = {"default": DEFAULTS, "x": X, "y": Y}

    chosen = choose_values(
        _settings({name: values[setting][name]}),
        {name: values[parameter][name]},
        deployment_run=deployment_run,
    )

    assert chosen == {name: values[expected][name]}


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_default_parameter_takes_the_setting_in_a_python_call(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cm_tasks"):
        chosen = choose_values(
            _settings({name: X[name]}), {name: DEFAULTS[name]}, deployment_run=False
        )

    assert chosen == {name: X[name]}
    assert f"using {PAIRS[name].variable}={X[name]!r}" in caplog.text


def test_a_default_parameter_against_a_setting_stops_a_deployment_run() -> None:
    settings = _settings(X)

    with pytest.raises(ParameterConflictError) as raised:
        choose_values(settings, DEFAULTS, deployment_run=True)

    message = str(raised.value)
    for name, pair in PAIRS.items():  # every conflict is named, with both values
        if not pair.guarded:  # base_url: the worker's CM_BASE_URL fills in (test_precedence)
            assert pair.variable not in message
            continue
        assert f"{name} is {DEFAULTS[name]!r}" in message
        assert f"{pair.variable}={X[name]!r}" in message
    assert "prefect.yaml `parameters:`" in message
    assert "The stored token is unchanged" in message
    assert isinstance(raised.value, ConfigurationError)  # callers that catch it keep working


def test_only_the_conflicting_parameters_are_named() -> None:
    settings = _settings({"token_block": X["token_block"]})

    with pytest.raises(ParameterConflictError) as raised:
        choose_values(settings, DEFAULTS, deployment_run=True)

    message = str(raised.value)
    assert "CM_TOKEN_BLOCK='x-token'" in message
    assert "CM_EMAIL_BLOCK" not in message
    assert "CM_TOKEN_LIFETIME_DAYS" not in message


def test_a_parameter_overriding_a_setting_warns_and_names_the_reader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="cm_tasks"):
        chosen = choose_values(_settings(Y), X, deployment_run=True)

    assert chosen == X
    assert "token_block='x-token' (the run's parameter) is used, not CM_TOKEN_BLOCK='y-token'" in (
        caplog.text
    )
    assert "get_stac_token() in processes with that setting reads block 'y-token'" in caplog.text
    assert "lifetime_days=30 (the run's parameter) is used, not CM_TOKEN_LIFETIME_DAYS=20" in (
        caplog.text
    )


def test_agreeing_values_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cm_tasks"):
        choose_values(_settings(X), X, deployment_run=True)
        choose_values(_settings(DEFAULTS), DEFAULTS, deployment_run=True)
        choose_values(_settings(DEFAULTS), X, deployment_run=True)

    assert caplog.text == ""


def test_outside_a_run_there_is_no_deployment() -> None:
    assert in_deployment_run() is False
    # ... so a call from plain Python takes the setting, as the flow does when called.
    assert choose_values(_settings(X), {"token_block": DEFAULT_TOKEN_BLOCK}) == {
        "token_block": "x-token"
    }


def test_deployment_parameters_list_the_settings_that_differ_from_the_defaults() -> None:
    names = list(PAIRS)

    assert deployment_parameters(names, CarbonMapperSettings()) == {}
    # Given explicitly (CM_* set in the environment), a default is carried too.
    assert deployment_parameters(names, _settings(DEFAULTS)) == DEFAULTS
    assert deployment_parameters(names, _settings(X)) == X
    assert deployment_parameters(["token_block"], _settings(X)) == {"token_block": "x-token"}


@pytest.mark.parametrize(
    ("flow", "defaults"),
    [
        (refresh_stac_token, {"token_name": "", **DEFAULTS}),
        (check_stac_token, {"threshold_days": 3.0, "token_block": DEFAULT_TOKEN_BLOCK}),
    ],
)
def test_run_form_schema_has_concrete_defaults_descriptions_and_limits(
    flow: Any, defaults: dict[str, Any]
) -> None:
    """What the UI's form is built from: no `X | None` type switch, every field described."""
    properties = flow.parameters.model_dump()["properties"]

    assert {name: p["default"] for name, p in properties.items()} == defaults
    for name, prop in properties.items():
        assert "anyOf" not in prop, name
        assert prop["type"] in ("string", "integer", "number"), name
        assert prop["description"], name
    if "token_block" in properties:
        assert properties["token_block"]["pattern"] == "^[a-z0-9-]+$"
    if "lifetime_days" in properties:
        assert (properties["lifetime_days"]["minimum"], properties["lifetime_days"]["maximum"]) == (
            1,
            365,
        )
        assert properties["token_name"]["maxLength"] == 100
        assert "minLength" not in properties["token_name"]  # empty means the dated default


def test_a_setting_given_explicitly_is_carried_even_when_it_is_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Deploying with CM_BASE_URL naming production pins it: a worker's own CM_BASE_URL then
    # cannot send the runs elsewhere (a run parameter beats a setting).
    from cm_tasks.run_parameters import deployment_parameters
    from cm_tasks.settings import DEFAULT_BASE_URL, load_settings

    monkeypatch.delenv("CM_TOKEN_BLOCK", raising=False)
    monkeypatch.setenv("CM_BASE_URL", DEFAULT_BASE_URL)
    carried = deployment_parameters(["base_url", "token_block"], load_settings())
    assert carried == {"base_url": DEFAULT_BASE_URL}
