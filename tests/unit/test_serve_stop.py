"""`cm-tasks serve` stopped by SIGTERM while Prefect is still loading: a clean stop (exit 0)."""

from __future__ import annotations

import os
import signal
from typing import Any

import prefect
import pytest
from pydantic import BaseModel, field_serializer

from cm_tasks.cli import main


class _Settings(BaseModel):
    """Stands in for Prefect's settings, which its logging setup serialises while it loads."""

    level: str = "INFO"

    @field_serializer("level")
    def _sigterm_lands_here(self, level: str) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return level


def test_a_sigterm_while_prefect_loads_stops_serve_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seen by a reviewer: SIGTERM 0.1-0.25 s after "Serving from" made `cm-tasks serve` exit 1
    # with a traceback: raised inside Prefect's import, the KeyboardInterrupt came out as
    # pydantic's PydanticSerializationError (with no cause to tell it was a stop).
    # `prefect.serve` is never in the module's namespace: Prefect loads it on each access.
    prefects_getattr = prefect.__getattr__
    served: list[Any] = []

    def loading(name: str) -> Any:
        if name != "serve":
            return prefects_getattr(name)
        _Settings().model_dump()
        return lambda *deployments: served.append(deployments)

    monkeypatch.setattr(prefect, "__getattr__", loading)
    previous = signal.getsignal(signal.SIGTERM)

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--no-watchdog"])

    assert exited.value.code in (0, None)
    assert "Stopped." in capsys.readouterr().out
    assert served == []  # asked to stop before it served anything
    assert signal.getsignal(signal.SIGTERM) is previous
