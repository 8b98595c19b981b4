"""httpx authentication with the STAC token, renewed at most once when the API answers 401.

`CarbonMapperAuth` adds `Authorization: Bearer <token>` from `get_stac_token()` to every
request. Only the scheme, host and port of the API base URL get the token, so following an
asset link to another host never leaks it; and the token must belong to that API (the token
block's `base_url`), or a `ConfigurationError` names both URLs before anything is sent.

When a request comes back 401 from the API's own origin (not from another host a redirect led
to), the token is renewed once and the request sent once more (see `cm_tasks._renewal`): a
token that another request already replaced is swapped in without any I/O; a 401 on a token
that a renewal after a 401 gave - or any 401 in refresh mode `off` - goes back to the caller.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from cm_tasks.access import DEFAULT_MIN_VALID, arun_steps, check_refresh, run_steps, token_steps
from cm_tasks.client import USER_AGENT
from cm_tasks.settings import RefreshMode, load_settings


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    parts = urlsplit(str(url))
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port or default)


class CarbonMapperAuth(httpx.Auth):
    """An `httpx.Auth` that sends the STAC token, renewing it at most once on a 401.

    Works with `httpx.Client` and `httpx.AsyncClient` (the async flow never blocks the event
    loop). The token is sent only to the scheme, host and port of the API base URL, and only
    if the token block holds a token for that API. A 401 renews the token only when it comes
    from the API itself and the token was not already renewed once; otherwise the 401 response
    is returned as it is.

    Args:
        block_name: the `CarbonMapperStacToken` block; default `CM_TOKEN_BLOCK`.
        min_valid: how long the token must stay valid when a request is sent (default 1 h).
        base_url: the API whose host gets the token; default `CM_BASE_URL`. The token
            block must hold a token for this API.
        refresh: how a missing, expiring or rejected token is renewed: `inline`,
            `deployment` or `off`; default `CM_REFRESH_MODE` (see `get_stac_token`).

    Example:
        ```python
        import httpx
        from cm_tasks.auth import CarbonMapperAuth

        with httpx.Client(auth=CarbonMapperAuth()) as http:
            response = http.get("https://api.carbonmapper.org/api/v1/catalog/plume-csv")
        ```
    """

    requires_request_body = True  # the body is sent twice on a 401: keep it readable

    def __init__(
        self,
        block_name: str | None = None,
        *,
        min_valid: timedelta = DEFAULT_MIN_VALID,
        base_url: str | None = None,
        refresh: RefreshMode | None = None,
    ) -> None:
        self.refresh = check_refresh(refresh)  # a bad value fails here, before any request
        self.block_name = block_name
        self.min_valid = min_valid
        self._base_url = base_url or load_settings().base_url
        self._origin = _origin(self._base_url)

    def __repr__(self) -> str:
        return f"CarbonMapperAuth(block_name={self.block_name!r})"

    def _ours(self, request: httpx.Request) -> bool:
        return _origin(request.url) == self._origin

    def _rejected_by_api(self, response: httpx.Response) -> bool:
        # After redirects, the response is the last hop's: a 401 from another host says
        # nothing about our token (which that host never got).
        return response.status_code == 401 and self._ours(response.request)

    def _steps(self, rejected: str | None = None) -> Any:
        return token_steps(self.block_name, self.min_valid, self._base_url, self.refresh, rejected)

    @staticmethod
    def _with_token(request: httpx.Request, token: str) -> httpx.Request:
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Send with the token; on the API's 401, renew the token at most once and resend."""
        if not self._ours(request):
            yield request
            return
        token = run_steps(self._steps())
        assert token is not None  # only a renewal after a 401 gives up
        response = yield self._with_token(request, token)
        if self._rejected_by_api(response):
            renewed = run_steps(self._steps(rejected=token))
            if renewed is not None:
                yield self._with_token(request, renewed)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send with the token; on the API's 401, renew the token at most once and resend."""
        if not self._ours(request):
            yield request
            return
        token = await arun_steps(self._steps())
        assert token is not None  # only a renewal after a 401 gives up
        response = yield self._with_token(request, token)
        if self._rejected_by_api(response):
            renewed = await arun_steps(self._steps(rejected=token))
            if renewed is not None:
                yield self._with_token(request, renewed)


def _client_kwargs(
    block_name: str | None,
    min_valid: timedelta,
    refresh: RefreshMode | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    settings = load_settings()
    kwargs.setdefault("base_url", settings.base_url)
    kwargs.setdefault("timeout", httpx.Timeout(settings.timeout, connect=min(settings.timeout, 10)))
    kwargs.setdefault("follow_redirects", True)
    headers = {"User-Agent": USER_AGENT, **dict(kwargs.pop("headers", None) or {})}
    kwargs["headers"] = headers
    kwargs["auth"] = CarbonMapperAuth(
        block_name, min_valid=min_valid, base_url=str(kwargs["base_url"]), refresh=refresh
    )
    return kwargs


def stac_http_client(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    refresh: RefreshMode | None = None,
    **kwargs: Any,
) -> httpx.Client:
    """An `httpx.Client` for the Carbon Mapper API that authenticates with the STAC token.

    Base URL, time-out and User-Agent come from the `CM_*` settings; redirects are followed
    (the token is never sent to another host). `refresh` chooses how the token is renewed
    (`inline`, `deployment`, `off`; default `CM_REFRESH_MODE`). Other keyword arguments go
    to `httpx.Client`.

    Example:
        ```python
        from cm_tasks.auth import stac_http_client

        with stac_http_client(refresh="deployment") as http:
            csv_page = http.get("catalog/plume-csv", params={"limit": 100}).text
        ```
    """
    return httpx.Client(**_client_kwargs(block_name, min_valid, refresh, kwargs))


def async_stac_http_client(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    refresh: RefreshMode | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """The `httpx.AsyncClient` twin of `stac_http_client`.

    Example:
        ```python
        import asyncio
        from cm_tasks.auth import async_stac_http_client

        async def main() -> None:
            async with async_stac_http_client() as http:
                print((await http.get("stac/search", params={"limit": 1})).status_code)

        asyncio.run(main())
        ```
    """
    return httpx.AsyncClient(**_client_kwargs(block_name, min_valid, refresh, kwargs))
