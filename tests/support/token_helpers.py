"""Helpers for the tests of get_stac_token, the httpx auth, the STAC client and ingest."""

from __future__ import annotations

import contextlib
import time
from datetime import date, datetime, timedelta, timezone

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import SecretStr

from cm_tasks import CarbonMapperStacToken
from cm_tasks.testing import CarbonMapperEmulator

EMAIL_BLOCK = "carbon-mapper-email"
PASSWORD_BLOCK = "carbon-mapper-password"
TOKEN_BLOCK = "carbon-mapper-stac-token"
# A token value no test expects to see printed, logged or raised.
SENTINEL_TOKEN = "sentinel-stac-token-must-never-show-0123456789"
CREATE_STAC = "account/tokens/create-stac"


def wait_for_renewals(block_name: str = TOKEN_BLOCK, timeout: float = 120.0) -> None:
    """Wait until no renewal of block_name on the current Prefect API runs in this process.

    A caller with a valid cached token stops waiting after 10 s; a renewal that then fails
    says so in a warning of its own, logged before it ends.
    """
    from cm_tasks import _renewal
    from cm_tasks._prefect_calls import prefect_api

    deadline = time.monotonic() + timeout
    for key, flight in list(_renewal._flights.items()):
        if key[:2] == (prefect_api(), block_name):  # this Prefect API's: not another test's
            outcome = flight.wait(max(deadline - time.monotonic(), 0.0))
            assert outcome is not None, f"a renewal of {block_name!r} still runs after {timeout} s"


def utc_today() -> date:
    return datetime.now(timezone.utc).date()


def is_days_after_today(day: date, days: int, *, since: date) -> bool:
    """Whether ``day`` is ``days`` after the UTC date of a call that began on ``since``.

    A call that crosses midnight UTC may use either date: both are accepted, nothing else.
    """
    return since <= day - timedelta(days=days) <= utc_today()


def save_token(
    emulator: CarbonMapperEmulator,
    token: str,
    expires_in: timedelta,
    block_name: str = TOKEN_BLOCK,
    *,
    created_ago: timedelta | None = None,
) -> CarbonMapperStacToken:
    """Save token to the block with an expiry of now + expires_in (whatever the JWT says).

    It was created created_ago (default: as a 14-day token would have been, at least a day
    ago): a token created minutes ago is one cm-tasks does not renew on a 401.
    """
    now = datetime.now(timezone.utc)
    if created_ago is None:
        created_ago = max(timedelta(days=14) - expires_in, timedelta(days=1))
    block = CarbonMapperStacToken(
        token=token,  # type: ignore[arg-type]
        name="saved-by-test",
        expires_at=now + expires_in,
        created_at=now - created_ago,
        scopes=["stac", "catalog:read"],
        base_url=emulator.base_url,
    )
    # _sync: async tests call this from the event loop's thread, where save() is a coroutine.
    block.save(block_name, overwrite=True, _sync=True)  # type: ignore[call-arg]
    return block


def token_block(expires_in: timedelta, **fields: object) -> CarbonMapperStacToken:
    """A token block holding SENTINEL_TOKEN that expires `expires_in` from now (not saved)."""
    now = datetime.now(timezone.utc)
    values: dict[str, object] = {
        "token": SecretStr(SENTINEL_TOKEN),
        "name": "test-token",
        "expires_at": now + expires_in,
        "created_at": now,
        "scopes": ["stac", "catalog:read"],
        "base_url": "http://127.0.0.1:1/api/v1/",
    }
    values.update(fields)
    return CarbonMapperStacToken(**values)  # type: ignore[arg-type]


def save_token_expiring_in(block_name: str, left: timedelta, name: str = "weekly") -> datetime:
    """Save a SENTINEL_TOKEN block that expires `left` from now, for no API; returns its expiry."""
    expires_at = datetime.now(timezone.utc) + left
    CarbonMapperStacToken(
        token=SENTINEL_TOKEN,  # type: ignore[arg-type]
        name=name,
        expires_at=expires_at,
        created_at=expires_at - timedelta(days=14),
        scopes=["stac"],
        base_url="http://127.0.0.1:9/api/v1/",
    ).save(block_name, overwrite=True, _sync=True)  # type: ignore[call-arg]
    return expires_at


def mint(emulator: CarbonMapperEmulator) -> str:
    """A valid STAC token, without an HTTP request."""
    return str(emulator.issue_stac_token()["token_value"])


def delete_token_block(block_name: str = TOKEN_BLOCK) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_block_document(
            client.read_block_document_by_name(block_name, "carbon-mapper-stac-token").id
        )


def stored_token(block_name: str = TOKEN_BLOCK) -> str:
    block = CarbonMapperStacToken.load(block_name, _sync=True)  # type: ignore[call-arg]
    return str(block.get())


def assert_no_secrets(text: str, emulator: CarbonMapperEmulator) -> None:
    assert emulator.password not in text
    for token in emulator.issued_access_tokens + emulator.issued_stac_tokens:
        assert token not in text
