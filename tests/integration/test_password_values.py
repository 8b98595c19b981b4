"""Passwords are used byte for byte as stored (issue 16, case 6).

On the old code the read stripped surrounding spaces (the platform then rejected the
password) and parsed text that looks like JSON (`[20240611]`, `{"a":1}`) as JSON, refusing it
as "holds JSON" and advising `cm-tasks login`, which stores the same text again.
"""

from __future__ import annotations

from uuid import uuid4

import pytest
from prefect.blocks.system import Secret
from typer.testing import CliRunner

from cm_tasks.cli import app
from cm_tasks.errors import CredentialsBlockError
from cm_tasks.refresh import resolve_request, run_refresh
from cm_tasks.settings import load_settings
from cm_tasks.tasks import ACCOUNT_EMAIL, ACCOUNT_PASSWORD, read_secret_block
from cm_tasks.testing import CarbonMapperEmulator
from tests.support.leaks import Secrets, assert_no_leak

PASSWORDS = [" pw with spaces ", "[20240611]", '{"a":1}', '"quoted"', "null", "tab\tand space "]


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_stored_by_login_is_sent_exactly(
    carbon_mapper_env: CarbonMapperEmulator, password: str
) -> None:
    email = f"exact-{uuid4().hex[:10]}@example.org"
    carbon_mapper_env.add_user(email, password)

    login = CliRunner().invoke(app, ["login", "--email", email], input=f"{password}\n{password}\n")
    assert login.exit_code == 0, login.output

    settings = load_settings()
    token = run_refresh(resolve_request(settings, token_block="exact-password-token"), settings)

    assert token.get() == carbon_mapper_env.issued_stac_tokens[-1]


def test_a_json_value_is_refused_with_advice_that_stores_text(
    carbon_mapper_env: CarbonMapperEmulator,
) -> None:
    Secret(value=[20240611]).save("json-password", overwrite=True)  # the UI's JSON input

    with pytest.raises(CredentialsBlockError) as raised:
        read_secret_block("json-password", ACCOUNT_PASSWORD)

    message = str(raised.value)
    assert "holds a JSON list, not text" in message
    assert "cm-tasks login --password-block json-password" in message
    assert "as text" in message
    assert_no_leak(Secrets({"password": "20240611"}), exceptions=[raised.value])


def test_an_email_is_stripped_a_password_is_not(carbon_mapper_env: CarbonMapperEmulator) -> None:
    Secret(value=" me@example.org\n").save("spaced-email", overwrite=True)
    Secret(value=" pw ").save("spaced-password", overwrite=True)

    email = read_secret_block("spaced-email", ACCOUNT_EMAIL)
    password = read_secret_block("spaced-password", ACCOUNT_PASSWORD)

    assert email.get_secret_value() == "me@example.org"
    assert password.get_secret_value() == " pw "
