"""The :class:`CarbonMapperEmulator`: a local, scriptable stand-in for the Carbon Mapper API."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cm_tasks.testing import _catalog
from cm_tasks.testing._faults import Fault, Quirk
from cm_tasks.testing._state import STAC_SCOPES, EmulatorState, path_key

if TYPE_CHECKING:
    from cm_tasks.testing._server import BackgroundServer

HOST = "127.0.0.1"

DEMO_EMAIL = "demo@carbonmapper.example"
DEMO_PASSWORD = "demo-password-123"


class CarbonMapperEmulator:
    """Serve a fake Carbon Mapper platform API on 127.0.0.1 for tests and demos.

    It issues real (locally signed) JWTs, serves a synthetic STAC catalogue, counts requests,
    and plays scripted faults. The state survives :meth:`reset`, except what a test changes.

    Example:
        ```python
        import httpx
        from cm_tasks.testing import CarbonMapperEmulator, Fault

        with CarbonMapperEmulator() as emu:
            emu.fail("token/pair", Fault.status(503))
            r = httpx.post(emu.base_url + "token/pair",
                           json={"email": emu.email, "password": emu.password})
            assert r.status_code == 503
        ```
    """

    def __init__(self, latency: float = 0.0) -> None:
        """Create an emulator with the demo account; call :meth:`start` to serve.

        Args:
            latency: Delay in seconds applied to every request (restored by :meth:`reset`).
        """
        self._state = EmulatorState(latency=latency)
        self._state.add_user(DEMO_EMAIL, DEMO_PASSWORD)
        self._server: BackgroundServer | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, port: int = 0) -> CarbonMapperEmulator:
        """Start serving on 127.0.0.1:``port`` (0: a free port) and return self.

        Raises:
            RuntimeError: If it is already running or uvicorn fails to start.
        """
        if self._server is not None:
            raise RuntimeError("emulator is already running")
        # Deferred so that importing cm_tasks.testing does not load uvicorn and Starlette.
        from cm_tasks.testing._app import build_app
        from cm_tasks.testing._server import BackgroundServer

        self._state.stopping.clear()
        server = BackgroundServer(build_app(self._state), port)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving; in-flight delayed requests are cut short. Safe to call twice."""
        if self._server is None:
            return
        self._state.stopping.set()
        self._server.stop()
        self._server = None

    def __enter__(self) -> CarbonMapperEmulator:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses and accounts ----------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port it listens on.

        Raises:
            RuntimeError: If it is not running.
        """
        if self._server is None:
            raise RuntimeError("emulator is not running; call start() first")
        return self._server.port

    @property
    def base_url(self) -> str:
        """The API base URL, ``http://127.0.0.1:PORT/api/v1/`` (with trailing slash)."""
        return f"http://{HOST}:{self.port}/api/v1/"

    @property
    def email(self) -> str:
        """The demo account's email address."""
        return DEMO_EMAIL

    @property
    def password(self) -> str:
        """The demo account's password (fake, public)."""
        return DEMO_PASSWORD

    def add_user(self, email: str, password: str) -> None:
        """Add an account that ``token/pair`` accepts; it survives :meth:`reset`."""
        self._state.add_user(email, password)

    # --- scripting -----------------------------------------------------------------------

    def reset(self) -> None:
        """Clear faults, quirks, counters, logs and issued tokens; restore the initial latency."""
        self._state.reset()

    @property
    def latency(self) -> float:
        """Delay in seconds applied to every request before it is handled."""
        return self._state.latency

    @latency.setter
    def latency(self, value: float) -> None:
        self._state.latency = value

    @property
    def quirks(self) -> frozenset[Quirk]:
        """Lasting misbehaviours switched on, e.g. ``{"merge-next"}``; :meth:`reset` clears them.

        Where a :class:`Fault` spoils a few requests, a quirk changes how every answer is
        formed (paging links, encodings, file names): see `cm_tasks.testing._faults.Quirk`.

        Example:
            ```python
            from cm_tasks.testing import CarbonMapperEmulator

            with CarbonMapperEmulator() as emu:
                emu.quirks = {"repeat-next", "gzip"}
                ...
                emu.quirks = set()
            ```
        """
        return self._state.quirks

    @quirks.setter
    def quirks(self, value: Iterable[Quirk]) -> None:
        self._state.quirks = frozenset(value)

    def fail(self, path: str, *faults: Fault) -> None:
        """Queue faults for requests to ``path`` (relative to the base URL, e.g. ``token/pair``).

        Each request to that path consumes one use of the first queued fault (a fault with
        ``times=N`` serves N requests); once the queue is empty requests behave normally.
        The path is matched without its query string; leading and trailing slashes are ignored.
        """
        self._state.add_faults(path_key(path), faults)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._state.clear_faults()

    def issue_stac_token(self, name: str = "test-token", lifetime_days: int = 14) -> dict[str, Any]:
        """Mint a STAC token for the demo account without an HTTP request (no counter moves).

        The token is recorded in :attr:`issued_stac_tokens` like any other. Fixtures use it to
        put a valid token in place without disturbing a test's request counts.

        Returns:
            The body ``account/tokens/create-stac`` would have answered with.
        """
        user_id = self._state.authenticate(DEMO_EMAIL, DEMO_PASSWORD)
        if user_id is None:  # pragma: no cover - the demo account is added in __init__
            raise RuntimeError("the demo account is missing")
        expires = datetime.now(timezone.utc).date() + timedelta(days=lifetime_days)
        token_id, token, created = self._state.issue_stac_token(user_id, expires)
        return {
            "id": token_id,
            "name": name,
            "token_value": token,
            "expiration_date": expires.isoformat(),
            "scopes": list(STAC_SCOPES),
            "created": created.isoformat(),
        }

    # --- observation ---------------------------------------------------------------------

    def requests(self, path: str | None = None) -> int:
        """Return how many requests reached ``path`` (relative to the base URL), or in total.

        Faulted and dropped requests count too. Slashes at either end are ignored, so
        ``"stac/"`` and ``"stac"`` both mean the landing page.
        """
        return self._state.count(None if path is None else path_key(path))

    def connections(self) -> int:
        """How many TCP connections sent requests (distinct client address and port)."""
        return self._state.connection_count()

    @property
    def request_log(self) -> list[tuple[str, str, int]]:
        """``(method, path, status)`` per finished request; status 0 means no response was sent."""
        return self._state.request_log()

    @property
    def issued_access_tokens(self) -> list[str]:
        """Every access token handed out since the last reset, oldest first."""
        return self._state.issued("access")

    @property
    def issued_refresh_tokens(self) -> list[str]:
        """Every refresh token handed out since the last reset, oldest first."""
        return self._state.issued("refresh")

    @property
    def issued_stac_tokens(self) -> list[str]:
        """Every STAC-scoped token handed out since the last reset, oldest first."""
        return self._state.issued("stac")

    @property
    def stac_token_requests(self) -> list[dict[str, Any]]:
        """The JSON bodies received by ``account/tokens/create-stac``, oldest first."""
        return self._state.stac_requests()

    # --- synthetic assets ----------------------------------------------------------------

    @property
    def large_asset(self) -> tuple[str, str]:
        """``(item_id, asset_key)`` of the one multi-megabyte asset, for streaming tests."""
        return _catalog.LARGE_ASSET

    def asset_size(self, item_id: str, name: str) -> int:
        """Return the byte size of an asset (``name`` is the key, e.g. ``cmf``, or ``cmf.tif``).

        Raises:
            KeyError: If there is no such asset.
        """
        size = _catalog.asset_size(item_id, name)
        if size is None:
            raise KeyError(f"no asset {name!r} on item {item_id!r}")
        return size

    def asset_bytes(self, item_id: str, name: str) -> bytes:
        """Return the exact bytes a download of the asset yields.

        Raises:
            KeyError: If there is no such asset.
        """
        self.asset_size(item_id, name)
        return b"".join(_catalog.asset_chunks(item_id, name))


@contextmanager
def run_emulator(port: int = 0, latency: float = 0.0) -> Iterator[CarbonMapperEmulator]:
    """Run an emulator for the duration of a ``with`` block.

    Args:
        port: TCP port on 127.0.0.1; 0 picks a free one.
        latency: Delay in seconds applied to every request.

    Yields:
        The started emulator.
    """
    emulator = CarbonMapperEmulator(latency=latency).start(port)
    try:
        yield emulator
    finally:
        emulator.stop()
