"""Settings read from `CM_*` environment variables and a `.env` file."""

from __future__ import annotations

import ipaddress
import os
import re
import warnings
from typing import Literal, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cm_tasks.errors import ConfigurationError

DEFAULT_BASE_URL = "https://api.carbonmapper.org/api/v1/"
ENV_PREFIX = "CM_"
# The package defaults. The deployable flows use the same values as their parameter defaults,
# so the UI's run form shows them (see cm_tasks.run_parameters for when a setting wins).
DEFAULT_EMAIL_BLOCK = "carbon-mapper-email"
DEFAULT_PASSWORD_BLOCK = "carbon-mapper-password"
DEFAULT_TOKEN_BLOCK = "carbon-mapper-stac-token"
DEFAULT_TOKEN_LIFETIME_DAYS = 14
# The lifetimes a new token may have: the setting, the flow parameter and the run form agree.
MIN_LIFETIME_DAYS = 1
MAX_LIFETIME_DAYS = 365
# A Prefect block document name, as `validate_block_name` checks it and the run form shows it.
BLOCK_NAME_PATTERN = "^[a-z0-9-]+$"

RefreshMode = Literal["inline", "deployment", "off"]
"""How downstream code gets a new token: `inline` (read the credentials and call the API
itself), `deployment` (run the refresh deployment and wait for it), `off` (never)."""
REFRESH_MODES: tuple[RefreshMode, ...] = get_args(RefreshMode)
DEFAULT_REFRESH_DEPLOYMENT = "refresh-stac-token/weekly"


class InsecureBaseURLWarning(UserWarning):
    """`CM_BASE_URL` sends credentials in clear text to a host that is not this machine."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CarbonMapperSettings(BaseSettings):
    """Where the Carbon Mapper API is, and where credentials and the token live in Prefect.

    Every field is read from an environment variable with the `CM_` prefix (`CM_BASE_URL`,
    `CM_TIMEOUT`, ...) or from a `.env` file in the working directory. Use
    `load_settings()` to build one: it turns a bad value into a `ConfigurationError` that
    names the variable.

    Example:
        ```python
        from cm_tasks import load_settings

        settings = load_settings()
        print(settings.base_url, settings.token_block)
        ```
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        frozen=True,  # load_settings() shares one instance between callers
    )

    base_url: str = Field(
        DEFAULT_BASE_URL,
        description="Base URL of the platform API, ending in /api/v1/.",
    )
    timeout: float = Field(30.0, gt=0, le=600, description="Seconds to wait for each response.")
    email_block: str = Field(
        DEFAULT_EMAIL_BLOCK,
        description="Name of the Prefect Secret block holding the account e-mail.",
    )
    password_block: str = Field(
        DEFAULT_PASSWORD_BLOCK,
        description="Name of the Prefect Secret block holding the account password.",
    )
    token_block: str = Field(
        DEFAULT_TOKEN_BLOCK,
        description="Name of the CarbonMapperStacToken block the scoped token is saved to.",
    )
    token_lifetime_days: int = Field(
        DEFAULT_TOKEN_LIFETIME_DAYS,
        ge=MIN_LIFETIME_DAYS,
        le=MAX_LIFETIME_DAYS,
        description="Days a new STAC token stays valid.",
    )
    max_attempts: int = Field(
        4,
        ge=1,
        le=10,
        description="Attempts per API call, counting the first, for transient faults.",
    )
    retry_backoff: float = Field(
        1.0, ge=0, le=60, description="First retry delay in seconds; doubles for each retry."
    )
    retry_after_cap: float = Field(
        60.0, ge=0, le=3600, description="Longest wait in seconds honoured from a 429 Retry-After."
    )
    refresh_mode: RefreshMode = Field(
        "inline",
        description=(
            "How get_stac_token() renews a missing or expiring token: inline (reads the "
            "credential blocks), deployment (runs CM_REFRESH_DEPLOYMENT and waits) or off."
        ),
    )
    refresh_deployment: str = Field(
        DEFAULT_REFRESH_DEPLOYMENT,
        description="The refresh deployment run in deployment mode, as FLOW_NAME/DEPLOYMENT_NAME.",
    )
    refresh_timeout: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Seconds to wait, in deployment mode, for the refresh run to finish.",
    )

    @field_validator("base_url")
    @classmethod
    def _normalise_base_url(cls, value: str) -> str:
        return validate_base_url(value)

    @field_validator("email_block", "password_block", "token_block")
    @classmethod
    def _block_name(cls, value: str) -> str:
        return validate_block_name(value)

    @field_validator("refresh_mode", mode="before")
    @classmethod
    def _refresh_mode(cls, value: object) -> object:
        return validate_refresh_mode(value) if isinstance(value, str) else value

    @field_validator("refresh_deployment")
    @classmethod
    def _deployment_name(cls, value: str) -> str:
        flow_name, _, deployment = value.strip().partition("/")
        if not flow_name or not deployment or "/" in deployment:
            raise ValueError(
                "must name a deployment as FLOW_NAME/DEPLOYMENT_NAME, e.g. "
                f"{DEFAULT_REFRESH_DEPLOYMENT}"
            )
        return value.strip()


