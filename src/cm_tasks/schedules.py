"""The deployments' schedules: what `cm_tasks.deployments` deploys and the daily check counts on.

The daily check (`cm_tasks.watchdog`) warns about a token that will not outlast the next weekly
refresh, so it needs that schedule too; both read it here.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

WEEKLY_REFRESH_CRON = "0 6 * * 1"
"""The weekly refresh: Mondays at 06:00."""
DAILY_CHECK_CRON = "0 7 * * *"
"""The daily expiry check: every day at 07:00."""
SCHEDULE_TIMEZONE = "UTC"
"""The time zone both crons are evaluated in."""


def next_fire(cron: str, after: datetime | None = None, tz: str = SCHEDULE_TIMEZONE) -> datetime:
    """When a cron schedule fires next after `after` (default now), as the Prefect server does.

    Example:
        ```python
        from datetime import datetime, timezone
        from cm_tasks.schedules import WEEKLY_REFRESH_CRON, next_fire

        sunday = datetime(2026, 11, 29, 7, tzinfo=timezone.utc)
        print(next_fire(WEEKLY_REFRESH_CRON, sunday))  # 2026-11-30 06:00:00+00:00
        ```
    """
    # The server's own schedule model: the same dates the scheduler will create.
    from prefect.server.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron=cron, timezone=tz)
    start = after or datetime.now(timezone.utc)
    dates = asyncio.run(schedule.get_dates(n=1, start=start))
    return datetime.fromisoformat(dates[0].isoformat()).astimezone(timezone.utc)
