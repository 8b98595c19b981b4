"""Scripted faults: what the emulator does instead of answering normally.

A :class:`Fault` is queued for one path with :meth:`CarbonMapperEmulator.fail`; each request to
that path consumes one use of the fault at the head of the queue (``times`` uses per fault).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

FaultKind = Literal["status", "html", "malformed_json", "missing_key", "drop", "delay"]

Quirk = Literal["merge-next", "repeat-next", "gzip", "csv-no-final-newline", "same-file-names"]
"""A lasting way the emulator answers differently (set with `CarbonMapperEmulator.quirks`):

* ``merge-next``: a POST search's ``next`` link has ``merge: true`` and a body holding only
  the paging ``token`` (allowed by the STAC API spec: the client merges it into the previous
  body). A client that sends that body as it is gets page 2 of an unfiltered search.
* ``repeat-next``: every ``next`` link (search, items, and the plume CSV's ``Link`` header)
  asks for the same page again, so a client that follows links blindly never stops.
* ``gzip``: assets are sent ``Content-Encoding: gzip`` (when the client accepts it), with the
  ``Content-Length`` of the compressed body.
* ``csv-no-final-newline``: plume CSV pages end without a newline after their last row.
* ``same-file-names``: every asset of an item is linked as ``.../<asset key>/plume.tif``, so
  two assets of one item share a file name.
"""
QUIRKS: tuple[Quirk, ...] = (
    "merge-next",
    "repeat-next",
    "gzip",
    "csv-no-final-newline",
    "same-file-names",
)


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _check_times(times: int) -> int:
    if times < 1:
        raise ValueError("times must be at least 1")
    return times


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour of the emulator; build it with the classmethods.

    Attributes:
        kind: Which misbehaviour.
        status_code: HTTP status of the response (unused by ``drop`` and ``delay``).
        body: Response body, already encoded (unused by ``drop``, ``delay``, ``missing_key``).
        headers: Extra response headers as ``(name, value)`` pairs.
        seconds: How long ``delay`` waits before answering normally.
        times: How many consecutive requests this fault applies to.
    """

    kind: FaultKind
    status_code: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    times: int = 1

    @classmethod
    def status(
        cls,
        code: int,
        body: str | bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        *,
        times: int = 1,
    ) -> Fault:
        """Respond with ``code``; the default body is ``{"detail": "<reason phrase>"}`` for errors.

        Args:
            code: HTTP status code.
            body: Response body: a dict is sent as JSON, a str as UTF-8 text.
            headers: Extra response headers.
            content_type: Overrides the content type guessed from ``body``.
            times: How many consecutive requests get this response.
        """
        raw: bytes
        guessed: str | None
        if body is None:
            if code >= 400:
                raw, guessed = json.dumps({"detail": _phrase(code)}).encode(), "application/json"
            else:
                raw, guessed = b"", None
        elif isinstance(body, dict):
            raw, guessed = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            raw, guessed = body.encode(), "text/plain; charset=utf-8"
        else:
            raw, guessed = body, "application/octet-stream"
        pairs = dict(headers or {})
        ctype = content_type or guessed
        if ctype is not None and not any(k.lower() == "content-type" for k in pairs):
            pairs["content-type"] = ctype
        return cls(
            kind="status",
            status_code=code,
            body=raw,
            headers=tuple(pairs.items()),
            times=_check_times(times),
        )

    @classmethod
    def rate_limited(cls, retry_after: float = 1, *, times: int = 1) -> Fault:
        """Respond 429 with a ``Retry-After`` header in whole seconds (rounded up)."""
        seconds = max(0, math.ceil(retry_after))
        unit = "second" if seconds == 1 else "seconds"
        detail = f"Request was throttled. Expected available in {seconds} {unit}."
        return cls.status(
            429, {"detail": detail}, headers={"Retry-After": str(seconds)}, times=times
        )

    @classmethod
    def html(cls, status: int = 200, *, times: int = 1) -> Fault:
        """Respond with an HTML page, like a proxy's error page or a captive portal."""
        title = f"{status} {_phrase(status)}"
        page = (
            f"<html><head><title>{title}</title></head><body>"
            f"<center><h1>{title}</h1></center><hr><center>nginx</center></body></html>"
        )
        return cls(
            kind="html",
            status_code=status,
            body=page.encode(),
            headers=(("content-type", "text/html; charset=utf-8"),),
            times=_check_times(times),
        )

    @classmethod
    def malformed_json(cls, status: int = 200, *, times: int = 1) -> Fault:
        """Respond with an ``application/json`` content type and a truncated, invalid body."""
        return cls(
            kind="malformed_json",
            status_code=status,
            body=b'{"detail": "upstream response was cut',
            headers=(("content-type", "application/json"),),
            times=_check_times(times),
        )

    @classmethod
    def missing_key(cls, status: int = 200, *, times: int = 1) -> Fault:
        """Respond with valid JSON without the key clients read (``access``, ``token_value``)."""
        return cls(kind="missing_key", status_code=status, times=_check_times(times))

    @classmethod
    def drop(cls, *, times: int = 1) -> Fault:
        """Close the TCP connection without sending any response."""
        return cls(kind="drop", times=_check_times(times))

    @classmethod
    def delay(cls, seconds: float, *, times: int = 1) -> Fault:
        """Wait ``seconds`` and then answer normally (to trigger client read timeouts)."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        return cls(kind="delay", seconds=seconds, times=_check_times(times))


def missing_key_body(path: str) -> dict[str, Any]:
    """Return a plausible response body for ``path`` that lacks the key clients read."""
    if path == "token/pair":
        return {"email": "renamed@carbonmapper.example", "token_type": "bearer"}
    if path == "account/tokens/create-stac":
        return {"id": 0, "name": "renamed", "scopes": ["stac", "catalog:read"]}
    return {"result": None}