def validate_base_url(value: str) -> str:
    """value as a base URL ending in `/`, or ValueError saying what is wrong (never the URL).

    Warns (`InsecureBaseURLWarning`) for plain http:// to any host but this machine.
    """
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as https://api.carbonmapper.org/api/v1/")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query string or fragment")
    if parts.username or parts.password:
        raise ValueError("must not contain a user name or password")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        warnings.warn(
            f"CM_BASE_URL uses plain http:// to {parts.hostname}: the account password and "
            "tokens would travel unencrypted. Use https:// for any host but this machine.",
            InsecureBaseURLWarning,
            stacklevel=2,
        )
    url = value.strip()
    return url if url.endswith("/") else url + "/"


def prefect_api_at(api: str | None) -> str:
    """Where a Prefect API is, for a message: its URL without any user:password in it."""
    if not api:
        return "the local Prefect API (no PREFECT_API_URL)"
    # Never a user:password written into the URL (a message may reach a log).
    parts = urlsplit(api)
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
        api = urlunsplit(parts._replace(netloc=netloc))
    return f"the Prefect API at {api}"


def api_identity(url: str) -> str:
    """A base URL in one spelling, to tell whether two URLs name the same API.

    Scheme and host are lower-cased, a default port is dropped and the path ends in `/`:
    `HTTPS://API.example.org:443/api/v1` and `https://api.example.org/api/v1/` are one API.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, {"http": 80, "https": 443}.get(scheme)) else f"{host}:{port}"
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{scheme}://{netloc}{path}"


def validate_block_name(value: str) -> str:
    """Return value if it is a valid Prefect block name, else raise ValueError saying why.

    The message does not quote the value (a setting's value is never echoed); callers that
    may quote it use `check_block_name`.
    """
    name = value.strip()
    if not name:
        raise ValueError("a block name must not be empty")
    if not re.fullmatch(BLOCK_NAME_PATTERN, name):
        raise ValueError("a block name may only contain lowercase letters, digits and dashes")
    return name


def check_block_name(parameter: str, value: str, example: str = DEFAULT_TOKEN_BLOCK) -> str:
    """Return value as a block name, or raise ConfigurationError saying what to use instead.

    The one check of a block name given as a parameter or argument: the error names the
    parameter, quotes the value (a block name is not a secret), says what is wrong and gives
    an example.

    Args:
        parameter: the parameter's name as the caller knows it, e.g. `token_block`.
        value: the name to check; surrounding spaces are dropped.
        example: a valid name to suggest, usually the parameter's default.

    Raises:
        ConfigurationError: value is empty or holds a character Prefect does not allow.

    Example:
        ```python
        from cm_tasks.settings import check_block_name

        check_block_name("token_block", " carbon-mapper-stac-token ")  # 'carbon-mapper-stac-token'
        ```
    """
    try:
        return validate_block_name(value)
    except ValueError as exc:
        problem = str(exc)
    # Raised outside the except block: the ValueError adds nothing to the message.
    raise ConfigurationError(f"{parameter} is {value!r}: {problem}. Use a name like {example!r}.")


def validate_refresh_mode(value: object) -> RefreshMode:
    """Return value as a refresh mode, or raise ValueError listing the modes."""
    mode = value.strip().lower() if isinstance(value, str) else value
    if mode not in REFRESH_MODES:
        raise ValueError(
            "the refresh mode must be one of " + ", ".join(REFRESH_MODES) + " (default inline)"
        )
    return mode


def load_settings(**overrides: object) -> CarbonMapperSettings:
    """Read the settings from the environment and `.env`, with optional overrides.

    Without overrides, the result is reused while the `CM_*` variables, the working directory
    and its `.env` file stay the same: `get_stac_token()` asks for the settings on every call,
    and parsing them costs far more than the cached token look-up it guards.

    Raises:
        ConfigurationError: a variable holds a value that cannot be used; the message names
            the variable and what it needs to be. Input values are never echoed.
    """
    if overrides:
        return _build(overrides)
    key = _environment_key()
    settings = _cache.get(key)
    if settings is None:
        settings = _build({})
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[key] = settings
    return settings


_CACHE_SIZE = 32
_cache: dict[tuple[object, ...], CarbonMapperSettings] = {}


def _environment_key() -> tuple[object, ...]:
    """Everything the settings are read from: CM_* variables, the directory, its `.env`."""
    variables = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith("CM_")))
    try:
        stat = os.stat(".env")
        dotenv: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        dotenv = None
    return (os.getcwd(), variables, dotenv)


def _build(overrides: dict[str, object]) -> CarbonMapperSettings:
    try:
        return CarbonMapperSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = ".".join(str(part) for part in error["loc"])
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise ConfigurationError(
            "Invalid cm-tasks setting(s): " + "; ".join(problems) + ". "
            "Fix the environment variable or the .env entry."
        ) from None
