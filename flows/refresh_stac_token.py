"""Deployment entry point of the `refresh-stac-token` flow (see prefect.yaml).

The flow lives in the installed package (`cm_tasks.flows`) so that the CLI, ingest flows and
this entry point all run the same code.
"""

from cm_tasks.flows import refresh_stac_token

__all__ = ["refresh_stac_token"]

if __name__ == "__main__":
    print(refresh_stac_token())
