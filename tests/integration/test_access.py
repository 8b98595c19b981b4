"""get_stac_token / aget_stac_token: cache, re-read, inline refresh, single-flight."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import timedelta

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

from cm_tasks import (
    CarbonMapperStacToken,
    ConfigurationError,
    aget_stac_token,
    clear_token_cache,
    get_stac_token,
    token_cache_info,
)
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.token_helpers import (
    CREATE_STAC,
    assert_no_secrets,
    delete_token_block,
    mint,
    save_token,
    stored_token,
)


@pytest.fixture
def token_env(carbon_mapper_token_block: CarbonMapperStacToken) -> CarbonMapperStacToken:
    """Demo credentials in the Secret blocks, a valid token block, an empty cache."""
    return carbon_mapper_token_block


@pytest.fixture
def no_block(token_env: CarbonMapperStacToken) -> None:
    delete_token_block()
    clear_token_cache()


def test_reads_the_block_once_while_the_token_is_fresh(
    token_env: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    before = token_cache_info()

    tokens = {get_stac_token() for _ in range(20)}

    after = token_cache_info()
    assert tokens == {token_env.get()}
    assert after.block_reads - before.block_reads == 1
    assert after.refreshes == before.refreshes
    assert "carbon-mapper-stac-token" in after.cached_blocks
    assert carbon_mapper_emulator.requests(CREATE_STAC) == 0


def test_clear_token_cache_makes_the_next_call_read_the_block(
    token_env: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    get_stac_token()
    newer = save_token(carbon_mapper_emulator, mint(carbon_mapper_emulator), timedelta(days=9))
    assert get_stac_token() == token_env.get()  # cached: the block is not read again

    clear_token_cache("carbon-mapper-stac-token")

    assert get_stac_token() == newer.get()


def test_near_expiry_rereads_the_block_another_process_refreshed(
    token_env: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    old = save_token(emu, mint(emu), timedelta(minutes=10))
    assert get_stac_token(min_valid=timedelta(0)) == old.get()  # cached, 10 min left
    # Another process refreshes the block meanwhile.
    new = save_token(emu, mint(emu), timedelta(days=13))
    before = token_cache_info()

    token = get_stac_token()  # default min_valid: 1 hour > 10 minutes

    assert token == new.get()
    assert token_cache_info().block_reads - before.block_reads == 1
    assert token_cache_info().refreshes == before.refreshes
    assert emu.requests(CREATE_STAC) == 0


def test_expiring_block_is_refreshed_inline_and_saved(
    token_env: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emu = carbon_mapper_emulator
    save_token(emu, mint(emu), timedelta(minutes=30))
    caplog.set_level(logging.DEBUG)

    token = get_stac_token(min_valid=timedelta(hours=2))

    assert emu.requests(CREATE_STAC) == 1
    assert token == emu.issued_stac_tokens[-1]
    assert stored_token() == token
    assert get_stac_token(min_valid=timedelta(hours=2)) == token  # now cached
    assert emu.requests(CREATE_STAC) == 1
    assert "missing or about to expire" in caplog.text
    assert_no_secrets(caplog.text, emu)


def test_missing_block_is_created_inline(
    no_block: None, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    token = get_stac_token()

    assert token == carbon_mapper_emulator.issued_stac_tokens[-1]
    assert stored_token() == token
    block = CarbonMapperStacToken.load("carbon-mapper-stac-token")
    assert block.base_url == carbon_mapper_emulator.base_url
    assert block.time_left() > timedelta(days=12)


def test_threads_share_one_refresh(
    no_block: None, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    carbon_mapper_emulator.latency = 0.05  # widen the window in which callers overlap
    barrier = threading.Barrier(12)
    tokens: list[str] = []

    def call() -> None:
        barrier.wait()
        tokens.append(get_stac_token())

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(tokens) == 12
    assert set(tokens) == {carbon_mapper_emulator.issued_stac_tokens[-1]}
    assert carbon_mapper_emulator.requests(CREATE_STAC) == 1


async def test_asyncio_tasks_share_one_refresh(
    no_block: None, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    carbon_mapper_emulator.latency = 0.05
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        tokens = await asyncio.gather(*(aget_stac_token() for _ in range(12)))
    finally:
        beat.cancel()

    assert set(tokens) == {carbon_mapper_emulator.issued_stac_tokens[-1]}
    assert carbon_mapper_emulator.requests(CREATE_STAC) == 1
    # The event loop kept running during the refresh (two requests of >= 50 ms each).
    assert ticks >= 3


async def test_async_twin_returns_the_cached_token(
    token_env: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    before = token_cache_info().block_reads
    assert await aget_stac_token() == token_env.get()
    assert await aget_stac_token() == token_env.get()
    assert token_cache_info().block_reads - before == 1


# What each mapped task got. Not task results: a Prefect 3.2 server whose SQLite is locked
# may hand back the flow's final state without its data (MissingResult, seen in CI).
_tokens_seen: list[str] = []


@task
def _uses_token(n: int) -> None:
    _tokens_seen.append(get_stac_token())


@flow
def _mapped_flow(count: int) -> None:
    _uses_token.map(range(count)).wait()


def test_inside_a_flow_refresh_is_task_runs_not_a_subflow(
    no_block: None, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    _tokens_seen.clear()
    state = _mapped_flow(6, return_state=True)

    assert state.is_completed()
    assert _tokens_seen == [carbon_mapper_emulator.issued_stac_tokens[-1]] * 6
    assert carbon_mapper_emulator.requests(CREATE_STAC) == 1
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        # Task runs reach the API through events, written in batches (on Prefect 3.2 the
        # task-run records themselves come from those events): poll until they are there.
        deadline = time.monotonic() + 60
        while True:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]})  # type: ignore[arg-type]
            )
            names = [run.name for run in task_runs]
            if any(n.startswith("create-stac-token") for n in names):
                break
            assert time.monotonic() < deadline, f"no create-stac-token task run, only {names}"
            time.sleep(0.5)
        flow_run = client.read_flow_run(flow_run_id)
    assert children == []
    assert_no_secrets(repr(flow_run.parameters), carbon_mapper_emulator)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_valid": timedelta(seconds=-1)}, "min_valid"),
        ({"min_valid": timedelta(days=14)}, "shorter than the shortest lifetime"),
        # 13 days: a 14-day token made just before midnight UTC has 13 days and a bit.
        ({"min_valid": timedelta(days=13)}, "under 13 days"),
        ({"block_name": "Not A Block"}, "lowercase letters"),
    ],
)
def test_bad_arguments_say_what_to_fix(
    token_env: CarbonMapperStacToken, kwargs: dict[str, object], message: str
) -> None:
    clear_token_cache()
    with pytest.raises(ConfigurationError, match=message):
        get_stac_token(**kwargs)  # type: ignore[arg-type]
