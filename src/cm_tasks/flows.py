"""The deployable flow: get a new scoped STAC token and save it to a block."""

from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from cm_tasks.refresh import (
    MAX_LIFETIME_DAYS,
    MAX_TOKEN_NAME_LENGTH,
    MIN_LIFETIME_DAYS,
    RefreshSummary,
    resolve_request,
    run_refresh,
)
from cm_tasks.settings import load_settings

# Limits for the UI's run form and for the server, which checks a deployment's parameters
# against this schema. `json_schema_extra` rather than `ge=`/`max_length=`: those would make
# Prefect reject a bad value before resolve_request can say what is wrong in plain words.
TokenName = Annotated[
    str, Field(json_schema_extra={"minLength": 1, "maxLength": MAX_TOKEN_NAME_LENGTH})
]
LifetimeDays = Annotated[
    int, Field(json_schema_extra={"minimum": MIN_LIFETIME_DAYS, "maximum": MAX_LIFETIME_DAYS})
]
BlockName = Annotated[str, Field(json_schema_extra={"pattern": "^[a-z0-9-]+$"})]


@flow(name="refresh-stac-token", persist_result=False)
def refresh_stac_token(
    token_name: TokenName | None = None,
    lifetime_days: LifetimeDays | None = None,
    email_block: BlockName | None = None,
    password_block: BlockName | None = None,
    token_block: BlockName | None = None,
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
        The run also gets a markdown artifact (key: the token block's name) and emits the
        event `carbon-mapper.stac-token.refreshed`.

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
