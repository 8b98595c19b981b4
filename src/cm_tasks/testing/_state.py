"""Mutable emulator state: accounts, issued tokens, request counters and queued faults.

The server thread writes it and the test thread reads it, so every access takes one lock.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import Counter, deque
from copy import deepcopy
from datetime import date, datetime, timezone
from typing import Any, Literal

from cm_tasks.testing._faults import QUIRKS, Fault, Quirk
from cm_tasks.testing._jwt import encode_hs256, verify_hs256

API_PREFIX = "/api/v1/"
ACCESS_LIFETIME_SECONDS = 5 * 60
REFRESH_LIFETIME_SECONDS = 24 * 60 * 60
STAC_SCOPE = "stac catalog:read"
STAC_SCOPES = ["stac", "catalog:read"]


def path_key(path: str) -> str:
    """Normalise a path to the key used for counters and faults.

    ``/api/v1/stac/``, ``api/v1/stac`` and ``stac/`` all become ``stac``; a request path outside
    the API keeps its leading slash so it cannot collide with an API path.
    """
    for prefix in (API_PREFIX, API_PREFIX.lstrip("/")):
        if path.startswith(prefix):
            return path[len(prefix) :].strip("/")
    if path.startswith("/"):
        return path
    return path.strip("/")


class EmulatorState:
    """Thread-safe state shared by the emulator's HTTP handlers and its Python API."""

    def __init__(self, latency: float = 0.0) -> None:
        """Create empty state with a fresh random signing key.

        Args:
            latency: Delay in seconds applied to every request until changed or reset.
        """
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._users: dict[str, tuple[str, int]] = {}
        self._default_latency = latency
        self._latency = latency
        self._counts: Counter[str] = Counter()
        self._clients: set[tuple[Any, ...]] = set()
        self._log: list[tuple[str, str, int]] = []
        self._access: list[str] = []
        self._refresh: list[str] = []
        self._stac: list[str] = []
        self._stac_requests: list[dict[str, Any]] = []
        self._faults: dict[str, deque[list[Any]]] = {}
        self._next_stac_id = 1
        self._quirks: frozenset[Quirk] = frozenset()
        self.stopping = threading.Event()

    # --- accounts and tokens -------------------------------------------------------------

    def add_user(self, email: str, password: str) -> None:
        """Register an account (or replace its password)."""
        with self._lock:
            existing = self._users.get(email)
            user_id = existing[1] if existing else len(self._users) + 1
            self._users[email] = (password, user_id)

    def authenticate(self, email: str, password: str) -> int | None:
        """Return the user id for matching credentials, else None."""
        with self._lock:
            entry = self._users.get(email)
        if entry is None or not secrets.compare_digest(entry[0].encode(), password.encode()):
            return None
        return entry[1]

    def _sign(self, claims: dict[str, Any]) -> str:
        return encode_hs256(claims, self._key)

    def issue_pair(self, user_id: int) -> tuple[str, str]:
        """Sign and record a new ``(access, refresh)`` pair for ``user_id``."""
        now = int(time.time())

        def token(token_type: str, lifetime: int) -> str:
            claims = {"token_type": token_type, "exp": now + lifetime, "iat": now}
            return self._sign({**claims, "jti": uuid.uuid4().hex, "user_id": user_id})

        access = token("access", ACCESS_LIFETIME_SECONDS)
        refresh = token("refresh", REFRESH_LIFETIME_SECONDS)
        with self._lock:
            self._access.append(access)
            self._refresh.append(refresh)
        return access, refresh

    def issue_stac_token(self, user_id: int, expires: date) -> tuple[int, str, datetime]:
        """Sign and record a STAC-scoped token; return ``(id, token, created)``."""
        created = datetime.now(timezone.utc)
        exp = datetime(expires.year, expires.month, expires.day, tzinfo=timezone.utc)
        token = self._sign(
            {
                "token_type": "access",
                "exp": int(exp.timestamp()),
                "iat": int(created.timestamp()),
                "jti": uuid.uuid4().hex,
                "scope": STAC_SCOPE,
                "groups": "Public",
                "user_id": user_id,
                "is_staff": False,
                "is_superuser": False,
            }
        )
        with self._lock:
            token_id = self._next_stac_id
            self._next_stac_id += 1
            self._stac.append(token)
        return token_id, token, created

    def verify(self, token: str, token_type: str) -> dict[str, Any] | None:
        """Return the claims of an unexpired token of ``token_type`` signed by us, else None."""
        claims = verify_hs256(token, self._key)
        if claims is None or claims.get("token_type") != token_type:
            return None
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp <= time.time():
            return None
        return claims

    # --- request accounting and faults ---------------------------------------------------

    def count_request(self, key: str, client: Any = None) -> None:
        """Count one request that reached the app, and the TCP connection it came on."""
        with self._lock:
            self._counts[key] += 1
            if client:
                self._clients.add(tuple(client))

    def connection_count(self) -> int:
        """How many distinct client connections (host, port) sent requests."""
        with self._lock:
            return len(self._clients)

    def log_response(self, method: str, key: str, status: int) -> None:
        """Record how a request ended (status 0: no response was sent)."""
        with self._lock:
            self._log.append((method, key, status))

    def record_stac_request(self, body: dict[str, Any]) -> None:
        """Keep a copy of a JSON body received by create-stac."""
        with self._lock:
            self._stac_requests.append(deepcopy(body))

    def add_faults(self, key: str, faults: tuple[Fault, ...]) -> None:
        """Append faults to the queue of ``key``."""
        with self._lock:
            queue = self._faults.setdefault(key, deque())
            queue.extend([fault, fault.times] for fault in faults)

    def take_fault(self, key: str) -> Fault | None:
        """Consume one use of the next fault queued for ``key``, if any."""
        with self._lock:
            queue = self._faults.get(key)
            if not queue:
                return None
            entry = queue[0]
            fault: Fault = entry[0]
            entry[1] -= 1
            if entry[1] <= 0:
                queue.popleft()
            return fault

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget faults, counters, logs and issued tokens; restore latency; keep accounts."""
        with self._lock:
            self._faults.clear()
            self._counts.clear()
            self._clients.clear()
            self._log.clear()
            self._access.clear()
            self._refresh.clear()
            self._stac.clear()
            self._stac_requests.clear()
            self._quirks = frozenset()
            self._latency = self._default_latency

    # --- read access for tests -----------------------------------------------------------

    @property
    def latency(self) -> float:
        """Delay in seconds applied to every request."""
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        if value < 0:
            raise ValueError("latency must not be negative")
        with self._lock:
            self._latency = value

    @property
    def quirks(self) -> frozenset[Quirk]:
        """The lasting misbehaviours switched on (see `Quirk`)."""
        with self._lock:
            return self._quirks

    @quirks.setter
    def quirks(self, value: frozenset[Quirk]) -> None:
        unknown = set(value) - set(QUIRKS)
        if unknown:
            raise ValueError(f"unknown quirk(s) {sorted(unknown)}; choose from {list(QUIRKS)}")
        with self._lock:
            self._quirks = frozenset(value)

    def count(self, key: str | None) -> int:
        """Return the number of requests for ``key``, or in total when None."""
        with self._lock:
            return sum(self._counts.values()) if key is None else self._counts[key]

    def request_log(self) -> list[tuple[str, str, int]]:
        """Return ``(method, path key, status)`` for every finished request, oldest first."""
        with self._lock:
            return list(self._log)

    def issued(self, kind: Literal["access", "refresh", "stac"]) -> list[str]:
        """Return every token of ``kind`` handed out since the last reset, oldest first."""
        with self._lock:
            return list(
                {"access": self._access, "refresh": self._refresh, "stac": self._stac}[kind]
            )

    def stac_requests(self) -> list[dict[str, Any]]:
        """Return copies of the JSON bodies received by create-stac, oldest first."""
        with self._lock:
            return deepcopy(self._stac_requests)
