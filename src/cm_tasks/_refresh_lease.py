"""One inline refresh at a time across every process that shares a Prefect API.

The per-process lock of `cm_tasks.access` stops a refresh storm inside one process; this lease
stops it across processes (30 worker processes finding the same token about to expire would
otherwise make 30 new tokens). It is a Prefect global concurrency limit of 1 per token block,
created on first use; the lease expires by itself if its holder dies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_URL

LEASE_PREFIX = "cm-tasks-refresh-"
LEASE_TIMEOUT_SECONDS = 300.0
"""How long to wait for another process's refresh before giving up."""
LEASE_DURATION_SECONDS = 120.0
"""How long a lease outlives a holder that died without releasing it."""

# Limits known to exist, per Prefect API (a process may talk to more than one).
_ensured: set[tuple[str | None, str]] = set()
_ensured_lock = threading.Lock()


def lease_name(block_name: str) -> str:
    """The global concurrency limit that serialises refreshes of block_name."""
    return f"{LEASE_PREFIX}{block_name}"


def _ensure_limit(name: str) -> None:
    key = (PREFECT_API_URL.value(), name)
    with _ensured_lock:
        if key in _ensured:
            return
        with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        _ensured.add(key)


@contextmanager
def refresh_lease(
    block_name: str, timeout_seconds: float = LEASE_TIMEOUT_SECONDS
) -> Iterator[None]:
    """Hold the refresh lease of block_name; other processes wait until it is released.

    Raises:
        TimeoutError: the lease was not free within timeout_seconds.
    """
    name = lease_name(block_name)
    _ensure_limit(name)
    with concurrency(
        name,
        occupy=1,
        timeout_seconds=timeout_seconds,
        lease_duration=LEASE_DURATION_SECONDS,
        strict=True,
    ):
        yield
