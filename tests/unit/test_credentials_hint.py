"""The fix a missing Secret block's error suggests: `cm-tasks login` with the right option."""

from __future__ import annotations

import pytest

from cm_tasks.tasks import ACCOUNT_EMAIL, ACCOUNT_PASSWORD, Credential


@pytest.mark.parametrize(
    ("credential", "block", "login"),
    [
        (ACCOUNT_EMAIL, "carbon-mapper-email", "`cm-tasks login`"),
        (ACCOUNT_PASSWORD, "carbon-mapper-password", "`cm-tasks login`"),
        (ACCOUNT_EMAIL, "team-email", "`cm-tasks login --email-block team-email`"),
        # The hint follows the credential, not words in a name or a description.
        (ACCOUNT_EMAIL, "password-of-email", "`cm-tasks login --email-block password-of-email`"),
        (ACCOUNT_PASSWORD, "team-pw", "`cm-tasks login --password-block team-pw`"),
    ],
)
def test_the_login_that_writes_the_block(credential: Credential, block: str, login: str) -> None:
    hint = credential.how_to_create(block)
    assert hint.startswith(f"Store it with {login} (it saves exactly what you type, as text)")
    assert ", or in Python: " in hint
    assert f"Secret(value=...).save({block!r}, overwrite=True)" in hint
