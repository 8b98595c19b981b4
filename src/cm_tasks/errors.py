"""Errors raised by cm-tasks.

Messages say what happened, where (status, endpoint) and how to fix it; they never contain a
password, a token or a request body.

    CarbonMapperError
    ├── ConfigurationError             a CM_* setting or a flow parameter is unusable
    ├── CredentialsBlockError          a Secret block with the account credentials is missing or bad
    ├── TokenBlockError                the token block is missing, unreadable or could not be saved
    │   └── UnusableTokenError         it holds a token that cannot be sent: a refresh replaces it
    ├── RefreshRunError                the refresh deployment's run failed, crashed or was cancelled
    │   └── RefreshTimeoutError        the refresh run did not finish within CM_REFRESH_TIMEOUT
    └── CarbonMapperAPIError           the platform API answered with an error (or not at all)
        ├── UnauthorizedError          401: credentials or access token rejected
        │   └── BadCredentialsError    401 from token/pair: wrong e-mail or password
        ├── PermissionDeniedError      403: the account lacks the needed scope
        ├── InvalidRequestError        400/404/405/409/413/415/422: the API rejected the request
        ├── RateLimitedError           429: too many requests (transient)
        ├── APIUnavailableError        408/500/502/503/504, time-out or no connection (transient)
        └── UnexpectedResponseError    any other status, or a 2xx it cannot read (HTML, bad JSON)

`TokenBlockError` is about the block in Prefect (the Prefect API failing included); a failed
refresh run is not, so `RefreshRunError` is a sibling, not a kind of it: a handler for
"Prefect is unreachable" does not also swallow a refresh that failed on its own.
"""

from __future__ import annotations


class CarbonMapperError(Exception):
    """Base class of every error cm-tasks raises on purpose.

    Attributes:
        transient: whether trying again later may succeed.
    """

    transient: bool = False


class ConfigurationError(CarbonMapperError, ValueError):
    """A `CM_*` setting or a flow parameter is unusable; nothing was sent to the API."""


class CredentialsBlockError(CarbonMapperError):
    """A Secret block holding the account e-mail or password is missing, empty or malformed."""


class TokenBlockError(CarbonMapperError):
    """The token block is missing, unreadable, or could not be saved.

    Attributes:
        status_code: the HTTP status the Prefect API answered, when that is what failed
            (429: the Prefect account is rate-limited); None otherwise.
        retry_after: the seconds its `Retry-After` header asked to wait, if it gave them.
    """

    def __init__(
        self,
        message: str,
        *,
        transient: bool = False,
        status_code: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.transient = transient
        self.status_code = status_code
        self.retry_after = retry_after


class UnusableTokenError(TokenBlockError):
    """The token block holds a token that cannot be sent (edited by hand?): refresh it."""


class RefreshRunError(CarbonMapperError):
    """A run of the refresh deployment (`CM_REFRESH_MODE=deployment`) did not renew the token.

    Attributes:
        flow_run_name: the run's name, as the Prefect UI shows it (None if none was made).
        flow_run_id: the run's id, as a string (None if none was made).
        state_type: the run's state when the error was raised, e.g. `FAILED`.
    """

    def __init__(
        self,
        message: str,
        *,
        flow_run_name: str | None = None,
        flow_run_id: str | None = None,
        state_type: str | None = None,
        transient: bool = False,
    ):
        super().__init__(message)
        self.transient = transient
        self.flow_run_name = flow_run_name
        self.flow_run_id = flow_run_id
        self.state_type = state_type


class RefreshTimeoutError(RefreshRunError):
    """The refresh run was not picked up, or did not finish, within `CM_REFRESH_TIMEOUT`."""


class CarbonMapperAPIError(CarbonMapperError):
    """The Carbon Mapper API answered with an error, or could not be reached.

    Attributes:
        status_code: HTTP status, or None when no response arrived.
        endpoint: the API path called, e.g. `token/pair`.
    """

    def __init__(self, message: str, *, status_code: int | None = None, endpoint: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.endpoint = endpoint


class UnauthorizedError(CarbonMapperAPIError):
    """401: the API did not accept the credentials or access token."""


class BadCredentialsError(UnauthorizedError):
    """401 from `token/pair`: the e-mail or password is wrong, or the account is inactive."""

    def __init__(
        self, message: str, *, status_code: int | None = 401, endpoint: str = "token/pair"
    ):
        super().__init__(message, status_code=status_code, endpoint=endpoint)


class PermissionDeniedError(CarbonMapperAPIError):
    """403: the account is authenticated but may not do this."""


class InvalidRequestError(CarbonMapperAPIError):
    """400/404/405/409/413/415/422: the API rejected the request; `api_message` says why."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        endpoint: str = "",
        api_message: str = "",
    ):
        super().__init__(message, status_code=status_code, endpoint=endpoint)
        self.api_message = api_message


class RateLimitedError(CarbonMapperAPIError):
    """429: too many requests; `retry_after` is the wait the API asked for, in seconds."""

    transient = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = 429,
        endpoint: str = "",
        retry_after: float | None = None,
    ):
        super().__init__(message, status_code=status_code, endpoint=endpoint)
        self.retry_after = retry_after


class APIUnavailableError(CarbonMapperAPIError):
    """The API answered 408/500/502/503/504, timed out, or the connection failed.

    Attributes:
        request_sent: False when the request never reached the API (the connection could
            not be made), so the API certainly did not act on it.
    """

    transient = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        endpoint: str = "",
        request_sent: bool = True,
    ):
        super().__init__(message, status_code=status_code, endpoint=endpoint)
        self.request_sent = request_sent


class UnexpectedResponseError(CarbonMapperAPIError):
    """The API answered with a status cm-tasks does not expect, or a 2xx it cannot read."""
