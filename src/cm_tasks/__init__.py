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

from cm_tasks._version import __version__
from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.client import CarbonMapperClient, IssuedStacToken, TokenPair
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
    TokenBlockError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from cm_tasks.flows import refresh_stac_token
from cm_tasks.refresh import RefreshRequest, RefreshSummary, resolve_request, run_refresh
from cm_tasks.retry import RetryPolicy
from cm_tasks.settings import CarbonMapperSettings, load_settings
from cm_tasks.tasks import (
    create_stac_token,
    get_access_token,
    read_credentials,
    save_stac_token,
)

__all__ = [
    "APIUnavailableError",
    "BadCredentialsError",
    "CarbonMapperAPIError",
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
    "RefreshRequest",
    "RefreshSummary",
    "RetryPolicy",
    "TokenBlockError",
    "TokenPair",
    "UnauthorizedError",
    "UnexpectedResponseError",
    "__version__",
    "create_stac_token",
    "get_access_token",
    "load_settings",
    "read_credentials",
    "refresh_stac_token",
    "resolve_request",
    "run_refresh",
    "save_stac_token",
]
