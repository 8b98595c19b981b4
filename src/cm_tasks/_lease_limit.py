"""The global concurrency limit that serialises the renewals of one token block.

`cm_tasks._refresh_lease` takes its single slot; `cm_tasks.refresh` makes it when it saves a
block for the first time, so that the processes that first wait on that block's renewal find it
there, instead of all creating it at once (one 201, the rest 409 or 503 retried by Prefect's
client).
"""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client

from cm_tasks import _compat
from cm_tasks._prefect_calls import bounded_calls

__all__ = ["LEASE_PREFIX", "create_lease_limit", "lease_name"]

LEASE_PREFIX = "cm-tasks-refresh-"

_logger = logging.getLogger("cm_tasks")


def lease_name(block_name: str) -> str:
    """The global concurrency limit that serialises renewals of block_name.

    Example:
        >>> lease_name("carbon-mapper-stac-token")
        'cm-tasks-refresh-carbon-mapper-stac-token'
    """
    return f"{LEASE_PREFIX}{block_name}"


def create_lease_limit(block_name: str) -> None:
    """Make the renewal limit of block_name on the current Prefect API, if it is missing.

    Never raises, and waits no longer than `bounded_calls` lets a request: without the limit,
    the first renewal makes it (`_compat.take_slot`).
    """
    name = lease_name(block_name)
    try:
        with bounded_calls(f"make the renewal limit {name!r}") as call:
            call(_create, name)
    except Exception as exc:
        _logger.debug("%s A renewal will make it.", exc)


def _create(name: str) -> None:
    with get_client(sync_client=True) as client:
        _compat.create_limit(client, name)
