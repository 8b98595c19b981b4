"""The Prefect block that holds a scoped STAC token for downstream flows."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import cast

from prefect.blocks.core import Block
from prefect.blocks.system import Secret
from prefect.exceptions import ObjectNotFound
from pydantic import ConfigDict, Field, SecretStr, ValidationError, field_validator

from cm_tasks.client import IssuedStacToken, header_safe_token
from cm_tasks.errors import TokenBlockError, UnusableTokenError
from cm_tasks.settings import prefect_api_at


class CarbonMapperStacToken(Block):
    """A scoped Carbon Mapper STAC token, saved by the `refresh-stac-token` flow.

    Downstream flows load it to download STAC assets and catalogue files. The token is
    encrypted at rest by Prefect and shown as `********` in the UI and API reads.

    Example:
        Load the token the refresh flow saved (the default block is
        `carbon-mapper-stac-token`) and search the STAC API with it:
        ```python
        import httpx
        from cm_tasks import CarbonMapperStacToken

        token = CarbonMapperStacToken.load("BLOCK_NAME")
        response = httpx.get(
            f"{token.base_url}stac/search", params={"limit": 1}, headers=token.auth_headers()
        )
        print(token.name, token.expires_at, response.status_code)
        ```
    """

    # A validation error would otherwise quote its input - the whole data, token included -
    # e.g. when loading a block document that lacks a field.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Carbon Mapper STAC Token"
    _block_type_slug = "carbon-mapper-stac-token"
    _logo_url = None
    _description = (
        "A scoped Carbon Mapper platform token with STAC privileges, and when it expires. "
        "Saved by the refresh-stac-token flow of cm-tasks; loaded by ingest flows with "
        "get_stac_token(). cm-tasks' documentation ships with the package: `cm-tasks docs`."
    )
    # cm-tasks has no public home yet: its docs ship with the package (`cm-tasks docs`). The
    # block page links to Prefect's page on using blocks, as Prefect's own Secret block does.
    _documentation_url = Secret._documentation_url

    token: SecretStr = Field(description="The scoped STAC token (a bearer token).")
    name: str = Field(description="The token's name on the Carbon Mapper platform.")
    expires_at: datetime = Field(description="When the token stops working, in UTC.")
    created_at: datetime = Field(description="When the token was issued, in UTC.")
    scopes: list[str] = Field(
        default_factory=list, description="Scopes the token grants, e.g. stac, catalog:read."
    )
    base_url: str = Field(
        description="Base URL of the platform API the token belongs to (ends in /api/v1/)."
    )

    @field_validator("token")
    @classmethod
    def _header_safe(cls, value: SecretStr) -> SecretStr:
        # A token edited by hand in the UI may end in a space or newline: sent as it is, httpx
        # would raise an error quoting the header, token included. Strip it or refuse it.
        return SecretStr(header_safe_token(value.get_secret_value()))

    @field_validator("expires_at", "created_at")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @classmethod
    def from_issued(cls, issued: IssuedStacToken, base_url: str) -> CarbonMapperStacToken:
        """A block (not yet saved) for a token the API just issued."""
        return cls(
            token=issued.token,
            name=issued.name,
            expires_at=issued.expires_at,
            created_at=issued.created_at,
            scopes=list(issued.scopes),
            base_url=base_url,
        )

    def get(self) -> str:
        """The token itself, for an `Authorization: Bearer` header or pystac-client."""
        return self.token.get_secret_value()

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a request with this token."""
        return {"Authorization": f"Bearer {self.get()}"}

    def expires_within(self, delta: timedelta) -> bool:
        """Whether the token is expired or will expire within delta from now."""
        return self.expires_at - datetime.now(timezone.utc) <= delta

    def time_left(self) -> timedelta:
        """How long the token stays valid from now (negative once expired)."""
        return self.expires_at - datetime.now(timezone.utc)


def load_token_block(block_name: str) -> CarbonMapperStacToken | None:
    """The token block saved under block_name, or None when there is no such block.

    Raises:
        TokenBlockError: the block exists but cannot be read as a token block (the message
            never quotes the stored values), or PREFECT_API_URL answers with something that
            is not JSON (a web page), so whether the block exists is unknown.
    """
    try:
        # _sync: a sync read even from code an event loop runs (async_dispatch would hand
        # back a coroutine there).
        block = CarbonMapperStacToken.load(block_name, _sync=True)  # type: ignore[call-arg]
    except (ValidationError, RuntimeError) as exc:
        # Prefect raises RuntimeError from pydantic's ValidationError, whose message quotes
        # the stored values, the token included: neither is chained.
        raise _unreadable(block_name, exc) from None
    except json.JSONDecodeError:
        # A 200 that is not JSON (a proxy's or web app's page at PREFECT_API_URL) is no
        # "not found"; raised below, outside the except block, so the page is not kept.
        pass
    except (ValueError, ObjectNotFound):
        return None  # Prefect's "Unable to find block document named ..."
    else:
        return cast(CarbonMapperStacToken, block)
    from prefect.settings import get_current_settings

    where = prefect_api_at(get_current_settings().api.url)
    raise TokenBlockError(
        f"Could not read the block {block_name!r}: {where} answered, "
        "but not as a Prefect API (not JSON). Check PREFECT_API_URL: it ends in /api, e.g. "
        "http://127.0.0.1:4200/api.",
        transient=True,
    )


def _unreadable(block_name: str, error: BaseException) -> TokenBlockError:
    """Why the block cannot be read as a token block, and the fix; never a stored value."""
    validation = error if isinstance(error, ValidationError) else error.__cause__
    if isinstance(validation, ValidationError) and any(
        problem["loc"] == ("token",) and problem["type"] == "value_error"
        for problem in validation.errors(include_input=False, include_url=False)
    ):
        return UnusableTokenError(
            f"The block {block_name!r} holds a token that cannot be sent: it is empty or has a "
            "space, control or non-ASCII character inside it (was it edited by hand?). Run the "
            "refresh-stac-token flow (or `cm-tasks refresh`) to write a new one."
        )
    return TokenBlockError(
        f"The block {block_name!r} exists but is not a readable CarbonMapperStacToken "
        "(saved with another schema?). Run the refresh-stac-token flow to write it again."
    )
