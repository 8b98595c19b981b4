"""The alert recipe of docs/operate.md, as written, on a server started as the page starts it.

The server gets the page's `PREFECT_UI_URL`; the automation is the page's `automation.yaml`
(with the id `prefect block inspect` shows for a notification block); a failed check then
sends a notification whose body carries a working link to the flow run - not `None`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import prefect
import pytest
import yaml
from packaging.version import Version
from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks.watchdog import check_stac_token
from tests.support.docblocks import REPO_ROOT, doc_blocks
from tests.support.prefect_server import PrefectServer, running_prefect_server

OPERATE = REPO_ROOT / "docs" / "operate.md"
WAIT_SECONDS = 120.0


def _ui_url_of_the_page() -> str:
    """The PREFECT_UI_URL that docs/operate.md's server block exports."""
    (start,) = [b for b in doc_blocks(OPERATE) if "prefect server start" in b.code]
    found = re.search(r"^export PREFECT_UI_URL=(\S+)", start.code, re.M)
    assert found, "docs/operate.md starts the server without PREFECT_UI_URL"
    return found.group(1)


def _automation_yaml() -> str:
    (block,) = [b for b in doc_blocks(OPERATE) if b.save == "automation.yaml"]
    return block.code


class _Capture(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    arrived = threading.Event()

    def do_POST(self) -> None:  # the http.server API names it
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        type(self).arrived.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def webhook() -> Iterator[str]:
    httpd = HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    finally:
        httpd.shutdown()


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[PrefectServer]:
    with running_prefect_server(
        tmp_path, extra_env={"PREFECT_UI_URL": _ui_url_of_the_page()}
    ) as server:
        yield server


def test_the_alert_links_to_the_failed_run(ui_server: PrefectServer, webhook: str) -> None:
    fields: dict[str, Any] = {"json_data": {"text": "{{subject}}\n{{body}}"}}
    if "allow_private_urls" in CustomWebhookNotificationBlock.model_fields:
        fields["allow_private_urls"] = True  # the test's webhook listens on 127.0.0.1
    with temporary_settings(updates={PREFECT_API_URL: ui_server.api_url}):
        CustomWebhookNotificationBlock(name="alerts", url=webhook, **fields).save(
            "team-alerts", overwrite=True
        )
        inspected = ui_server.prefect("block", "inspect", "custom-webhook/team-alerts")
        (block_id,) = set(
            re.findall(
                r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", inspected.stdout
            )
        )
        recipe = _automation_yaml().replace("<id of your notification block>", block_id)
        Automation.model_validate(yaml.safe_load(recipe)).create()

        state = check_stac_token(token_block="no-such-token", return_state=True)

    assert state.is_failed()
    assert _Capture.arrived.wait(WAIT_SECONDS), ui_server.log()[-3000:]
    text = _Capture.received[-1]["text"]
    run_id = str(state.state_details.flow_run_id)
    assert f"flow run id {run_id}" in text  # works on every Prefect
    if Version(prefect.__version__) < Version("3.4"):
        # Prefect 3.2's server renders `ui_url` as None even with PREFECT_UI_URL set (seen
        # with 3.2.15; docs/operate.md says so): the run id is the link there.
        assert f"None (flow run id {run_id})" in text
        return
    assert f"{_ui_url_of_the_page()}/runs/flow-run/{run_id}" in text
    assert "None" not in text
    assert "check-stac-token" in text
