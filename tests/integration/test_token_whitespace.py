"""A token with whitespace never reaches a header, and never Prefect (issue 16, case 1).

On the old code, a create-stac answer ending in a newline was saved as it came; the ingest
task then raised httpx's `LocalProtocolError: Illegal header value b'Bearer <token>\\n'`, and
the flow run's state message in the Prefect API held the token.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate

from cm_tasks import get_stac_token, refresh_stac_token
from cm_tasks.access import clear_token_cache
from cm_tasks.blocks import load_token_block
from cm_tasks.errors import TokenBlockError
from cm_tasks.ingest import _request, search_body, search_stac_items
from cm_tasks.testing import CarbonMapperEmulator, Fault
from cm_tasks.watchdog import TokenState, check_token
from tests.support.leaks import Secrets, assert_no_leak, collect_secrets, wait_for_events
from tests.support.token_helpers import mint, save_token, stored_token

BLOCK = "whitespace-token"


@flow(name="whitespace-token-ingest")
async def _ingest() -> int:
    items = await search_stac_items(search_body(limit=2), max_items=2, token_block=BLOCK)
    return len(items)


async def test_a_token_answered_with_a_newline_is_saved_stripped_and_used(
    carbon_mapper_credentials: CarbonMapperEmulator, capfd: pytest.CaptureFixture[str]
) -> None:
    emulator = carbon_mapper_credentials
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    answer = emulator.issue_stac_token("padded")
    token = answer["token_value"]
    emulator.fail(
        "account/tokens/create-stac", Fault.status(200, {**answer, "token_value": token + "\n"})
    )
    clear_token_cache()

    refreshed = refresh_stac_token(token_block=BLOCK, return_state=True)
    state = await _ingest(return_state=True)

    assert refreshed.type.value == "COMPLETED"
    assert stored_token(BLOCK) == token
    assert state.type.value == "COMPLETED", state.message
    wait_for_events(state.state_details.flow_run_id)
    out, err = capfd.readouterr()
    assert_no_leak(
        collect_secrets(emulator, extra={"token with newline": token + "\n"}),
        texts={"stdout": out, "stderr": err},
        api=True,
        since=start,
    )


def _edit_token_by_hand(value: str) -> None:
    """What a person does in the UI's block form: only the token field changes."""
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            BLOCK, "carbon-mapper-stac-token", include_secrets=True
        )
        data: dict[str, Any] = {**document.data, "token": value}
        client.update_block_document(
            document.id, BlockDocumentUpdate(data=data, merge_existing_data=False)
        )


def test_a_token_edited_with_a_trailing_space_is_loaded_stripped(
    carbon_mapper_env: CarbonMapperEmulator,
) -> None:
    token = mint(carbon_mapper_env)
    save_token(carbon_mapper_env, token, timedelta(days=10), BLOCK)
    _edit_token_by_hand(token + " \n")

    block = load_token_block(BLOCK)

    assert block is not None
    assert block.get() == token


def test_a_token_edited_with_a_space_inside_is_refused_clearly(
    carbon_mapper_env: CarbonMapperEmulator,
) -> None:
    token = mint(carbon_mapper_env)
    save_token(carbon_mapper_env, token, timedelta(days=10), BLOCK)
    _edit_token_by_hand(token[:20] + " " + token[20:])

    with pytest.raises(TokenBlockError) as raised:
        load_token_block(BLOCK)

    assert "cannot be sent" in str(raised.value)
    assert "refresh" in str(raised.value)
    assert_no_leak(Secrets({"token": token}), exceptions=[raised.value])


async def test_a_request_error_quoting_the_header_carries_no_token(
    carbon_mapper_env: CarbonMapperEmulator,
) -> None:
    # A real socket: h11 refuses the header and quotes it, as in the reported run.
    token = mint(carbon_mapper_env)
    async with httpx.AsyncClient(base_url=carbon_mapper_env.base_url) as http:
        with pytest.raises(httpx.LocalProtocolError) as raised:
            await _request(http, "GET", "stac/", headers={"Authorization": f"Bearer {token}\n"})

    assert "withheld" in str(raised.value)
    assert_no_leak(Secrets({"token": token + "\n"}), exceptions=[raised.value])


def test_a_block_with_an_unusable_token_is_renewable_not_stuck(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    # The daily check calls it EXPIRED (so its event starts the refresh), and an inline
    # get_stac_token() renews it like a missing token instead of failing every call.
    emulator = carbon_mapper_credentials
    token = mint(emulator)
    save_token(emulator, token, timedelta(days=10), BLOCK)
    _edit_token_by_hand(token[:20] + " " + token[20:])

    status = check_token(BLOCK)
    assert status.state is TokenState.EXPIRED
    assert "cannot be sent" in status.message
    assert "refresh" in status.message

    clear_token_cache()
    renewed = get_stac_token(BLOCK, refresh="inline")
    assert renewed == emulator.issued_stac_tokens[-1] != token
    assert load_token_block(BLOCK) is not None
    assert_no_leak(Secrets({"token": token}), texts={"status": status.message})
