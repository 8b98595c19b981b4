"""Run the `refresh-stac-token` flow once from a checkout: `python flows/refresh_stac_token.py`.

Not a deployment entry point: the deployments (prefect.yaml, `cm-tasks deploy`) use the module
path `cm_tasks.flows.refresh_stac_token` of the installed package, so that the CLI, ingest
flows, workers and this script all run the same code.
"""

from cm_tasks.flows import refresh_stac_token

__all__ = ["refresh_stac_token"]

if __name__ == "__main__":
    print(refresh_stac_token())
