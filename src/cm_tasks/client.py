"""The HTTP client for the two Carbon Mapper calls: typed results in, typed errors out.

This is the only module that talks to the platform API's token endpoints. It turns every
response into a result model or one of the errors in `cm_tasks.errors`, retries transient
faults per its `RetryPolicy`, and unwraps a secret only on the line that sends it.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from types import TracebackType
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cm_tasks._jwt import decode_claims
from cm_tasks._logging import RunLogger
from cm_tasks._version import __version__
from cm_tasks.errors import (
    APIUnavailableError,
    BadCredentialsError,
    CarbonMapperAPIError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from cm_tasks.retry import RetryPolicy, unprocessed
from cm_tasks.settings import DEFAULT_BASE_URL, CarbonMapperSettings

TOKEN_PAIR_PATH = "token/pair"
CREATE_STAC_PATH = "account/tokens/create-stac"
USER_AGENT = f"cm-tasks/{__version__}"
CONNECT_TIMEOUT_CAP = 10.0
"""Longest wait, in seconds, to connect to the API, whatever `CM_TIMEOUT` allows a response."""
_MAX_API_MESSAGE = 300
_TRANSIENT_STATUSES = frozenset({408, 500, 502, 503, 504})
_INVALID_REQUEST_STATUSES = frozenset({400, 404, 405, 409, 413, 415, 422})
_UNREADABLE = object()

T = TypeVar("T")


def api_timeout(timeout: float) -> httpx.Timeout:
    """The time-outs of a call to the API: `timeout` for each response, at most 10 s to connect.

    The one place for the connect bound: a host that does not answer fails fast, while a slow
    answer (the API can take a while to make a token) still gets all of `CM_TIMEOUT`.

    Example:
        ```python
        import httpx
        from cm_tasks.client import api_timeout

        http = httpx.Client(timeout=api_timeout(30.0))  # 30 s per response, 10 s to connect
        ```
    """
    return httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_CAP))


class _Logger(Protocol):
    def warning(self, msg: str, *args: Any) -> None: ...


class TokenPair(BaseModel):
    """The answer of `token/pair`: a short-lived access token (and its refresh token)."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    access: SecretStr = Field(description="Bearer token for account endpoints; minutes long.")
    refresh: SecretStr | None = Field(None, description="Token to get a new access token.")


class IssuedStacToken(BaseModel):
    """A scoped STAC token as `account/tokens/create-stac` issued it, with what it tells of it."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    token: SecretStr = Field(description="The scoped token (shown by the API only once).")
    name: str = Field(description="The token's name on the platform.")
    expires_at: datetime = Field(description="When the token stops working (UTC).")
    created_at: datetime = Field(description="When the token was issued (UTC).")
    scopes: list[str] = Field(default_factory=list, description="Scopes the token grants.")


def _utc(value: datetime) -> datetime:
    return (
        value.replace(tzinfo=timezone.utc)
        if value.tzinfo is None
        else value.astimezone(timezone.utc)
    )


def _scrub(text: str, secrets: Iterable[str]) -> str:
    # Longest first: masking a secret inside a longer one would leave the rest readable.
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "**********")
    return text


def _api_message(response: httpx.Response, secrets: Iterable[str]) -> str:
    """The API's own explanation of an error, in its words, without echoing any input."""
    try:
        body = response.json()
    except ValueError:
        return ""
    parts: list[str] = []
    if isinstance(body, dict):
        detail = body.get("detail", body.get("message"))
        if isinstance(detail, str):
            parts.append(detail)
        elif isinstance(detail, list):
            for item in detail:
                if isinstance(item, dict) and isinstance(item.get("msg"), str):
                    # django-ninja's loc is ["body", "<schema>", "<field>"]: the field is last
                    loc = item.get("loc")
                    field_name = str(loc[-1]) if isinstance(loc, list) and loc else ""
                    parts.append(f"{field_name}: {item['msg']}" if field_name else item["msg"])
        for item in body.get("messages", []) if isinstance(body.get("messages"), list) else []:
            if isinstance(item, dict) and isinstance(item.get("message"), str):
                parts.append(item["message"])
    message = _scrub("; ".join(parts), secrets)
    return message[:_MAX_API_MESSAGE] + ("..." if len(message) > _MAX_API_MESSAGE else "")


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The seconds a response's `Retry-After` asks to wait (seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (_utc(when) - datetime.now(timezone.utc)).total_seconds())


