"""Run an ASGI app with uvicorn on 127.0.0.1 in a background daemon thread."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

HOST = "127.0.0.1"
_START_TIMEOUT_SECONDS = 10.0
_STOP_TIMEOUT_SECONDS = 5.0


class BackgroundServer:
    """A uvicorn server bound before it starts, so its port is known up front."""

    def __init__(self, app: ASGIApp, port: int = 0) -> None:
        """Bind 127.0.0.1:``port`` (0 picks a free port) for ``app``; nothing is served yet."""
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it each response on a kept-alive connection waits ~40 ms (Nagle).
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((HOST, port))
        except OSError:
            self._socket.close()
            raise
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # Bounds shutdown when a client abandoned a slow request mid-flight.
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"cm-tasks-emulator-{self.port}",
            daemon=True,
        )

    def start(self) -> None:
        """Start serving and wait until uvicorn accepts connections.

        Raises:
            RuntimeError: If the server does not start within 10 seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator failed to start on {HOST}:{self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Ask uvicorn to shut down, wait for its thread, and release the socket."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(_STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(_STOP_TIMEOUT_SECONDS)
        self._socket.close()
