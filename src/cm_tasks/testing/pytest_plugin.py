"""Pytest fixtures for the Carbon Mapper API emulator (registered via the ``pytest11`` entry point).

One emulator serves the whole session; ``carbon_mapper_emulator`` resets it before each test.
Each fixture builds on the one before it:

- ``carbon_mapper_env`` points cm-tasks at the emulator (``CM_BASE_URL``), with retries that
  do not wait; no Prefect API needed.
- ``carbon_mapper_credentials`` also saves the demo account to the Secret blocks, so a refresh
  (the flow, ``cm-tasks refresh``, an inline refresh) works offline.
- ``carbon_mapper_token_block`` also saves a valid token block, so ``get_stac_token()`` and
  ingest flows work offline without a refresh.

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
def carbon_mapper_env(
    carbon_mapper_emulator: CarbonMapperEmulator, monkeypatch: pytest.MonkeyPatch
) -> CarbonMapperEmulator:
    """The emulator, with cm-tasks pointed at it for this test; returns the emulator.

    Sets ``CM_BASE_URL`` to the emulator (so nothing in the test can reach the real API),
    ``CM_RETRY_BACKOFF=0`` (retries do not wait) and ``CM_TIMEOUT=5`` (a local API answers at
    once; a scripted time-out fault ends quickly). Needs no Prefect API.

    Example:
        ```python
        from cm_tasks.settings import load_settings

        def test_points_at_the_emulator(carbon_mapper_env):
            assert load_settings().base_url == carbon_mapper_env.base_url
        ```
    """
    emulator = carbon_mapper_emulator
    monkeypatch.setenv("CM_BASE_URL", emulator.base_url)
    monkeypatch.setenv("CM_RETRY_BACKOFF", "0")
    monkeypatch.setenv("CM_TIMEOUT", "5")
    return emulator


@pytest.fixture
def carbon_mapper_credentials(carbon_mapper_env: CarbonMapperEmulator) -> CarbonMapperEmulator:
    """The emulator's demo account in the Secret blocks cm-tasks reads; returns the emulator.

    As ``carbon_mapper_env``, and saves the demo account to the Secret blocks of
    ``CM_EMAIL_BLOCK`` and ``CM_PASSWORD_BLOCK``: a refresh works offline, no token block is
    saved. Needs a Prefect API, e.g. a session fixture around
    ``prefect.testing.utilities.prefect_test_harness``.

    Example:
        ```python
        from cm_tasks import refresh_stac_token

        def test_refresh(carbon_mapper_credentials):
            refresh_stac_token()
            assert carbon_mapper_credentials.requests("account/tokens/create-stac") == 1
        ```
    """
    from prefect.blocks.system import Secret

    from cm_tasks.settings import load_settings

    emulator = carbon_mapper_env
    settings = load_settings()
    # _sync: a sync save even if the test's event loop runs in this thread.
    Secret(value=emulator.email).save(settings.email_block, overwrite=True, _sync=True)  # type: ignore[call-arg]
    Secret(value=emulator.password).save(settings.password_block, overwrite=True, _sync=True)  # type: ignore[call-arg]
    return emulator


@pytest.fixture
def carbon_mapper_token_block(
    carbon_mapper_credentials: CarbonMapperEmulator,
) -> Iterator[CarbonMapperStacToken]:
    """A valid STAC token from the emulator, saved to the token block; cm-tasks points at it.

    As ``carbon_mapper_credentials`` (``CM_BASE_URL`` at the emulator, the demo account in the
    Secret blocks, so an inline refresh works too), and saves a 14-day token to the
    ``CM_TOKEN_BLOCK`` block and empties the process's token cache. No request counter moves:
    the token is minted directly. Needs a Prefect API, e.g. a session fixture around
    ``prefect.testing.utilities.prefect_test_harness``.

    Example:
        ```python
        from cm_tasks import get_stac_token

        def test_my_ingest(carbon_mapper_token_block, carbon_mapper_emulator):
            assert get_stac_token() == carbon_mapper_token_block.get()
            assert carbon_mapper_emulator.requests("account/tokens/create-stac") == 0
        ```
    """
    from cm_tasks.access import clear_token_cache
    from cm_tasks.blocks import CarbonMapperStacToken
    from cm_tasks.client import parse_issued_stac_token
    from cm_tasks.settings import load_settings

    emulator = carbon_mapper_credentials
    body = emulator.issue_stac_token("pytest")
    issued = parse_issued_stac_token(
        body, body["name"], date.fromisoformat(body["expiration_date"])
    )
    block = CarbonMapperStacToken.from_issued(issued, emulator.base_url)
    block.save(load_settings().token_block, overwrite=True, _sync=True)  # type: ignore[call-arg]
    clear_token_cache()
    yield block
    clear_token_cache()
