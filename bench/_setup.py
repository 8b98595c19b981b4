"""Shared set-up of the benchmarks: a Prefect API, the emulator, credentials and a token block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keep the figures readable


@contextmanager
def bench_environment(latency: float = 0.0) -> Iterator[object]:
    """A Prefect API + emulator, with the demo account and a fresh token block.

    The Prefect API is the one `PREFECT_API_URL` names (e.g. a `prefect server start`), or a
    temporary one from `prefect_test_harness` when it is unset.
    """
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    from cm_tasks import clear_token_cache, load_settings
    from cm_tasks.blocks import CarbonMapperStacToken
    from cm_tasks.client import parse_issued_stac_token
    from cm_tasks.testing import run_emulator

    api = (
        nullcontext()
        if os.environ.get("PREFECT_API_URL")
        else prefect_test_harness(server_startup_timeout=120)
    )
    with api, run_emulator() as emulator:
        os.environ["CM_BASE_URL"] = emulator.base_url
        settings = load_settings()
        Secret(value=emulator.email).save(settings.email_block, overwrite=True)
        Secret(value=emulator.password).save(settings.password_block, overwrite=True)
        body = emulator.issue_stac_token("bench")
        issued = parse_issued_stac_token(body, "bench", settings_date(body))
        CarbonMapperStacToken.from_issued(issued, emulator.base_url).save(
            settings.token_block, overwrite=True
        )
        clear_token_cache()
        emulator.latency = latency
        yield emulator


def settings_date(body: dict[str, str]):  # type: ignore[no-untyped-def]
    from datetime import date

    return date.fromisoformat(body["expiration_date"])


@contextmanager
def external_emulator(latency: float) -> Iterator[str]:
    """The emulator in its own process (it must not compete for this process's GIL, as a real
    API would not), stopped by PID on exit. Yields the API base URL.

    Args:
        latency: the emulator's delay per request, in seconds.
    """
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "cm_tasks.testing"]
    server = subprocess.Popen(
        [sys.executable, *launcher, "--port", str(port), "--latency", str(latency)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base_url = f"http://127.0.0.1:{port}/api/v1/"
        for _ in range(300):
            try:
                httpx.get(base_url + "stac/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base_url
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def external_emulator_environment(latency: float, harness: bool = True) -> Iterator[str]:
    """The emulator in its own process, a Prefect API, the demo account's Secret blocks and a
    token block (obtained by an inline refresh).

    Args:
        latency: the emulator's delay per request, in seconds.
        harness: start a temporary Prefect API (`prefect_test_harness`); with False, use the
            API that `PREFECT_API_URL` points at (e.g. a `prefect server start`).

    Yields the API base URL.
    """
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    from cm_tasks import clear_token_cache, get_stac_token, load_settings
    from cm_tasks.testing import DEMO_EMAIL, DEMO_PASSWORD

    with (
        external_emulator(latency) as base_url,
        prefect_test_harness(server_startup_timeout=120) if harness else nullcontext(),
    ):
        os.environ["CM_BASE_URL"] = base_url
        settings = load_settings()
        Secret(value=DEMO_EMAIL).save(settings.email_block, overwrite=True)
        Secret(value=DEMO_PASSWORD).save(settings.password_block, overwrite=True)
        clear_token_cache()
        get_stac_token()  # no block yet: refreshed inline and saved
        yield base_url
