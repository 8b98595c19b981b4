"""Two refreshes at once in one process: the block ends up consistent and loadable.

`Block.save(overwrite=True)` is several API calls, so two savers race; the block's data is
still written in one request, so whichever save lands last must leave a token that matches
its own metadata (name, expiry) - never one run's token with the other's metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import SecretStr

from cm_tasks import (
    CarbonMapperStacToken,
    load_settings,
    refresh_stac_token,
    resolve_request,
    run_refresh,
)
from cm_tasks._jwt import decode_claims
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.leaks import assert_no_leak, collect_secrets
from tests.support.token_helpers import is_days_after_today, utc_today

TOKEN_BLOCK = "carbon-mapper-stac-token"
# Different lifetimes tell the two runs apart by the token's own exp claim.
RUNS = {"first-run": 14, "second-run": 21}


def _delete_token_block() -> None:
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(TOKEN_BLOCK, "carbon-mapper-stac-token")
        except ObjectNotFound:
            return
        client.delete_block_document(document.id)


def _assert_consistent(emulator: CarbonMapperEmulator, since: date) -> CarbonMapperStacToken:
    block = CarbonMapperStacToken.load(TOKEN_BLOCK)
    assert block.get() in emulator.issued_stac_tokens
    exp = datetime.fromtimestamp(decode_claims(block.get())["exp"], timezone.utc)  # type: ignore[index]
    assert block.expires_at == exp
    lifetime = RUNS[block.name]
    assert is_days_after_today(exp.date(), lifetime, since=since)
    # the emulator's record of the request that made this token
    requests = {r["name"]: r["expiration_date"] for r in emulator.stac_token_requests}
    assert requests[block.name] == exp.date().isoformat()
    assert block.base_url == emulator.base_url
    return block


@pytest.fixture
def saves_in_lockstep(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Hold each save until both runs are about to save, so they really overlap."""
    real = CarbonMapperStacToken.save
    barrier = threading.Barrier(2, timeout=30)
    saved: list[str] = []

    def save(self: CarbonMapperStacToken, *args: Any, **kwargs: Any) -> Any:
        if self.name in RUNS:
            barrier.wait()
        result = real(self, *args, **kwargs)
        saved.append(self.name)
        return result

    monkeypatch.setattr(CarbonMapperStacToken, "save", save)
    return saved


def _both(run: Callable[[str, int], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run, name, days) for name, days in RUNS.items()]
        return [future.result(timeout=120) for future in futures]


@pytest.mark.parametrize("block_exists", [False, True], ids=["new-block", "existing-block"])
def test_two_inline_refreshes_at_once(
    carbon_mapper_credentials: CarbonMapperEmulator,
    saves_in_lockstep: list[str],
    block_exists: bool,
) -> None:
    if not block_exists:
        _delete_token_block()
    else:
        now = datetime.now(timezone.utc)
        CarbonMapperStacToken(
            token=SecretStr("earlier-token"),
            name="earlier",
            expires_at=now + timedelta(days=3),
            created_at=now,
            base_url=carbon_mapper_credentials.base_url,
        ).save(TOKEN_BLOCK, overwrite=True)
        saves_in_lockstep.clear()
    settings = load_settings()

    def run(name: str, days: int) -> CarbonMapperStacToken:
        request = resolve_request(settings, token_name=name, lifetime_days=days)
        return run_refresh(request, settings)

    since = utc_today()
    tokens = _both(run)

    assert sorted(saves_in_lockstep) == sorted(RUNS)
    assert len(carbon_mapper_credentials.issued_stac_tokens) == 2
    block = _assert_consistent(carbon_mapper_credentials, since)
    assert block.get() in {t.get() for t in tokens}
    assert_no_leak(collect_secrets(carbon_mapper_credentials), texts={"block": repr(block)})


def test_two_flow_runs_at_once(carbon_mapper_credentials: CarbonMapperEmulator) -> None:
    def run(name: str, days: int) -> Any:
        return refresh_stac_token(token_name=name, lifetime_days=days, return_state=True)

    since = utc_today()
    states = _both(run)

    assert all(state.is_completed() for state in states)
    assert carbon_mapper_credentials.requests("account/tokens/create-stac") == 2
    block = _assert_consistent(carbon_mapper_credentials, since)
    summaries = {state.result()["token_name"]: state.result() for state in states}
    assert summaries[block.name]["expires_at"].startswith(block.expires_at.date().isoformat())
