"""A token bound to its platform API and its Prefect API; the refresh lease; Prefect outages.

Real parts only: two emulator instances (two platform APIs) over HTTP, the session's Prefect
API and a second one from `prefect server start` (shared by the module), and a third server
that is stopped in the middle of the outage test.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, temporary_settings

from cm_tasks import (
    CarbonMapperStacToken,
    ConfigurationError,
    TokenBlockError,
    _prefect_calls,
    _refresh_lease,
    _renewal,
    aget_stac_token,
    clear_token_cache,
    get_stac_token,
    load_settings,
    resolve_request,
    run_refresh,
    stac_http_client,
    token_cache_info,
)
from cm_tasks._lease_limit import lease_name
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.leaks import assert_no_leak, collect_secrets
from tests.support.prefect_server import (
    PrefectServer,
    restart,
    running_prefect_server,
    stop_process_group,
)
from tests.support.token_helpers import (
    CREATE_STAC,
    EMAIL_BLOCK,
    PASSWORD_BLOCK,
    TOKEN_BLOCK,
    delete_token_block,
    mint,
    save_token,
    stored_token,
    wait_for_renewals,
)

LEASE = lease_name(TOKEN_BLOCK)


@pytest.fixture(scope="module")
def _other_emulator_session() -> Iterator[CarbonMapperEmulator]:
    with CarbonMapperEmulator() as emulator:
        yield emulator


@pytest.fixture
def other_emulator(_other_emulator_session: CarbonMapperEmulator) -> CarbonMapperEmulator:
    """A second platform API (say, staging), reset for this test."""
    _other_emulator_session.reset()
    return _other_emulator_session


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_token_cache()
    yield
    clear_token_cache()


def _save_credentials(emulator: CarbonMapperEmulator) -> None:
    Secret(value=emulator.email).save(EMAIL_BLOCK, overwrite=True)
    Secret(value=emulator.password).save(PASSWORD_BLOCK, overwrite=True)


def _on(server: PrefectServer) -> AbstractContextManager[Any]:
    """Use server's API in this block (as a process that talks to two Prefect APIs does)."""
    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


def _delete_lease_limit() -> None:
    with get_client(sync_client=True) as client, suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(LEASE)


def _occupy_lease() -> object:
    """Take the refresh lease's slot as another process would, for 5 minutes; its lease id.

    On a Prefect without leases (3.2) the slot is taken plainly, as `_refresh_lease` does
    there: the id is then None.
    """
    with get_client(sync_client=True) as client:
        if not _refresh_lease.prefect_has_leases():
            client.increment_concurrency_slots(names=[LEASE], slots=1, mode="concurrency")
            return None
        response = client.increment_concurrency_slots_with_lease(
            names=[LEASE], slots=1, mode="concurrency", lease_duration=300
        )
    return response.json()["lease_id"]


def _free_lease(lease_id: object) -> None:
    with get_client(sync_client=True) as client:
        if lease_id is None:
            client.release_concurrency_slots(names=[LEASE], slots=1, occupancy_seconds=1.0)
        else:
            client.release_concurrency_slots_with_lease(lease_id)  # type: ignore[arg-type]


# --- A token only goes to the API its block names ------------------------------------------------