def error_for_response(
    response: httpx.Response, endpoint: str, secrets: Iterable[str] = ()
) -> CarbonMapperAPIError:
    """Map an error response (status >= 400) to the matching typed error."""
    status = response.status_code
    api_message = _api_message(response, secrets)
    said = f": {api_message}" if api_message else ""
    where = f"{status} from {endpoint}"
    if status == 401 and endpoint == TOKEN_PAIR_PATH:
        return BadCredentialsError(
            f"The Carbon Mapper API rejected the e-mail or password ({where}){said}. "
            "Check the account credentials.",
            status_code=status,
            endpoint=endpoint,
        )
    if status == 401:
        return UnauthorizedError(
            f"The Carbon Mapper API did not accept the access token ({where}){said}. "
            "It was issued moments before: run the refresh again, and report it to the "
            "cm-tasks maintainers if this persists.",
            status_code=status,
            endpoint=endpoint,
        )
    if status == 403:
        return PermissionDeniedError(
            f"The Carbon Mapper account may not do this ({where}){said}. "
            "Check the account's scopes on the platform.",
            status_code=status,
            endpoint=endpoint,
        )
    if status == 429:
        retry_after = retry_after_seconds(response)
        hint = f"; it asked to wait {retry_after:.0f} s" if retry_after is not None else ""
        return RateLimitedError(
            f"The Carbon Mapper API is rate limiting requests ({where}){hint}.",
            endpoint=endpoint,
            retry_after=retry_after,
        )
    if status in _TRANSIENT_STATUSES:
        return APIUnavailableError(
            f"The Carbon Mapper API is unavailable ({where} {response.reason_phrase}). "
            "Try again later.",
            status_code=status,
            endpoint=endpoint,
        )
    if status in _INVALID_REQUEST_STATUSES:
        return InvalidRequestError(
            f"The Carbon Mapper API rejected the request ({where}){said}. Fix the value it "
            "names (token_name, lifetime_days, or the e-mail in the Secret block) and run again.",
            status_code=status,
            endpoint=endpoint,
            api_message=api_message,
        )
    return UnexpectedResponseError(
        f"The Carbon Mapper API answered with an unexpected status ({where}).",
        status_code=status,
        endpoint=endpoint,
    )


def _json_object(response: httpx.Response, endpoint: str, key: str) -> dict[str, Any]:
    """The JSON object of a 2xx response, which must hold a token under key (stripped).

    Both keys read this way (`access`, `token_value`) are tokens sent later in a header: the
    value is made header-safe here, the one place every answer passes through.
    """
    content_type = response.headers.get("content-type", "")
    where = f"{response.status_code} from {endpoint}"
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        # Raised below, outside this block: the decoding error (kept as __context__ even
        # with `from None`) holds the whole body, which may hold a token.
        body = _UNREADABLE
    if body is _UNREADABLE:
        if "html" in content_type:
            kind = "HTML instead of JSON"
        elif "json" in content_type:
            kind = "malformed JSON"
        else:
            kind = f"non-JSON ({content_type or 'no type'}) instead of JSON"
        raise UnexpectedResponseError(
            f"The Carbon Mapper API answered with {kind} ({where}). "
            "Is CM_BASE_URL right (it should end in /api/v1/)?",
            status_code=response.status_code,
            endpoint=endpoint,
        )
    if not isinstance(body, dict) or not isinstance(body.get(key), str) or not body[key]:
        raise UnexpectedResponseError(
            f"The Carbon Mapper API's answer has no {key!r} ({where}). "
            "The API may have changed: please report this to the cm-tasks maintainers.",
            status_code=response.status_code,
            endpoint=endpoint,
        )
    return {**body, key: _token_field(body, response, endpoint, key)}


def header_safe_token(value: str) -> str:
    """value without surrounding whitespace, if it can go into an `Authorization` header.

    A token with a trailing newline (an API answer, a block edited by hand) would make httpx
    raise an error that quotes the header, token included: it is stripped here, before it is
    ever sent. What remains must be visible ASCII (no space or control character inside).

    Raises:
        ValueError: nothing is left, or a character cannot be sent in a header. The message
            says which kind, never the value.
    """
    token = value.strip()
    if not token:
        raise ValueError("the token is empty")
    if not all("\x21" <= c <= "\x7e" for c in token):
        raise ValueError(
            "the token contains a space, control or non-ASCII character, which cannot be sent "
            "in an HTTP header"
        )
    return token


def _token_field(body: dict[str, Any], response: httpx.Response, endpoint: str, key: str) -> str:
    """body[key] as a header-safe token, or UnexpectedResponseError that never quotes it."""
    try:
        return header_safe_token(body[key])
    except ValueError as exc:
        problem = str(exc)
    raise UnexpectedResponseError(
        f"The Carbon Mapper API's {key!r} cannot be used ({response.status_code} from "
        f"{endpoint}): {problem}. Please report this to the cm-tasks maintainers.",
        status_code=response.status_code,
        endpoint=endpoint,
    )


