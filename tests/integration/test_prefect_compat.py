"""What differs between the supported Prefect versions (3.2 to 3.9), and how cm-tasks meets it.

`make compat` runs the whole suite on Prefect 3.2, 3.4 and the newest; these tests pin down the
places where cm-tasks does something version-dependent, so each runs on every version.
"""

import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import prefect
import pytest
from packaging.version import Version
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.utilities.callables import parameter_schema

from cm_tasks import TokenBlockError, _compat, _refresh_lease, refresh_stac_token
from cm_tasks._lease_limit import lease_name
from cm_tasks._refresh_lease import prefect_has_leases, try_lease
from cm_tasks.watchdog import check_stac_token


@pytest.mark.parametrize(
    ("flow", "parameters"),
    [
        (refresh_stac_token, {"token_name": "nightly", "lifetime_days": 3, "token_block": "a-b"}),
        (check_stac_token, {"threshold_days": 2.5, "token_block": "a-b"}),
    ],
)
def test_flow_parameter_models_build_with_descriptions(
    flow: Callable[..., Any], parameters: dict[str, Any]
) -> None:
    # Postponed annotations with Annotated aliases made this raise on Prefect 3.2 and 3.4
    # ("Refresh_Stac_TokenModel is not fully defined; you should define TokenName").
    validated = flow.validate_parameters(parameters)  # type: ignore[attr-defined]
    # Prefect 3.4 also fills in the defaults of the other parameters; 3.2 and 3.9 do not.
    assert {name: validated[name] for name in parameters} == parameters
    properties = parameter_schema(flow.fn).properties  # type: ignore[attr-defined]
    assert set(parameters) <= set(properties)
    assert all(p.get("description") for p in properties.values())


def test_leases_are_used_only_where_prefect_has_them() -> None:
    # Prefect 3.2 has no leases: its concurrency() raised TypeError on lease_duration=, and
    # its client has no increment-with-lease.
    assert prefect_has_leases() == (Version(prefect.__version__) >= Version("3.4"))


def test_one_lease_holder_at_a_time_on_every_version() -> None:
    # The single-renewal guarantee, with or without leases: while one holder has the slot,
    # another try finds it held (once: nobody polls); once released, the next one gets it.
    block = "compat-lease-test"
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with try_lease(block, 60) as mine:
            assert mine
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        with try_lease(block, 60) as mine:
            assert not mine
    finally:
        release.set()
        holder.join(60)
    with try_lease(block, 60) as mine:
        assert mine


