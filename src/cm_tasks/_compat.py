"""Every difference between the Prefect versions cm-tasks supports (3.2 to 3.9), in one place.

Each shim names the versions that need it: raising the floor deletes code here and nowhere
else. The rest of the package calls these functions and never tests a version itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError

MIN_LEASE_SECONDS = 60.0
MAX_LEASE_SECONDS = 86400.0
"""The lease durations a Prefect server accepts (3.4.10+)."""

_no_leases: set[str | None] = set()  # Prefect APIs found to lack leases (a 3.2 server)


def prefect_has_leases() -> bool:
    """Whether the installed Prefect client has concurrency leases.

    Prefect 3.2 to 3.4.9: no (`concurrency()` takes `lease_duration` from 3.4.10). Without
    them a slot is held until released, so a holder killed while
    holding it keeps it until an operator frees it (`prefect gcl update NAME --active-slots 0`).
    """
    return "lease_duration" in inspect.signature(concurrency).parameters


@dataclass(frozen=True)
class Slot:
    """One taken slot of a global concurrency limit: its lease, or (no leases) its name."""

    name: str
    lease_id: Any  # None on a Prefect without leases


def take_slot(
    client: SyncPrefectClient, api: str | None, name: str, duration: float
) -> Slot | None:
    """Try once to take the single slot of limit `name` (made if missing); None if held."""
    duration = min(max(duration, MIN_LEASE_SECONDS), MAX_LEASE_SECONDS)
    for _ in range(2):
        try:
            taken, lease_id = _increment(client, api, name, duration)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 423:
                return None
            raise
        if taken:
            return Slot(name, lease_id)
        # No limit of that name yet (or deleted, or a database reset): make it, try again.
        create_limit(client, name)
    raise LookupError(name)


def _increment(
    client: SyncPrefectClient, api: str | None, name: str, duration: float
) -> tuple[bool, Any]:
    if prefect_has_leases() and api not in _no_leases:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=duration
            )
        except PrefectHTTPStatusError as exc:
            # A server without leases (before 3.4.10) under a client with them: 405 (or 404)
            # on the lease endpoint.
            if exc.response.status_code not in (404, 405):
                raise
            _no_leases.add(api)
        else:
            data = response.json()
            return bool(data.get("limits")), data.get("lease_id")
    # Before Prefect 3.4.10: a plain slot, held until released.
    response = client.increment_concurrency_slots(names=[name], slots=1, mode="concurrency")
    return bool(response.json()), None


def create_limit(client: SyncPrefectClient, name: str) -> None:
    """Make the global concurrency limit `name` with one slot; nothing if it exists."""
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    except ObjectAlreadyExists:
        pass
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code != 409:  # Prefect 3.2 does not map 409 to ObjectAlreadyExists
            raise


def renew_slot(client: SyncPrefectClient, slot: Slot, duration: float) -> bool:
    """Make a slot's lease last duration seconds more; False if the server lost the lease.

    Prefect 3.4.10+ answers 410 (or 404) for a lease it does not know: it lapsed, or the server
    restarted (the default lease storage is in memory). Without leases: nothing to renew.
    """
    if slot.lease_id is None:
        return True
    try:
        client.renew_concurrency_lease(slot.lease_id, lease_duration=duration)
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code in (404, 410):
            return False
        raise
    return True


def release_slot(client: SyncPrefectClient, slot: Slot, held_seconds: float) -> None:
    """Give the slot back (by its lease, or, before Prefect 3.4.10, by name)."""
    if slot.lease_id is not None:
        client.release_concurrency_slots_with_lease(slot.lease_id)
    else:
        client.release_concurrency_slots(names=[slot.name], slots=1, occupancy_seconds=held_seconds)


def stopped_before_start(exc: BaseException) -> bool:
    """Whether exc is Prefect's runner refusing a SIGTERM that came while it was starting.

    Prefect 3.2-3.4: the runner's SIGTERM handler calls `stop()`, which raises RuntimeError
    ("Runner has not yet started") until the runner has started. Prefect 3.9 exits 0 instead.
    """
    return isinstance(exc, RuntimeError) and "Runner has not yet started" in str(exc)


def show_serve_banner(deployments: Sequence[Any]) -> None:
    """Print what `prefect.serve` prints once its deployments are registered.

    Prefect 3.2-3.9: `prefect.flows._display_serve_start_message` (private); a plain line of
    the same meaning if a release drops it.
    """
    from prefect import flows

    show = getattr(flows, "_display_serve_start_message", None)
    if show is not None:
        show(*deployments)
        return
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    print(f"Your deployments are being served and polling for scheduled runs! ({names})")
