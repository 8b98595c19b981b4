"""The refresh's request (`cm_tasks.refresh.resolve_request`): bounds and warnings, no call.

Boundary values are accepted as given; a lifetime shorter than the weekly schedule's interval
warns. tests/integration/test_bad_input.py checks what is refused, through the flow.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cm_tasks import load_settings, resolve_request


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"token_name": "n" * 100}, {"token_name": "n" * 100}),
        ({"token_name": "  padded  "}, {"token_name": "padded"}),
        ({"lifetime_days": 365}, {"lifetime_days": 365}),
        ({"lifetime_days": 1}, {"lifetime_days": 1}),
    ],
)
def test_boundary_values_are_accepted(parameters: dict[str, Any], expected: dict[str, Any]) -> None:
    # The expiry date is counted when create-stac is sent (tests/unit/test_expiry_date.py).
    request = resolve_request(load_settings(), **parameters)
    for field, value in expected.items():
        assert getattr(request, field) == value


@pytest.mark.parametrize(("lifetime", "warns"), [(1, True), (7, True), (8, False), (14, False)])
def test_lifetime_within_the_weekly_interval_warns(
    caplog: pytest.LogCaptureFixture, lifetime: int, warns: bool
) -> None:
    with caplog.at_level(logging.WARNING):
        resolve_request(load_settings(), lifetime_days=lifetime)

    assert ("lapse before the next run" in caplog.text) is warns


def test_short_lifetime_from_the_environment_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", "5")
    with caplog.at_level(logging.WARNING):
        request = resolve_request(load_settings())

    assert request.lifetime_days == 5
    assert "lifetime_days=5" in caplog.text


@pytest.mark.parametrize(
    ("blocks", "login"),
    [
        ({}, "cm-tasks login"),
        (
            {"email_block": "em-w", "password_block": "pw-w"},
            "cm-tasks login --email-block em-w --password-block pw-w",
        ),
        ({"password_block": "pw-w"}, "cm-tasks login --password-block pw-w"),
    ],
)
def test_the_wrong_password_advice_writes_the_blocks_the_run_read(
    blocks: dict[str, str], login: str
) -> None:
    from cm_tasks.refresh import _login_command

    assert _login_command(resolve_request(load_settings(), **blocks)) == login
