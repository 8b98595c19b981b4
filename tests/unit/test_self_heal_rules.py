"""The self-healing rules, without a Prefect API: when the daily check warns, and what it starts.

The end-to-end proof (a check, its event, the triggered refresh) is tests/e2e/test_self_heal.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from cm_tasks.deployments import DAILY_CHECK, DEPLOYMENTS, WEEKLY_REFRESH
from cm_tasks.notify import EXPIRING_EVENT
from cm_tasks.watchdog import RENEWAL_MARGIN_DAYS, renewal_threshold

REPO_ROOT = Path(__file__).resolve().parents[2]
UTC = timezone.utc
LIFETIME = timedelta(days=14)  # the refresh's default token lifetime
MONDAY_RUN = datetime(2026, 11, 30, 6, tzinfo=UTC)  # a Monday 06:00: the weekly refresh


def _daily_checks(start: datetime, days: int) -> list[datetime]:
    """The daily check's times (07:00 UTC) for days days from start's date."""
    first = start.replace(hour=7, minute=0)
    return [first + timedelta(days=n) for n in range(days)]


def _warns(expires_at: datetime, now: datetime, threshold_days: float = 3) -> bool:
    left = (expires_at - now).total_seconds() / 86_400
    return round(left, 2) <= renewal_threshold(threshold_days, now)


def test_a_token_renewed_every_monday_never_warns() -> None:
    expires_at = MONDAY_RUN + LIFETIME
    checks = _daily_checks(MONDAY_RUN, 7)  # Monday 07:00 to Sunday 07:00
    assert [now for now in checks if _warns(expires_at, now)] == []


def test_a_missed_monday_warns_at_the_next_daily_check() -> None:
    # Monday's run failed: the token is last Monday's, with 7 days left at 06:00.
    expires_at = MONDAY_RUN - timedelta(days=7) + LIFETIME
    first_check = MONDAY_RUN.replace(hour=7)
    assert _warns(expires_at, first_check)
    # The old rule (3 days) would have waited until Thursday, leaving it to a person.
    left = (expires_at - first_check).total_seconds() / 86_400
    assert left > 3


def test_the_threshold_is_a_floor() -> None:
    sunday = MONDAY_RUN - timedelta(hours=23)
    assert renewal_threshold(3, sunday) == 3
    assert renewal_threshold(0, sunday) == round(23 / 24 + RENEWAL_MARGIN_DAYS, 2)
    assert renewal_threshold(10, MONDAY_RUN.replace(hour=7)) == 10


def test_only_the_weekly_refresh_is_triggered_by_the_expiring_event() -> None:
    assert WEEKLY_REFRESH.triggered_by == EXPIRING_EVENT
    assert [spec for spec in DEPLOYMENTS if spec.triggered_by] == [WEEKLY_REFRESH]
    assert DAILY_CHECK.triggered_by is None
    # Never two refreshes at once: a triggered run beyond the limit is cancelled.
    assert (WEEKLY_REFRESH.concurrency_limit, WEEKLY_REFRESH.collision_strategy) == (
        1,
        "CANCEL_NEW",
    )


def _yaml_weekly() -> dict[str, Any]:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return next(d for d in config["deployments"] if d["name"] == WEEKLY_REFRESH.name)


@pytest.mark.parametrize("token_block", ["carbon-mapper-stac-token", "team-token"])
def test_the_trigger_matches_the_block_the_deployment_writes(token_block: str) -> None:
    (trigger,) = WEEKLY_REFRESH.triggers({"token_block": token_block})
    assert trigger.expect == {EXPIRING_EVENT}
    assert trigger.match.model_dump() == {
        "prefect.resource.id": f"carbon-mapper.stac-token.{token_block}"
    }
    assert trigger.threshold == 1
    assert trigger.posture.value == "Reactive"
    assert trigger.parameters is None  # the deployment's own parameters


def test_prefect_yaml_declares_the_same_trigger() -> None:
    (declared,) = _yaml_weekly()["triggers"]
    (built,) = WEEKLY_REFRESH.triggers({})
    assert declared["enabled"] is True
    assert set(declared["expect"]) == built.expect
    assert declared["match"] == built.match.model_dump()


@pytest.mark.parametrize("self_heal", [True, False])
def test_deploy_and_serve_build_the_trigger_unless_told_not_to(self_heal: bool) -> None:
    from cm_tasks.deployments import build_deployments

    built = {d.name: d for d in build_deployments(self_heal=self_heal)}
    assert len(built["weekly"].triggers) == (1 if self_heal else 0)
    assert built["daily"].triggers == []
