"""Tests of the `CM_*` settings: defaults, environment, `.env`, validation and warnings."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from cm_tasks.errors import CarbonMapperError, ConfigurationError
from cm_tasks.settings import (
    DEFAULT_BASE_URL,
    CarbonMapperSettings,
    InsecureBaseURLWarning,
    load_settings,
    validate_block_name,
)
from tests.support import REPO_ROOT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CM_* variable or .env file of the machine running the tests can leak in."""
    for name in list(os.environ):
        if name.upper().startswith("CM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_error(**env: str) -> ConfigurationError:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureBaseURLWarning)
            with pytest.raises(ConfigurationError) as info:
                load_settings()
    return info.value


def insecure_warnings(url: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_settings(base_url=url)
    return [w for w in caught if issubclass(w.category, InsecureBaseURLWarning)]


def test_defaults() -> None:
    settings = load_settings()
    assert settings.base_url == DEFAULT_BASE_URL == "https://api.carbonmapper.org/api/v1/"
    assert settings.timeout == 30.0
    assert settings.email_block == "carbon-mapper-email"
    assert settings.password_block == "carbon-mapper-password"
    assert settings.token_block == "carbon-mapper-stac-token"
    assert settings.token_lifetime_days == 14
    assert settings.max_attempts == 4
    assert settings.retry_backoff == 1.0
    assert settings.retry_after_cap == 60.0


def test_environment_overrides_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CM_BASE_URL": "https://staging.example.org/api/v1/",
        "CM_TIMEOUT": "12.5",
        "CM_EMAIL_BLOCK": "my-email",
        "CM_PASSWORD_BLOCK": "my-password",
        "CM_TOKEN_BLOCK": "my-token-2",
        "CM_TOKEN_LIFETIME_DAYS": "7",
        "CM_MAX_ATTEMPTS": "2",
        "CM_RETRY_BACKOFF": "0",
        "CM_RETRY_AFTER_CAP": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.base_url == "https://staging.example.org/api/v1/"
    assert settings.timeout == 12.5
    assert settings.email_block == "my-email"
    assert settings.password_block == "my-password"
    assert settings.token_block == "my-token-2"
    assert settings.token_lifetime_days == 7
    assert settings.max_attempts == 2
    assert settings.retry_backoff == 0.0
    assert settings.retry_after_cap == 5.0


def test_lowercase_environment_variable_names_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("cm_timeout", "9")
    assert load_settings().timeout == 9.0


def test_dotenv_file_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        "CM_TOKEN_LIFETIME_DAYS=21\nCM_TOKEN_BLOCK=from-dotenv\nUNRELATED=1\n", encoding="utf-8"
    )
    settings = load_settings()
    assert settings.token_lifetime_days == 21
    assert settings.token_block == "from-dotenv"


def test_environment_beats_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("CM_TIMEOUT=11\n", encoding="utf-8")
    monkeypatch.setenv("CM_TIMEOUT", "22")
    assert load_settings().timeout == 22.0


def test_invalid_dotenv_value_is_a_configuration_error(clean_env: Path) -> None:
    (clean_env / ".env").write_text("CM_TIMEOUT=forever-and-ever\n", encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "CM_TIMEOUT" in str(info.value)
    assert "forever-and-ever" not in str(info.value)


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_TIMEOUT", "22")
    assert load_settings(timeout=3).timeout == 3.0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.example.org/api/v1", "https://api.example.org/api/v1/"),
        ("https://api.example.org/api/v1/", "https://api.example.org/api/v1/"),
        ("  https://api.example.org/api/v1  ", "https://api.example.org/api/v1/"),
        ("http://127.0.0.1:8000/api/v1", "http://127.0.0.1:8000/api/v1/"),
    ],
)
def test_base_url_gets_one_trailing_slash(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("CM_BASE_URL", given)
    assert load_settings().base_url == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CM_TIMEOUT", "abc"),
        ("CM_TIMEOUT", "0"),
        ("CM_TIMEOUT", "-98765"),
        ("CM_TIMEOUT", "98765"),
        ("CM_TOKEN_LIFETIME_DAYS", "0"),
        ("CM_TOKEN_LIFETIME_DAYS", "400"),
        ("CM_TOKEN_LIFETIME_DAYS", "fortnight"),
        ("CM_MAX_ATTEMPTS", "0"),
        ("CM_MAX_ATTEMPTS", "11"),
        ("CM_RETRY_BACKOFF", "-1"),
        ("CM_RETRY_AFTER_CAP", "99999"),
        ("CM_BASE_URL", "not-a-url"),
        ("CM_BASE_URL", "ftp://x"),
        ("CM_BASE_URL", "https://"),
        ("CM_BASE_URL", "https://alice:hunter2secret@api.example.org/api/v1/"),
        ("CM_BASE_URL", "https://tokenonly4242@api.example.org/api/v1/"),
        ("CM_TOKEN_BLOCK", "My-Token"),
        ("CM_EMAIL_BLOCK", "carbon mapper email"),
        ("CM_PASSWORD_BLOCK", "pass_word"),
        ("CM_TOKEN_BLOCK", "   "),
    ],
)
def test_invalid_value_names_the_variable(variable: str, value: str) -> None:
    error = config_error(**{variable: value})
    message = str(error)
    assert variable in message
    assert "Invalid cm-tasks setting" in message
    # the pydantic error (which holds the input) is not chained
    assert error.__cause__ is None
    assert error.__suppress_context__ is True


