"""`make demo`: the whole job on one machine, against the bundled emulator.

Starts the Carbon Mapper API emulator on 127.0.0.1, saves its demo account into the two Secret
blocks, runs the `refresh-stac-token` flow, loads the saved token block and downloads one STAC
asset with it. Prints what happened, never the token or the password.

Run it with `python -m cm_tasks.demo` (the Makefile sets a project-local `PREFECT_HOME`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import cast

import httpx


def main() -> int:
    """Run the demo; returns the process exit code."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.blocks.system import Secret

    from cm_tasks import CarbonMapperStacToken, load_settings, refresh_stac_token
    from cm_tasks.testing import run_emulator

    started = time.perf_counter()
    with run_emulator() as emulator:
        os.environ["CM_BASE_URL"] = emulator.base_url
        settings = load_settings()
        print(f"Emulator of the Carbon Mapper API at {emulator.base_url}")

        Secret(value=emulator.email).save(settings.email_block, overwrite=True)
        Secret(value=emulator.password).save(settings.password_block, overwrite=True)
        print(
            f"Saved the demo account to Secret blocks {settings.email_block!r} "
            f"and {settings.password_block!r}"
        )

        summary = refresh_stac_token()
        token = cast(CarbonMapperStacToken, CarbonMapperStacToken.load(summary["token_block"]))
        print(f"Token block {summary['token_block']!r}:")
        print(f"  name     {token.name}")
        print(f"  expires  {token.expires_at.isoformat()} ({token.time_left().days} days left)")
        print(f"  scopes   {', '.join(token.scopes)}")
        print(f"  token    {token.token}")

        with httpx.Client(base_url=token.base_url, timeout=30) as http:
            items = http.get("stac/search", params={"limit": 1}).json()["features"]
            item = items[0]
            asset_name, asset = next(iter(item["assets"].items()))
            response = http.get(asset["href"], headers=token.auth_headers())
            response.raise_for_status()
        print(
            f"Downloaded STAC asset {item['id']}/{asset_name} with the token: "
            f"{len(response.content):,} bytes, HTTP {response.status_code}"
        )
    print(f"Demo finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
