"""The token block as a model: fields, expiry helpers, secret masking, block metadata.

No Prefect API: tests/integration/test_blocks.py saves and loads it, and runs its example.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cm_tasks import CarbonMapperStacToken
from cm_tasks.blocks import CarbonMapperStacToken as BlockClass
from tests.support.token_helpers import SENTINEL_TOKEN, token_block


def test_get_and_auth_headers_give_the_token() -> None:
    block = token_block(timedelta(days=3))
    assert block.get() == SENTINEL_TOKEN
    assert block.auth_headers() == {"Authorization": f"Bearer {SENTINEL_TOKEN}"}


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
    assert token_block(expires_in).expires_within(within) is expected


def test_naive_datetimes_become_utc() -> None:
    block = token_block(
        timedelta(0), expires_at=datetime(2030, 1, 1), created_at=datetime(2029, 1, 1)
    )
    assert block.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert block.created_at.tzinfo is not None


def test_repr_str_and_dump_mask_the_token() -> None:
    block = token_block(timedelta(days=1))
    for text in (repr(block), str(block), str(block.model_dump()), block.model_dump_json()):
        assert SENTINEL_TOKEN not in text


def test_validation_error_does_not_echo_the_token() -> None:
    with pytest.raises(ValueError) as raised:
        CarbonMapperStacToken(token=SENTINEL_TOKEN, name="x")  # type: ignore[call-arg]
    assert SENTINEL_TOKEN not in str(raised.value)


def test_block_type_metadata() -> None:
    assert BlockClass.get_block_type_slug() == "carbon-mapper-stac-token"
    assert BlockClass.get_description()
    schema = BlockClass.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"field {name} has no description"
    assert schema["properties"]["token"]["format"] == "password"
    assert "CarbonMapperStacToken.load(" in (BlockClass.get_code_example() or "")
