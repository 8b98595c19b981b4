"""Run the `check-stac-token` flow once from a checkout: `python flows/check_stac_token.py`.

Not a deployment entry point: the deployments (prefect.yaml, `cm-tasks deploy`) use the module
path `cm_tasks.flows.check_stac_token` of the installed package, so that `cm-tasks status`,
workers and this script all run the same code.
"""

from cm_tasks.flows import check_stac_token

__all__ = ["check_stac_token"]

if __name__ == "__main__":
    print(check_stac_token())
