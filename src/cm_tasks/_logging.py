"""A logger that writes to the current Prefect run when there is one."""

from __future__ import annotations

import logging
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

_fallback = logging.getLogger("cm_tasks")


def current_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run logger of the flow or task being run, else the `cm_tasks` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback


class RunLogger:
    """Looks the run logger up at each call, so a client made in a flow logs from its tasks."""

    def warning(self, msg: str, *args: Any) -> None:
        current_logger().warning(msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        current_logger().info(msg, *args)
