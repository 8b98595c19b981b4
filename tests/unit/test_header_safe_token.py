"""Tokens are header-safe from the moment they are parsed or loaded (issue 16, case 1).

A token with surrounding whitespace is stripped; one with a space or control character inside
is refused with an error that never quotes it. Nothing here talks to Prefect or the network.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from cm_tasks.blocks import CarbonMapperStacToken
from cm_tasks.client import CarbonMapperClient, header_safe_token
from cm_tasks.errors import UnexpectedResponseError
from cm_tasks.ingest import _message_without_headers
from tests.support.leaks import Secrets, assert_no_leak

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJqdGkiOiJhYmMxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbi14eXo"


def _client(answers: dict[str, dict[str, Any]], seen: list[httpx.Request]) -> CarbonMapperClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=answers[request.url.path.rsplit("/api/v1/", 1)[1]])

    return CarbonMapperClient(
        "https://api.example.org/api/v1/", transport=httpx.MockTransport(handle)
    )


@pytest.mark.parametrize("padded", [TOKEN + "\n", TOKEN + " ", "\t" + TOKEN + "\r\n"])
def test_tokens_in_api_answers_are_stripped_before_they_are_sent(padded: str) -> None:
    seen: list[httpx.Request] = []
    answers = {
        "token/pair": {"access": padded, "refresh": "r"},
        "account/tokens/create-stac": {"token_value": padded, "name": "n"},
    }
    with _client(answers, seen) as client:
        pair = client.get_token_pair(SecretStr("me@example.org"), SecretStr("pw"))
        issued = client.create_stac_token(pair.access, "n", date(2030, 1, 1))

    assert pair.access.get_secret_value() == TOKEN
    assert issued.token.get_secret_value() == TOKEN
    assert seen[1].headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("bad", ["abc def-0123456789", "abc\x00def-0123456789", "tökén-0123456789"])
def test_a_token_that_cannot_be_sent_is_refused_without_quoting_it(bad: str) -> None:
    seen: list[httpx.Request] = []
    answers = {"account/tokens/create-stac": {"token_value": bad, "name": "n"}}
    with _client(answers, seen) as client, pytest.raises(UnexpectedResponseError) as raised:
        client.create_stac_token(SecretStr("access"), "n", date(2030, 1, 1))

    assert "'token_value' cannot be used" in str(raised.value)
    assert "HTTP header" in str(raised.value)
    assert_no_leak(Secrets({"bad token": bad}), exceptions=[raised.value])


def _block(token: str) -> CarbonMapperStacToken:
    now = datetime.now(timezone.utc)
    return CarbonMapperStacToken(
        token=token,  # type: ignore[arg-type]
        name="n",
        expires_at=now + timedelta(days=1),
        created_at=now,
        base_url="https://api.example.org/api/v1/",
    )


def test_the_block_strips_a_token_edited_with_a_trailing_newline() -> None:
    assert _block(TOKEN + " \n").get() == TOKEN
    assert _block(TOKEN + "\n").auth_headers() == {"Authorization": f"Bearer {TOKEN}"}


def test_the_block_refuses_a_token_with_a_space_inside_without_quoting_it() -> None:
    bad = TOKEN[:20] + " " + TOKEN[20:]
    with pytest.raises(ValidationError) as raised:
        _block(bad)
    assert "HTTP header" in str(raised.value)
    assert_no_leak(Secrets({"bad token": bad}), exceptions=[raised.value])


def test_header_safe_token_says_what_is_wrong() -> None:
    assert header_safe_token(f" {TOKEN}\n") == TOKEN
    with pytest.raises(ValueError, match="empty"):
        header_safe_token(" \n")


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}\n", f"Bearer {TOKEN[:30]}\x01{TOKEN[30:]}"])
def test_an_error_quoting_the_authorization_header_is_withheld(header: str) -> None:
    # What h11 raises for an illegal header value: the value's repr, token included.
    request = httpx.Request("GET", "https://api.example.org/stac/", headers={"X": "y"})
    request.headers["Authorization"] = header
    error = httpx.LocalProtocolError(f"Illegal header value {header.encode()!r}")
    http = httpx.AsyncClient()

    message = _message_without_headers(error, request, http)

    assert "withheld" in message
    assert message.startswith("LocalProtocolError")
    assert_no_leak(Secrets({"token": TOKEN}), texts={"message": message})
    plain = httpx.ConnectError("[Errno 111] Connection refused")
    assert _message_without_headers(plain, request, http) == str(plain)


def test_the_scanner_finds_a_whitespace_token_in_its_escaped_form() -> None:
    # The leak suite's own positive control: b'Bearer <token>\n' as h11 quotes it.
    with pytest.raises(AssertionError, match="padded token"):
        assert_no_leak(
            Secrets({"padded token": TOKEN + "\n"}),
            texts={"state message": json.dumps(f"Illegal header value b'Bearer {TOKEN}\\n'")},
        )
