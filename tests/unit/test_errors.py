"""The exception hierarchy of `cm_tasks.errors`, and its docstring against the client's mapping."""

from __future__ import annotations

import re

import httpx
import pytest

from cm_tasks import errors
from cm_tasks.client import error_for_response
from cm_tasks.errors import (
    APIUnavailableError,
    CarbonMapperError,
    InvalidRequestError,
    RefreshRunError,
    RefreshTimeoutError,
    TokenBlockError,
)


def test_a_failed_refresh_run_is_not_a_token_block_error() -> None:
    # `except TokenBlockError` is the "Prefect or the block is unavailable" handler: a refresh
    # run that failed on its own must not land there.
    for error in (
        RefreshRunError("the run failed", flow_run_name="a-run", state_type="FAILED"),
        RefreshTimeoutError("not picked up", flow_run_name="a-run", transient=True),
    ):
        assert not isinstance(error, TokenBlockError)
        assert isinstance(error, CarbonMapperError)


def test_refresh_run_errors_keep_the_run_and_transient() -> None:
    error = RefreshTimeoutError("x", flow_run_name="a-run", flow_run_id="1", transient=True)
    assert (error.flow_run_name, error.flow_run_id, error.transient) == ("a-run", "1", True)
    assert RefreshRunError("y").transient is False
    assert TokenBlockError("z", transient=True).transient is True


def _documented_statuses(error: type[errors.CarbonMapperAPIError]) -> set[int]:
    """The statuses the tree in errors.py's docstring lists for error."""
    assert errors.__doc__ is not None
    line = next(line for line in errors.__doc__.splitlines() if f"── {error.__name__} " in line)
    codes = re.search(r"\b(\d{3}(?:/\d{3})*)\b", line)
    assert codes is not None, line
    return {int(code) for code in codes.group(1).split("/")}


@pytest.mark.parametrize(
    ("error", "statuses"),
    [
        (InvalidRequestError, {400, 404, 405, 409, 413, 415, 422}),
        (APIUnavailableError, {408, 500, 502, 503, 504}),
    ],
)
def test_the_docstring_lists_the_statuses_the_client_maps(
    error: type[errors.CarbonMapperAPIError], statuses: set[int]
) -> None:
    assert _documented_statuses(error) == statuses
    for status in statuses:
        mapped = error_for_response(httpx.Response(status), "stac/create")
        assert type(mapped) is error, status
    for status in (406, 410, 418, 501):  # not listed anywhere: an unexpected status
        unexpected = error_for_response(httpx.Response(status), "x")
        assert type(unexpected) is errors.UnexpectedResponseError
