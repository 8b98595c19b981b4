"""Prefect API calls of the renewal: each bounded in time, each failure a typed error.

Inside `bounded_calls` a request gets at most `CALL_SECONDS` and two retries (not Prefect's
default 6 x 60 s), and a failure becomes a `TokenBlockError` that names what was being done,
never the Prefect error itself (which can carry a request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import httpx
from prefect.context import AsyncClientContext, SyncClientContext
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import (
    PREFECT_API_REQUEST_TIMEOUT,
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)

from cm_tasks import _messages
from cm_tasks.client import retry_after_seconds
from cm_tasks.errors import CarbonMapperError, TokenBlockError

CALL_SECONDS = 10.0
"""Longest wait for one Prefect API request during a renewal."""
_TRANSIENT = (408, 429, 500, 502, 503, 504)

T = TypeVar("T")


def prefect_api() -> str | None:
    """The current Prefect API URL (None: a local, temporary one)."""
    url = PREFECT_API_URL.value()
    return str(url).rstrip("/") if url else None


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a Prefect API error, if it is one."""
    return exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may go away by itself (an outage, a busy or restarting server)."""
    if isinstance(exc, CarbonMapperError):
        return exc.transient
    return isinstance(exc, (httpx.TransportError, TimeoutError)) or status_of(exc) in _TRANSIENT


def call_prefect(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs); a failure of the Prefect API becomes a TokenBlockError."""
    failure: TokenBlockError | None = None
    try:
        return fn(*args, **kwargs)
    except CarbonMapperError:
        raise
    except Exception as exc:
        status = status_of(exc)
        failure = TokenBlockError(
            _messages.prefect_failed(what, prefect_api(), exc, status),
            transient=is_transient(exc),
            status_code=status,
            retry_after=(
                retry_after_seconds(exc.response)
                if isinstance(exc, PrefectHTTPStatusError)
                else None
            ),
        )
    raise failure  # outside the except block: the Prefect error is not chained


@contextmanager
def bounded_calls(what: str) -> Iterator[Callable[..., Any]]:
    """Bound the Prefect requests made inside; yields `call_prefect` for `what`."""
    timeout = min(float(PREFECT_API_REQUEST_TIMEOUT.value()), CALL_SECONDS)
    retries = min(int(PREFECT_CLIENT_MAX_RETRIES.value()), 2)
    with (
        temporary_settings(
            updates={PREFECT_API_REQUEST_TIMEOUT: timeout, PREFECT_CLIENT_MAX_RETRIES: retries}
        ),
        _no_run_client(),
    ):
        yield lambda fn, *args, **kwargs: call_prefect(what, fn, *args, **kwargs)


def without_client_retries() -> AbstractContextManager[object]:
    """Inside, Prefect's client sends each request once: it does not retry it by itself.

    For a request whose caller decides about trying again: one that must not be applied
    twice (a decrement by name: a lost answer may have been applied), or one the renewal
    tries again on its own terms while it listens for news (`_renewal._patiently`).
    """
    return temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0})


def not_applied(exc: BaseException) -> bool:
    """Whether a failed request surely did nothing: it never reached the server, or the server
    (or a proxy) refused it for being busy. A lost answer (a read time-out, a dropped
    connection) leaves that unknown."""
    refused = (httpx.ConnectError, httpx.ConnectTimeout)
    return isinstance(exc, refused) or status_of(exc) in (429, 503)


@contextmanager
def _no_run_client() -> Iterator[None]:
    """Inside, `get_client()` makes a client with the current settings, not the run's one.

    In a flow or task run, `get_client()` (and so `Block.load`) hands out the run's client,
    whose time-out was fixed when it was made: a hung Prefect API held a renewal for minutes.
    """
    variables: list[ContextVar[Any]] = [SyncClientContext.__var__, AsyncClientContext.__var__]
    resets = [(variable, variable.set(None)) for variable in variables]
    try:
        yield
    finally:
        for variable, reset in reversed(resets):
            variable.reset(reset)
