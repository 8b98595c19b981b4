"""cm_tasks.stac: pystac-client with the STAC token, and an optional import."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import timedelta

import pytest

from cm_tasks import CarbonMapperStacToken, clear_token_cache, get_stac_token
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.token_helpers import CREATE_STAC, assert_no_secrets, save_token


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_importing_cm_tasks_does_not_import_pystac_client() -> None:
    result = _python(
        "import sys, cm_tasks\n"
        "cm_tasks.get_stac_token, cm_tasks.CarbonMapperAuth\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pystac', 'cm_tasks.stac'))))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_pystac_client_the_error_says_how_to_install_it() -> None:
    result = _python(
        "import sys\nsys.modules['pystac_client'] = None\nimport cm_tasks\nimport cm_tasks.stac"
    )
    assert result.returncode == 1
    assert "pip install 'cm-tasks[stac]'" in result.stderr


def test_open_catalog_searches_with_query_and_paging(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    from cm_tasks.stac import open_catalog

    catalog = open_catalog()
    search = catalog.search(
        collections=["l4a-ch4", "l2b-cmf"],
        query={"cm:emission": {"gt": 500}},
        limit=4,
        max_items=9,
    )
    items = list(search.items())

    assert catalog.id == "carbon-mapper"
    assert 0 < len(items) <= 9
    assert all(item.properties["cm:emission"] > 500 for item in items)
    assert all(item.collection_id in ("l4a-ch4", "l2b-cmf") for item in items)
    assert carbon_mapper_emulator.requests("stac/search") >= 2  # followed a next link


def test_catalog_session_downloads_assets_with_the_token_and_never_logs_it(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cm_tasks.stac import open_catalog

    emu = carbon_mapper_emulator
    caplog.set_level(logging.DEBUG)  # pystac-client logs request headers at DEBUG
    catalog = open_catalog()
    item = next(catalog.search(max_items=1).items())
    href = item.assets["rgb"].href

    response = catalog._stac_io.session.get(href)  # type: ignore[attr-defined]

    assert response.status_code == 200
    assert response.content == emu.asset_bytes(item.id, "rgb")
    assert "Headers" in caplog.text
    assert_no_secrets(caplog.text, emu)


def test_catalog_renews_a_rejected_token_once(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    from cm_tasks.stac import open_catalog

    emu = carbon_mapper_emulator
    catalog = open_catalog()
    item = next(catalog.search(max_items=1).items())
    save_token(emu, "revoked-token", timedelta(days=10))
    clear_token_cache()

    response = catalog._stac_io.session.get(item.assets["cmf"].href)  # type: ignore[attr-defined]

    assert response.status_code == 200
    assert emu.requests(CREATE_STAC) == 1
    assert get_stac_token() == emu.issued_stac_tokens[-1]


@pytest.mark.parametrize("fault", ["drop", "500"])
def test_catalog_errors_do_not_carry_the_token(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    fault: str,
) -> None:
    # pystac-client raises APIError inside its `except`: the requests error it replaces stays
    # as __context__, with the signed request (Authorization header) attached.
    from pystac_client.exceptions import APIError

    from cm_tasks.stac import open_catalog
    from cm_tasks.testing import Fault
    from tests.support.leaks import Secrets, assert_no_leak

    catalog = open_catalog()
    failure = Fault.drop(times=10) if fault == "drop" else Fault.status(500, times=10)
    carbon_mapper_emulator.fail("stac/search", failure)
    with pytest.raises(APIError) as error:
        list(catalog.search(collections=["l4a-ch4"], max_items=3).items())

    assert_no_leak(
        Secrets({"stac token": carbon_mapper_token_block.get()}), exceptions=[error.value]
    )
