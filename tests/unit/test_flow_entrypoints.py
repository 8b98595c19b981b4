"""Both deployable flows live in cm_tasks.flows; the entrypoints users' deployments hold load."""

from __future__ import annotations

import pytest
from prefect.flows import load_flow_from_entrypoint

from cm_tasks import flows
from cm_tasks.deployments import DEPLOYMENTS


@pytest.mark.parametrize(
    ("entrypoint", "flow"),
    [
        ("cm_tasks.flows.refresh_stac_token", flows.refresh_stac_token),
        ("cm_tasks.flows.check_stac_token", flows.check_stac_token),
        # The daily check deployed by cm-tasks 0.2: a worker still finds the same flow.
        ("cm_tasks.watchdog.check_stac_token", flows.check_stac_token),
    ],
)
def test_a_worker_loads_the_flow_of_each_entrypoint(entrypoint: str, flow: object) -> None:
    # What a worker does with a deployment's entrypoint before it runs the flow.
    assert load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False) is flow


def test_every_deployment_runs_a_flow_of_cm_tasks_flows() -> None:
    for spec in DEPLOYMENTS:
        assert spec.entrypoint.startswith("cm_tasks.flows."), spec.entrypoint
        assert spec.load_flow().name == spec.flow_name


def test_the_watchdog_module_has_no_other_lazy_names() -> None:
    from cm_tasks import watchdog

    with pytest.raises(AttributeError, match="no attribute 'refresh_stac_token'"):
        watchdog.refresh_stac_token  # noqa: B018
