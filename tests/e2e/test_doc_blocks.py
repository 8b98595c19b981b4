"""Every command of README.md and docs/*.md runs, as written, against a Prefect server.

The blocks are read from the Markdown when the tests run (tests/support/docblocks.py says how), not
copied here, so the docs cannot drift from what works. Each page's blocks run in order, in a
fresh directory of their own, as a user who follows the page would run them: `python` blocks
with `python`, `bash` blocks with `bash -e`, against one real `prefect server start` and the
emulator (as `CM_BASE_URL`). The only changes are the placeholders of `placeholders()`, a
worker that runs once instead of forever, and the answers a user types at the prompts.

And the README's ingest example fails when its work fails: run as shown with one URL that
answers 404, its flow run ends Failed and the process exits non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL, temporary_settings

from cm_tasks.testing import CarbonMapperEmulator
from tests.support.docblocks import (
    DocBlock,
    all_blocks,
    doc_blocks,
    doc_pages,
    markers_without_a_block,
)
from tests.support.prefect_server import PrefectServer
from tests.support.token_helpers import EMAIL_BLOCK, PASSWORD_BLOCK

BIN = Path(sys.executable).parent
BLOCK_TIMEOUT = 300.0
MAX_SKIPPED = 9


def _page_ids() -> list[str]:
    """The pages with a block to run."""
    return [page.name for page in doc_pages() if any(b.runs for b in doc_blocks(page))]


@pytest.fixture(scope="module")
def prepared(server: PrefectServer, emulator: CarbonMapperEmulator) -> dict[str, str]:
    """The server as a reader's has it after the README's first steps, and the placeholders."""
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        Secret(value=emulator.email).save(EMAIL_BLOCK, overwrite=True)
        Secret(value=emulator.password).save(PASSWORD_BLOCK, overwrite=True)
        webhook = CustomWebhookNotificationBlock(name="doc-test", url="http://127.0.0.1:9/hook")
        block_id = str(webhook.save("doc-test-alerts", overwrite=True))
    item_id, _ = emulator.large_asset
    return {
        "http://your-prefect-server:4200/api": server.api_url,
        "http://127.0.0.1:4200/api": server.api_url,
        "https://api.carbonmapper.org/api/v1/stac/assets/ITEM/": (
            f"{emulator.base_url}stac/assets/{item_id}/"
        ),
        "<id of your notification block>": block_id,
    }


def _filled(code: str, placeholders: dict[str, str]) -> str:
    for placeholder, value in placeholders.items():
        code = code.replace(placeholder, value)
    # A worker serves until stopped; in a test it runs what is due and exits.
    return re.sub(r"(prefect worker start --pool \S+)", r"\1 --run-once", code)


def _environment(server: PrefectServer, emulator: CarbonMapperEmulator) -> dict[str, str]:
    env = {k: v for k, v in server.client_env().items() if not k.startswith("CM_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        CM_BASE_URL=emulator.base_url,
        CM_RETRY_BACKOFF="0",
        CM_TIMEOUT="5",
    )
    return env


def _run(
    block: DocBlock, code: str, cwd: Path, env: dict[str, str], emulator: CarbonMapperEmulator
) -> subprocess.CompletedProcess[str]:
    script = cwd / f"block-{block.line}.{'py' if block.language == 'python' else 'sh'}"
    script.write_text(code)
    command = (
        [sys.executable, script.name] if block.language == "python" else ["bash", "-e", script.name]
    )
    # The answers to `cm-tasks login` and input()/getpass(): e-mail, password, password again.
    # A new session has no terminal, so getpass reads them from stdin too.
    answers = f"{emulator.email}\n{emulator.password}\n{emulator.password}\n"
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        input=answers,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        start_new_session=True,
        check=False,
    )


def test_every_block_has_a_language_and_markers_are_few_and_justified() -> None:
    blocks = all_blocks()
    assert [b.id for b in blocks if not b.language] == []
    assert markers_without_a_block() == []
    skipped = [b for b in blocks if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [f"{b.id}: {b.skip}" for b in skipped]
    for block in skipped:
        # Each says what covers the block instead, or what the test machines lack.
        assert re.search(r"tests/|make |needs |lack|until stopped", block.skip or ""), block.id
    assert sum(b.runs for b in blocks) >= 15


@pytest.mark.parametrize("page", _page_ids())
def test_the_blocks_of_a_page_run(
    page: str,
    prepared: dict[str, str],
    server: PrefectServer,
    emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    (path,) = [p for p in doc_pages() if p.name == page]
    blocks = doc_blocks(path)
    env = _environment(server, emulator)
    for block in blocks:
        code = _filled(block.code, prepared)
        if block.save:
            (tmp_path / block.save).write_text(code)
        if not block.runs:
            continue
        result = _run(block, code, tmp_path, env, emulator)
        assert result.returncode == 0, (
            f"{block.id} exited {result.returncode}:\n{code}\n--- stdout\n{result.stdout}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )
        assert emulator.password not in result.stdout + result.stderr


@pytest.fixture
def readme_ingest(tmp_path: Path) -> Path:
    (block,) = [b for b in doc_blocks(doc_pages()[0]) if b.save == "ingest.py"]
    script = tmp_path / "ingest.py"
    script.write_text(block.code)
    return script


def _last_run_of(server: PrefectServer, flow_name: str) -> dict[str, object]:
    with server.http() as http:
        response = http.post(
            "flow_runs/filter",
            json={
                "flows": {"name": {"any_": [flow_name]}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 1,
            },
        )
        response.raise_for_status()
        (run,) = response.json()
    return dict(run)


def test_the_readme_ingest_fails_when_a_download_fails(
    readme_ingest: Path,
    prepared: dict[str, str],
    server: PrefectServer,
    emulator: CarbonMapperEmulator,
) -> None:
    item_id, _ = emulator.large_asset
    good = f"{emulator.base_url}stac/assets/{item_id}/rgb.tif"
    missing = f"{emulator.base_url}stac/assets/no-such-item/rgb.tif"
    env = _environment(server, emulator)

    result = subprocess.run(
        [sys.executable, readme_ingest.name, good, missing],
        cwd=readme_ingest.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )

    assert result.returncode != 0, result.stdout
    assert "bytes" not in result.stdout
    assert "404" in result.stderr
    run = _last_run_of(server, "ingest")
    assert run["state_type"] == "FAILED"

    # The same script with URLs that work completes and prints the bytes.
    result = subprocess.run(
        [sys.executable, readme_ingest.name, good, good],
        cwd=readme_ingest.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == [str(2 * emulator.asset_size(item_id, "rgb")), "bytes"]
    assert _last_run_of(server, "ingest")["state_type"] == "COMPLETED"
