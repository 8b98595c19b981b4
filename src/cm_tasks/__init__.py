"""Prefect tasks and flows for the Carbon Mapper platform API.

Get a scoped STAC token with the account credentials kept in Prefect Secret blocks, save it
to a `CarbonMapperStacToken` block, and load it from ingest flows.

Example:
    ```python
    from cm_tasks import CarbonMapperStacToken, refresh_stac_token

    refresh_stac_token()
    token = CarbonMapperStacToken.load("carbon-mapper-stac-token")
    print(token.name, token.expires_at)
    ```
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from cm_tasks._version import __version__
from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.errors import (
    APIUnavailableError,
    BadCredentialsError,
    CarbonMapperAPIError,
    CarbonMapperError,
    ConfigurationError,
    CredentialsBlockError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    RefreshRunError,
    RefreshTimeoutError,
    TokenBlockError,
    UnauthorizedError,
    UnexpectedResponseError,
)

if TYPE_CHECKING:
    from cm_tasks.access import (
        TokenCacheInfo,
        aget_stac_token,
        clear_token_cache,
        get_stac_token,
        token_cache_info,
    )
    from cm_tasks.auth import CarbonMapperAuth, async_stac_http_client, stac_http_client
    from cm_tasks.client import CarbonMapperClient, IssuedStacToken, TokenPair
    from cm_tasks.flows import refresh_stac_token
    from cm_tasks.notify import EXPIRING_EVENT, REFRESHED_EVENT
    from cm_tasks.refresh import RefreshRequest, RefreshSummary, resolve_request, run_refresh
    from cm_tasks.retry import RetryPolicy
    from cm_tasks.settings import CarbonMapperSettings, RefreshMode, load_settings
    from cm_tasks.tasks import (
        create_stac_token,
        get_access_token,
        read_credentials,
        save_stac_token,
    )
    from cm_tasks.watchdog import (
        StacTokenExpiringError,
        TokenState,
        TokenStatus,
        check_stac_token,
        check_token,
    )

# The block type is imported at once: Prefect's `prefect.collections` entry point imports this
# package to register it. Everything else loads on first use, so that `import cm_tasks` costs
# little more than Prefect itself (building each flow's parameter schema alone is ~25 ms).
_LAZY_MODULES = {
    "cm_tasks.access": [
        "TokenCacheInfo",
        "aget_stac_token",
        "clear_token_cache",
        "get_stac_token",
        "token_cache_info",
    ],
    "cm_tasks.auth": ["CarbonMapperAuth", "async_stac_http_client", "stac_http_client"],
    "cm_tasks.client": ["CarbonMapperClient", "IssuedStacToken", "TokenPair"],
    "cm_tasks.flows": ["refresh_stac_token"],
    "cm_tasks.notify": ["EXPIRING_EVENT", "REFRESHED_EVENT"],
    "cm_tasks.refresh": ["RefreshRequest", "RefreshSummary", "resolve_request", "run_refresh"],
    "cm_tasks.retry": ["RetryPolicy"],
    "cm_tasks.settings": ["CarbonMapperSettings", "RefreshMode", "load_settings"],
    "cm_tasks.tasks": [
        "create_stac_token",
        "get_access_token",
        "read_credentials",
        "save_stac_token",
    ],
    "cm_tasks.watchdog": [
        "StacTokenExpiringError",
        "TokenState",
        "TokenStatus",
        "check_stac_token",
        "check_token",
    ],
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cm_tasks' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "EXPIRING_EVENT",
    "REFRESHED_EVENT",
    "APIUnavailableError",
    "BadCredentialsError",
    "CarbonMapperAPIError",
    "CarbonMapperAuth",
    "CarbonMapperClient",
    "CarbonMapperError",
    "CarbonMapperSettings",
    "CarbonMapperStacToken",
    "ConfigurationError",
    "CredentialsBlockError",
    "InvalidRequestError",
    "IssuedStacToken",
    "PermissionDeniedError",
    "RateLimitedError",
    "RefreshMode",
    "RefreshRequest",
    "RefreshRunError",
    "RefreshSummary",
    "RefreshTimeoutError",
    "RetryPolicy",
    "StacTokenExpiringError",
    "TokenBlockError",
    "TokenCacheInfo",
    "TokenPair",
    "TokenState",
    "TokenStatus",
    "UnauthorizedError",
    "UnexpectedResponseError",
    "__version__",
    "aget_stac_token",
    "async_stac_http_client",
    "check_stac_token",
    "check_token",
    "clear_token_cache",
    "create_stac_token",
    "get_access_token",
    "get_stac_token",
    "load_settings",
    "read_credentials",
    "refresh_stac_token",
    "resolve_request",
    "run_refresh",
    "save_stac_token",
    "stac_http_client",
    "token_cache_info",
]
