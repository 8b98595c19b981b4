"""The deployable flows: the weekly token refresh and the daily expiry check.

Each is a thin flow around the module that does the work: `refresh-stac-token` runs
`cm_tasks.refresh`, `check-stac-token` runs `cm_tasks.watchdog`. Their entrypoints,
`cm_tasks.flows.refresh_stac_token` and `cm_tasks.flows.check_stac_token`, are what
`cm-tasks deploy`, `cm-tasks serve` and prefect.yaml deploy.
"""

from datetime import datetime, timezone
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from cm_tasks.refresh import MAX_TOKEN_NAME_LENGTH, RefreshSummary, resolve_request, run_refresh
from cm_tasks.run_parameters import choose_values
from cm_tasks.settings import (
    BLOCK_NAME_PATTERN,
    DEFAULT_BASE_URL,
    DEFAULT_EMAIL_BLOCK,
    DEFAULT_PASSWORD_BLOCK,
    DEFAULT_TOKEN_BLOCK,
    DEFAULT_TOKEN_LIFETIME_DAYS,
    MAX_LIFETIME_DAYS,
    MIN_LIFETIME_DAYS,
    load_settings,
)
from cm_tasks.watchdog import (
    DEFAULT_THRESHOLD_DAYS,
    MAX_THRESHOLD_DAYS,
    StacTokenExpiringError,
    check_token,
    publish_status,
    renewal_threshold,
    status_payload,
)

# Limits for the UI's run form and for the server, which checks a deployment's parameters
# against this schema. `json_schema_extra` rather than `ge=`/`max_length=`: those would make
# Prefect reject a bad value before resolve_request can say what is wrong in plain words.
# The defaults are concrete values, never None: the run form then shows what a run uses (an
# `X | None` parameter is a type switch there, with 'Property is type "None"').
TokenName = Annotated[str, Field(json_schema_extra={"maxLength": MAX_TOKEN_NAME_LENGTH})]
LifetimeDays = Annotated[
    int, Field(json_schema_extra={"minimum": MIN_LIFETIME_DAYS, "maximum": MAX_LIFETIME_DAYS})
]
BlockName = Annotated[str, Field(json_schema_extra={"pattern": BLOCK_NAME_PATTERN})]


@flow(name="refresh-stac-token", persist_result=False)
def refresh_stac_token(
    token_name: TokenName = "",
    lifetime_days: LifetimeDays = DEFAULT_TOKEN_LIFETIME_DAYS,
    email_block: BlockName = DEFAULT_EMAIL_BLOCK,
    password_block: BlockName = DEFAULT_PASSWORD_BLOCK,
    token_block: BlockName = DEFAULT_TOKEN_BLOCK,
    base_url: str = DEFAULT_BASE_URL,
) -> dict[str, Any]:
    """Get a new Carbon Mapper STAC token and save it to a block for ingest flows.

    Reads the account e-mail and password from two Prefect Secret blocks, asks the platform
    API for a scoped STAC token and saves it into a `CarbonMapperStacToken` block. The block is
    written only once the new token is in hand: on any failure the stored token is unchanged.
    No parameter is required and none is secret.

    Parameters and `CM_*` settings: an explicit argument, CLI option or run parameter beats a
    `CM_*` setting; `CM_*` settings fill in what nothing explicit says. In a deployment run
    that does not set a parameter (a Quick run, the schedule), a worker setting that differs
    from the default the run form shows stops the run before any call - set the deployment's
    parameter to it (see `cm_tasks.run_parameters`).

    Args:
        token_name: Name of the new token on the platform, up to 100 characters. Leave it
            empty for the dated default prefect-YYYYMMDDTHHMMZ (UTC), e.g.
            prefect-20261127T0600Z.
        lifetime_days: Days the new token stays valid, 1 to 365. 14 gives a weekly refresh a
            week of overlap. Setting: CM_TOKEN_LIFETIME_DAYS.
        email_block: Secret block holding the account e-mail (`cm-tasks login` saves it).
            Setting: CM_EMAIL_BLOCK.
        password_block: Secret block holding the account password. Setting:
            CM_PASSWORD_BLOCK.
        token_block: Block the new token is saved to; get_stac_token() in ingest code reads
            the block CM_TOKEN_BLOCK names. Setting: CM_TOKEN_BLOCK.
        base_url: Carbon Mapper platform API the new token is for, ending in /api/v1/ (the
            production API by default). `cm-tasks deploy` sets it to the CM_BASE_URL it was
            run with; the worker's own CM_BASE_URL does not change where a run goes that
            sets it. Setting: CM_BASE_URL.

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
    chosen = choose_values(
        settings,
        {
            "lifetime_days": lifetime_days,
            "email_block": email_block,
            "password_block": password_block,
            "token_block": token_block,
            "base_url": base_url,
        },
    )
    request = resolve_request(
        settings,
        token_name=token_name,  # empty: the dated default
        lifetime_days=chosen["lifetime_days"],
        email_block=chosen["email_block"],
        password_block=chosen["password_block"],
        token_block=chosen["token_block"],
        base_url=chosen["base_url"],
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


@flow(name="check-stac-token", persist_result=False)
def check_stac_token(
    threshold_days: Annotated[
        float, Field(json_schema_extra={"minimum": 0, "maximum": MAX_THRESHOLD_DAYS})
    ] = DEFAULT_THRESHOLD_DAYS,
    token_block: BlockName = DEFAULT_TOKEN_BLOCK,
) -> dict[str, Any]:
    """Check the saved STAC token; fail when it is missing, expired or about to expire.

    Reads the CarbonMapperStacToken block only (no call to the Carbon Mapper API), leaves a
    markdown artifact with the days left, and - when the token is missing, expired, or will
    not outlast the next weekly refresh (Mondays 06:00 UTC) by a day, or has threshold_days
    or fewer left - emits the event `carbon-mapper.stac-token.expiring` and fails with a
    message saying what to do. Deployed by `cm-tasks deploy`, that event starts the weekly
    refresh at once.

    Args:
        threshold_days: Fail when the token has this many days left or fewer, 0 to 365,
            even if it outlasts the next weekly refresh. Default: 3.
        token_block: Block holding the token, as refresh-stac-token writes it and
            get_stac_token() reads it. Setting: CM_TOKEN_BLOCK (a worker setting that differs
            from a default parameter stops a deployment run: set the parameter to it).

    Returns:
        The status: state, block, token name, expiry, days left, threshold. Never the token.

    Raises:
        StacTokenExpiringError: the token is missing, expired or expiring.

    Example:
        ```python
        from cm_tasks.flows import check_stac_token

        status = check_stac_token(threshold_days=5)
        print(status["state"], status["days_left"])
        ```
    """
    block_name = choose_values(load_settings(), {"token_block": token_block})["token_block"]
    now = datetime.now(timezone.utc)
    status = check_token(block_name, renewal_threshold(threshold_days, now), now)
    publish_status(status)
    if not status.ok:
        raise StacTokenExpiringError(status.message)
    get_run_logger().info(status.message)
    return status_payload(status)
