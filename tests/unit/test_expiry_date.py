"""The expiry date is counted when create-stac is sent, not when the run started (case 12).

On the old code the date was fixed before the API calls: a run starting at 23:59:59 UTC with
lifetime_days=1 asked for "tomorrow" after midnight - the API's today - and got 422.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone

import httpx
from pydantic import SecretStr

from cm_tasks.client import CarbonMapperClient

DAY = date(2030, 1, 1)
BEFORE_MIDNIGHT = datetime(2030, 1, 1, 23, 59, 59, tzinfo=timezone.utc)


class _Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _platform(
    clock: _Clock, sent: list[str], first_status: int = 200
) -> Callable[..., httpx.Response]:
    """The API's own rule: the expiry date must be after its today, by its clock."""
    statuses = [first_status]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("token/pair"):
            clock.now += timedelta(seconds=2)  # the login crosses midnight
            return httpx.Response(200, json={"access": "access-token-value"})
        body = json.loads(request.content)
        sent.append(body["expiration_date"])
        if statuses and statuses.pop() != 200:
            clock.now += timedelta(days=1)
            return httpx.Response(503, json={"detail": "Service Unavailable"})
        if date.fromisoformat(body["expiration_date"]) <= clock.now.date():
            return httpx.Response(422, json={"detail": "expiration_date must be after today"})
        return httpx.Response(200, json={"token_value": "opaque-token-value", "name": "n"})

    return handle


def test_a_run_starting_at_23_59_59_does_not_send_todays_date() -> None:
    clock, sent = _Clock(BEFORE_MIDNIGHT), []
    client = CarbonMapperClient(
        "https://api.example.org/api/v1/",
        transport=httpx.MockTransport(_platform(clock, sent)),
        clock=clock,
    )
    with client:
        pair = client.get_token_pair(SecretStr("me@example.org"), SecretStr("pw"))
        issued = client.create_stac_token(pair.access, "n", lifetime_days=1)

    assert sent == ["2030-01-03"]  # the 2nd, the day it was sent, plus one day
    assert issued.expires_at == datetime(2030, 1, 3, tzinfo=timezone.utc)


def test_a_retried_create_stac_counts_the_date_again() -> None:
    clock, sent = _Clock(BEFORE_MIDNIGHT), []
    client = CarbonMapperClient(
        "https://api.example.org/api/v1/",
        transport=httpx.MockTransport(_platform(clock, sent, first_status=503)),
        clock=clock,
        sleep=lambda _seconds: None,
    )
    with client:
        client.create_stac_token(SecretStr("access"), "n", lifetime_days=14)

    assert sent == ["2030-01-15", "2030-01-16"]


def test_an_explicit_date_is_sent_as_given() -> None:
    clock, sent = _Clock(BEFORE_MIDNIGHT), []
    client = CarbonMapperClient(
        "https://api.example.org/api/v1/",
        transport=httpx.MockTransport(_platform(clock, sent)),
        clock=clock,
    )
    with client:
        client.create_stac_token(SecretStr("access"), "n", DAY + timedelta(days=7))

    assert sent == ["2030-01-08"]
