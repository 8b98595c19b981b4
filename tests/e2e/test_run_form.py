"""The run form and the run page a person meets, in a real browser; settings vs parameters.

Debian's `chromium`, driven by Playwright, against a real `prefect server start` with the
deployments of prefect.yaml (`prefect --no-prompt deploy --all`, as an operator does). Prefect
3.9 serves two UIs: the new one (`/v2/...`, where its root URL leads) and the classic one (the
only one up to Prefect 3.5, still behind deep links). The Custom run form of both must show the
values a run uses, with no `None` type switch. Then a worker runs the refresh against the
emulator and the finished run's Artifacts tab must show the token's name and expiry, never
the token.

The last tests run deployments through a worker whose `CM_*` settings differ from the form's
defaults: such a run must stop before any call, and one whose deployment parameter names the
worker's block must write exactly that block, which `get_stac_token()` then reads.

Screenshots go to a temporary directory; `make screenshots` writes them to docs/img/ (README).
Without /usr/bin/chromium the module is skipped with the command that installs it; CI
(CM_TEST_REQUIRE_BROWSER=1) fails instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import prefect
import pytest

from cm_tasks.testing import CarbonMapperEmulator
from tests.support.deploy import (
    DAILY,
    WEEKLY,
    assert_no_secret,
    create_run,
    load_token,
    read_flow_run,
    read_logs,
    run_worker,
)
from tests.support.prefect_server import PrefectServer
from tests.support.token_helpers import EMAIL_BLOCK, PASSWORD_BLOCK, TOKEN_BLOCK

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "The browser test needs Debian's chromium at /usr/bin/chromium: install it with "
    "`apt-get update && apt-get install -y chromium` (as root; .ci/run does this)."
)
# Set (by .ci/run and `make screenshots`): a missing browser fails the test instead of skipping.
REQUIRE_BROWSER_VARIABLE = "CM_TEST_REQUIRE_BROWSER"
PAGE_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1280, "height": 1000}
# Where `make screenshots` asks for the pictures the README shows.
SCREENSHOTS_VARIABLE = "CM_TEST_SCREENSHOTS_DIR"
NONE_SWITCH = 'Property is type "None"'
TEAM_BLOCK = "team-stac-token"

# The value of each form field, by the parameter name its label starts with: the label is
# followed, in document order, by the field's input or textarea (true of both UIs).
FORM_VALUES_JS = """
() => {
  const values = {};
  let label = null;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_ELEMENT);
  for (let node = walker.currentNode; node; node = walker.nextNode()) {
    if (node.tagName === "LABEL") {
      const match = node.textContent.trim().match(/^([a-z_]+) \\(Optional\\)/);
      label = match ? match[1] : null;
    } else if ((node.tagName === "INPUT" || node.tagName === "TEXTAREA") && label) {
      if (!(label in values)) values[label] = node.value;
      label = null;
    }
  }
  return values;
}
"""

# The two UIs' paths: (name, path prefix). The classic UI is the one of Prefect 3.2-3.5.
# Before the new UI existed, Prefect serves the classic one only: there is no `/v2` to test,
# and the run page a person meets is the classic one.
HAS_V2_UI = hasattr(prefect, "__ui_v2_static_path__")
UIS = [
    pytest.param(
        "v2",
        "/v2",
        marks=pytest.mark.skipif(
            not HAS_V2_UI, reason=f"Prefect {prefect.__version__} has no /v2 UI"
        ),
    ),
    ("classic", ""),
]
MAIN_UI = "/v2" if HAS_V2_UI else ""
"""The prefix of the UI a person meets first: the new one where Prefect has it."""


@pytest.fixture(scope="module", autouse=True)
def require_browser() -> None:
    """Stop at once, before the server starts, when the browser or Playwright is missing.

    Without chromium the module is skipped, saying what it skipped and how to install it
    (`make test` on a developer's machine); where CM_TEST_REQUIRE_BROWSER is set (CI) it fails.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("Playwright is missing: `pip install -e '.[dev]'` installs it.")
    if not CHROMIUM.exists():
        if os.environ.get(REQUIRE_BROWSER_VARIABLE):
            pytest.fail(f"{INSTALL_HINT} ({REQUIRE_BROWSER_VARIABLE} is set.)")
        pytest.skip(
            f"no browser, so no check of the run form, run page and artifact. {INSTALL_HINT}"
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get(SCREENSHOTS_VARIABLE)
    directory = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    opened = context.new_page()
    opened.set_default_timeout(PAGE_TIMEOUT_MS)
    yield opened
    context.close()


def _ui_root(prefect_yaml_server: PrefectServer) -> str:
    return prefect_yaml_server.api_url.removesuffix("/api")


def _open_run_form(
    page: Page, prefect_yaml_server: PrefectServer, prefix: str, deployment_id: str
) -> str:
    """Open a deployment's Custom run page; return its text once every field is filled in."""
    page.goto(f"{_ui_root(prefect_yaml_server)}{prefix}/deployments/deployment/{deployment_id}/run")
    page.get_by_text("Parameters", exact=True).first.wait_for()
    page.wait_for_function(f"() => Object.keys(({FORM_VALUES_JS})()).length >= 2")
    return page.inner_text("body")


def _form_values(page: Page) -> dict[str, str]:
    return dict(page.evaluate(FORM_VALUES_JS))


@pytest.mark.parametrize(("ui", "prefix"), UIS)
def test_custom_run_form_shows_what_a_weekly_run_uses(
    prefect_yaml_server: PrefectServer,
    deployments: dict[str, Any],
    screenshots: Path,
    page: Page,
    ui: str,
    prefix: str,
) -> None:
    text = _open_run_form(page, prefect_yaml_server, prefix, deployments[WEEKLY]["id"])

    assert _form_values(page) == {
        "token_name": "",
        "lifetime_days": "14",
        "email_block": EMAIL_BLOCK,
        "password_block": PASSWORD_BLOCK,
        "token_block": TOKEN_BLOCK,
        "base_url": "https://api.carbonmapper.org/api/v1/",  # a filled-in text field
    }
    assert NONE_SWITCH not in text
    # The descriptions from the flow's docstring reach the form.
    assert "Leave it empty for the dated default prefect-YYYYMMDDTHHMMZ" in text
    assert "CM_TOKEN_BLOCK" in text
    assert "Carbon Mapper platform API the new token is for" in text
    page.screenshot(path=str(screenshots / f"run-form-{ui}.png"), full_page=True)


@pytest.mark.parametrize(("ui", "prefix"), UIS)
def test_custom_run_form_shows_what_a_daily_check_uses(
    prefect_yaml_server: PrefectServer,
    deployments: dict[str, Any],
    page: Page,
    ui: str,
    prefix: str,
) -> None:
    text = _open_run_form(page, prefect_yaml_server, prefix, deployments[DAILY]["id"])

    assert _form_values(page) == {"threshold_days": "3", "token_block": TOKEN_BLOCK}
    assert NONE_SWITCH not in text, ui


def test_finished_refresh_shows_its_artifact_and_no_token(
    prefect_yaml_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, Any],
    screenshots: Path,
    page: Page,
) -> None:
    from playwright.sync_api import expect

    with prefect_yaml_server.http() as http:
        flow_run_id = create_run(http, deployments[WEEKLY])
        worker_output = run_worker(prefect_yaml_server, emulator)
        flow_run = read_flow_run(http, flow_run_id)
        assert flow_run["state"]["type"] == "COMPLETED", worker_output
        logs = json.dumps(read_logs(http, flow_run_id))
    token = load_token(prefect_yaml_server)

    # The run's Artifacts tab lists the artifact as a card; the card opens it, rendered.
    page.goto(f"{_ui_root(prefect_yaml_server)}{MAIN_UI}/runs/flow-run/{flow_run_id}?tab=Artifacts")
    if not HAS_V2_UI:  # the classic UI of Prefect 3.2 opens on its Logs tab, under a modal
        page.locator("#artifacts").dispatch_event("click")
    card = page.get_by_text(f"The STAC token saved to block {TOKEN_BLOCK}").first
    card.wait_for()
    tab_html = page.content()
    if HAS_V2_UI:
        card.click()
    else:  # a modal of the classic UI takes the pointer; the card still opens on a click event
        card.dispatch_event("click")
    # The heading can show before the table under it, and the new UI may re-render the artifact
    # after it first shows (CI saw the table gone again): these assertions retry until it settles.
    for shown in (
        "Carbon Mapper STAC token refreshed",
        rf"Token name\s+{re.escape(token.name)}\s",
        rf"Expires\s+{token.expires_at:%Y-%m-%d %H:%M} UTC",
        rf"Block\s+{re.escape(TOKEN_BLOCK)}\s",
    ):
        expect(page.locator("body")).to_contain_text(
            re.compile(shown), use_inner_text=True, timeout=PAGE_TIMEOUT_MS
        )
    assert_no_secret(
        emulator,
        artifact_page=page.content(),
        artifacts_tab=tab_html,
        logs=logs,
        worker=worker_output,
    )
    page.screenshot(path=str(screenshots / "refresh-artifact.png"), full_page=True)


def test_a_worker_setting_the_form_does_not_show_stops_the_run_before_any_call(
    prefect_yaml_server: PrefectServer, emulator: CarbonMapperEmulator, deployments: dict[str, Any]
) -> None:
    """The worker says CM_TOKEN_BLOCK=team-stac-token; the form says carbon-mapper-stac-token."""
    stored = _stored_token(prefect_yaml_server, TOKEN_BLOCK)
    requests_before = emulator.requests()
    with prefect_yaml_server.http() as http:
        flow_run_id = create_run(http, deployments[WEEKLY])  # Quick run: the form's defaults
        worker_output = run_worker(prefect_yaml_server, emulator, CM_TOKEN_BLOCK=TEAM_BLOCK)
        flow_run = read_flow_run(http, flow_run_id)

    assert flow_run["state"]["type"] == "FAILED", worker_output
    message = flow_run["state"]["message"]
    assert f"token_block is '{TOKEN_BLOCK}'" in message
    assert f"CM_TOKEN_BLOCK='{TEAM_BLOCK}'" in message
    assert "prefect.yaml `parameters:`" in message
    assert emulator.requests() == requests_before  # stopped before any call to the API
    assert _stored_token(prefect_yaml_server, TOKEN_BLOCK) == stored
    assert _stored_token(prefect_yaml_server, TEAM_BLOCK) is None


def test_a_deployment_parameter_naming_the_worker_block_is_written_and_read(
    prefect_yaml_server: PrefectServer,
    emulator: CarbonMapperEmulator,
    deployments: dict[str, Any],
    page: Page,
) -> None:
    """The fix the conflict message gives: the deployment names the worker's block."""
    weekly_id = deployments[WEEKLY]["id"]
    with prefect_yaml_server.http() as http:
        http.patch(
            f"deployments/{weekly_id}", json={"parameters": {"token_block": TEAM_BLOCK}}
        ).raise_for_status()
        try:
            _open_run_form(page, prefect_yaml_server, MAIN_UI, weekly_id)
            assert _form_values(page)["token_block"] == TEAM_BLOCK  # the form shows it
            flow_run_id = create_run(http, deployments[WEEKLY])
            worker_output = run_worker(prefect_yaml_server, emulator, CM_TOKEN_BLOCK=TEAM_BLOCK)
            flow_run = read_flow_run(http, flow_run_id)
        finally:
            http.patch(f"deployments/{weekly_id}", json={"parameters": {}}).raise_for_status()

    assert flow_run["state"]["type"] == "COMPLETED", worker_output
    assert flow_run["parameters"] == {"token_block": TEAM_BLOCK}
    assert load_token(prefect_yaml_server, TEAM_BLOCK).get() == emulator.issued_stac_tokens[-1]
    # An ingest process configured like the worker reads that block with get_stac_token().
    reader = subprocess.run(
        [sys.executable, "-c", INGEST_READER],
        env=prefect_yaml_server.client_env(
            {"CM_TOKEN_BLOCK": TEAM_BLOCK, "CM_BASE_URL": emulator.base_url}
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.split()[-1] == _digest(emulator.issued_stac_tokens[-1])


# An ingest process: reads the token with get_stac_token() and prints only a digest of it.
INGEST_READER = """
import hashlib
from cm_tasks import get_stac_token
print(hashlib.sha256(get_stac_token().encode()).hexdigest())
"""


def _stored_token(prefect_yaml_server: PrefectServer, block_name: str) -> str | None:
    """The token saved in block_name, or None when there is no such block."""
    try:
        return load_token(prefect_yaml_server, block_name).get()
    except ValueError:  # Prefect: "Unable to find block document named ..."
        return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