def test_a_block_of_another_api_is_refused_not_sent_and_not_overwritten(
    carbon_mapper_credentials: CarbonMapperEmulator,
    other_emulator: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    production, staging = carbon_mapper_credentials, other_emulator
    saved = save_token(production, mint(production), timedelta(days=10))
    monkeypatch.setenv("CM_BASE_URL", staging.base_url)  # a developer points at staging
    path = f"stac/assets/{staging.large_asset[0]}/rgb.tif"

    with stac_http_client() as http, pytest.raises(ConfigurationError) as raised:
        http.get(path)
    with pytest.raises(ConfigurationError):
        get_stac_token()

    message = str(raised.value)
    assert production.base_url in message
    assert staging.base_url in message
    assert "CM_TOKEN_BLOCK" in message
    assert staging.requests(path) == 0  # the production token never reached staging
    assert staging.requests(CREATE_STAC) == production.requests(CREATE_STAC) == 0
    assert stored_token() == saved.get()  # the shared block is untouched
    assert_no_leak(
        collect_secrets(production),
        texts={"log": caplog.text},
        exceptions=[raised.value],
    )


def test_an_auth_for_another_api_than_cm_base_url_is_refused_too(
    carbon_mapper_token_block: CarbonMapperStacToken,
    other_emulator: CarbonMapperEmulator,
) -> None:
    import httpx

    from cm_tasks import CarbonMapperAuth

    auth = CarbonMapperAuth(base_url=other_emulator.base_url)
    with httpx.Client(auth=auth) as http, pytest.raises(ConfigurationError, match="holds a token"):
        http.get(f"{other_emulator.base_url}stac/assets/x/rgb.tif")
    assert other_emulator.requests() == 0


def test_the_explicit_refresh_replaces_another_apis_block_with_a_warning(
    carbon_mapper_credentials: CarbonMapperEmulator,
    other_emulator: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    save_token(carbon_mapper_credentials, mint(carbon_mapper_credentials), timedelta(days=10))
    monkeypatch.setenv("CM_BASE_URL", other_emulator.base_url)
    caplog.set_level(logging.WARNING)
    settings = load_settings()

    block = run_refresh(resolve_request(settings), settings)  # the flow's own body

    assert block.base_url == other_emulator.base_url
    assert stored_token() == other_emulator.issued_stac_tokens[-1]
    assert f"held a token for {carbon_mapper_credentials.base_url}" in caplog.text
    assert get_stac_token() == block.get()  # the new binding is served


def test_two_prefect_apis_in_one_process_keep_their_own_tokens(
    carbon_mapper_credentials: CarbonMapperEmulator, server: PrefectServer
) -> None:
    token_a = save_token(
        carbon_mapper_credentials, mint(carbon_mapper_credentials), timedelta(days=10)
    ).get()
    with _on(server):
        token_b = save_token(
            carbon_mapper_credentials, mint(carbon_mapper_credentials), timedelta(days=10)
        ).get()

    assert get_stac_token() == token_a  # cached for the session's API
    with _on(server):
        assert get_stac_token() == token_b  # not API A's cached token
        assert get_stac_token() == token_b
    assert get_stac_token() == token_a
    assert carbon_mapper_credentials.requests(CREATE_STAC) == 0


# --- The cross-process lease ---------------------------------------------------------------------


def test_the_lease_wait_follows_the_retry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from cm_tasks._refresh_lease import refresh_time_bound

    defaults = refresh_time_bound(load_settings())
    # Two calls, four attempts of 10 s connect + 2 x 30 s, three waits of 60 s (the cap).
    assert defaults == 2 * (4 * 70 + 3 * 60) + _refresh_lease.LEASE_MARGIN_SECONDS
    assert defaults > 300  # the old fixed wait was shorter than one worst-case refresh
    monkeypatch.setenv("CM_MAX_ATTEMPTS", "6")
    assert refresh_time_bound(load_settings()) > defaults
    monkeypatch.setenv("CM_TIMEOUT", "5")
    monkeypatch.setenv("CM_RETRY_AFTER_CAP", "0")
    monkeypatch.setenv("CM_RETRY_BACKOFF", "0")
    assert refresh_time_bound(load_settings()) == 2 * 6 * 15 + _refresh_lease.LEASE_MARGIN_SECONDS


def test_a_deleted_lease_limit_is_made_again(
    carbon_mapper_credentials: CarbonMapperEmulator, server: PrefectServer
) -> None:
    with _on(server):
        _save_credentials(carbon_mapper_credentials)
        delete_token_block()
        get_stac_token()  # the first refresh makes the limit
        _delete_lease_limit()  # a clean-up in the UI, or a database reset
        delete_token_block()
        clear_token_cache()

        token = get_stac_token()

        assert token == stored_token() == carbon_mapper_credentials.issued_stac_tokens[-1]
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(LEASE).limit == 1
    assert carbon_mapper_credentials.requests(CREATE_STAC) == 2


@pytest.mark.timeout(150)
def test_the_lease_is_taken_on_the_current_prefect_api(
    carbon_mapper_credentials: CarbonMapperEmulator, server: PrefectServer
) -> None:
    delete_token_block()
    get_stac_token()  # a refresh through the session's API first
    held = _occupy_lease()  # another process of that API is refreshing now
    try:
        with _on(server):
            _save_credentials(carbon_mapper_credentials)
            delete_token_block()

            token = get_stac_token()  # needs no lease of the other API

            assert token == stored_token()
    finally:
        _free_lease(held)
    assert carbon_mapper_credentials.requests(CREATE_STAC) == 2


@pytest.mark.timeout(120)
def test_a_lease_that_never_comes_is_a_token_block_error(
    carbon_mapper_credentials: CarbonMapperEmulator,
    server: PrefectServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_refresh_lease, "LEASE_MARGIN_SECONDS", 0.0, raising=False)
    with _on(server):
        _save_credentials(carbon_mapper_credentials)
        delete_token_block()
        get_stac_token()  # makes the limit, with the default time-out a busy machine may need
        delete_token_block()
        clear_token_cache()
        monkeypatch.setenv("CM_TIMEOUT", "1")
        monkeypatch.setenv("CM_MAX_ATTEMPTS", "1")  # the wait: 2 calls x (1 + 2 x 1 s) = 6 s
        held = _occupy_lease()  # a stuck refresh in another process
        try:
            with pytest.raises(TokenBlockError, match="Waited 6 s") as raised:
                get_stac_token()
        finally:
            _free_lease(held)
    assert raised.value.transient
    assert LEASE in str(raised.value)
    assert carbon_mapper_credentials.requests(CREATE_STAC) == 1
    assert_no_leak(collect_secrets(carbon_mapper_credentials), exceptions=[raised.value])


# --- A brief Prefect outage ----------------------------------------------------------------------


async def test_a_prefect_outage_serves_the_cached_token_with_a_warning(
    carbon_mapper_env: CarbonMapperEmulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emu = carbon_mapper_env
    with running_prefect_server(tmp_path) as outage_server, _on(outage_server):
        cached = save_token(emu, mint(emu), timedelta(minutes=50)).get()
        assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
        stop_process_group(outage_server.process)  # Prefect goes down
        caplog.set_level(logging.WARNING)
        reads = token_cache_info().block_reads

        # 50 minutes left, inside the default 1 hour: a re-read is due, and fails.
        assert get_stac_token() == cached
        assert await aget_stac_token() == cached
        assert get_stac_token() == cached

        wait_for_renewals()  # a slow machine may have served the token before the failure
        assert "Using the cached token" in caplog.text
        assert token_cache_info().block_reads - reads == 1  # not tried again for 30 s
        assert emu.requests(CREATE_STAC) == 0

        # Nothing cached, nothing to serve: the read is tried again for RIDE_OUT_SECONDS
        # (none here), then the error, transient...
        clear_token_cache()
        monkeypatch.setattr(_renewal, "RIDE_OUT_SECONDS", 0.0)
        with pytest.raises(TokenBlockError, match="Could not read the token block") as err:
            get_stac_token()
        assert err.value.transient

        # ...so that a fresh process gets its token once Prefect is back (CI on Prefect 3.2:
        # one read timed out 3 times, and all 8 tasks of a fresh ingest process failed). The
        # patience here covers a server start on a loaded machine.
        clear_token_cache()
        monkeypatch.setattr(_renewal, "RIDE_OUT_SECONDS", 300.0)
        reads = token_cache_info().block_reads
        with ThreadPoolExecutor(max_workers=1) as pool:
            fresh = pool.submit(
                contextvars.copy_context().run, get_stac_token, min_valid=timedelta(minutes=10)
            )
            while token_cache_info().block_reads - reads < 2 and not fresh.done():
                time.sleep(0.1)  # until one read failed and the next is under way
            restart(outage_server)
            assert fresh.result(timeout=300) == cached
    assert_no_leak(collect_secrets(emu), texts={"log": caplog.text}, exceptions=[err.value])


def test_a_prefect_api_that_stops_answering_serves_the_cached_token(
    carbon_mapper_env: CarbonMapperEmulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not refused connections but a hung API (an overloaded server, a proxy whose backend
    # died): it accepts connections and never answers. Prefect's client would wait its
    # request time-out on every one of its retries while callers hold a valid token.
    emu = carbon_mapper_env
    # The bound, shorter than its 10 s: the hung read below ends in seconds, not half a minute.
    monkeypatch.setattr(_prefect_calls, "CALL_SECONDS", 2.0)
    with running_prefect_server(tmp_path, services=False) as hung_server, _on(hung_server):
        cached = save_token(emu, mint(emu), timedelta(minutes=50)).get()
        assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
        stop_process_group(hung_server.process)
        port = urlsplit(hung_server.api_url).port
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)  # the kernel completes connections; nobody reads or answers
        caplog.set_level(logging.WARNING)
        try:
            with (
                temporary_settings(updates={PREFECT_API_REQUEST_TIMEOUT: 60}),
                ThreadPoolExecutor(max_workers=1) as pool,
            ):
                call = pool.submit(contextvars.copy_context().run, get_stac_token)
                # A guard against hanging the suite, far above the bounded re-read;
                # before the bound, the call took 6 x 60 s.
                assert call.result(timeout=150) == cached
            wait_for_renewals()  # the hung read ends (bounded) with its warning
        finally:
            listener.close()
    assert "Using the cached token" in caplog.text
    assert emu.requests(CREATE_STAC) == 0
