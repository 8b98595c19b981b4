"""Outermost ASGI layer: counts requests, applies latency, and plays scripted faults.

It must wrap the Starlette app directly under uvicorn: ``Fault.drop`` aborts the TCP
connection through the transport of uvicorn's own ``send`` callable, which Starlette's
middleware would hide behind wrappers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cm_tasks.testing._faults import Fault, missing_key_body
from cm_tasks.testing._state import EmulatorState, path_key

_POLL_SECONDS = 0.05


class EmulatorMiddleware:
    """Wrap an ASGI app with the emulator's accounting, latency and faults."""

    def __init__(self, app: ASGIApp, state: EmulatorState) -> None:
        """Wrap ``app``, reading latency and faults from ``state``."""
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = path_key(scope["path"])
        method = str(scope["method"])
        self.state.count_request(key, scope.get("client"))
        exchange = _Exchange(self.state, method, key, receive, send)
        try:
            await exchange.run(self.app, scope)
        finally:
            exchange.finish()


class _Exchange:
    """One request: buffers its body so the client's disconnect can be watched while waiting."""

    def __init__(
        self, state: EmulatorState, method: str, key: str, receive: Receive, send: Send
    ) -> None:
        self.state = state
        self.method = method
        self.key = key
        self._receive = receive
        self._send = send
        self._body = b""
        self._body_sent = False
        self._watcher: asyncio.Task[Message] | None = None
        self._logged = False

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        if not await self._read_body():
            return
        if not await self._pause(self.state.latency):
            return
        fault = self.state.take_fault(self.key)
        if fault is not None:
            if fault.kind == "drop":
                await self._drop()
                return
            if fault.kind != "delay":
                await self._respond(fault)
                return
            if not await self._pause(fault.seconds):
                return
        await app(scope, self.receive, self.send)

    def finish(self) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        if not self._logged:
            self._log(0)

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        # Shielded: Starlette cancels its disconnect listener, which must not kill the watcher.
        return await asyncio.shield(self._watch())

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self._logged:
            self._log(int(message["status"]))
        await self._send(message)

    def _log(self, status: int) -> None:
        self._logged = True
        self.state.log_response(self.method, self.key, status)

    def _watch(self) -> asyncio.Task[Message]:
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._receive())
        return self._watcher

    async def _read_body(self) -> bool:
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return False
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self._body = b"".join(chunks)
        return True

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; return False early if the client leaves or the server stops."""
        if seconds <= 0:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        watcher = self._watch()
        while (remaining := deadline - loop.time()) > 0:
            if self.state.stopping.is_set():
                return False
            done, _ = await asyncio.wait({watcher}, timeout=min(remaining, _POLL_SECONDS))
            if done:
                return False
        return True

    async def _drop(self) -> None:
        transport: Any = getattr(getattr(self._send, "__self__", None), "transport", None)
        if transport is None:
            raise RuntimeError("cannot drop the connection: the ASGI server exposes no transport")
        self._log(0)
        transport.abort()
        # Let uvicorn see connection_lost first, so it does not try to send a 500 afterwards.
        for _ in range(3):
            await asyncio.sleep(0)

    async def _respond(self, fault: Fault) -> None:
        headers = dict(fault.headers)
        body = fault.body
        if fault.kind == "missing_key":
            body = json.dumps(missing_key_body(self.key)).encode()
            headers["content-type"] = "application/json"
        raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        raw_headers.append((b"content-length", str(len(body)).encode()))
        await self.send(
            {"type": "http.response.start", "status": fault.status_code, "headers": raw_headers}
        )
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
