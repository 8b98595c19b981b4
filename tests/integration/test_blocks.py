"""The token block through a real Prefect API: masked in the API, loaded whole; its example runs.

tests/unit/test_blocks.py tests it as a model.
"""

from __future__ import annotations

import re
import textwrap
from datetime import timedelta

from prefect.client.orchestration import get_client

from cm_tasks import CarbonMapperStacToken
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.token_helpers import SENTINEL_TOKEN, token_block


def test_api_read_is_masked_and_load_round_trips() -> None:
    block = token_block(timedelta(days=10))
    block.save("masking-test", overwrite=True)

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "masking-test", "carbon-mapper-stac-token", include_secrets=False
        )
    assert SENTINEL_TOKEN not in str(document.data)
    assert document.data["token"] == "********"
    loaded = CarbonMapperStacToken.load("masking-test")
    assert loaded.get() == SENTINEL_TOKEN
    assert loaded.expires_at == block.expires_at
    assert loaded.scopes == block.scopes


def test_docstring_example_runs(carbon_mapper_emulator: CarbonMapperEmulator) -> None:
    emulator = carbon_mapper_emulator
    docstring = CarbonMapperStacToken.__doc__ or ""
    example = re.search(r"```python\n(.*?)```", docstring, re.S)
    assert example is not None
    # "BLOCK_NAME" is Prefect's placeholder for the block a user looks at (block standards).
    code = textwrap.dedent(example.group(1)).replace('"BLOCK_NAME"', '"team-token"')
    token_block(timedelta(days=14), base_url=emulator.base_url).save("team-token", overwrite=True)

    namespace: dict[str, object] = {}
    exec(compile(code, "<CarbonMapperStacToken example>", "exec"), namespace)

    assert namespace["response"].status_code == 200  # type: ignore[attr-defined]
    assert emulator.requests("stac/search") == 1
