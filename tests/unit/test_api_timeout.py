"""The connect bound of calls to the Carbon Mapper API, defined once in the client."""

from __future__ import annotations

import httpx
import pytest

from cm_tasks.client import CONNECT_TIMEOUT_CAP, CarbonMapperClient, api_timeout


@pytest.mark.parametrize(("timeout", "connect"), [(30.0, CONNECT_TIMEOUT_CAP), (4.0, 4.0)])
def test_each_response_gets_the_timeout_and_connecting_at_most_the_cap(
    timeout: float, connect: float
) -> None:
    bounds = api_timeout(timeout)
    assert (bounds.read, bounds.write, bounds.pool, bounds.connect) == (
        timeout,
        timeout,
        timeout,
        connect,
    )


def test_the_token_client_uses_it() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(500))
    with CarbonMapperClient(
        "https://api.example.test/api/v1/", timeout=45.0, transport=transport
    ) as api:
        assert api._http.timeout == api_timeout(45.0)
