"""Open the Carbon Mapper STAC API with pystac-client, authenticated with the STAC token.

Needs the optional extra: `pip install 'cm-tasks[stac]'` (pystac-client). Importing `cm_tasks`
never imports this module, so the package works without pystac-client.

The token is added when each request is *sent*, by a `requests` transport adapter mounted on
the API base URL only: pystac-client's debug log of request headers never shows it, other
hosts never receive it, a long-lived catalog picks up a refreshed token, and a 401 makes the
adapter renew the token at most once and resend (a token that a renewal after a 401 gave is
not renewed again: the 401 is returned).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cm_tasks.access import (
    DEFAULT_MIN_VALID,
    check_refresh,
    get_stac_token,
    run_steps,
    token_steps,
)
from cm_tasks.settings import RefreshMode, load_settings

try:
    import requests
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO
    from requests.adapters import HTTPAdapter
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "cm_tasks.stac needs pystac-client: install it with `pip install 'cm-tasks[stac]'`."
    ) from exc

__all__ = ["TokenAdapter", "open_catalog"]

_MAX_RETRIES = 5  # pystac-client's default for its own adapters


class TokenAdapter(HTTPAdapter):
    """A `requests` adapter that sends the STAC token and renews it once on a 401.

    Mount it on the API base URL of a `requests.Session`; `open_catalog` does.

    Example:
        ```python
        import requests
        from cm_tasks.stac import TokenAdapter

        session = requests.Session()
        session.mount("https://api.carbonmapper.org/api/v1/", TokenAdapter())
        ```
    """

    def __init__(
        self,
        block_name: str | None = None,
        *,
        min_valid: timedelta = DEFAULT_MIN_VALID,
        max_retries: int = _MAX_RETRIES,
        refresh: RefreshMode | None = None,
    ) -> None:
        self.refresh = check_refresh(refresh)  # before anything else: a bad value fails here
        super().__init__(max_retries=max_retries)
        self.block_name = block_name
        self.min_valid = min_valid

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        """Send with `Authorization: Bearer`; on a 401, renew the token and send once more."""
        token = get_stac_token(self.block_name, min_valid=self.min_valid, refresh=self.refresh)
        signed = request.copy()
        signed.headers["Authorization"] = f"Bearer {token}"
        response = self._send(signed, **kwargs)
        if response.status_code != 401:
            return response
        steps = token_steps(self.block_name, self.min_valid, None, self.refresh, token)
        renewed = run_steps(steps)
        if renewed is None:  # this token was already renewed once: the 401 is not about it
            return response
        response.close()
        token = renewed
        signed = request.copy()
        signed.headers["Authorization"] = f"Bearer {token}"
        return self._send(signed, **kwargs)

    def _send(self, signed: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        # requests attaches the signed request (token in its headers) to its errors, and
        # pystac-client keeps that error as the __context__ of its APIError: raise a copy
        # whose request has no Authorization, outside the except block.
        try:
            return super().send(signed, **kwargs)
        except requests.RequestException as exc:
            bare = signed.copy()
            bare.headers.pop("Authorization", None)
            try:
                error = type(exc)(*exc.args, request=bare)
            except TypeError:  # a subclass with other arguments: keep the message
                error = requests.RequestException(str(exc), request=bare)
        raise error


def open_catalog(
    block_name: str | None = None,
    *,
    min_valid: timedelta = DEFAULT_MIN_VALID,
    url: str | None = None,
    refresh: RefreshMode | None = None,
    **kwargs: Any,
) -> Client:
    """Open the Carbon Mapper STAC API (`<CM_BASE_URL>stac/`) as a pystac-client `Client`.

    Every request to the API carries the STAC token of `get_stac_token(block_name)`, fetched
    when the request is sent (so the catalog stays usable across a token refresh).

    Args:
        block_name: the `CarbonMapperStacToken` block; default `CM_TOKEN_BLOCK`.
        min_valid: how long the token must stay valid when a request is sent (default 1 h).
        url: the STAC API root; default `CM_BASE_URL` + `stac/`.
        refresh: how a missing, expiring or rejected token is renewed: `inline`,
            `deployment` or `off`; default `CM_REFRESH_MODE` (see `get_stac_token`).
        **kwargs: passed on to `pystac_client.Client.open` (e.g. `timeout`, `modifier`).

    Returns:
        The opened catalog.

    Example:
        ```python
        from cm_tasks.stac import open_catalog

        catalog = open_catalog()
        search = catalog.search(
            collections=["l4a-ch4"], query={"cm:emission": {"gt": 1000}}, max_items=10
        )
        for item in search.items():
            print(item.id, item.properties["cm:emission"])
        ```
    """
    adapter = TokenAdapter(block_name, min_valid=min_valid, refresh=refresh)
    settings = load_settings()
    stac_io = StacApiIO(max_retries=_MAX_RETRIES, timeout=kwargs.pop("timeout", settings.timeout))
    stac_io.session.mount(settings.base_url, adapter)
    return Client.open(url or f"{settings.base_url}stac/", stac_io=stac_io, **kwargs)
