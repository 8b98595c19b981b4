"""Reading what a flow run left in the current Prefect API (PREFECT_API_URL)."""

from __future__ import annotations

from typing import Any

import httpx
from prefect.settings import PREFECT_API_URL


def api(path: str, body: dict[str, Any]) -> Any:
    """POST body to the Prefect API's path and return the JSON answer."""
    response = httpx.post(f"{PREFECT_API_URL.value()}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def run_artifacts(flow_run_id: Any) -> list[dict[str, Any]]:
    """The markdown artifacts of a flow run."""
    found = api("artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}})
    return [a for a in found if a["type"] == "markdown"]
