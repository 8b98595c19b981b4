"""`cm_tasks._prefect_calls`: a renewal's Prefect calls are bounded in a flow run too."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, temporary_settings

from cm_tasks._prefect_calls import CALL_SECONDS, bounded_calls


def test_a_bounded_call_in_a_flow_run_gets_a_client_with_the_bound() -> None:
    # Found by a reviewer: in a flow run, get_client() (and so Block.load) handed out the
    # run's client, made with Prefect's 60 s time-out: against a hung API, a refresh run's
    # calls waited 62 s each, and a get_stac_token() in a flow was still waiting at 120 s.
    @flow
    def a_run() -> dict[str, Any]:
        run_client = SyncClientContext.get().client  # type: ignore[union-attr]
        with bounded_calls("read a block"), get_client(sync_client=True) as client:
            bounded = client
        with get_client(sync_client=True) as client:
            after = client
        return {"run": run_client, "bounded": bounded, "after": after}

    with temporary_settings({PREFECT_API_REQUEST_TIMEOUT: 60}):
        clients = a_run()

    assert clients["bounded"] is not clients["run"]
    assert clients["bounded"]._client.timeout.read == CALL_SECONDS
    assert clients["run"]._client.timeout.read == 60
    assert clients["after"] is clients["run"]  # the run's own calls keep the run's client
