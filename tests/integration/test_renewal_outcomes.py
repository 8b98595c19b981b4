"""Issue 16: one renewal per block, every waiter gets its outcome, no polling while waiting.

Against the emulator over HTTP and the session's real Prefect API. Each test failed on the
code before the renewal was rebuilt (`cm_tasks._renewal`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.to_thread
import pytest
from prefect.blocks.system import Secret
from prefect.events import emit_event

from cm_tasks import (
    BadCredentialsError,
    UnexpectedResponseError,
    aget_stac_token,
    clear_token_cache,
    get_stac_token,
    stac_http_client,
)
from cm_tasks.notify import publish_refreshed, token_resource
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support.prefect_api import api
from tests.support.token_helpers import (
    CREATE_STAC,
    delete_token_block,
    mint,
    save_token,
    stored_token,
    wait_for_renewals,
)

TOKEN_PAIR = "token/pair"


def _asset(emu: CarbonMapperEmulator) -> str:
    item_id, _ = emu.large_asset
    return f"stac/assets/{item_id}/rgb.tif"


def test_a_create_stac_that_may_have_made_a_token_is_every_waiters_outcome_and_cools_down(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Case 2: a 200 of another shape (the token nested under `data`): the token exists but
    # cannot be read. Before, each of the 8 waiters made its own create-stac.
    emu = carbon_mapper_credentials
    # A block of its own: its renewal-failed event cools the block down for other processes
    # (and other tests) for a minute.
    monkeypatch.setenv("CM_TOKEN_BLOCK", "cooling-down-token")
    delete_token_block("cooling-down-token")
    clear_token_cache()
    emu.fail(CREATE_STAC, Fault.status(200, body={"data": {"token": "x"}}, times=100))

    def call() -> str:
        try:
            return get_stac_token()
        except Exception as exc:  # each caller's error is its outcome
            return type(exc).__name__

    with ThreadPoolExecutor(max_workers=8) as pool:
        # Each caller in a copy of this thread's context (it points Prefect at the test API).
        contexts = [contextvars.copy_context() for _ in range(8)]
        outcomes = list(pool.map(lambda context: context.run(call), contexts))

    assert outcomes == ["UnexpectedResponseError"] * 8
    assert emu.requests(CREATE_STAC) == 1
    # The cool-down: the next call is the same outcome, without another create-stac.
    with pytest.raises(UnexpectedResponseError):
        get_stac_token()
    assert emu.requests(CREATE_STAC) == 1


def test_refused_credentials_are_one_login_a_minute_not_one_per_call(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by a reviewer: with a wrong password and no token to serve, every call logged in
    # again (deployment mode holds a failed run's outcome for a minute; inline mode did not):
    # a fleet of retrying ingest tasks was a stream of failed logins on the account.
    emu = carbon_mapper_credentials
    wrong = "not-the-password-7"
    monkeypatch.setenv("CM_TOKEN_BLOCK", "refused-login-token")  # its cool-down is its own
    monkeypatch.setenv("CM_PASSWORD_BLOCK", "refused-login-password")
    Secret(value=wrong).save("refused-login-password", overwrite=True)
    delete_token_block("refused-login-token")
    clear_token_cache()
    before = emu.requests(TOKEN_PAIR)

    with pytest.raises(BadCredentialsError):
        get_stac_token()
    for _ in range(5):
        with pytest.raises(BadCredentialsError) as held:
            get_stac_token()

    assert emu.requests(TOKEN_PAIR) - before == 1
    message = str(held.value)
    assert "without logging in again" in message
    assert "cm-tasks login" in message
    assert wrong not in message + caplog.text
    # Credentials fixed: clear_token_cache() ends the wait at once.
    monkeypatch.delenv("CM_PASSWORD_BLOCK")
    clear_token_cache()
    assert get_stac_token() == emu.issued_stac_tokens[-1]
    assert emu.requests(TOKEN_PAIR) - before == 2


def test_a_waiter_hears_another_holders_renewal_on_the_events_stream_without_polling(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fleet's cost: a waiter used to ask for the lease about once a second until the
    # holder was done. Now it asks once, then listens; the save's event wakes it.
    from cm_tasks import _compat
    from cm_tasks._refresh_lease import try_lease

    emu = carbon_mapper_credentials
    block = "events-stream-token"  # its own: earlier tests' outcomes for other blocks stay out
    save_token(emu, mint(emu), timedelta(minutes=20), block)  # within min_valid (1 h): stale
    # An earlier renewal's outcome, which the stream replays on connect: not this wait's.
    emit_event(
        "carbon-mapper.stac-token.refreshed",
        resource=token_resource(block),
        occurred=datetime.now(timezone.utc) - timedelta(seconds=30),
    )
    _wait_until_stored("carbon-mapper.stac-token.refreshed", block)
    clear_token_cache()
    tries: list[float] = []
    real_take = _compat.take_slot

    def counted(*args: Any, **kwargs: Any) -> Any:
        tries.append(time.monotonic())
        return real_take(*args, **kwargs)

    monkeypatch.setattr(_compat, "take_slot", counted)
    held, release = threading.Event(), threading.Event()

    def another_process_renews() -> None:  # holds the lease as another process would
        with try_lease(block, 60) as mine:
            assert mine
            held.set()
            release.wait(60)

    holder = threading.Thread(target=contextvars.copy_context().run, args=(another_process_renews,))
    holder.start()
    assert held.wait(60)
    with ThreadPoolExecutor(max_workers=1) as pool, contextlib.ExitStack() as cleanup:
        cleanup.callback(holder.join, 60)
        cleanup.callback(release.set)
        waiting = pool.submit(contextvars.copy_context().run, get_stac_token, block)
        deadline = time.monotonic() + 60
        while len(tries) < 2 and time.monotonic() < deadline:  # the holder's, then the waiter's
            time.sleep(0.05)
        time.sleep(3)  # not a wait for a state: the span in which a poller would ask again
        assert len(tries) == 2
        renewed = save_token(emu, mint(emu), timedelta(days=13), block)
        saved_at = time.monotonic()
        publish_refreshed(renewed, block)
        token = waiting.result(timeout=60)
        got_it_after = time.monotonic() - saved_at
    assert token == renewed.get()
    assert got_it_after < 2.0
    assert len(tries) == 2  # the waiter asked for the lease once
    assert emu.requests(CREATE_STAC) == 0


async def test_async_waiters_hold_no_worker_thread(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    # Case 8: 45 aget_stac_token callers waiting for one renewal used to take anyio's 40
    # worker threads, and unrelated to_thread work in the process stalled until it ended.
    emu = carbon_mapper_credentials
    delete_token_block()
    clear_token_cache()
    emu.fail(TOKEN_PAIR, Fault.delay(6))
    async with anyio.create_task_group() as group:
        for _ in range(45):
            group.start_soon(aget_stac_token)
        await anyio.sleep(0.5)  # let every caller start waiting
        started = time.monotonic()
        assert await anyio.to_thread.run_sync(lambda: 42) == 42
        unrelated = time.monotonic() - started
    assert unrelated < 2.0
    assert emu.requests(CREATE_STAC) == 1


def test_off_mode_returns_a_401_that_is_not_about_the_token(
    carbon_mapper_emulator: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Case 11: a token 20 minutes old, an asset the account may not read: the 401 comes back
    # instead of "refresh it".
    emu = carbon_mapper_emulator
    monkeypatch.setenv("CM_BASE_URL", emu.base_url)
    save_token(emu, mint(emu), timedelta(days=13), created_ago=timedelta(minutes=20))
    clear_token_cache()
    path = _asset(emu)
    emu.fail(path, Fault.status(401, times=10))
    with stac_http_client(refresh="off") as http:
        response = http.get(path)
    assert response.status_code == 401
    assert emu.requests(CREATE_STAC) == 0


def test_a_token_made_in_the_future_is_renewed_once_on_a_401(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> None:
    # Case 13: platform clock skew put created_at 10 minutes ahead; such a token used to be
    # "just made" for 25 minutes, so a 401 renewed nothing.
    emu = carbon_mapper_credentials
    rejected = mint(emu)
    save_token(emu, rejected, timedelta(days=13), created_ago=-timedelta(minutes=10))
    clear_token_cache()
    path = _asset(emu)
    emu.fail(path, Fault.status(401, times=1))
    with stac_http_client() as http:
        response = http.get(path)
    assert response.status_code == 200
    assert emu.requests(CREATE_STAC) == 1
    assert stored_token() != rejected


def test_a_prefect_api_hanging_on_concurrency_calls_serves_the_cached_token(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Case 7: the lease call hangs; a valid cached token (within min_valid) is served within
    # the patience bound instead of after minutes.
    from prefect.client.orchestration import SyncPrefectClient

    emu = carbon_mapper_credentials
    monkeypatch.setenv("CM_TOKEN_BLOCK", "hanging-token")
    cached = save_token(emu, mint(emu), timedelta(minutes=50), "hanging-token")
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached.get()
    hang = threading.Event()

    def hanging(*args: Any, **kwargs: Any) -> Any:
        hang.wait(60)
        raise TimeoutError

    for method in ("increment_concurrency_slots_with_lease", "increment_concurrency_slots"):
        monkeypatch.setattr(SyncPrefectClient, method, hanging, raising=False)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    try:
        assert get_stac_token() == cached.get()
    finally:
        hang.set()
    assert time.monotonic() - started < 20
    # Served while the renewal still ran; its failure is a warning of its own when it ends.
    assert "is still running after 10 s; using the cached token meanwhile" in caplog.text
    wait_for_renewals("hanging-token")
    assert "Using the cached token" in caplog.text


def test_a_first_call_whose_lease_call_fails_serves_the_token_it_just_read(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing cached yet (a fresh ingest process); the block read works, the lease call fails
    # (a loaded Prefect server answering 503). The token just read has 50 minutes left: the
    # one outage rule serves it, as it would a cached one. Before, the caller got the error.
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

    emu = carbon_mapper_credentials
    monkeypatch.setenv("CM_TOKEN_BLOCK", "lease-refused-token")
    stored = save_token(emu, mint(emu), timedelta(minutes=50), "lease-refused-token")
    clear_token_cache()
    calls = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise httpx.ConnectError("the Prefect API is overloaded")

    for method in ("increment_concurrency_slots_with_lease", "increment_concurrency_slots"):
        monkeypatch.setattr(SyncPrefectClient, method, refused, raising=False)
    caplog.set_level(logging.WARNING)
    assert get_stac_token() == stored.get()
    assert calls  # the renewal was due and tried
    assert "Using the cached token" in caplog.text
    assert emu.requests(CREATE_STAC) == 0
    assert stored.get() not in caplog.text


def test_a_refresh_deployment_nobody_serves_does_not_hold_a_valid_cached_token(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Case 5: in deployment mode a valid cached token is served while the refresh deployment
    # is down, as inline mode does while the platform is: after at most 10 s, not after
    # CM_REFRESH_TIMEOUT (300 s) and not as an error.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.states import Cancelled

    emu = carbon_mapper_credentials
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="nobody-serves", type="process"))
        flow_id = client.create_flow_from_name("refresh-stac-token")
        deployment_id = client.create_deployment(
            flow_id, "unserved", work_pool_name="nobody-serves"
        )
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/unserved")
    monkeypatch.setenv("CM_TOKEN_BLOCK", "unserved-token")
    cached = save_token(emu, mint(emu), timedelta(minutes=50), "unserved-token")
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10), refresh="deployment") == cached.get()
    started = time.monotonic()
    assert get_stac_token(refresh="deployment") == cached.get()
    assert time.monotonic() - started < 30
    assert emu.requests(CREATE_STAC) == 0
    # The renewal still waits on its run (up to 300 s): cancelled, it ends and releases its
    # lease now, while this Prefect API is up, not at the worker's exit into a closed log.
    with get_client(sync_client=True) as client:
        waiting = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
        assert waiting, "the renewal started no run of the unserved deployment"
        for run in waiting:
            client.set_flow_run_state(run.id, Cancelled(), force=True)
    wait_for_renewals("unserved-token")


def test_a_refresh_run_running_longer_than_a_refresh_can_take_is_crashed_not_joined(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Case 4: a worker SIGKILLed mid-refresh leaves its run Running; every caller joined it
    # until it timed out, and nothing ever started a new run.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.states import Running

    from cm_tasks import RefreshTimeoutError, _deployment_refresh

    emu = carbon_mapper_credentials
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="dead-worker", type="process"))
        flow_id = client.create_flow_from_name("refresh-stac-token")
        deployment_id = client.create_deployment(flow_id, "dead", work_pool_name="dead-worker")
        dead = client.create_flow_run_from_deployment(
            deployment_id, parameters={"token_block": "dead-run-token"}
        )
        client.set_flow_run_state(dead.id, Running(), force=True)
    # Every Running run has now run "longer than a refresh can take".
    monkeypatch.setattr(_deployment_refresh, "refresh_time_bound", lambda _: 0.0, raising=False)
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/dead")
    monkeypatch.setenv("CM_TOKEN_BLOCK", "dead-run-token")
    monkeypatch.setenv("CM_REFRESH_TIMEOUT", "3")
    delete_token_block("dead-run-token")
    clear_token_cache()
    with pytest.raises(RefreshTimeoutError) as caught:  # nobody serves the new run either
        get_stac_token(refresh="deployment")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(dead.id).state_type.value == "CRASHED"
        assert caught.value.flow_run_id != str(dead.id)  # a new run, not the dead one
    assert emu.requests(CREATE_STAC) == 0


def _wait_until_stored(event: str, block_name: str) -> None:
    """Wait until the Prefect API has stored an event about the block (events come in batches)."""
    resource = token_resource(block_name)["prefect.resource.id"]
    query = {"filter": {"event": {"name": [event]}, "resource": {"id": [resource]}}}
    deadline = time.monotonic() + 60
    while not api("events/filter", query)["events"]:
        assert time.monotonic() < deadline, f"{event} was not stored within 60 s"
        time.sleep(0.2)


def test_a_slow_healthy_renewal_serves_the_cached_token_without_a_warning(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A caller with a valid cached token stops waiting after the patience bound; a renewal
    # that is merely slow (a deployment run waits for its worker's next poll) is no failure:
    # it says so at INFO, and its token is the next call's. Before, a warning said "Could not
    # renew" while nothing was wrong.
    from cm_tasks import _renewal

    emu = carbon_mapper_credentials
    monkeypatch.setenv("CM_TOKEN_BLOCK", "slow-renewal-token")
    cached = save_token(emu, mint(emu), timedelta(minutes=50), "slow-renewal-token").get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
    monkeypatch.setattr(_renewal, "PATIENCE_SECONDS", 0.5)
    emu.fail(TOKEN_PAIR, Fault.delay(3))
    caplog.set_level(logging.INFO)

    assert get_stac_token() == cached  # served while the renewal runs
    wait_for_renewals("slow-renewal-token")

    renewed = stored_token("slow-renewal-token")
    assert renewed != cached
    assert get_stac_token() == renewed  # the renewal's outcome replaced the cached token
    assert "is still running after" in caplog.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings if r.name.startswith("cm_tasks")] == []
    assert emu.requests(CREATE_STAC) == 1
    assert renewed not in caplog.text
    assert cached not in caplog.text


def test_callers_for_two_platform_apis_never_share_a_renewal(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One block, two callers at once: one for the block's API, one (misconfigured) for
    # another. Before, whichever came second joined the first one's renewal and got its
    # outcome: the right caller could get the other's ConfigurationError.
    import httpx

    from cm_tasks import CarbonMapperAuth, ConfigurationError, _renewal

    emu = carbon_mapper_credentials
    monkeypatch.setenv("CM_TOKEN_BLOCK", "two-apis-token")
    save_token(emu, mint(emu), timedelta(minutes=50), "two-apis-token")
    clear_token_cache()
    original = _renewal.load_token_block
    lock, reads = threading.Lock(), []
    first_read, second_read = threading.Event(), threading.Event()

    def gated(name: str) -> Any:
        with lock:
            reads.append(name)
            n = len(reads)
        if n == 1:  # the other API's renewal: held until the right caller's own one reads
            first_read.set()
            second_read.wait(5)
        else:
            second_read.set()
        return original(name)

    monkeypatch.setattr(_renewal, "load_token_block", gated)
    other = "http://127.0.0.1:9/api/v1/"

    def other_api_call() -> BaseException | None:
        try:
            with httpx.Client(auth=CarbonMapperAuth(base_url=other)) as http:
                http.get(f"{other}stac/search")
        except BaseException as exc:  # its outcome is the result
            return exc
        return None

    with ThreadPoolExecutor(max_workers=1) as pool:
        theirs = pool.submit(contextvars.copy_context().run, other_api_call)
        assert first_read.wait(30)
        token = get_stac_token()  # for the block's own API
        error = theirs.result(timeout=60)

    assert second_read.is_set()  # the right caller's renewal read the block itself
    assert token == stored_token("two-apis-token")
    assert isinstance(error, ConfigurationError)
    assert "127.0.0.1:9" in str(error)


def test_a_slow_failing_renewal_stalls_callers_once_and_its_failure_backs_off(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The platform answers 503 with back-off (1 s, then 2 s): the renewal outlasts the
    # patience, then fails. The first caller waits the patience once; a caller after it takes
    # the cached token at once (before, each waited again); the failure is one warning, and
    # the next call within 30 s does not try again (before, it did at once).
    from cm_tasks import _renewal

    emu = carbon_mapper_credentials
    block = "slow-failing-token"
    monkeypatch.setenv("CM_TOKEN_BLOCK", block)
    monkeypatch.setenv("CM_RETRY_BACKOFF", "1")
    monkeypatch.setenv("CM_MAX_ATTEMPTS", "3")
    cached = save_token(emu, mint(emu), timedelta(minutes=50), block).get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
    monkeypatch.setattr(_renewal, "PATIENCE_SECONDS", 2.0)
    emu.fail(TOKEN_PAIR, Fault.status(503, times=100))
    caplog.set_level(logging.INFO)

    assert get_stac_token() == cached  # after the patience
    assert get_stac_token() == cached  # at once: the renewal has not ended yet
    renewing = [key for key in _renewal._flights if key[1] == block]
    assert renewing, "the second call waited for the renewal to end"
    wait_for_renewals(block)
    pairs = emu.requests(TOKEN_PAIR)
    assert pairs == 3  # one renewal, its three attempts
    assert get_stac_token() == cached  # backed off: no new renewal
    assert emu.requests(TOKEN_PAIR) == pairs

    assert caplog.text.count("is still running after") == 1
    assert caplog.text.count("Using the cached token") == 1
    assert "trying again in 30 s" in caplog.text
    assert cached not in caplog.text


def test_a_configuration_error_after_every_caller_left_is_the_next_callers_error(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by a reviewer: the renewal outlasted the patience (its caller left with the
    # cached token), then failed on the configuration. Before, that failure backed off like
    # an outage: callers got the cached token for 30 s, with a warning about trying again.
    from cm_tasks import ConfigurationError, _renewal

    emu = carbon_mapper_credentials
    block = "misconfigured-slow-token"
    monkeypatch.setenv("CM_TOKEN_BLOCK", block)
    cached = save_token(emu, mint(emu), timedelta(minutes=50), block).get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
    monkeypatch.setattr(_renewal, "PATIENCE_SECONDS", 0.5)
    mints = []

    def misconfigured(call: Any) -> Any:
        mints.append(call)
        time.sleep(1.5)
        raise ConfigurationError("CM_BASE_URL names no Carbon Mapper API: set it to ...")

    monkeypatch.setattr(_renewal, "_mint", misconfigured)
    caplog.set_level(logging.INFO)

    assert get_stac_token() == cached  # left after the patience
    wait_for_renewals(block)
    for _ in range(2):  # the next callers see it, without renewing again meanwhile
        with pytest.raises(ConfigurationError, match="CM_BASE_URL names no"):
            get_stac_token()

    assert len(mints) == 1
    assert "Using the cached token" not in caplog.text
    assert cached not in caplog.text


def test_a_renewal_failure_many_callers_waited_for_is_one_warning(
    carbon_mapper_credentials: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by a reviewer: 50 callers inside their patience when the renewal failed logged
    # 18 "trying again in 30 s" warnings; one failure is one warning.
    from cm_tasks import APIUnavailableError, _renewal

    emu = carbon_mapper_credentials
    block = "many-waiters-token"
    monkeypatch.setenv("CM_TOKEN_BLOCK", block)
    cached = save_token(emu, mint(emu), timedelta(minutes=50), block).get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
    callers = 12
    all_asking = threading.Barrier(callers)
    mints = []

    def failing(call: Any) -> Any:
        mints.append(call)
        # A window for the callers to join; one that comes later gets the failure's answer
        # without a renewal (and without a warning) just the same.
        time.sleep(1)
        raise APIUnavailableError("the platform answered 503", endpoint="token/pair")

    monkeypatch.setattr(_renewal, "_mint", failing)
    caplog.set_level(logging.INFO)

    def call(context: contextvars.Context) -> str:
        all_asking.wait(30)
        return context.run(get_stac_token)

    with ThreadPoolExecutor(max_workers=callers) as pool:
        futures = [pool.submit(call, contextvars.copy_context()) for _ in range(callers)]
        tokens = [future.result(timeout=60) for future in futures]

    assert tokens == [cached] * callers
    assert len(mints) == 1
    assert caplog.text.count("Using the cached token") == 1


def test_a_token_that_expires_during_the_patience_is_not_served(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a reviewer: the cached token had 6 s left, the renewal was slow, and after
    # its patience the caller was handed the token that had expired meanwhile.
    from cm_tasks import _renewal

    emu = carbon_mapper_credentials
    block = "expires-while-waiting"
    monkeypatch.setenv("CM_TOKEN_BLOCK", block)
    cached = save_token(emu, mint(emu), timedelta(seconds=5), block).get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(seconds=1)) == cached
    monkeypatch.setattr(_renewal, "PATIENCE_SECONDS", 7.0)
    emu.fail(TOKEN_PAIR, Fault.delay(9))
    made = emu.requests(CREATE_STAC)

    token = get_stac_token()

    assert token != cached  # the renewed one, after waiting for it
    assert emu.requests(CREATE_STAC) == made + 1


def test_a_run_the_limit_cancelled_after_a_failed_one_does_not_lift_the_hold(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refresh run failed (a wrong password); a newer run for the same block was cancelled
    # by the deployment's limit (CANCEL_NEW) while the first held the slot. A caller now gets
    # the failed run's error, not a new run: the cancelled duplicate says nothing.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.states import Cancelled, Failed

    from cm_tasks import RefreshRunError

    emu = carbon_mapper_credentials
    parameters = {"token_block": "held-token"}
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="held", type="process"))
        flow_id = client.create_flow_from_name("refresh-stac-token")
        deployment_id = client.create_deployment(flow_id, "held", work_pool_name="held")
        failed = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        client.set_flow_run_state(failed.id, Failed(message="BadCredentialsError"), force=True)
        duplicate = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        client.set_flow_run_state(duplicate.id, Cancelled(), force=True)
        before = len(client.read_flow_runs())
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/held")
    monkeypatch.setenv("CM_TOKEN_BLOCK", "held-token")
    delete_token_block("held-token")
    clear_token_cache()

    with pytest.raises(RefreshRunError) as caught:
        get_stac_token(refresh="deployment")

    assert caught.value.flow_run_id == str(failed.id)
    assert "callers get its failure, not a new run" in str(caught.value)
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # no run started
    assert emu.requests(CREATE_STAC) == 0


def test_a_configuration_error_of_one_refresh_mode_is_not_the_answer_for_another(
    carbon_mapper_credentials: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a reviewer: a deployment-mode caller whose refresh deployment does not exist
    # got a ConfigurationError; for 30 s, inline callers in the same process got it too ("CM_
    # REFRESH_MODE is deployment, but ..."), although an inline renewal would have worked.
    from cm_tasks import ConfigurationError

    emu = carbon_mapper_credentials
    block = "two-modes-token"
    monkeypatch.setenv("CM_TOKEN_BLOCK", block)
    monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "refresh-stac-token/nobody-made-this")
    cached = save_token(emu, mint(emu), timedelta(minutes=50), block).get()
    clear_token_cache()
    assert get_stac_token(min_valid=timedelta(minutes=10)) == cached
    hour = timedelta(hours=1)

    with pytest.raises(ConfigurationError, match="nobody-made-this"):
        get_stac_token(min_valid=hour, refresh="deployment")
    renewed = get_stac_token(min_valid=hour)  # inline, the default mode

    assert renewed != cached
    assert stored_token(block) == renewed
