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

# The public names are the imports below, and only they: `__all__` and the lazy look-up are
# read from these statements (`_public_names`), so a new name is one import line, in the
# eager or the lazy group. `name as name` marks it exported for type checkers.
#
# Imported at once: the block type, because Prefect's `prefect.collections` entry point
# imports this package to register it; the errors and the version, because they cost nothing.
from cm_tasks._version import __version__ as __version__
from cm_tasks.blocks import CarbonMapperStacToken as CarbonMapperStacToken
from cm_tasks.errors import APIUnavailableError as APIUnavailableError
from cm_tasks.errors import BadCredentialsError as BadCredentialsError
from cm_tasks.errors import CarbonMapperAPIError as CarbonMapperAPIError
from cm_tasks.errors import CarbonMapperError as CarbonMapperError
from cm_tasks.errors import ConfigurationError as ConfigurationError
from cm_tasks.errors import CredentialsBlockError as CredentialsBlockError
from cm_tasks.errors import InvalidRequestError as InvalidRequestError
from cm_tasks.errors import PermissionDeniedError as PermissionDeniedError
from cm_tasks.errors import RateLimitedError as RateLimitedError
from cm_tasks.errors import RefreshRunError as RefreshRunError
from cm_tasks.errors import RefreshTimeoutError as RefreshTimeoutError
from cm_tasks.errors import TokenBlockError as TokenBlockError
from cm_tasks.errors import UnauthorizedError as UnauthorizedError
from cm_tasks.errors import UnexpectedResponseError as UnexpectedResponseError

# Loaded on first use, so that `import cm_tasks` costs little more than Prefect itself
# (building each flow's parameter schema alone is ~25 ms).
if TYPE_CHECKING:
    from cm_tasks.access import TokenCacheInfo as TokenCacheInfo
    from cm_tasks.access import aget_stac_token as aget_stac_token
    from cm_tasks.access import clear_token_cache as clear_token_cache
    from cm_tasks.access import get_stac_token as get_stac_token
    from cm_tasks.access import token_cache_info as token_cache_info
    from cm_tasks.auth import CarbonMapperAuth as CarbonMapperAuth
    from cm_tasks.auth import async_stac_http_client as async_stac_http_client
    from cm_tasks.auth import stac_http_client as stac_http_client
    from cm_tasks.client import CarbonMapperClient as CarbonMapperClient
    from cm_tasks.client import IssuedStacToken as IssuedStacToken
    from cm_tasks.client import TokenPair as TokenPair
    from cm_tasks.flows import check_stac_token as check_stac_token
    from cm_tasks.flows import refresh_stac_token as refresh_stac_token
    from cm_tasks.notify import EXPIRING_EVENT as EXPIRING_EVENT
    from cm_tasks.notify import REFRESHED_EVENT as REFRESHED_EVENT
    from cm_tasks.refresh import RefreshRequest as RefreshRequest
    from cm_tasks.refresh import RefreshSummary as RefreshSummary
    from cm_tasks.refresh import resolve_request as resolve_request
    from cm_tasks.refresh import run_refresh as run_refresh
    from cm_tasks.retry import RetryPolicy as RetryPolicy
    from cm_tasks.settings import CarbonMapperSettings as CarbonMapperSettings
    from cm_tasks.settings import RefreshMode as RefreshMode
    from cm_tasks.settings import load_settings as load_settings
    from cm_tasks.tasks import create_stac_token as create_stac_token
    from cm_tasks.tasks import get_access_token as get_access_token
    from cm_tasks.tasks import read_credentials as read_credentials
    from cm_tasks.tasks import save_stac_token as save_stac_token
    from cm_tasks.watchdog import StacTokenExpiringError as StacTokenExpiringError
    from cm_tasks.watchdog import TokenState as TokenState
    from cm_tasks.watchdog import TokenStatus as TokenStatus
    from cm_tasks.watchdog import check_token as check_token


def _public_names() -> tuple[list[str], dict[str, str]]:
    """The names this module's imports export, and the module of each lazy one.

    Read from this file's own source, so the imports above are the only list of names.
    """
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    exported: list[str] = []
    lazy: dict[str, str] = {}
    for node in tree.body:
        is_lazy = isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for statement in node.body if isinstance(node, ast.If) else [node]:
            if not isinstance(statement, ast.ImportFrom) or statement.module is None:
                continue
            for alias in statement.names:
                if alias.asname == alias.name:  # `name as name`: exported
                    exported.append(alias.name)
                    if is_lazy:
                        lazy[alias.name] = statement.module
    return sorted(exported), lazy


__all__, _LAZY = _public_names()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cm_tasks' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
