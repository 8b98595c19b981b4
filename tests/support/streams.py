"""A stand-in for `cm_tasks._token_events.Listener`: a live stream that says what it is told."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ScriptedStream:
    """A live events stream that delivers the given events in order, one per `next`.

    Patched in for the `Listener` class (calling it returns the stream itself), so that a
    unit test decides exactly what a waiter hears, and fails if it listens for more.
    """

    live = True

    def __init__(self, heard: Sequence[Any]) -> None:
        self.heard = list(heard)

    def __call__(self, *_args: object, **_kwargs: object) -> ScriptedStream:
        return self

    def __enter__(self) -> ScriptedStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def next(self, timeout: float) -> Any:
        if not self.heard and timeout == 0:
            return None  # a look at what is queued, as the real stream answers it
        assert self.heard, "waited for more events than the script holds"
        return self.heard.pop(0)

    def queued(self) -> list[Any]:
        """What the script holds now, as the real stream's events already heard."""
        taken, self.heard = [h for h in self.heard if h is not None], []
        return taken
