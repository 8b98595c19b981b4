"""What the renewal's messages say of the Prefect API: where it is, never its credentials."""

from __future__ import annotations

import httpx
import pytest

from cm_tasks import _messages


@pytest.mark.parametrize(
    ("api", "shown"),
    [
        ("https://ops:s3cret-pw@prefect.example:4200/api", "https://prefect.example:4200/api"),
        ("http://ops:s3cret-pw@[::1]/api", "http://[::1]/api"),
        ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api"),
    ],
)
def test_a_password_in_prefect_api_url_never_reaches_a_message(api: str, shown: str) -> None:
    # Review: messages printed PREFECT_API_URL as given, user:password and all.
    texts = [
        _messages.prefect_failed("read the token block", api, httpx.ConnectError("x"), None),
        _messages.lease_not_released("cm-tasks-refresh-b", api, httpx.ConnectError("x")),
        _messages.lease_forgotten("cm-tasks-refresh-b", api),
        _messages.lease_lost("cm-tasks-refresh-b", api),
    ]
    for text in texts:
        assert "s3cret-pw" not in text
        assert "ops" not in text.split("Prefect API at ")[1].split()[0]
        assert f"Prefect API at {shown}" in text
