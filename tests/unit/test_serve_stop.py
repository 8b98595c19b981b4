"""`cm-tasks serve` stopped by SIGTERM or Ctrl-C while Prefect is still loading: a clean stop."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import prefect
import pytest
from pydantic import BaseModel, field_serializer

from cm_tasks import deployments
from cm_tasks.cli import main


class _Settings(BaseModel):
    """Stands in for Prefect's settings, which its logging setup serialises while it loads."""

    level: str = "INFO"
    stop_signal: int = signal.SIGTERM

    @field_serializer("level")
    def _stop_signal_lands_here(self, level: str) -> str:
        os.kill(os.getpid(), self.stop_signal)
        return level


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_prefect_loads_stops_serve_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop_signal: int
) -> None:
    # Seen by a reviewer: SIGTERM 0.1-0.25 s after "Serving from" made `cm-tasks serve` exit 1
    # with a traceback: raised inside Prefect's import, the KeyboardInterrupt came out as
    # pydantic's PydanticSerializationError (with no cause to tell it was a stop). Then the
    # same with Ctrl-C, and both said the schedules were paused though none was registered.
    # `prefect.serve` is never in the module's namespace: Prefect loads it on each access.
    prefects_getattr = prefect.__getattr__
    served: list[Any] = []

    def loading(name: str) -> Any:
        if name != "serve":
            return prefects_getattr(name)
        _Settings(stop_signal=stop_signal).model_dump()
        return lambda *deployments: served.append(deployments)

    monkeypatch.setattr(prefect, "__getattr__", loading)
    monkeypatch.setattr(deployments, "_register", lambda *args: served.append(args))
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--no-watchdog"])

    assert exited.value.code in (0, None)
    output = capsys.readouterr()
    assert "Stopped before registering any deployment" in output.out
    assert "paused" not in output.out + output.err
    assert served == []  # asked to stop before it served anything
    assert {signum: signal.getsignal(signum) for signum in previous} == previous


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_the_runners_shutdown_errors_keep_their_message_and_lose_their_traceback(
    monkeypatch: pytest.MonkeyPatch, debug: bool
) -> None:
    # Seen in the Prefect 3.2 compat leg: anyio's "Set changed size during iteration", logged
    # by asyncio with a traceback as Prefect's runner shut down after its API had gone.
    asyncio_logger, seen = logging.getLogger("asyncio"), _Records()

    def registered(_served: Any, names: list[str], _stops: list[int]) -> None:
        names.append("refresh-stac-token/weekly")

    def serve_then_fail_at_shutdown(*_args: Any) -> None:
        try:
            raise RuntimeError("Set changed size during iteration")
        except RuntimeError:
            asyncio_logger.exception("Exception in callback CancelScope")
        raise KeyboardInterrupt

    monkeypatch.setattr(deployments, "_register", registered)
    monkeypatch.setattr(deployments, "_run_until_stopped", serve_then_fail_at_shutdown)
    monkeypatch.setattr(deployments, "_pause_served", lambda full_names: None)
    asyncio_logger.addHandler(seen)  # after the logger's filters, whatever Prefect's set-up
    try:
        with pytest.raises(SystemExit):
            main([*(["--debug"] if debug else []), "serve", "--no-watchdog"])
    finally:
        asyncio_logger.removeHandler(seen)

    [record] = seen.records
    assert record.getMessage() == "Exception in callback CancelScope"
    assert (record.exc_info is not None) is debug
    assert asyncio_logger.filters == []  # not left behind


class _Runner:
    """Prefect's runner, whose registration of a deployment is where a stop arrives."""

    def __init__(self, steps: list[str], stops: list[int], **options: Any) -> None:
        self.steps, self.stops, self.options = steps, stops, options

    def add_deployment(self, deployment: Any) -> None:
        self.steps.append(f"registering {deployment.name}")
        for signum in self.stops:
            os.kill(os.getpid(), signum)
        self.stops = []
        self.steps.append(f"registered {deployment.name}")

    async def start(self) -> None:
        self.steps.append("started")


@pytest.mark.parametrize(
    "stops",
    [[signal.SIGTERM], [signal.SIGINT], [signal.SIGTERM, signal.SIGINT]],
    ids=["SIGTERM", "SIGINT", "twice"],
)
def test_a_stop_while_a_deployment_is_registered_takes_effect_once_it_is(
    monkeypatch: pytest.MonkeyPatch, stops: list[int]
) -> None:
    # Found by a reviewer on Prefect 3.9: a stop 0.3-0.45 s after "Serving from" came while
    # Prefect's runner registered a deployment from its own thread. The stop was raised here,
    # serve paused the schedules, then the registration finished and left the weekly refresh
    # active, while serve said it was paused.
    import prefect.runner

    steps: list[str] = []
    runners: list[_Runner] = []

    def runner(**options: Any) -> _Runner:
        runners.append(_Runner(steps, stops, **options))
        return runners[-1]

    monkeypatch.setattr(prefect.runner, "Runner", runner)
    monkeypatch.setattr(
        deployments, "_pause_served", lambda names: steps.append(f"paused {', '.join(names)}")
    )
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `cm-tasks serve`
    try:
        if len(stops) == 1:
            deployments.serve()
        else:  # a second stop gives up at once: what is registered is not known to be paused
            with pytest.raises(deployments.ServedNotPausedError, match="stopped again while"):
                deployments.serve()
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)

    if len(stops) == 1:
        # Only what it registered: a daily check deployed to a pool is not serve's to pause.
        assert steps == [
            "registering weekly",
            "registered weekly",
            "paused refresh-stac-token/weekly",
        ]
    else:
        assert steps == ["registering weekly"]
    [made] = runners
    assert made.options["pause_on_shutdown"] is False  # the pause is ours, bounded in time


@pytest.mark.parametrize("stop_at", ["daily", "prepare"])
def test_a_stop_after_the_last_registration_is_held_until_the_runner_takes_signals_over(
    monkeypatch: pytest.MonkeyPatch, stop_at: str
) -> None:
    # Found by a reviewer on Prefect 3.9: SIGTERM just after the banner, while the runner
    # imported its web server before installing its own handler, came out of that import as
    # pydantic's SchemaError: a traceback, exit 1, both schedules left active.
    import importlib

    import prefect.runner

    steps: list[str] = []
    real_import = importlib.import_module

    class Runner(_Runner):
        def add_deployment(self, deployment: Any) -> None:
            self.stops = [signal.SIGTERM] if deployment.name == stop_at else []
            super().add_deployment(deployment)

    def import_module(name: str, package: str | None = None) -> Any:
        if name == "prefect.runner.server" and stop_at == "prepare":
            steps.append("preparing")
            os.kill(os.getpid(), signal.SIGTERM)
        return real_import(name, package)

    monkeypatch.setattr(prefect.runner, "Runner", lambda **options: Runner(steps, [], **options))
    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(
        deployments, "_pause_served", lambda names: steps.append(f"paused {', '.join(names)}")
    )
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `cm-tasks serve`
    try:
        registered = deployments.serve()
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert registered == ["refresh-stac-token/weekly", "check-stac-token/daily"]
    assert "started" not in steps
    assert steps[-1] == "paused refresh-stac-token/weekly, check-stac-token/daily"
