"""Bounded renewal (401 storms, redirects), no refresh loops near midnight, fork safety.

Over real HTTP to the emulator (a second instance plays another host a redirect leads to).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from cm_tasks import (
    CarbonMapperStacToken,
    ConfigurationError,
    _renewal,
    async_stac_http_client,
    clear_token_cache,
    get_stac_token,
    stac_http_client,
)
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support.leaks import assert_no_leak, collect_secrets
from tests.support.token_helpers import (
    CREATE_STAC,
    mint,
    save_token,
    stored_token,
    wait_for_renewals,
)


@pytest.fixture(scope="module")
def _other_host_session() -> Iterator[CarbonMapperEmulator]:
    with CarbonMapperEmulator() as emulator:
        yield emulator


@pytest.fixture
def other_host(_other_host_session: CarbonMapperEmulator) -> CarbonMapperEmulator:
    _other_host_session.reset()
    return _other_host_session


def _asset(emu: CarbonMapperEmulator) -> str:
    return f"stac/assets/{emu.large_asset[0]}/rgb.tif"


# --- Renewal storms ------------------------------------------------------------------------------


def test_401s_for_an_asset_the_account_may_not_read_make_at_most_one_token(
    carbon_mapper_credentials: CarbonMapperEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = carbon_mapper_credentials
    save_token(emu, mint(emu), timedelta(days=10))  # made four days ago
    clear_token_cache()
    path = _asset(emu)
    emu.fail(path, Fault.status(401, times=100))  # 401 whatever the token

    with stac_http_client() as http:
        statuses = [http.get(path).status_code for _ in range(10)]

    assert statuses == [401] * 10
    assert emu.requests(CREATE_STAC) == 1  # the old token renewed once; the new one never
    assert emu.requests(path) == 11  # the first request was sent again once, no other
    assert stored_token() == emu.issued_stac_tokens[-1]
    assert_no_leak(collect_secrets(emu), texts={"log": caplog.text})


def test_a_token_made_moments_ago_is_renewed_once_on_a_401_then_the_401_is_returned(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    # Issue 16 case 13: renewed once per token, whenever it was made; a 401 on the renewed
    # token goes back to the caller (an asset the account may not read answers 401 anyway).
    emu = carbon_mapper_emulator  # the fixture's token was made just now
    path = _asset(emu)
    emu.fail(path, Fault.status(401, times=100))

    with stac_http_client() as http:
        statuses = [http.get(path).status_code for _ in range(10)]

    assert statuses == [401] * 10
    assert emu.requests(CREATE_STAC) == 1
    assert emu.requests(path) == 11
    assert stored_token() != carbon_mapper_token_block.get()


async def test_the_async_client_renews_a_token_made_moments_ago_once(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_emulator
    path = _asset(emu)
    emu.fail(path, Fault.status(401, times=100))

    async with async_stac_http_client() as http:
        statuses = [(await http.get(path)).status_code for _ in range(5)]

    assert statuses == [401] * 5
    assert emu.requests(CREATE_STAC) == 1
    assert emu.requests(path) == 6


def test_a_401_from_another_host_after_a_redirect_renews_nothing(
    carbon_mapper_credentials: CarbonMapperEmulator, other_host: CarbonMapperEmulator
) -> None:
    emu = carbon_mapper_credentials
    save_token(emu, mint(emu), timedelta(days=10))
    clear_token_cache()
    path = _asset(emu)
    elsewhere = f"{other_host.base_url}{_asset(other_host)}"
    emu.fail(path, Fault.status(302, headers={"Location": elsewhere}, times=2))
    other_host.fail(_asset(other_host), Fault.status(401, times=2))  # e.g. an expired signed URL

    with stac_http_client() as http:
        response = http.get(path)

    assert response.status_code == 401
    assert str(response.url) == elsewhere
    assert emu.requests(CREATE_STAC) == 0
    assert emu.requests(path) == 1
    assert other_host.requests(_asset(other_host)) == 1


# --- Midnight UTC and refresh loops --------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime_days", "min_valid"),
    [(1, timedelta(hours=23)), (1, timedelta(0)), (2, timedelta(days=1)), (14, timedelta(days=13))],
)
def test_min_valid_must_fit_the_shortest_lifetime_of_a_new_token(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    lifetime_days: int,
    min_valid: timedelta,
) -> None:
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", str(lifetime_days))
    clear_token_cache()

    with pytest.raises(ConfigurationError, match="00:00 UTC") as raised:
        get_stac_token(min_valid=min_valid)

    assert "CM_TOKEN_LIFETIME_DAYS" in str(raised.value)
    assert carbon_mapper_credentials.requests() == 0


def test_min_valid_just_under_the_shortest_lifetime_is_accepted(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", "2")
    save_token(
        carbon_mapper_credentials, mint(carbon_mapper_credentials), timedelta(days=1, hours=12)
    )
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(hours=23)) == stored_token()


def _short_lived(minutes: int) -> dict[str, Any]:
    """A create-stac answer with a token that lapses in `minutes` (an API granting less)."""
    now = int(time.time())
    claims = {
        "token_type": "access",
        "exp": now + 60 * minutes,
        "iat": now,
        "jti": os.urandom(8).hex(),
    }

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"
    return {"token_value": token, "name": "short", "scopes": ["stac", "catalog:read"]}


def test_a_new_token_already_within_min_valid_is_not_refreshed_again(
    carbon_mapper_credentials: CarbonMapperEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = carbon_mapper_credentials
    save_token(emu, mint(emu), timedelta(minutes=30))  # about to expire: a refresh is due
    clear_token_cache()
    emu.fail(CREATE_STAC, Fault.status(200, _short_lived(30), times=10))
    caplog.set_level(logging.WARNING)

    tokens = {get_stac_token() for _ in range(3)}

    assert len(tokens) == 1
    assert emu.requests(CREATE_STAC) == 1  # not 3
    assert "within min_valid" in caplog.text

    # The same from five threads at once, with the block about to expire again.
    save_token(emu, mint(emu), timedelta(minutes=30))
    clear_token_cache()
    barrier = threading.Barrier(5, timeout=30)
    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(get_stac_token())

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(results) == 5
    assert len(set(results)) == 1
    assert emu.requests(CREATE_STAC) == 2  # one more, not five
    assert_no_leak(collect_secrets(emu), texts={"log": caplog.text})


# --- The platform side: the API is down while a cached token is still valid ----------------------


def test_an_api_outage_during_a_refresh_serves_the_cached_token(
    carbon_mapper_credentials: CarbonMapperEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = carbon_mapper_credentials
    cached = save_token(emu, mint(emu), timedelta(minutes=50)).get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
    emu.fail("token/pair", Fault.status(503, times=20))
    caplog.set_level(logging.WARNING)

    assert get_stac_token() == cached  # the refresh failed after its retries

    wait_for_renewals()  # a slow machine may have served the token before the failure
    assert "Using the cached token" in caplog.text
    assert emu.requests(CREATE_STAC) == 0
    assert stored_token() == cached
    assert_no_leak(collect_secrets(emu), texts={"log": caplog.text})


# --- Fork safety ---------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_holds_the_lock_leaves_the_child_working(
    carbon_mapper_token_block: CarbonMapperStacToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = carbon_mapper_token_block
    reading = threading.Event()
    release = threading.Event()
    parent = os.getpid()
    real_read = _renewal._read

    def slow_read(call: _renewal.Call) -> CarbonMapperStacToken | None:
        if os.getpid() == parent:
            reading.set()
            release.wait(30)  # a slow Prefect API: the renewal is in progress meanwhile
            return real_read(call)
        return block  # the child: no Prefect call, only the renewal's state is under test

    monkeypatch.setattr(_renewal, "_read", slow_read)
    clear_token_cache()
    holder = threading.Thread(target=get_stac_token)
    holder.start()
    assert reading.wait(30)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            os.write(write_end, get_stac_token().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    hung = True
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                hung = False
                break
            time.sleep(0.05)
        if hung:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        got = os.read(read_end, 4096).decode()
    finally:
        os.close(read_end)
        release.set()
        holder.join(30)
    assert not hung, "the child's get_stac_token() hung on a lock the parent's thread held"
    assert got == block.get()
