"""When to try an API call again, and how long to wait first: a small pure policy."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cm_tasks.errors import APIUnavailableError, CarbonMapperAPIError, RateLimitedError

# 503 Service Unavailable: the server refused the request without acting on it (RFC 9110).
_UNPROCESSED_STATUSES = frozenset({429, 503})


def unprocessed(error: Exception) -> bool:
    """Whether the API certainly did not act on the failed request.

    True for a 429, a 503 and a connection that could not be made; False for a time-out
    waiting for the answer, a connection lost after sending, and 500/502/504, after which the
    API may have done what was asked. Only an unprocessed request is safe to send again when
    the call is not idempotent (`create-stac` makes a new token each time).

    Example:
        ```python
        from cm_tasks.errors import APIUnavailableError
        from cm_tasks.retry import unprocessed

        assert unprocessed(APIUnavailableError("503", status_code=503))
        assert not unprocessed(APIUnavailableError("read time-out"))
        ```
    """
    if isinstance(error, RateLimitedError):
        return True
    if isinstance(error, APIUnavailableError):
        return not error.request_sent or error.status_code in _UNPROCESSED_STATUSES
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient faults with exponential backoff and jitter; never retry the rest.

    Transient: connection failures, time-outs, 500/502/503/504 and 429. A 429 waits what
    its `Retry-After` asks, capped at `retry_after_cap`. Everything else (400, 401, 403,
    404, 422, unreadable answers) fails after one call: asking again would not help. A call
    that is not idempotent is retried only when the API certainly did not act on it.

    Attributes:
        max_attempts: calls in total, counting the first.
        backoff: wait before the first retry, in seconds; doubles for each further retry.
        max_backoff: longest backoff wait, in seconds.
        jitter: spread each backoff wait by up to this fraction, so that many clients
            failing together do not retry together.
        retry_after_cap: longest wait honoured from a `Retry-After` header, in seconds.

    Example:
        ```python
        from cm_tasks.errors import APIUnavailableError
        from cm_tasks.retry import RetryPolicy

        policy = RetryPolicy(max_attempts=3, backoff=0.5, jitter=0)
        assert policy.next_wait(APIUnavailableError("503"), attempt=1) == 0.5
        assert policy.next_wait(APIUnavailableError("503"), attempt=3) is None
        ```
    """

    max_attempts: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    jitter: float = 0.2
    retry_after_cap: float = 60.0
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def next_wait(self, error: Exception, attempt: int, *, idempotent: bool = True) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise error.

        Args:
            error: what the attempt raised.
            attempt: the number of the attempt that failed, starting at 1.
            idempotent: whether sending the request twice does no harm; when False, only a
                request the API certainly did not act on is retried (see `unprocessed`).
        """
        if attempt >= self.max_attempts:
            return None
        if not isinstance(error, CarbonMapperAPIError) or not error.transient:
            return None
        if not idempotent and not unprocessed(error):
            return None
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            return max(0.0, min(float(error.retry_after), self.retry_after_cap))
        wait = min(self.backoff * 2.0 ** min(attempt - 1, 30), self.max_backoff)
        spread = wait * self.jitter
        return max(0.0, wait + self._random.uniform(-spread, spread))
