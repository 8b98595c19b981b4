"""Tests of `RetryPolicy.next_wait`: a pure function of (error, attempt)."""

from __future__ import annotations

import dataclasses
import random

import httpx
import pytest

from cm_tasks.errors import (
    APIUnavailableError,
    BadCredentialsError,
    CarbonMapperAPIError,
    ConfigurationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    TokenBlockError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from cm_tasks.retry import RetryPolicy


def unavailable() -> APIUnavailableError:
    return APIUnavailableError("503 from token/pair", status_code=503, endpoint="token/pair")


def test_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 4
    assert policy.backoff == 1.0
    assert policy.max_backoff == 30.0
    assert policy.jitter == 0.2
    assert policy.retry_after_cap == 60.0


def test_docstring_example() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=0.5, jitter=0)
    assert policy.next_wait(APIUnavailableError("503"), attempt=1) == 0.5
    assert policy.next_wait(APIUnavailableError("503"), attempt=3) is None


def test_backoff_doubles_for_each_attempt_without_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, backoff=1.5, max_backoff=1000, jitter=0)
    waits = [policy.next_wait(unavailable(), attempt) for attempt in range(1, 6)]
    assert waits == [1.5, 3.0, 6.0, 12.0, 24.0]


def test_backoff_is_capped_at_max_backoff() -> None:
    policy = RetryPolicy(max_attempts=20, backoff=1.0, max_backoff=5.0, jitter=0)
    assert policy.next_wait(unavailable(), 3) == 4.0
    assert policy.next_wait(unavailable(), 4) == 5.0
    assert policy.next_wait(unavailable(), 15) == 5.0


def test_zero_backoff_never_waits() -> None:
    policy = RetryPolicy(backoff=0)
    assert policy.next_wait(unavailable(), 1) == 0.0
    assert policy.next_wait(unavailable(), 3) == 0.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 7])
def test_jitter_stays_within_its_fraction(attempt: int) -> None:
    policy = RetryPolicy(
        max_attempts=10, backoff=1.0, max_backoff=30.0, jitter=0.25, _random=random.Random(0)
    )
    base = min(2.0 ** (attempt - 1), 30.0)
    for _ in range(200):
        wait = policy.next_wait(unavailable(), attempt)
        assert wait is not None
        assert base * 0.75 <= wait <= base * 1.25


def test_jitter_spreads_waits_and_is_reproducible_with_a_seed() -> None:
    first = RetryPolicy(jitter=0.5, _random=random.Random(0))
    second = RetryPolicy(jitter=0.5, _random=random.Random(0))
    waits = [first.next_wait(unavailable(), 1) for _ in range(20)]
    assert waits == [second.next_wait(unavailable(), 1) for _ in range(20)]
    assert len(set(waits)) > 1
    assert any(w != 1.0 for w in waits)


def test_full_jitter_never_goes_negative() -> None:
    policy = RetryPolicy(jitter=1.0, _random=random.Random(1))
    for _ in range(200):
        wait = policy.next_wait(unavailable(), 2)
        assert wait is not None
        assert 0.0 <= wait <= 4.0


def test_retry_after_is_honoured_exactly_without_jitter() -> None:
    policy = RetryPolicy(backoff=1.0, jitter=0.5, retry_after_cap=60.0, _random=random.Random(0))
    error = RateLimitedError("429", endpoint="token/pair", retry_after=7.0)
    assert policy.next_wait(error, 1) == 7.0
    assert policy.next_wait(error, 3) == 7.0


def test_retry_after_is_capped() -> None:
    policy = RetryPolicy(retry_after_cap=60.0)
    error = RateLimitedError("429", retry_after=3600.0)
    assert policy.next_wait(error, 1) == 60.0
    assert RetryPolicy(retry_after_cap=0).next_wait(error, 1) == 0.0


@pytest.mark.parametrize(("retry_after", "expected"), [(0.0, 0.0), (-5.0, 0.0), (0.25, 0.25)])
def test_retry_after_small_or_negative(retry_after: float, expected: float) -> None:
    error = RateLimitedError("429", retry_after=retry_after)
    assert RetryPolicy().next_wait(error, 1) == expected


def test_rate_limit_without_retry_after_uses_backoff() -> None:
    policy = RetryPolicy(backoff=2.0, jitter=0)
    error = RateLimitedError("429", retry_after=None)
    assert policy.next_wait(error, 1) == 2.0
    assert policy.next_wait(error, 2) == 4.0


@pytest.mark.parametrize(
    "error",
    [
        UnauthorizedError("401", status_code=401),
        BadCredentialsError("401", status_code=401),
        PermissionDeniedError("403", status_code=403),
        InvalidRequestError("400", status_code=400),
        InvalidRequestError("422", status_code=422),
        UnexpectedResponseError("200 html", status_code=200),
        UnexpectedResponseError("418", status_code=418),
        CarbonMapperAPIError("generic"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_are_not_retried(error: CarbonMapperAPIError) -> None:
    assert RetryPolicy().next_wait(error, 1) is None


@pytest.mark.parametrize(
    "error",
    [
        ValueError("boom"),
        RuntimeError("boom"),
        httpx.ConnectError("raw httpx error"),
        ConfigurationError("bad setting"),
        TokenBlockError("block down", transient=True),
    ],
    ids=lambda e: type(e).__name__,
)
def test_non_api_errors_are_not_retried(error: Exception) -> None:
    assert RetryPolicy().next_wait(error, 1) is None


@pytest.mark.parametrize(
    "error",
    [unavailable(), RateLimitedError("429", retry_after=1.0), RateLimitedError("429")],
    ids=["unavailable", "429-retry-after", "429-bare"],
)
def test_gives_up_once_attempts_are_used(error: CarbonMapperAPIError) -> None:
    policy = RetryPolicy(max_attempts=4)
    assert policy.next_wait(error, 3) is not None
    assert policy.next_wait(error, 4) is None
    assert policy.next_wait(error, 5) is None


def test_single_attempt_policy_never_retries() -> None:
    assert RetryPolicy(max_attempts=1).next_wait(unavailable(), 1) is None


def test_policy_is_frozen_and_random_is_not_part_of_identity() -> None:
    policy = RetryPolicy(_random=random.Random(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 9  # type: ignore[misc]
    assert policy == RetryPolicy(_random=random.Random(42))
    assert "_random" not in repr(policy)
