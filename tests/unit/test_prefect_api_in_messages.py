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


API_WITH_PASSWORD = "http://ops:s3cret-pw@127.0.0.1:9/api"  # a closed port: refused at once


@pytest.mark.parametrize("command", ["status", "refresh"])
def test_the_cli_never_prints_a_password_written_into_prefect_api_url(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Review lead: the renewal's messages hid it, but `cm-tasks status` and `refresh` printed
    # "ConnectError from the Prefect API at http://ops:s3cret-pw@...".
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cm_tasks.cli import main

    with (
        temporary_settings(updates={PREFECT_API_URL: API_WITH_PASSWORD}),
        pytest.raises(SystemExit),
    ):
        main([command])
    shown = capsys.readouterr()
    assert "Prefect API at http://127.0.0.1:9/api" in shown.err + shown.out
    assert "s3cret-pw" not in shown.err + shown.out


def test_the_check_never_names_a_password_written_into_prefect_api_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from contextlib import contextmanager
    from typing import Any

    from prefect.client import orchestration
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cm_tasks import watchdog
    from cm_tasks.errors import TokenBlockError

    class WebPage:
        """A server that is no Prefect API: /health fails (404, as without /api)."""

        def api_healthcheck(self) -> Exception:
            return httpx.HTTPStatusError("404", request=None, response=None)  # type: ignore[arg-type]

    @contextmanager
    def client(**_kwargs: Any) -> Any:
        yield WebPage()

    monkeypatch.setattr(orchestration, "get_client", client)
    with (
        temporary_settings(updates={PREFECT_API_URL: API_WITH_PASSWORD}),
        pytest.raises(TokenBlockError) as err,
    ):
        watchdog._confirm_not_found("carbon-mapper-stac-token")
    assert "s3cret-pw" not in str(err.value)
    assert "Prefect API at http://127.0.0.1:9/api answered" in str(err.value)


def test_a_web_page_at_prefect_api_url_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review: the block reader's "answered, but not as a Prefect API" printed the URL as given
    # (in `cm-tasks status`, in get_stac_token()'s error and in a warning).
    import json

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cm_tasks.blocks import CarbonMapperStacToken, load_token_block
    from cm_tasks.errors import TokenBlockError

    def a_web_page(*_args: object, **_kwargs: object) -> None:
        raise json.JSONDecodeError("Expecting value", "<!doctype html>", 0)

    monkeypatch.setattr(CarbonMapperStacToken, "load", a_web_page)
    with (
        temporary_settings(updates={PREFECT_API_URL: API_WITH_PASSWORD}),
        pytest.raises(TokenBlockError) as err,
    ):
        load_token_block("carbon-mapper-stac-token")
    assert "s3cret-pw" not in str(err.value)
    assert "Prefect API at http://127.0.0.1:9/api answered" in str(err.value)
