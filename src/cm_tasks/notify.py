"""What a refresh or a check leaves behind: Prefect events and markdown artifacts.

Events let automations and deployment triggers react (e-mail, Slack, start another flow);
artifacts show the outcome on the run's page in the UI. Both carry the token's name, expiry
and scopes - never the token.

    carbon-mapper.stac-token.refreshed   a new token was saved to its block
    carbon-mapper.stac-token.expiring    the saved token is missing, expired or expires soon

Both have the resource id `carbon-mapper.stac-token.<block name>`; inside a run, Prefect adds
the flow run, flow, deployment and tags as related resources.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event

from cm_tasks._logging import current_logger
from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.settings import DEFAULT_TOKEN_BLOCK

REFRESHED_EVENT = "carbon-mapper.stac-token.refreshed"
EXPIRING_EVENT = "carbon-mapper.stac-token.expiring"
RESOURCE_PREFIX = "carbon-mapper.stac-token."
SECONDS_PER_DAY = 86_400


def token_resource(block_name: str) -> dict[str, str]:
    """The Prefect event resource that stands for the token saved in block_name.

    Example:
        ```python
        from cm_tasks.notify import token_resource

        assert token_resource("carbon-mapper-stac-token")["prefect.resource.id"] == (
            "carbon-mapper.stac-token.carbon-mapper-stac-token"
        )
        ```
    """
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{block_name}",
        "prefect.resource.name": block_name,
    }


def artifact_key(block_name: str, kind: str = "") -> str:
    """A stable artifact key per block, so the UI keeps each block's history together.

    Block names are lowercase letters, digits and dashes, which artifact keys also allow.
    """
    return f"{block_name}-{kind}" if kind else block_name


def days_left(expires_at: datetime, now: datetime | None = None) -> float:
    """Days from now until expires_at, to two decimals; negative once expired."""
    left = expires_at - (now or datetime.now(timezone.utc))
    return round(left.total_seconds() / SECONDS_PER_DAY, 2)


def in_run() -> bool:
    """Whether the caller runs inside a Prefect flow or task run (where artifacts belong)."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def md_text(value: object) -> str:
    """Value as markdown table text: pipes, backticks and line breaks cannot break the table."""
    text = " ".join(str(value).split())
    for char in ("\\", "|", "`", "*", "_", "<", ">", "[", "]"):
        text = text.replace(char, "\\" + char)
    return text


def markdown_table(title: str, rows: list[tuple[str, object]], footer: str = "") -> str:
    """A small two-column markdown table under a heading."""
    lines = [f"### {title}", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {md_text(value)} |" for label, value in rows]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def refreshed_payload(token: CarbonMapperStacToken, block_name: str) -> dict[str, Any]:
    """Event payload for a saved token: name, expiry, scopes, days left. Never the token."""
    return {
        "token_block": block_name,
        "token_name": token.name,
        "expires_at": token.expires_at.isoformat(),
        "days_left": days_left(token.expires_at),
        "scopes": list(token.scopes),
        "base_url": token.base_url,
    }


def publish_refreshed(token: CarbonMapperStacToken, block_name: str) -> None:
    """Emit `carbon-mapper.stac-token.refreshed` and, inside a run, add a markdown artifact.

    Called once the new token is saved. Neither carries the token.

    Example:
        ```python
        from cm_tasks import CarbonMapperStacToken
        from cm_tasks.notify import publish_refreshed

        token = CarbonMapperStacToken.load("carbon-mapper-stac-token")
        publish_refreshed(token, "carbon-mapper-stac-token")
        ```
    """
    payload = refreshed_payload(token, block_name)
    emit_event(REFRESHED_EVENT, resource=token_resource(block_name), payload=payload)
    if not in_run():
        return
    try:
        _refreshed_artifact(token, block_name, payload["days_left"])
    except Exception as exc:  # the token is saved: a missing artifact must not fail the run
        current_logger().warning(
            "Saved the token, but could not add the run's artifact (%s).", type(exc).__name__
        )


def _refreshed_artifact(token: CarbonMapperStacToken, block_name: str, left: float) -> None:
    create_markdown_artifact(
        markdown_table(
            "Carbon Mapper STAC token refreshed",
            [
                ("Block", block_name),
                ("Token name", token.name),
                ("Scopes", ", ".join(token.scopes) or "none listed"),
                ("Expires", f"{token.expires_at:%Y-%m-%d %H:%M} UTC"),
                ("Days left", f"{left:.1f}"),
            ],
            footer=_how_to_use(block_name),
        ),
        key=artifact_key(block_name),
        description=f"The STAC token saved to block {block_name}: name, scopes, expiry.",
        _sync=True,  # type: ignore[call-arg]  # sync even inside an async flow (else a coroutine)
    )


def _how_to_use(block_name: str) -> str:
    """The artifact's advice: the README's way to read the token, for this block."""
    call = (
        "get_stac_token()"
        if block_name == DEFAULT_TOKEN_BLOCK
        else f'get_stac_token("{block_name}")'
    )
    return (
        f"Ingest code gets it with `from cm_tasks import get_stac_token` and `{call}`: read "
        "once per process, renewed before it runs out. The token itself is kept encrypted in "
        "the block and is not shown here."
    )
