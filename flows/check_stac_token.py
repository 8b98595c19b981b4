"""Deployment entry point of the `check-stac-token` watchdog flow (see prefect.yaml).

The flow lives in the installed package (`cm_tasks.watchdog`), like `refresh-stac-token`, so
that `cm-tasks status`, this entry point and tests all run the same code.
"""

from cm_tasks.watchdog import check_stac_token

__all__ = ["check_stac_token"]

if __name__ == "__main__":
    print(check_stac_token())
