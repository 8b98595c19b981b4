"""The emulator's Starlette app: account endpoints here, STAC and catalogue in ``_stac``.

Responses mimic django-ninja and django-ninja-jwt, the real platform's framework: errors are
``{"detail": "..."}``, validation errors are 422 with a ``detail`` list, and no error ever
echoes a submitted value.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from cm_tasks.testing._http import bearer_token, detail, invalid
from cm_tasks.testing._middleware import EmulatorMiddleware
from cm_tasks.testing._stac import stac_routes
from cm_tasks.testing._state import STAC_SCOPES, EmulatorState

PREFIX = "/api/v1/"
MAX_NAME_LENGTH = 100
MAX_EXPIRY_DAYS = 365
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


async def _json_object(request: Request) -> dict[str, Any] | None:
    try:
        data = json.loads(await request.body())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _string_fields(
    data: dict[str, Any] | None, schema: str, fields: tuple[str, ...]
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Pick required string fields, collecting pydantic-style errors for the missing ones."""
    if data is None:
        return {}, [{"type": "json_invalid", "loc": ["body", schema], "msg": "Invalid JSON body"}]
    values: dict[str, str] = {}
    errors: list[dict[str, Any]] = []
    for field in fields:
        loc = ["body", schema, field]
        if field not in data:
            errors.append({"type": "missing", "loc": loc, "msg": "Field required"})
        elif not isinstance(data[field], str):
            errors.append(
                {"type": "string_type", "loc": loc, "msg": "Input should be a valid string"}
            )
        else:
            values[field] = data[field]
    return values, errors


def account_routes(state: EmulatorState) -> list[Route]:
    """Return the token and account routes bound to ``state``."""

    async def token_pair(request: Request) -> Response:
        values, errors = _string_fields(
            await _json_object(request), "user_token", ("email", "password")
        )
        if errors:
            return invalid(errors)
        user_id = state.authenticate(values["email"], values["password"])
        if user_id is None:
            return detail(
                401,
                "No active account found with the given credentials",
                code="authentication_failed",
            )
        access, refresh = state.issue_pair(user_id)
        return JSONResponse({"email": values["email"], "access": access, "refresh": refresh})

    async def token_refresh(request: Request) -> Response:
        values, errors = _string_fields(await _json_object(request), "refresh_token", ("refresh",))
        if errors:
            return invalid(errors)
        claims = state.verify(values["refresh"], "refresh")
        if claims is None:
            return detail(401, "Token is invalid or expired", code="token_not_valid")
        access, refresh = state.issue_pair(int(claims["user_id"]))
        return JSONResponse({"access": access, "refresh": refresh})

    async def create_stac(request: Request) -> Response:
        data = await _json_object(request)
        if data is not None:
            state.record_stac_request(data)
        token = bearer_token(request)
        claims = state.verify(token, "access") if token else None
        # A scoped token must not mint more scoped tokens: only session tokens lack "scope".
        if claims is None or "scope" in claims:
            return detail(401, "Unauthorized")
        values, errors = _string_fields(data, "payload", ("name", "expiration_date"))
        name = values.get("name")
        if name is not None:
            errors += _name_errors(name)
        raw_date = values.get("expiration_date")
        expires = None
        if raw_date is not None:
            expires, date_errors = _expiry(raw_date)
            errors += date_errors
        if errors or name is None or expires is None:
            return invalid(errors)
        token_id, token_value, created = state.issue_stac_token(int(claims["user_id"]), expires)
        return JSONResponse(
            {
                "id": token_id,
                "name": name,
                "token_value": token_value,
                "expiration_date": expires.isoformat(),
                "scopes": list(STAC_SCOPES),
                "created": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }
        )

    return [
        Route(f"{PREFIX}token/pair", token_pair, methods=["POST"]),
        Route(f"{PREFIX}token/refresh", token_refresh, methods=["POST"]),
        Route(f"{PREFIX}account/tokens/create-stac", create_stac, methods=["POST"]),
    ]


def _name_errors(name: str) -> list[dict[str, Any]]:
    loc = ["body", "payload", "name"]
    if not name.strip():
        return [
            {
                "type": "string_too_short",
                "loc": loc,
                "msg": "String should have at least 1 character",
            }
        ]
    if len(name) > MAX_NAME_LENGTH:
        msg = f"String should have at most {MAX_NAME_LENGTH} characters"
        return [{"type": "string_too_long", "loc": loc, "msg": msg}]
    return []


def _expiry(raw: str) -> tuple[date | None, list[dict[str, Any]]]:
    loc = ["body", "payload", "expiration_date"]
    try:
        if not _DATE_RE.fullmatch(raw):
            raise ValueError(raw)
        expires = date.fromisoformat(raw)
    except ValueError:
        msg = "Input should be a valid date in the format YYYY-MM-DD"
        return None, [{"type": "date_from_datetime_parsing", "loc": loc, "msg": msg}]
    today = datetime.now(timezone.utc).date()
    if expires <= today:
        msg = "Value error, Expiration date must be after today (UTC)"
        return None, [{"type": "value_error", "loc": loc, "msg": msg}]
    if expires > today + timedelta(days=MAX_EXPIRY_DAYS):
        msg = f"Value error, Expiration date must be at most {MAX_EXPIRY_DAYS} days from today"
        return None, [{"type": "value_error", "loc": loc, "msg": msg}]
    return expires, []


async def _http_error(request: Request, exc: Exception) -> Response:
    del request  # required by Starlette's handler signature
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = {404: "Not Found", 405: "Method not allowed"}.get(status, "Server Error")
    return detail(status, message)


def build_app(state: EmulatorState) -> ASGIApp:
    """Build the emulator's ASGI app for ``state``, wrapped in its fault middleware."""
    app = Starlette(
        routes=[*account_routes(state), *stac_routes(state)],
        exception_handlers={HTTPException: _http_error},
    )
    return EmulatorMiddleware(app, state)
