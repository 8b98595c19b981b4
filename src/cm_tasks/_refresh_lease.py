"""One inline refresh at a time across every process that shares a Prefect API.

The per-process lock of `cm_tasks.access` stops a refresh storm inside one process; this lease
stops it across processes (30 worker processes finding the same token about to expire would
otherwise make 30 new tokens). It is a Prefect global concurrency limit of 1 per token block,
created on first use; the lease expires by itself if its holder dies.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL

LEASE_PREFIX = "cm-tasks-refresh-"
LEASE_TIMEOUT_SECONDS = 300.0
"""How long to wait for another process's refresh before giving up."""
LEASE_DURATION_SECONDS = 120.0
"""How long a lease outlives a holder that died without releasing it."""

# Limits known to exist, per Prefect API (a process may talk to more than one).
_ensured: set[tuple[str | None, str]] = set()
_ensured_lock = threading.Lock()


def lease_kwargs() -> dict[str, Any]:
    """`lease_duration=` where the installed Prefect's `concurrency()` takes it (3.4 and later).

    Before that a slot has no lease: it is held until released, so one refresh at a time still
    holds, but a holder killed mid-refresh keeps the slot until an operator frees it
    (`prefect gcl update cm-tasks-refresh-<block> --active-slots 0`; see the README).
    """
    if "lease_duration" in inspect.signature(concurrency).parameters:
        return {"lease_duration": LEASE_DURATION_SECONDS}
    return {}


def lease_name(block_name: str) -> str:
    """The global concurrency limit that serialises refreshes of block_name."""
    return f"{LEASE_PREFIX}{block_name}"


def _ensure_limit(name: str) -> None:
    key = (PREFECT_API_URL.value(), name)
    with _ensured_lock:
        if key in _ensured:
            return
        with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except PrefectHTTPStatusError as exc:
                if not _already_exists(exc):
                    raise
        _ensured.add(key)


def _already_exists(exc: PrefectHTTPStatusError) -> bool:
    # Prefect 3.2's sync client raises the server's 409 as is (3.4 on: ObjectAlreadyExists).
    return exc.response.status_code == 409


@contextmanager
def refresh_lease(block_name: str) -> Iterator[None]:
    """Hold the refresh lease of block_name; other processes wait until it is released."""
    name = lease_name(block_name)
    _ensure_limit(name)
    with concurrency(
        name,
        occupy=1,
        timeout_seconds=LEASE_TIMEOUT_SECONDS,
        strict=True,
        **lease_kwargs(),
    ):
        yield