@pytest.mark.parametrize(
    ("variable", "value", "secret_parts"),
    [
        ("CM_TIMEOUT", "abc", ["abc"]),
        ("CM_TIMEOUT", "-98765", ["98765"]),
        ("CM_TOKEN_LIFETIME_DAYS", "400", ["400"]),
        ("CM_TOKEN_LIFETIME_DAYS", "fortnight", ["fortnight"]),
        ("CM_BASE_URL", "not-a-url", ["not-a-url"]),
        ("CM_BASE_URL", "ftp://x", ["ftp://x"]),
        (
            "CM_BASE_URL",
            "https://alice:hunter2secret@api.example.org/api/v1/",
            ["hunter2secret", "alice"],
        ),
        ("CM_BASE_URL", "https://tokenonly4242@api.example.org/api/v1/", ["tokenonly4242"]),
    ],
)
def test_invalid_value_is_not_echoed(variable: str, value: str, secret_parts: list[str]) -> None:
    error = config_error(**{variable: value})
    for part in secret_parts:
        assert part not in str(error)
        assert part not in repr(error)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CM_TOKEN_BLOCK", "My-Secret-Block"), ("CM_EMAIL_BLOCK", "carbon mapper email")],
)
def test_invalid_block_name_is_not_echoed(variable: str, value: str) -> None:
    error = config_error(**{variable: value})
    assert value not in str(error)


def test_several_invalid_values_are_all_named() -> None:
    error = config_error(CM_TIMEOUT="abc", CM_TOKEN_LIFETIME_DAYS="0", CM_BASE_URL="ftp://x")
    message = str(error)
    assert "CM_TIMEOUT" in message
    assert "CM_TOKEN_LIFETIME_DAYS" in message
    assert "CM_BASE_URL" in message


def test_configuration_error_is_a_value_error_and_a_package_error() -> None:
    error = config_error(CM_TIMEOUT="abc")
    assert isinstance(error, ValueError)
    assert isinstance(error, CarbonMapperError)


@pytest.mark.parametrize(
    "url",
    ["http://api.example.org/api/v1/", "http://10.1.2.3:8000/api/v1/", "http://localhost.evil/"],
)
def test_plain_http_to_a_remote_host_warns(url: str) -> None:
    caught = insecure_warnings(url)
    assert len(caught) == 1
    assert "https://" in str(caught[0].message)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/api/v1/",
        "http://127.5.6.7/api/v1/",
        "http://localhost:8000/api/v1/",
        "http://[::1]:8080/api/v1/",
        "https://api.example.org/api/v1/",
    ],
)
def test_loopback_or_https_does_not_warn(url: str) -> None:
    assert insecure_warnings(url) == []


def test_insecure_warning_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_BASE_URL", "http://api.example.org/api/v1")
    with pytest.warns(InsecureBaseURLWarning, match=r"api\.example\.org"):
        settings = load_settings()
    assert settings.base_url == "http://api.example.org/api/v1/"


def test_settings_class_reads_environment_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_TOKEN_LIFETIME_DAYS", "30")
    assert CarbonMapperSettings().token_lifetime_days == 30


@pytest.mark.parametrize(
    ("name", "expected"),
    [("carbon-mapper-stac-token", "carbon-mapper-stac-token"), ("  abc-1  ", "abc-1")],
)
def test_validate_block_name_accepts(name: str, expected: str) -> None:
    assert validate_block_name(name) == expected


@pytest.mark.parametrize("name", ["", "   ", "Upper", "with space", "under_score", "émoji", "a.b"])
def test_validate_block_name_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="block name"):
        validate_block_name(name)


def test_the_reference_table_lists_every_setting_with_its_default() -> None:
    # docs/reference.md is what users configure from: each CM_* row must be a real setting
    # with the stated default, and every setting must have a row.
    reference = REPO_ROOT / "docs" / "reference.md"
    rows = re.findall(r"^\| `(CM_[A-Z_]+)` \| `([^`]*)` \|", reference.read_text(), re.M)
    documented = {name: default for name, default in rows}
    fields = CarbonMapperSettings.model_fields
    assert set(documented) == {f"CM_{name.upper()}" for name in fields}
    for name, field in fields.items():
        stated = documented[f"CM_{name.upper()}"]
        default = field.default
        if isinstance(default, float) and default.is_integer():
            default = int(default)
        assert stated == str(default), f"CM_{name.upper()}: docs say {stated!r}, code {default!r}"
