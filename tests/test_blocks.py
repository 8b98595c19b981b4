"""The token block: fields, expiry helpers, secret masking, and the documented example."""

from __future__ import annotations

import re
import textwrap
from datetime import datetime, timedelta, timezone

import pytest
from prefect.client.orchestration import get_client
from pydantic import SecretStr

from cm_tasks import CarbonMapperStacToken
from cm_tasks.blocks import CarbonMapperStacToken as BlockClass
from cm_tasks.testing import CarbonMapperEmulator

SENTINEL = "sentinel-token-value-7f3c"


def _block(expires_in: timedelta, **fields: object) -> CarbonMapperStacToken:
    now = datetime.now(timezone.utc)
    values: dict[str, object] = {
        "token": SecretStr(SENTINEL),
        "name": "test-token",
        "expires_at": now + expires_in,
        "created_at": now,
        "scopes": ["stac", "catalog:read"],
        "base_url": "http://127.0.0.1:1/api/v1/",
    }
    values.update(fields)
    return CarbonMapperStacToken(**values)  # type: ignore[arg-type]


def test_get_and_auth_headers_give_the_token() -> None:
    block = _block(timedelta(days=3))
    assert block.get() == SENTINEL
    assert block.auth_headers() == {"Authorization": f"Bearer {SENTINEL}"}


@pytest.mark.parametrize(
    ("expires_in", "within", "expected"),
    [
        (timedelta(days=3), timedelta(days=1), False),
        (timedelta(days=3), timedelta(days=4), True),
        (timedelta(hours=-1), timedelta(0), True),
        (timedelta(minutes=5), timedelta(minutes=10), True),
    ],
)
def test_expires_within(expires_in: timedelta, within: timedelta, expected: bool) -> None:
    assert _block(expires_in).expires_within(within) is expected


def test_naive_datetimes_become_utc() -> None:
    block = _block(timedelta(0), expires_at=datetime(2030, 1, 1), created_at=datetime(2029, 1, 1))
    assert block.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert block.created_at.tzinfo is not None


def test_repr_str_and_dump_mask_the_token() -> None:
    block = _block(timedelta(days=1))
    for text in (repr(block), str(block), str(block.model_dump()), block.model_dump_json()):
        assert SENTINEL not in text


def test_validation_error_does_not_echo_the_token() -> None:
    with pytest.raises(ValueError) as raised:
        CarbonMapperStacToken(token=SENTINEL, name="x")  # type: ignore[call-arg]
    assert SENTINEL not in str(raised.value)


def test_api_read_is_masked_and_load_round_trips() -> None:
    block = _block(timedelta(days=10))
    block.save("masking-test", overwrite=True)

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "masking-test", "carbon-mapper-stac-token", include_secrets=False
        )
    assert SENTINEL not in str(document.data)
    assert document.data["token"] == "********"
    loaded = CarbonMapperStacToken.load("masking-test")
    assert loaded.get() == SENTINEL
    assert loaded.expires_at == block.expires_at
    assert loaded.scopes == block.scopes


def test_block_type_metadata() -> None:
    assert BlockClass.get_block_type_slug() == "carbon-mapper-stac-token"
    assert BlockClass.get_description()
    schema = BlockClass.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"field {name} has no description"
    assert schema["properties"]["token"]["format"] == "password"
    assert "CarbonMapperStacToken.load(" in (BlockClass.get_code_example() or "")


def test_docstring_example_runs(carbon_mapper_emulator: CarbonMapperEmulator) -> None:
    emulator = carbon_mapper_emulator
    docstring = CarbonMapperStacToken.__doc__ or ""
    example = re.search(r"```python\n(.*?)```", docstring, re.S)
    assert example is not None
    # "BLOCK_NAME" is Prefect's placeholder for the block a user looks at (block standards).
    code = textwrap.dedent(example.group(1)).replace('"BLOCK_NAME"', '"team-token"')
    _block(timedelta(days=14), base_url=emulator.base_url).save("team-token", overwrite=True)

    namespace: dict[str, object] = {}
    exec(compile(code, "<CarbonMapperStacToken example>", "exec"), namespace)

    assert namespace["response"].status_code == 200  # type: ignore[attr-defined]
    assert emulator.requests("stac/search") == 1
