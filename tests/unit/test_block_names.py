"""One check of a block name given as a parameter: `settings.check_block_name`, and its users."""

from __future__ import annotations

import pytest

from cm_tasks.errors import ConfigurationError
from cm_tasks.refresh import resolve_request
from cm_tasks.settings import check_block_name, load_settings
from cm_tasks.watchdog import check_token


def test_a_valid_name_comes_back_stripped() -> None:
    assert check_block_name("token_block", "  my-token-2 ") == "my-token-2"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "a block name must not be empty"),
        ("   ", "a block name must not be empty"),
        ("My Token", "a block name may only contain lowercase letters, digits and dashes"),
        ("tökén", "a block name may only contain lowercase letters, digits and dashes"),
    ],
)
def test_a_bad_name_says_which_parameter_what_is_wrong_and_what_to_use(
    value: str, problem: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_block_name("email_block", value, "carbon-mapper-email")
    assert str(caught.value) == (
        f"email_block is {value!r}: {problem}. Use a name like 'carbon-mapper-email'."
    )


def test_the_refresh_and_the_watchdog_say_it_the_same_way() -> None:
    # Both reject before any call to Prefect or the API, with the same wording.
    with pytest.raises(ConfigurationError) as refresh:
        resolve_request(load_settings(), token_block="Bad Block")
    with pytest.raises(ConfigurationError) as watchdog:
        check_token("Bad Block")
    expected = (
        "token_block is 'Bad Block': a block name may only contain lowercase letters, digits "
        "and dashes. Use a name like 'carbon-mapper-stac-token'."
    )
    assert str(refresh.value) == expected
    assert str(watchdog.value) == expected