def test_a_living_holder_renews_its_lease_on_every_version_that_has_leases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prefect 3.4+: the lease is short and renewed while its holder lives (a killed holder
    # frees it within a minute, not at the end of the bound). Prefect 3.2: nothing to renew.
    monkeypatch.setattr(_refresh_lease, "KEEP_ALIVE_SECONDS", 0.1)
    renewed, failed = threading.Event(), []
    renew = _compat.renew_slot

    def counted(client: SyncPrefectClient, slot: _compat.Slot, duration: float) -> bool:
        try:
            known = renew(client, slot, duration)
        except Exception as exc:
            failed.append(exc)
            raise
        if known:
            renewed.set()
        return known

    monkeypatch.setattr(_compat, "renew_slot", counted)
    with try_lease("compat-lease-renewed", 980.0) as mine:
        assert mine
        leases = [t for t in threading.enumerate() if t.name == "cm-tasks-lease"]
        assert bool(leases) == prefect_has_leases()  # each compat leg's server is its own version
        if leases:
            assert renewed.wait(30), failed  # renewed by the real server, with no error
    assert failed == []
    with try_lease("compat-lease-renewed", 980.0) as mine:  # released as before
        assert mine


def test_a_lease_the_server_no_longer_knows_is_told_apart_on_every_version() -> None:
    # What a restarted server (leases kept in memory) or a lapsed lease answers a renewal:
    # 410 or 404 on Prefect 3.4+, which renew_slot reports as lost; 3.2 has nothing to renew.
    name = lease_name("compat-lease-lost")
    with get_client(sync_client=True) as client:
        slot = _compat.take_slot(client, None, name, 60.0)
        assert slot is not None
        assert _compat.renew_slot(client, slot, 60.0)  # known: renewed
        _compat.release_slot(client, slot, 1.0)
        assert _compat.renew_slot(client, slot, 60.0) is not prefect_has_leases()


def _busy(status: int = 500) -> PrefectHTTPStatusError:
    """What a SQLite-backed Prefect server answers while its database is locked."""
    request = httpx.Request("POST", "http://127.0.0.1/api/v2/concurrency_limits/decrement")
    response = httpx.Response(status, request=request, text="database is locked")
    return PrefectHTTPStatusError("busy", request=request, response=response)


def _fail_first(monkeypatch: pytest.MonkeyPatch, method: str, times: int | None) -> list[int]:
    """Make SyncPrefectClient.method answer 500 the first `times` calls (None: every call)."""
    calls: list[int] = []
    real = getattr(SyncPrefectClient, method)

    def flaky(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if times is None or len(calls) <= times:
            raise _busy()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SyncPrefectClient, method, flaky)
    return calls


RELEASE = (
    "release_concurrency_slots_with_lease" if prefect_has_leases() else "release_concurrency_slots"
)
INCREMENT = (
    "increment_concurrency_slots_with_lease"
    if prefect_has_leases()
    else "increment_concurrency_slots"
)


@pytest.fixture
def no_release_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real pauses between attempts to give a slot back."""
    monkeypatch.setattr(_refresh_lease, "RELEASE_WAITS", (0.0, 0.0, 0.0, 0.0))


def test_a_slot_the_busy_api_refuses_to_take_back_at_first_is_given_back(
    monkeypatch: pytest.MonkeyPatch, no_release_pauses: None
) -> None:
    # Seen on Prefect 3.2.15 with SQLite under 50 runs at once: the release answered 500
    # "database is locked", and with no lease to lapse the slot stayed taken for good.
    block = "compat-release-retried"
    calls = _fail_first(monkeypatch, RELEASE, times=2)
    with try_lease(block, 60) as mine:
        assert mine
    assert len(calls) == 3
    monkeypatch.undo()
    with try_lease(block, 60) as mine:  # free again
        assert mine


def test_a_slot_that_cannot_be_given_back_says_what_happens_next(
    monkeypatch: pytest.MonkeyPatch, no_release_pauses: None, caplog: pytest.LogCaptureFixture
) -> None:
    block = "compat-release-failed"
    _fail_first(monkeypatch, RELEASE, times=None)
    with caplog.at_level(logging.WARNING, logger="cm_tasks"), try_lease(block, 60):
        pass
    assert "it lapses by itself" in caplog.text
    assert f"prefect gcl update {lease_name(block)} --active-slots 0" in caplog.text
    monkeypatch.undo()
    with get_client(sync_client=True) as client:  # the slot may still be taken: remove it
        client.delete_global_concurrency_limit_by_name(lease_name(block))


def test_a_prefect_api_that_stays_busy_is_a_transient_token_block_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fail_first(monkeypatch, INCREMENT, times=None)
    with (
        pytest.raises(TokenBlockError, match="HTTPStatusError 500") as caught,
        try_lease("compat-acquire-failed", 60),
    ):
        pass
    assert caught.value.transient
    assert caught.value.__context__ is None  # the Prefect error (its request) is not kept


def test_a_server_without_leases_under_a_newer_client_gets_a_plain_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Prefect 3.4+ client against a 3.2 server: increment-with-lease answers 405 there (404
    # was all that was handled), and every inline refresh failed. Unsupported skew (README),
    # but it must still renew once at a time.
    monkeypatch.setattr(_compat, "_no_leases", set())  # this test's finding only
    request = httpx.Request(
        "POST", "http://127.0.0.1/api/v2/concurrency_limits/increment-with-lease"
    )

    def no_such_route(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> Any:
        response = httpx.Response(405, request=request, json={"detail": "Method Not Allowed"})
        raise PrefectHTTPStatusError("405", request=request, response=response)

    monkeypatch.setattr(
        SyncPrefectClient, "increment_concurrency_slots_with_lease", no_such_route, raising=False
    )
    block = "compat-server-without-leases"
    with try_lease(block, 60) as first, try_lease(block, 60) as second:
        assert (first, second) == (True, False)  # a plain slot after the 405, held once
    with try_lease(block, 60) as mine:
        assert mine


def test_the_notification_blocks_docs_operate_names_build() -> None:
    # docs/operate.md has failures notify through a Slack Webhook (or e-mail) block; in a team
    # environment of Prefect 3.2 with a later apprise, building one raised TypeError.
    from prefect.blocks.notifications import SlackWebhook
    from pydantic import SecretStr

    slack = SlackWebhook(url=SecretStr("https://hooks.slack.com/services/T0/B0/X"))
    assert slack.url.get_secret_value().startswith("https://hooks.slack.com/")


@pytest.mark.parametrize("state", ["Scheduled", "Running"])
def test_a_deployment_refresh_time_out_says_what_to_do_for_the_runs_state(state: str) -> None:
    # Review on 3.2.15: a worker killed during the run left it Running and kept the
    # deployment's concurrency slot; the caller was told the run "stays queued" and to wait
    # longer, which cannot help.
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Running, Scheduled

    from cm_tasks import load_settings
    from cm_tasks._deployment_refresh import _timeout

    run_state = Running() if state == "Running" else Scheduled()
    run = FlowRun(
        flow_id=uuid4(),
        name="stuck-run",
        state=run_state,
        state_type=run_state.type,
        state_name=run_state.name,
    )
    deployment = SimpleNamespace(id=uuid4(), work_pool_name="carbon-mapper")
    settings = load_settings()
    error = _timeout(run, deployment, settings, "team-token")

    message = str(error)
    assert "'stuck-run'" in message
    if state == "Running":  # such a run is crashed by the next caller (issue 16 case 4)
        assert "marked Crashed by the next caller" in message
        assert "not picked up" not in message
    else:
        assert "prefect worker start --pool carbon-mapper" in message
        assert "not picked up" in message


def test_a_deployment_refresh_run_is_created_once_when_prefect_sends_the_post_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seen once on Prefect 3.2.15 under load: one caller's refresh made two runs, the second
    # cancelled by CANCEL_NEW. Prefect's client sends a POST again after a read time-out; the
    # idempotency key makes the server answer the second with the first run.
    from cm_tasks import load_settings
    from cm_tasks._deployment_refresh import _Runs

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("compat-idempotent-refresh")
        deployment_id = client.create_deployment(flow_id=flow_id, name="weekly")
        real = SyncPrefectClient.create_flow_run_from_deployment
        keys: list[str | None] = []

        def sent_twice(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> Any:
            keys.append(kwargs.get("idempotency_key"))
            real(self, *args, **kwargs)  # the response that never arrived
            return real(self, *args, **kwargs)

        monkeypatch.setattr(SyncPrefectClient, "create_flow_run_from_deployment", sent_twice)
        monkeypatch.setenv("CM_REFRESH_DEPLOYMENT", "compat-idempotent-refresh/weekly")
        settings = load_settings()

        def direct(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        runs_of = _Runs(client, direct, settings, "team-token", settings.base_url)
        first, second = runs_of.start(), runs_of.start()
        runs = client.read_flow_runs()

    assert first.id != second.id
    # Two runs, not four: each repeated POST returned its first run.
    assert sorted(str(r.id) for r in runs if r.deployment_id == deployment_id) == sorted(
        [str(first.id), str(second.id)]
    )
    assert None not in keys
    assert len(set(keys)) == 2


@pytest.mark.parametrize("message", ["Runner has not yet started. Please start it", "other"])
def test_a_sigterm_while_prefects_runner_starts_stops_serve_cleanly(
    monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    # Prefect 3.2-3.4: a SIGTERM after the runner's banner but before it has started makes
    # its handler raise RuntimeError("Runner has not yet started"). Seen in the 3.4 compat
    # leg: `cm-tasks serve` exited 1 with a traceback. It is now a stop like any other: the
    # schedules paused, then `serve` returns; any other RuntimeError is still raised.
    from cm_tasks import deployments

    def starting(*_args: Any) -> None:  # registered by Prefect's runner, then this
        raise RuntimeError(message)

    paused: list[Any] = []
    monkeypatch.setattr(deployments, "_run_until_stopped", starting)
    monkeypatch.setattr(deployments, "_pause_served", paused.append)
    if message == "other":
        with pytest.raises(RuntimeError, match="other"):
            deployments.serve(watchdog=False)
        assert paused == []
        return
    deployments.serve(watchdog=False)
    assert paused == [["refresh-stac-token/weekly"]]
