"""CarbonMapperAuth and the client factories: bearer header, one renewal on a 401."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest

from cm_tasks import (
    CarbonMapperAuth,
    CarbonMapperStacToken,
    async_stac_http_client,
    get_stac_token,
    stac_http_client,
)
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support.token_helpers import CREATE_STAC, mint, save_token, stored_token

REVOKED = "revoked-token-value"


def _asset_path(emu: CarbonMapperEmulator) -> tuple[str, str, str]:
    """A small asset: the RGB quicklook of the item that also has the large asset."""
    item_id, _ = emu.large_asset
    return item_id, "rgb", f"stac/assets/{item_id}/rgb.tif"


def test_sends_the_token_and_reuses_it(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    item_id, key, path = _asset_path(emu)
    with stac_http_client() as http:
        first = http.get(path)
        second = http.get(path)

    assert first.status_code == second.status_code == 200
    assert first.content == emu.asset_bytes(item_id, key)
    assert emu.requests(path) == 2
    assert emu.requests(CREATE_STAC) == 0


def test_401_with_a_rejected_token_refreshes_once_and_retries_once(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    save_token(emu, REVOKED, timedelta(days=10))  # looks valid, but the API refuses it
    item_id, key, path = _asset_path(emu)

    with stac_http_client() as http:
        response = http.get(path)

    assert response.status_code == 200
    assert response.content == emu.asset_bytes(item_id, key)
    assert emu.requests(path) == 2  # the 401, then the retry
    assert emu.requests(CREATE_STAC) == 1  # the block still held the rejected token
    assert stored_token() == emu.issued_stac_tokens[-1] == get_stac_token()


def test_401_rereads_a_block_another_process_refreshed(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    save_token(emu, REVOKED, timedelta(days=10))
    get_stac_token()  # this process caches the token the API will refuse
    save_token(emu, carbon_mapper_token_block.get(), timedelta(days=13))  # someone refreshed
    _, _, path = _asset_path(emu)

    with stac_http_client() as http:
        response = http.get(path)

    assert response.status_code == 200
    assert emu.requests(path) == 2
    assert emu.requests(CREATE_STAC) == 0
    assert get_stac_token() == carbon_mapper_token_block.get()


def test_a_second_401_is_returned_not_retried_forever(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    save_token(emu, mint(emu), timedelta(days=10))  # made 4 days ago: renewed on a 401
    _, _, path = _asset_path(emu)
    emu.fail(path, Fault.status(401, times=5))

    with stac_http_client() as http:
        response = http.get(path)

    assert response.status_code == 401
    assert emu.requests(path) == 2
    assert emu.requests(CREATE_STAC) == 1


async def test_async_client_concurrent_401s_share_one_refresh(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    save_token(emu, REVOKED, timedelta(days=10))
    _, _, path = _asset_path(emu)
    emu.latency = 0.5  # all 8 are sent before the first 401 comes back, even on a busy machine

    async with async_stac_http_client() as http:
        responses = await asyncio.gather(*(http.get(path) for _ in range(8)))

    assert [r.status_code for r in responses] == [200] * 8
    assert emu.requests(CREATE_STAC) == 1
    statuses = [status for _, logged, status in emu.request_log if logged == path]
    # Each 401 is retried once with the new token. A request a starved event loop sends only
    # after the renewal goes once (CI saw 2 of 8 do so without the latency).
    assert statuses.count(200) == 8
    assert statuses.count(401) == len(statuses) - 8 >= 4


def test_token_goes_only_to_the_api_origin(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("Authorization")
        return httpx.Response(200)

    auth = CarbonMapperAuth()  # CM_BASE_URL: the emulator, which the token block names
    with httpx.Client(auth=auth, transport=httpx.MockTransport(handler)) as http:
        http.get(f"{carbon_mapper_emulator.base_url}stac/assets/x/cmf.tif")
        http.get("https://bucket.s3.example.com/x/cmf.tif")

    assert seen["127.0.0.1"] == f"Bearer {carbon_mapper_token_block.get()}"
    assert seen["bucket.s3.example.com"] is None
    assert carbon_mapper_token_block.get() not in repr(auth)


@pytest.mark.parametrize("factory", [stac_http_client, async_stac_http_client])
def test_client_factories_point_at_cm_base_url(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    factory: object,
) -> None:
    client = factory()  # type: ignore[operator]
    assert str(client.base_url) == carbon_mapper_emulator.base_url
    assert isinstance(client.auth, CarbonMapperAuth)