def _parse_datetime(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


def _parse_date(value: object) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def _claim_time(claims: dict[str, Any], name: str) -> datetime | None:
    """A JWT time claim (seconds since the epoch) as UTC, or None if absent or absurd."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, ValueError, OSError):
        return None


def parse_issued_stac_token(
    body: dict[str, Any], requested_name: str, requested_expiration: date
) -> IssuedStacToken:
    """Build an `IssuedStacToken` from a create-stac answer, tolerant of missing metadata.

    The expiry comes from the JWT `exp` claim when the token is a JWT (exact), else from the
    answer's `expiration_date` (or the requested one) at 00:00 UTC, the earliest it may lapse.
    """
    token: str = body["token_value"]
    claims = decode_claims(token) or {}
    expires_at = _claim_time(claims, "exp")
    if expires_at is None:
        expiry_date = _parse_date(body.get("expiration_date")) or requested_expiration
        expires_at = datetime.combine(expiry_date, dt_time.min, tzinfo=timezone.utc)
    created_at = _parse_datetime(body.get("created"))
    if created_at is None:
        created_at = _claim_time(claims, "iat")
    scopes: list[str] = []
    if isinstance(body.get("scopes"), list):
        scopes = [str(scope) for scope in body["scopes"]]
    elif isinstance(claims.get("scope"), str):
        scopes = claims["scope"].split()
    name = body.get("name")
    return IssuedStacToken(
        token=SecretStr(token),
        name=name if isinstance(name, str) and name else requested_name,
        expires_at=expires_at,
        created_at=created_at or datetime.now(timezone.utc),
        scopes=scopes,
    )


class CarbonMapperClient:
    """A small synchronous client for the Carbon Mapper token endpoints.

    One client keeps one connection pool, so both calls of a refresh share a connection. Use
    it as a context manager, or call `close()`.

    Args:
        base_url: API base URL ending in `/api/v1/` (a missing slash is added).
        timeout: seconds to wait for each response (and at most 10 s to connect).
        retry: the retry policy; defaults to `RetryPolicy()`.
        transport: an httpx transport, e.g. `httpx.MockTransport` in tests.
        logger: where retries are reported; defaults to the current Prefect run's logger,
            or the `cm_tasks` logger outside a run.
        sleep: how to wait between attempts (tests pass a fake).
        clock: the current time, UTC (tests pass a fake); a token's expiry date is counted
            from it when create-stac is sent.

    Example:
        ```python
        from datetime import date, timedelta
        from pydantic import SecretStr
        from cm_tasks import CarbonMapperClient

        with CarbonMapperClient("https://api.carbonmapper.org/api/v1/") as client:
            pair = client.get_token_pair(SecretStr("me@example.org"), SecretStr("..."))
            stac = client.create_stac_token(
                pair.access, "my-token", date.today() + timedelta(days=14)
            )
            print(stac.name, stac.expires_at)
        ```
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        logger: _Logger | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.retry = retry or RetryPolicy()
        self._logger: _Logger = logger or RunLogger()
        self._sleep = sleep
        self._clock = clock
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=api_timeout(timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: CarbonMapperSettings, **kwargs: Any) -> CarbonMapperClient:
        """A client configured by `CM_*` settings (base URL, time-out, retry policy)."""
        retry = RetryPolicy(
            max_attempts=settings.max_attempts,
            backoff=settings.retry_backoff,
            retry_after_cap=settings.retry_after_cap,
        )
        kwargs.setdefault("retry", retry)
        return cls(settings.base_url, timeout=settings.timeout, **kwargs)

    def __enter__(self) -> CarbonMapperClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CarbonMapperClient(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def get_token_pair(self, email: SecretStr, password: SecretStr) -> TokenPair:
        """Exchange the account e-mail and password for an access token (`POST token/pair`).

        Raises:
            BadCredentialsError: the API rejected the e-mail or password (not retried).
            CarbonMapperAPIError: any other failure, after retrying the transient ones.
        """
        secrets = (email.get_secret_value(), password.get_secret_value())
        body = self._post(
            TOKEN_PAIR_PATH,
            lambda: {"email": secrets[0], "password": secrets[1]},
            secrets=secrets,
            required_key="access",
        )
        refresh = body.get("refresh")
        return TokenPair(
            access=SecretStr(body["access"]),
            refresh=SecretStr(refresh) if isinstance(refresh, str) else None,
        )

    def create_stac_token(
        self,
        access_token: SecretStr,
        name: str,
        expiration_date: date | None = None,
        *,
        lifetime_days: int | None = None,
    ) -> IssuedStacToken:
        """Create a scoped STAC token (`POST account/tokens/create-stac`).

        Args:
            access_token: from `get_token_pair`.
            name: the token's name on the platform.
            expiration_date: the day the token lapses (the API takes a date, not a time).
            lifetime_days: instead of expiration_date: the token lapses this many days after
                the UTC date at which the request is sent (each attempt counts again), so a
                request sent just after midnight never asks for a date the API now calls
                today.

        Not idempotent: retried only when the API cannot have acted on the request (no
        connection, 429, 503), never after a time-out, a lost connection or 500/502/504,
        where a retry could create a second live token.

        Raises:
            CarbonMapperAPIError: the API refused or failed, after retrying transient faults.
        """
        if (expiration_date is None) == (lifetime_days is None):
            raise TypeError("give expiration_date or lifetime_days, not both or neither")
        access = access_token.get_secret_value()
        sent: list[date] = []

        def payload() -> dict[str, str]:
            day = expiration_date or self._clock().date() + timedelta(days=lifetime_days or 0)
            sent.append(day)
            return {"name": name, "expiration_date": day.isoformat()}

        body = self._post(
            CREATE_STAC_PATH,
            payload,
            secrets=(access,),
            required_key="token_value",
            headers={"Authorization": f"Bearer {access}"},
            # Each call makes a new token: retried only where the API cannot have acted.
            idempotent=False,
        )
        return parse_issued_stac_token(body, name, sent[-1])

    def _post(
        self,
        endpoint: str,
        payload: Callable[[], dict[str, str]],
        *,
        secrets: tuple[str, ...],
        required_key: str,
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        attempt = 1
        while True:
            try:
                response = self._send(endpoint, payload(), headers)
                if response.status_code >= 400:
                    raise error_for_response(response, endpoint, secrets)
                return _json_object(response, endpoint, required_key)
            except CarbonMapperAPIError as caught:
                error = caught
            # Decided and raised outside the except block, so that no error carries another
            # in its __context__.
            wait = self.retry.next_wait(error, attempt, idempotent=idempotent)
            if wait is None:
                if not idempotent:
                    error = _maybe_processed(error)
                raise error
            self._logger.warning(
                "%s Retrying in %.1f s (attempt %d of %d).",
                str(error),
                wait,
                attempt + 1,
                self.retry.max_attempts,
            )
            self._sleep(wait)
            attempt += 1

    def _send(
        self, endpoint: str, payload: dict[str, str], headers: dict[str, str] | None
    ) -> httpx.Response:
        error: CarbonMapperAPIError
        # Every error is raised after the except blocks: httpx's exception holds the request
        # (the password in its body, the access token in its headers), and `raise ... from
        # None` inside the block would still keep it as __context__.
        try:
            return self._http.post(
                endpoint,
                content=json.dumps(payload),
                headers={"Content-Type": "application/json", **(headers or {})},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            error = APIUnavailableError(
                f"Could not reach the Carbon Mapper API at {self.base_url} "
                f"({type(exc).__name__} on {endpoint}).",
                endpoint=endpoint,
                request_sent=False,
            )
        except httpx.TimeoutException as exc:
            error = APIUnavailableError(
                f"The Carbon Mapper API did not answer in time ({type(exc).__name__} on "
                f"{endpoint}; CM_TIMEOUT={self._http.timeout.read}s).",
                endpoint=endpoint,
            )
        except httpx.TransportError as exc:
            error = APIUnavailableError(
                f"The connection to the Carbon Mapper API at {self.base_url} was lost "
                f"({type(exc).__name__} on {endpoint}).",
                endpoint=endpoint,
            )
        except httpx.RequestError as exc:  # e.g. DecodingError: a body that is not what it says
            error = UnexpectedResponseError(
                f"The Carbon Mapper API's answer could not be read ({type(exc).__name__} on "
                f"{endpoint}).",
                endpoint=endpoint,
            )
        raise error


def _maybe_processed(error: CarbonMapperAPIError) -> CarbonMapperAPIError:
    """The error of a non-idempotent call that was not retried because it may have worked."""
    if not isinstance(error, APIUnavailableError) or unprocessed(error):
        return error
    return APIUnavailableError(
        f"{error} The API may have created the token before the answer was lost; cm-tasks "
        "does not ask again, as that could create a second live token. Run the refresh "
        "again (a token that was created but never saved lapses on its expiry date).",
        status_code=error.status_code,
        endpoint=error.endpoint,
        request_sent=error.request_sent,
    )
