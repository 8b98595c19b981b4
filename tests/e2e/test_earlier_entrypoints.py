"""A deployment made by cm-tasks 0.2 keeps running after an upgrade.

0.2 deployed the daily check with the entrypoint `cm_tasks.watchdog.check_stac_token`; the flow
now lives in `cm_tasks.flows`. A worker given the old entrypoint must still run the flow, on a
real `prefect server start` with a process worker, as a team's upgraded workers would.
"""

from __future__ import annotations

from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks.deployments import DAILY_CHECK
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.prefect_server import PrefectServer

POOL = "earlier-release"
OLD_ENTRYPOINT = "cm_tasks.watchdog.check_stac_token"


def test_a_worker_runs_the_daily_check_deployed_with_the_old_entrypoint(
    server: PrefectServer, emulator: CarbonMapperEmulator
) -> None:
    server.prefect("work-pool", "create", POOL, "--type", "process")
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        deployment = DAILY_CHECK.to_deployment(work_pool_name=POOL)
        deployment.entrypoint = OLD_ENTRYPOINT  # as `cm-tasks deploy` of 0.2 wrote it
        deployment_id = deployment.apply()

    with server.http() as http:
        stored = http.get(f"deployments/{deployment_id}").json()
        assert stored["entrypoint"] == OLD_ENTRYPOINT
        created = http.post(f"deployments/{deployment_id}/create_flow_run", json={})
        assert created.status_code == 201, created.text
        flow_run_id = created.json()["id"]

        env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
        env["CM_BASE_URL"] = emulator.base_url
        worker = server.prefect("worker", "start", "--pool", POOL, "--run-once", extra_env=env)

        state = http.get(f"flow_runs/{flow_run_id}").json()["state"]
    # The flow ran (the server has no token block, so the check fails saying so), rather than
    # the run crashing because the worker could not load the flow.
    output = worker.stdout + worker.stderr
    assert state["type"] == "FAILED", output
    assert "MISSING: there is no CarbonMapperStacToken block" in state["message"], output
