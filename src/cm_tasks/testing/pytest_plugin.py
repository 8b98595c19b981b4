"""Pytest fixtures for the Carbon Mapper API emulator (registered via the ``pytest11`` entry point).

One emulator serves the whole session; ``carbon_mapper_emulator`` resets it before each test.
``carbon_mapper_token_block`` also points cm-tasks at it and puts a valid token block (and the
demo account's Secret blocks) in place, so ``get_stac_token()`` and ingest flows work offline.
The emulator is imported inside the fixture so that merely loading this plugin stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cm_tasks.blocks import CarbonMapperStacToken
    from cm_tasks.testing import CarbonMapperEmulator


@pytest.fixture(scope="session")
def _carbon_mapper_emulator_session() -> Iterator[CarbonMapperEmulator]:
    from cm_tasks.testing import CarbonMapperEmulator

    with CarbonMapperEmulator() as emulator:
        yield emulator


@pytest.fixture
def carbon_mapper_emulator(
    _carbon_mapper_emulator_session: CarbonMapperEmulator,
) -> CarbonMapperEmulator:
    """A running Carbon Mapper API emulator, reset (no faults, counters, tokens) for this test.

    Example:
        ```python
        def test_login(carbon_mapper_emulator):
            emu = carbon_mapper_emulator
            r = httpx.post(emu.base_url + "token/pair",
                           json={"email": emu.email, "password": emu.password})
            assert r.status_code == 200
        ```
    """
    _carbon_mapper_emulator_session.reset()
    return _carbon_mapper_emulator_session


@pytest.fixture
def carbon_mapper_token_block(
    carbon_mapper_emulator: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CarbonMapperStacToken]:
    """A valid STAC token from the emulator, saved to the token block; cm-tasks points at it.

    Sets ``CM_BASE_URL`` to the emulator (and ``CM_RETRY_BACKOFF=0``), saves the demo account
    to the Secret blocks of ``CM_EMAIL_BLOCK`` and ``CM_PASSWORD_BLOCK`` (so an inline refresh
    works too), saves a 14-day token to the ``CM_TOKEN_BLOCK`` block and empties the
    process's token cache. No request counter moves: the token is minted directly. Needs a
    Prefect API, e.g. a session fixture around ``prefect.testing.utilities.prefect_test_harness``.

    Example:
        ```python
        from cm_tasks import get_stac_token

        def test_my_ingest(carbon_mapper_token_block, carbon_mapper_emulator):
            assert get_stac_token() == carbon_mapper_token_block.get()
            assert carbon_mapper_emulator.requests("account/tokens/create-stac") == 0
        ```
    """
    from prefect.blocks.system import Secret

    from cm_tasks.access import clear_token_cache
    from cm_tasks.blocks import CarbonMapperStacToken
    from cm_tasks.client import parse_issued_stac_token
    from cm_tasks.settings import load_settings

    emulator = carbon_mapper_emulator
    monkeypatch.setenv("CM_BASE_URL", emulator.base_url)
    monkeypatch.setenv("CM_RETRY_BACKOFF", "0")
    settings = load_settings()
    # _sync: a sync save even if the test's event loop runs in this thread.
    Secret(value=emulator.email).save(settings.email_block, overwrite=True, _sync=True)  # type: ignore[call-arg]
    Secret(value=emulator.password).save(settings.password_block, overwrite=True, _sync=True)  # type: ignore[call-arg]
    body = emulator.issue_stac_token("pytest")
    issued = parse_issued_stac_token(
        body, body["name"], date.fromisoformat(body["expiration_date"])
    )
    block = CarbonMapperStacToken.from_issued(issued, emulator.base_url)
    block.save(settings.token_block, overwrite=True, _sync=True)  # type: ignore[call-arg]
    clear_token_cache()
    yield block
    clear_token_cache()
