"""A counting reverse proxy for a Prefect API: what each client process asks of Prefect.

`CountingProxy(upstream)` relays raw TCP from ports on 127.0.0.1 to the Prefect server. Each
port has a label (give each client process its own port: no header needed to tell clients
apart). For every port it counts

- each HTTP request, by method and path (UUIDs shown as `{id}`), with the time it arrived;
- each websocket connection (`/api/events/in`, `/api/events/out`) and each message on it, in
  both directions. Messages from the client to `/api/events/in` are Prefect events: the proxy
  records their `event` name (never anything else of the payload; the first message of a
  connection is the client's `auth` message and is counted as such).

Websockets pass through untouched (the `prefect` subprotocol and the auth message included,
or Prefect's events client reconnects in a loop), except that the proxy removes the
`Sec-WebSocket-Extensions` request header so that messages are not compressed and their event
names can be read.

Example:
    ```python
    with CountingProxy("127.0.0.1", 4200) as proxy:
        port = proxy.listen("process-1")
        ...  # a client with PREFECT_API_URL=http://127.0.0.1:{port}/api
        print(proxy.counts("process-1").requests)
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_COPY_CHUNK = 65536
_STOP_TIMEOUT = 10.0


@dataclass
class Counts:
    """What one client (one port) sent through the proxy."""

    requests: Counter[str] = field(default_factory=Counter)  # "POST /api/..." -> count
    times: list[tuple[float, str]] = field(default_factory=list)  # (arrival, "METHOD path")
    ws_connections: Counter[str] = field(default_factory=Counter)  # path -> count
    ws_sent: Counter[str] = field(default_factory=Counter)  # path -> client messages
    ws_received: Counter[str] = field(default_factory=Counter)  # path -> server messages
    events: Counter[str] = field(default_factory=Counter)  # event name -> count
    # (arrival, event name) of each event sent, and of each event delivered on /events/out
    event_times: list[tuple[float, str]] = field(default_factory=list)
    delivered: list[tuple[float, str]] = field(default_factory=list)

    @property
    def total_requests(self) -> int:
        """HTTP requests, websocket upgrades included."""
        return sum(self.requests.values())

    @property
    def total_events(self) -> int:
        """Prefect events sent to `/api/events/in` (auth messages not included)."""
        return sum(self.events.values())


def normalise(path: str) -> str:
    """The path without its query string, UUIDs replaced by `{id}`."""
    return _UUID.sub("{id}", path.split("?", 1)[0])


class _Connection:
    """What the two directions of one relayed connection share."""

    def __init__(self) -> None:
        self.first_request = asyncio.Event()
        self.websocket: str | None = None  # the path, once an upgrade was requested


class CountingProxy:
    """Ports on 127.0.0.1 relaying to one upstream HTTP server, each counting its traffic.

    Runs its own asyncio loop in a daemon thread; `stop()` (or leaving the `with` block)
    closes every listener and connection.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._counts: dict[str, Counts] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: dict[str, asyncio.Server] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def listen(self, label: str) -> int:
        """Open a new port for `label` (counts start at zero); returns the port."""
        with self._lock:
            self._counts[label] = Counts()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(lambda r, w: self._serve(label, r, w), "127.0.0.1", 0)

        server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(_STOP_TIMEOUT)
        self._servers[label] = server
        return int(server.sockets[0].getsockname()[1])

    def reset(self, label: str) -> None:
        """Start counting `label` from zero again (its port stays open)."""
        with self._lock:
            self._counts[label] = Counts()

    def counts(self, label: str) -> Counts:
        """A snapshot of what `label`'s port has seen so far."""
        with self._lock:
            c = self._counts[label]
            return Counts(
                Counter(c.requests),
                list(c.times),
                Counter(c.ws_connections),
                Counter(c.ws_sent),
                Counter(c.ws_received),
                Counter(c.events),
                list(c.event_times),
                list(c.delivered),
            )

    def close(self, label: str) -> None:
        """Stop accepting connections on `label`'s port (its counts stay readable)."""
        server = self._servers.pop(label, None)
        if server is not None:
            self._loop.call_soon_threadsafe(server.close)

    def stop(self) -> None:
        """Close every port and connection and stop the loop's thread."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            for server in self._servers.values():
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(_STOP_TIMEOUT)
        self._servers.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_STOP_TIMEOUT)

    # -- the relay ---------------------------------------------------------------------------

    def _record(self, label: str, update: Callable[[Counts], None]) -> None:
        with self._lock:
            update(self._counts[label])

    async def _serve(
        self, label: str, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            connection = _Connection()
            await asyncio.gather(
                self._requests(label, client_reader, upstream_writer, connection),
                self._responses(label, upstream_reader, client_writer, connection),
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a peer went away: close both sides
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)

    async def _requests(
        self,
        label: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
    ) -> None:
        """Client to server: one HTTP request at a time, then websocket frames after an upgrade."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as end:
                    writer.write(end.partial)
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                path = normalise(target)
                key = f"{method} {path}"
                now = time.time()

                def request(c: Counts, key: str = key, now: float = now) -> None:
                    c.requests[key] += 1
                    c.times.append((now, key))

                self._record(label, request)
                if headers.get("upgrade", "").lower() == "websocket":
                    kept = [ln for ln in lines if not ln.lower().startswith("sec-websocket-ext")]
                    connection.websocket = path
                    connection.first_request.set()

                    def upgrade(c: Counts, path: str = path) -> None:
                        c.ws_connections[path] += 1

                    self._record(label, upgrade)
                    writer.write("\r\n".join(kept).encode("latin-1"))
                    await self._frames(label, reader, writer, path, sent=True)
                    break
                connection.first_request.set()
                writer.write(head)
                if "content-length" in headers:
                    await _copy_exactly(reader, writer, int(headers["content-length"]))
                elif "chunked" in headers.get("transfer-encoding", "").lower():
                    await _copy_chunked(reader, writer)
                await writer.drain()
        finally:
            connection.first_request.set()
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

    async def _responses(
        self,
        label: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
    ) -> None:
        """Server to client: raw bytes, or websocket frames after a 101 to an upgrade."""
        await connection.first_request.wait()
        if connection.websocket is not None:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            await writer.drain()
            if head.split(b" ", 2)[1:2] == [b"101"]:
                await self._frames(label, reader, writer, connection.websocket, sent=False)
        while chunk := await reader.read(_COPY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        # The server closed: so does the client's side. A websocket client waits for this
        # after the closing handshake (up to its close timeout) before its process exits.
        with contextlib.suppress(OSError):
            writer.close()

    async def _frames(
        self,
        label: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        sent: bool,
    ) -> None:
        """Relay websocket frames one by one, counting data messages (RFC 6455 framing)."""
        message = bytearray()
        first = True
        while True:
            try:
                header = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return
            fin, opcode = header[0] & 0x80, header[0] & 0x0F
            length = header[1] & 0x7F
            extended = b""
            if length == 126:
                extended = await reader.readexactly(2)
                length = int.from_bytes(extended, "big")
            elif length == 127:
                extended = await reader.readexactly(8)
                length = int.from_bytes(extended, "big")
            mask = await reader.readexactly(4) if header[1] & 0x80 else b""
            payload = await reader.readexactly(length)
            writer.write(header + extended + mask + payload)
            await writer.drain()
            if opcode not in (0, 1, 2):
                continue  # ping, pong, close
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            message += payload
            if not fin:
                continue
            name = _message_name(bytes(message))
            message.clear()
            now = time.time()

            def count(
                c: Counts, name: str | None = name, auth: bool = first, now: float = now
            ) -> None:
                (c.ws_sent if sent else c.ws_received)[path] += 1
                if name is None or auth:
                    return
                if sent and path.endswith("/events/in"):
                    c.events[name] += 1
                    c.event_times.append((now, name))
                elif not sent and path.endswith("/events/out"):
                    c.delivered.append((now, name))

            self._record(label, count)
            first = False


def _message_name(payload: bytes) -> str | None:
    """The `event` name of a Prefect event message, sent or delivered (None for anything else)."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("event"), dict):  # /events/out delivery
        body = body["event"]
    if isinstance(body, dict) and isinstance(body.get("event"), str):
        return str(body["event"])
    return None


async def _copy_exactly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        chunk = await reader.read(min(n, _COPY_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(chunk)
        n -= len(chunk)


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                writer.write(trailer)
            writer.write(b"\r\n")
            return
        await _copy_exactly(reader, writer, size + 2)
