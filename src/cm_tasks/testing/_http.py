"""Small response helpers shared by the emulator's route modules."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


def bearer_token(request: Request) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def detail(status: int, message: str, **extra: str) -> JSONResponse:
    """Return a ninja-style ``{"detail": message}`` error response."""
    return JSONResponse({"detail": message, **extra}, status_code=status)


def invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    """Return a ninja-style 422 validation error response."""
    return JSONResponse({"detail": errors}, status_code=422)


def api_base(request: Request) -> str:
    """Return the absolute API base URL (``http://host:port/api/v1/``) the client used."""
    return f"{str(request.base_url).rstrip('/')}/api/v1/"
