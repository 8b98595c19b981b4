"""The deployable flow: get a new scoped STAC token and save it to a block."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cm_tasks.refresh import RefreshSummary, resolve_request, run_refresh
from cm_tasks.settings import load_settings


@flow(name="refresh-stac-token", persist_result=False)
def refresh_stac_token(
    token_name: str | None = None,
    lifetime_days: int | None = None,
    email_block: str | None = None,
    password_block: str | None = None,
    token_block: str | None = None,
) -> dict[str, Any]:
    """Get a new Carbon Mapper STAC token and save it to a block for ingest flows.

    Reads the account e-mail and password from two Prefect Secret blocks, asks the platform
    API for a scoped STAC token and saves it into a `CarbonMapperStacToken` block. The block is
    written only once the new token is in hand: on any failure the stored token is unchanged.
    No parameter is required and none is secret.

    Args:
        token_name: Name of the new token on the platform. Default: the UTC date and time,
            e.g. prefect-20261127T0600Z.
        lifetime_days: Days the new token stays valid, 1 to 365. Default: CM_TOKEN_LIFETIME_DAYS
            (14), which gives a weekly refresh a week of overlap.
        email_block: Secret block holding the account e-mail. Default: CM_EMAIL_BLOCK
            (carbon-mapper-email).
        password_block: Secret block holding the account password. Default:
            CM_PASSWORD_BLOCK (carbon-mapper-password).
        token_block: Block the new token is saved to. Default: CM_TOKEN_BLOCK
            (carbon-mapper-stac-token).

    Returns:
        A summary: token block, token name, expiry (ISO 8601, UTC) and scopes. Never the token.

    Example:
        ```python
        from cm_tasks import refresh_stac_token

        summary = refresh_stac_token(lifetime_days=14)
        print(summary["token_block"], summary["expires_at"])
        ```
    """
    settings = load_settings()
    request = resolve_request(
        settings,
        token_name=token_name,
        lifetime_days=lifetime_days,
        email_block=email_block,
        password_block=password_block,
        token_block=token_block,
    )
    token = run_refresh(request, settings)
    summary = RefreshSummary.of(token, request.token_block)
    get_run_logger().info(
        "Saved STAC token %r to block %r; it expires %s (scopes: %s).",
        summary.token_name,
        summary.token_block,
        summary.expires_at.isoformat(),
        ", ".join(summary.scopes) or "none listed",
    )
    return summary.model_dump(mode="json")
