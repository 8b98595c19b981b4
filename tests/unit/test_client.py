"""Tests of `CarbonMapperClient` against scripted `httpx.MockTransport` answers."""

from __future__ import annotations

import email.utils
import json
import os
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cm_tasks._version import __version__
from cm_tasks.client import (
    CREATE_STAC_PATH,
    TOKEN_PAIR_PATH,
    CarbonMapperClient,
    IssuedStacToken,
    TokenPair,
)
from cm_tasks.errors import (
    APIUnavailableError,
    BadCredentialsError,
    CarbonMapperAPIError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from cm_tasks.retry import RetryPolicy
from cm_tasks.settings import load_settings
from cm_tasks.testing import _jwt

BASE_URL = "https://api.example.test/api/v1/"
EMAIL = "sentinel.user@example.org"
PASSWORD = "Sentinel-Pa55word-QZX"
ACCESS = "sentinel-access-token-7f3a9c"
REFRESH = "sentinel-refresh-token-1b2c3d"
STAC_OPAQUE = "sentinel-opaque-stac-token-8e8e"
KEY = b"test-signing-key"
REQUESTED = date(2030, 1, 15)
SECRETS = (PASSWORD, ACCESS, REFRESH, STAC_OPAQUE)

Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Script:
    """A MockTransport handler that answers with scripted steps and records every request."""

    def __init__(self, *steps: Step, repeat_last: bool = False) -> None:
        self.steps = list(steps)
        self.repeat_last = repeat_last
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        index = len(self.requests) - 1
        if index >= len(self.steps):
            if not self.repeat_last:
                raise AssertionError(f"unexpected request #{index + 1} to {request.url}")
            index = len(self.steps) - 1
        step = self.steps[index]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        return step(request)

    @property
    def calls(self) -> int:
        return len(self.requests)


class Recorder:
    """Stands in for both `sleep` and the logger: remembers, never waits."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.warnings: list[str] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def warning(self, msg: str, *args: Any) -> None:
        self.warnings.append(msg % args)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_client(recorder: Recorder) -> Iterator[Callable[..., CarbonMapperClient]]:
    clients: list[CarbonMapperClient] = []

    def make(
        script: Script,
        *,
        retry: RetryPolicy | None = None,
        base_url: str = BASE_URL,
        timeout: float = 30.0,
    ) -> CarbonMapperClient:
        client = CarbonMapperClient(
            base_url,
            timeout=timeout,
            retry=retry or RetryPolicy(max_attempts=4, backoff=1.0, jitter=0),
            transport=httpx.MockTransport(script),
            logger=recorder,
            sleep=recorder.sleep,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def pair_ok() -> httpx.Response:
    return httpx.Response(200, json={"access": ACCESS, "refresh": REFRESH, "email": EMAIL})


def stac_ok(**body: Any) -> httpx.Response:
    return httpx.Response(200, json={"token_value": STAC_OPAQUE, **body})


def jwt(**claims: Any) -> str:
    return _jwt.encode_hs256(claims, KEY)


def ts(value: datetime) -> int:
    return int(value.timestamp())


def get_pair(client: CarbonMapperClient) -> TokenPair:
    return client.get_token_pair(SecretStr(EMAIL), SecretStr(PASSWORD))


def create_stac(
    client: CarbonMapperClient, name: str = "ingest-token", expiration: date = REQUESTED
) -> IssuedStacToken:
    return client.create_stac_token(SecretStr(ACCESS), name, expiration)


CALLS: dict[str, Callable[[CarbonMapperClient], object]] = {
    TOKEN_PAIR_PATH: get_pair,
    CREATE_STAC_PATH: create_stac,
}


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in (*SECRETS, EMAIL):
            assert secret not in text, f"secret leaked into {text!r}"


# --- success: token/pair ---------------------------------------------------------------


def test_get_token_pair_sends_credentials_as_json(make_client: Callable[..., Any]) -> None:
    script = Script(pair_ok())
    pair = get_pair(make_client(script))

    assert script.calls == 1
    request = script.requests[0]
    assert request.method == "POST"
    assert str(request.url) == BASE_URL + "token/pair"
    assert json.loads(request.content) == {"email": EMAIL, "password": PASSWORD}
    assert request.headers["User-Agent"] == f"cm-tasks/{__version__}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert "Authorization" not in request.headers

    assert isinstance(pair, TokenPair)
    assert pair.access.get_secret_value() == ACCESS
    assert pair.refresh is not None
    assert pair.refresh.get_secret_value() == REFRESH


@pytest.mark.parametrize("body", [{"access": ACCESS}, {"access": ACCESS, "refresh": 42}])
def test_get_token_pair_without_usable_refresh(
    make_client: Callable[..., Any], body: dict[str, Any]
) -> None:
    pair = get_pair(make_client(Script(httpx.Response(200, json=body))))
    assert pair.access.get_secret_value() == ACCESS
    assert pair.refresh is None


def test_base_url_without_trailing_slash_is_normalised(make_client: Callable[..., Any]) -> None:
    script = Script(pair_ok())
    client = make_client(script, base_url="https://api.example.test/api/v1")
    assert client.base_url == BASE_URL
    get_pair(client)
    assert str(script.requests[0].url) == "https://api.example.test/api/v1/token/pair"


# --- success: create-stac --------------------------------------------------------------


def test_create_stac_token_sends_bearer_and_json(make_client: Callable[..., Any]) -> None:
    script = Script(stac_ok(name="ingest-token", expiration_date="2030-01-15"))
    issued = create_stac(make_client(script), "ingest-token", date(2030, 1, 15))

    assert script.calls == 1
    request = script.requests[0]
    assert request.method == "POST"
    assert str(request.url) == BASE_URL + "account/tokens/create-stac"
    assert request.headers["Authorization"] == f"Bearer {ACCESS}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"cm-tasks/{__version__}"
    assert json.loads(request.content) == {"name": "ingest-token", "expiration_date": "2030-01-15"}

    assert isinstance(issued, IssuedStacToken)
    assert issued.token.get_secret_value() == STAC_OPAQUE
    assert issued.name == "ingest-token"


def test_expiry_comes_from_jwt_exp(make_client: Callable[..., Any]) -> None:
    exp = datetime(2030, 1, 14, 17, 30, 5, tzinfo=timezone.utc)
    token = jwt(exp=ts(exp), iat=ts(exp - timedelta(days=7)), scope="stac catalog:read")
    # a different expiration_date in the body must not win over the exact claim
    script = Script(
        httpx.Response(200, json={"token_value": token, "expiration_date": "2031-01-01"})
    )
    issued = create_stac(make_client(script))
    assert issued.expires_at == exp
    assert issued.expires_at.tzinfo is not None
    assert issued.expires_at.utcoffset() == timedelta(0)
    assert issued.token.get_secret_value() == token


def test_jwt_exp_as_float(make_client: Callable[..., Any]) -> None:
    token = jwt(exp=1894000000.5)
    issued = create_stac(make_client(Script(httpx.Response(200, json={"token_value": token}))))
    assert issued.expires_at == datetime.fromtimestamp(1894000000.5, timezone.utc)


@pytest.mark.parametrize(
    ("expiration_date", "expected"),
    [
        ("2030-02-01", datetime(2030, 2, 1, tzinfo=timezone.utc)),
        ("2030-02-01T12:34:56Z", datetime(2030, 2, 1, tzinfo=timezone.utc)),
    ],
)
def test_expiry_falls_back_to_expiration_date_when_not_a_jwt(
    make_client: Callable[..., Any], expiration_date: str, expected: datetime
) -> None:
    issued = create_stac(make_client(Script(stac_ok(expiration_date=expiration_date))))
    assert issued.expires_at == expected


def test_expiry_falls_back_to_expiration_date_when_jwt_has_no_exp(
    make_client: Callable[..., Any],
) -> None:
    token = jwt(iat=1_700_000_000, scope="stac")
    body = {"token_value": token, "expiration_date": "2030-03-03"}
    issued = create_stac(make_client(Script(httpx.Response(200, json=body))))
    assert issued.expires_at == datetime(2030, 3, 3, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "body",
    [{}, {"expiration_date": None}, {"expiration_date": "soon"}, {"expiration_date": 20300201}],
    ids=["missing", "null", "garbage", "number"],
)
def test_expiry_falls_back_to_requested_date(
    make_client: Callable[..., Any], body: dict[str, Any]
) -> None:
    issued = create_stac(make_client(Script(stac_ok(**body))), expiration=date(2030, 4, 5))
    assert issued.expires_at == datetime(2030, 4, 5, 0, 0, tzinfo=timezone.utc)


def test_scopes_from_body_list_win_over_jwt(make_client: Callable[..., Any]) -> None:
    token = jwt(exp=1_900_000_000, scope="jwt-scope")
    body = {"token_value": token, "scopes": ["stac", "catalog:read"]}
    issued = create_stac(make_client(Script(httpx.Response(200, json=body))))
    assert issued.scopes == ["stac", "catalog:read"]


def test_scopes_from_jwt_scope_claim(make_client: Callable[..., Any]) -> None:
    token = jwt(exp=1_900_000_000, scope="stac catalog:read")
    issued = create_stac(make_client(Script(httpx.Response(200, json={"token_value": token}))))
    assert issued.scopes == ["stac", "catalog:read"]


@pytest.mark.parametrize("body", [{}, {"scopes": "stac catalog:read"}, {"scopes": None}])
def test_no_scopes_when_neither_body_list_nor_jwt(
    make_client: Callable[..., Any], body: dict[str, Any]
) -> None:
    issued = create_stac(make_client(Script(stac_ok(**body))))
    assert issued.scopes == []


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        ("2030-01-08T10:00:00Z", datetime(2030, 1, 8, 10, tzinfo=timezone.utc)),
        ("2030-01-08T10:00:00", datetime(2030, 1, 8, 10, tzinfo=timezone.utc)),
        ("2030-01-08T12:00:00+02:00", datetime(2030, 1, 8, 10, tzinfo=timezone.utc)),
        ("2030-01-08T10:00:00.123456Z", datetime(2030, 1, 8, 10, 0, 0, 123456, timezone.utc)),
    ],
)
def test_created_at_from_body(
    make_client: Callable[..., Any], created: str, expected: datetime
) -> None:
    token = jwt(exp=1_900_000_000, iat=1_000_000_000)
    body = {"token_value": token, "created": created}
    issued = create_stac(make_client(Script(httpx.Response(200, json=body))))
    assert issued.created_at == expected
    assert issued.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("body", [{}, {"created": "yesterday"}, {"created": 5}])
def test_created_at_from_jwt_iat(make_client: Callable[..., Any], body: dict[str, Any]) -> None:
    iat = datetime(2030, 1, 8, 9, 0, tzinfo=timezone.utc)
    token = jwt(exp=ts(iat + timedelta(days=7)), iat=ts(iat))
    full = {"token_value": token, **body}
    issued = create_stac(make_client(Script(httpx.Response(200, json=full))))
    assert issued.created_at == iat


def test_created_at_defaults_to_now(make_client: Callable[..., Any]) -> None:
    before = datetime.now(timezone.utc)
    issued = create_stac(make_client(Script(stac_ok())))
    after = datetime.now(timezone.utc)
    assert before <= issued.created_at <= after


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"name": "platform-name"}, "platform-name"),
        ({}, "requested-name"),
        ({"name": ""}, "requested-name"),
        ({"name": None}, "requested-name"),
        ({"name": 7}, "requested-name"),
    ],
)
def test_name_from_body_or_requested(
    make_client: Callable[..., Any], body: dict[str, Any], expected: str
) -> None:
    issued = create_stac(make_client(Script(stac_ok(**body))), name="requested-name")
    assert issued.name == expected


# --- error mapping ---------------------------------------------------------------------

NO_RETRY = RetryPolicy(max_attempts=1)

ERROR_CASES: list[tuple[int, type[CarbonMapperAPIError]]] = [
    (400, InvalidRequestError),
    (403, PermissionDeniedError),
    (404, InvalidRequestError),
    (405, InvalidRequestError),
    (422, InvalidRequestError),
    (429, RateLimitedError),
    (500, APIUnavailableError),
    (502, APIUnavailableError),
    (503, APIUnavailableError),
    (504, APIUnavailableError),
    (418, UnexpectedResponseError),
]


@pytest.mark.parametrize("endpoint", [TOKEN_PAIR_PATH, CREATE_STAC_PATH])
@pytest.mark.parametrize(("status", "expected"), ERROR_CASES)
def test_status_maps_to_error(
    make_client: Callable[..., Any],
    endpoint: str,
    status: int,
    expected: type[CarbonMapperAPIError],
) -> None:
    script = Script(httpx.Response(status, json={"detail": "nope"}))
    with pytest.raises(expected) as info:
        CALLS[endpoint](make_client(script, retry=NO_RETRY))
    error = info.value
    assert type(error) is expected
    assert error.status_code == status
    assert error.endpoint == endpoint
    assert str(status) in str(error)
    assert endpoint in str(error)
    assert script.calls == 1


def test_401_from_token_pair_is_bad_credentials(make_client: Callable[..., Any]) -> None:
    body = {
        "detail": "No active account found with the given credentials",
        "code": "authentication_failed",
    }
    with pytest.raises(BadCredentialsError) as info:
        get_pair(make_client(Script(httpx.Response(401, json=body))))
    assert isinstance(info.value, UnauthorizedError)
    assert info.value.status_code == 401
    assert info.value.endpoint == TOKEN_PAIR_PATH
    assert "No active account found" in str(info.value)


def test_401_from_create_stac_is_unauthorized_not_bad_credentials(
    make_client: Callable[..., Any],
) -> None:
    body = {"detail": "Given token not valid for any token type"}
    with pytest.raises(UnauthorizedError) as info:
        create_stac(make_client(Script(httpx.Response(401, json=body))))
    assert not isinstance(info.value, BadCredentialsError)
    assert info.value.status_code == 401
    assert info.value.endpoint == CREATE_STAC_PATH
    assert "Given token not valid" in str(info.value)


@pytest.mark.parametrize("endpoint", [TOKEN_PAIR_PATH, CREATE_STAC_PATH])
def test_422_django_ninja_detail_list(make_client: Callable[..., Any], endpoint: str) -> None:
    body = {
        "detail": [
            {"type": "missing", "loc": ["body", "payload", "name"], "msg": "Field required"},
            {"type": "value_error", "loc": [], "msg": "Something else"},
            {"type": "odd"},
        ]
    }
    with pytest.raises(InvalidRequestError) as info:
        CALLS[endpoint](make_client(Script(httpx.Response(422, json=body))))
    assert "name: Field required" in info.value.api_message
    assert "Something else" in info.value.api_message
    assert "name: Field required" in str(info.value)
    assert info.value.status_code == 422


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"message": "Bad payload"}, "Bad payload"),
        ({"messages": [{"message": "first"}, {"message": "second"}]}, "first; second"),
        ({"detail": 42}, ""),
        (["not", "an", "object"], ""),
    ],
)
def test_invalid_request_api_message_forms(
    make_client: Callable[..., Any], body: Any, expected: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        create_stac(make_client(Script(httpx.Response(400, json=body))))
    assert info.value.api_message == expected


def test_invalid_request_with_non_json_body_has_empty_api_message(
    make_client: Callable[..., Any],
) -> None:
    response = httpx.Response(
        404, text="<html>Not Found</html>", headers={"Content-Type": "text/html"}
    )
    with pytest.raises(InvalidRequestError) as info:
        create_stac(make_client(Script(response)))
    assert info.value.api_message == ""
    assert "<html>" not in str(info.value)


def test_long_api_message_is_truncated(make_client: Callable[..., Any]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        create_stac(make_client(Script(httpx.Response(400, json={"detail": "y" * 5000}))))
    assert len(info.value.api_message) == 303
    assert info.value.api_message.endswith("...")
    assert len(str(info.value)) < 600


def test_429_retry_after_seconds(make_client: Callable[..., Any]) -> None:
    response = httpx.Response(429, headers={"Retry-After": "17"})
    with pytest.raises(RateLimitedError) as info:
        get_pair(make_client(Script(response), retry=NO_RETRY))
    assert info.value.retry_after == 17.0
    assert info.value.status_code == 429
    assert info.value.endpoint == TOKEN_PAIR_PATH
    assert "17 s" in str(info.value)


def test_429_retry_after_http_date(make_client: Callable[..., Any]) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    response = httpx.Response(429, headers={"Retry-After": email.utils.format_datetime(when, True)})
    with pytest.raises(RateLimitedError) as info:
        create_stac(make_client(Script(response), retry=NO_RETRY))
    assert info.value.retry_after is not None
    assert 100 <= info.value.retry_after <= 120


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("soon", None),
        ("-5", 0.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_429_retry_after_odd_values(
    make_client: Callable[..., Any], header: str | None, expected: float | None
) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    with pytest.raises(RateLimitedError) as info:
        get_pair(make_client(Script(httpx.Response(429, headers=headers)), retry=NO_RETRY))
    assert info.value.retry_after == expected


def test_502_html_body_is_unavailable(make_client: Callable[..., Any]) -> None:
    html = "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    response = httpx.Response(502, text=html, headers={"Content-Type": "text/html"})
    with pytest.raises(APIUnavailableError) as info:
        get_pair(make_client(Script(response), retry=NO_RETRY))
    assert info.value.status_code == 502
    assert "Bad Gateway" in str(info.value)
    assert "<html>" not in str(info.value)


# --- malformed 2xx ---------------------------------------------------------------------

MALFORMED_PAIR = {
    "html": httpx.Response(200, text="<html>login</html>", headers={"Content-Type": "text/html"}),
    "invalid-json": httpx.Response(
        200, text="{not json", headers={"Content-Type": "application/json"}
    ),
    "no-content-type": httpx.Response(200, content=b"plain words"),
    "empty-body": httpx.Response(200, content=b""),
    "bad-utf8": httpx.Response(
        200, content=b"\xff\xfe\xfa", headers={"Content-Type": "application/json"}
    ),
    "json-list": httpx.Response(200, json=[{"access": ACCESS}]),
    "json-string": httpx.Response(200, json="access"),
    "missing-key": httpx.Response(200, json={"refresh": REFRESH}),
    "empty-string": httpx.Response(200, json={"access": ""}),
    "not-a-string": httpx.Response(200, json={"access": 12345}),
    "null": httpx.Response(200, json={"access": None}),
    "201-missing-key": httpx.Response(201, json={}),
}

MALFORMED_STAC = {
    "html": httpx.Response(200, text="<html>hi</html>", headers={"Content-Type": "text/html"}),
    "invalid-json": httpx.Response(200, text="{", headers={"Content-Type": "application/json"}),
    "json-list": httpx.Response(200, json=[]),
    "missing-key": httpx.Response(200, json={"name": "x", "token": STAC_OPAQUE}),
    "empty-string": httpx.Response(200, json={"token_value": ""}),
    "not-a-string": httpx.Response(200, json={"token_value": ["x"]}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_PAIR))
def test_malformed_token_pair_answer(make_client: Callable[..., Any], case: str) -> None:
    response = MALFORMED_PAIR[case]
    script = Script(response)
    with pytest.raises(UnexpectedResponseError) as info:
        get_pair(make_client(script))
    assert info.value.status_code == response.status_code
    assert info.value.endpoint == TOKEN_PAIR_PATH
    assert script.calls == 1  # not retried
    assert info.value.__cause__ is None


@pytest.mark.parametrize("case", sorted(MALFORMED_STAC))
def test_malformed_create_stac_answer(make_client: Callable[..., Any], case: str) -> None:
    script = Script(MALFORMED_STAC[case])
    with pytest.raises(UnexpectedResponseError) as info:
        create_stac(make_client(script))
    assert info.value.endpoint == CREATE_STAC_PATH
    assert script.calls == 1


def test_html_answer_message_hints_at_base_url(make_client: Callable[..., Any]) -> None:
    with pytest.raises(UnexpectedResponseError, match="HTML") as info:
        get_pair(make_client(Script(MALFORMED_PAIR["html"])))
    assert "CM_BASE_URL" in str(info.value)


def test_missing_key_message_names_the_key(make_client: Callable[..., Any]) -> None:
    with pytest.raises(UnexpectedResponseError, match="'token_value'"):
        create_stac(make_client(Script(MALFORMED_STAC["missing-key"])))


# --- transport errors ------------------------------------------------------------------

TRANSPORT_ERRORS: dict[str, Callable[[], Exception]] = {
    "connect": lambda: httpx.ConnectError("[Errno 111] Connection refused"),
    "connect-timeout": lambda: httpx.ConnectTimeout("timed out"),
    "read-timeout": lambda: httpx.ReadTimeout("timed out"),
    "remote-protocol": lambda: httpx.RemoteProtocolError("peer closed connection"),
    "read-error": lambda: httpx.ReadError("connection reset"),
}


@pytest.mark.parametrize("endpoint", [TOKEN_PAIR_PATH, CREATE_STAC_PATH])
@pytest.mark.parametrize("kind", sorted(TRANSPORT_ERRORS))
def test_transport_error_is_unavailable_without_chaining(
    make_client: Callable[..., Any], endpoint: str, kind: str
) -> None:
    script = Script(TRANSPORT_ERRORS[kind]())
    with pytest.raises(APIUnavailableError) as info:
        CALLS[endpoint](make_client(script, retry=NO_RETRY))
    error = info.value
    assert error.status_code is None
    assert error.endpoint == endpoint
    assert endpoint in str(error)
    # the httpx error holds the request, and the request holds the password or token: it is
    # not even kept as the (suppressed) __context__
    assert error.__cause__ is None
    assert error.__context__ is None
    assert script.calls == 1


def test_read_timeout_message_names_cm_timeout(make_client: Callable[..., Any]) -> None:
    with pytest.raises(APIUnavailableError, match=r"CM_TIMEOUT=7\.0s"):
        get_pair(make_client(Script(httpx.ReadTimeout("slow")), retry=NO_RETRY, timeout=7.0))


def test_connect_error_message_names_base_url(make_client: Callable[..., Any]) -> None:
    with pytest.raises(APIUnavailableError, match=r"api\.example\.test") as info:
        get_pair(make_client(Script(httpx.ConnectError("refused")), retry=NO_RETRY))
    assert "ConnectError" in str(info.value)


def test_undecodable_body_is_a_typed_error(make_client: Callable[..., Any]) -> None:
    response = httpx.Response(
        200,
        stream=httpx.ByteStream(b"definitely not gzip"),  # decoded only when the client reads
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    with pytest.raises(UnexpectedResponseError, match="could not be read"):
        get_pair(make_client(Script(response), retry=NO_RETRY))


@pytest.mark.parametrize("payload", ['{"exp":1e20}', '{"exp":NaN}', '{"exp":1,"iat":-1e20}'])
def test_absurd_jwt_claims_do_not_crash(make_client: Callable[..., Any], payload: str) -> None:
    header = _jwt._b64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    token = f"{header}.{_jwt._b64url_encode(payload.encode())}.c2ln"
    script = Script(httpx.Response(200, json={"token_value": token}))
    try:
        issued = create_stac(make_client(script))
    except CarbonMapperAPIError:
        return
    assert issued.expires_at.year >= 1970


# --- retries through the client --------------------------------------------------------


def test_503_is_retried_then_succeeds(make_client: Callable[..., Any], recorder: Recorder) -> None:
    script = Script(httpx.Response(503), httpx.Response(503), pair_ok())
    pair = get_pair(make_client(script, retry=RetryPolicy(max_attempts=4, backoff=1, jitter=0)))
    assert pair.access.get_secret_value() == ACCESS
    assert script.calls == 3
    assert recorder.sleeps == [1.0, 2.0]
    assert len(recorder.warnings) == 2
    assert "attempt 2 of 4" in recorder.warnings[0]
    assert "attempt 3 of 4" in recorder.warnings[1]
    # the body is sent whole on every attempt
    bodies = [json.loads(r.content) for r in script.requests]
    assert bodies == [{"email": EMAIL, "password": PASSWORD}] * 3


def test_429_honours_retry_after(make_client: Callable[..., Any], recorder: Recorder) -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "5"}), stac_ok())
    issued = create_stac(make_client(script, retry=RetryPolicy(backoff=1, jitter=0)))
    assert issued.token.get_secret_value() == STAC_OPAQUE
    assert script.calls == 2
    assert recorder.sleeps == [5.0]
    assert all(r.headers["Authorization"] == f"Bearer {ACCESS}" for r in script.requests)


def test_429_retry_after_is_capped(make_client: Callable[..., Any], recorder: Recorder) -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "86400"}), pair_ok())
    get_pair(make_client(script, retry=RetryPolicy(retry_after_cap=60.0, jitter=0)))
    assert script.calls == 2
    assert recorder.sleeps == [60.0]


def test_429_without_retry_after_uses_backoff(
    make_client: Callable[..., Any], recorder: Recorder
) -> None:
    script = Script(httpx.Response(429), pair_ok())
    get_pair(make_client(script, retry=RetryPolicy(backoff=0.5, jitter=0)))
    assert recorder.sleeps == [0.5]


def test_connect_error_is_retried(make_client: Callable[..., Any], recorder: Recorder) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), stac_ok())
    issued = create_stac(make_client(script, retry=RetryPolicy(backoff=2, jitter=0)))
    assert issued.token.get_secret_value() == STAC_OPAQUE
    assert script.calls == 3
    assert recorder.sleeps == [2.0, 4.0]


# create-stac makes a new token per call: after these the API may have made one already
MAYBE_PROCESSED: dict[str, Callable[[], Step]] = {
    "read-timeout": lambda: httpx.ReadTimeout("timed out"),
    "write-timeout": lambda: httpx.WriteTimeout("timed out"),
    "reset-after-sending": lambda: httpx.RemoteProtocolError("peer closed connection"),
    "read-error": lambda: httpx.ReadError("connection reset"),
    "500": lambda: httpx.Response(500),
    "502": lambda: httpx.Response(502),
    "504": lambda: httpx.Response(504),
}
# ...and after these it certainly did not
UNPROCESSED: dict[str, Callable[[], Step]] = {
    "connect": lambda: httpx.ConnectError("[Errno 111] Connection refused"),
    "connect-timeout": lambda: httpx.ConnectTimeout("timed out"),
    "pool-timeout": lambda: httpx.PoolTimeout("no free connection"),
    "429": lambda: httpx.Response(429, headers={"Retry-After": "1"}),
    "503": lambda: httpx.Response(503),
}


@pytest.mark.parametrize("fault", sorted(MAYBE_PROCESSED))
def test_create_stac_is_not_retried_when_the_api_may_have_acted(
    make_client: Callable[..., Any], recorder: Recorder, fault: str
) -> None:
    script = Script(MAYBE_PROCESSED[fault](), stac_ok())
    with pytest.raises(APIUnavailableError) as info:
        create_stac(make_client(script, retry=RetryPolicy(max_attempts=4, jitter=0)))
    assert script.calls == 1  # a second call could make a second live token
    assert recorder.sleeps == []
    message = str(info.value)
    assert CREATE_STAC_PATH in message
    assert "may have created the token" in message
    assert "Run the refresh again" in message
    assert info.value.__context__ is None


@pytest.mark.parametrize("fault", sorted(UNPROCESSED))
def test_create_stac_is_retried_when_the_api_cannot_have_acted(
    make_client: Callable[..., Any], fault: str
) -> None:
    script = Script(UNPROCESSED[fault](), stac_ok())
    issued = create_stac(make_client(script, retry=RetryPolicy(max_attempts=4, jitter=0)))
    assert issued.token.get_secret_value() == STAC_OPAQUE
    assert script.calls == 2


@pytest.mark.parametrize("fault", sorted({**MAYBE_PROCESSED, **UNPROCESSED}))
def test_token_pair_is_retried_after_every_transient_fault(
    make_client: Callable[..., Any], fault: str
) -> None:
    # token/pair only hands out a short-lived access token: asking twice does no harm
    step = {**MAYBE_PROCESSED, **UNPROCESSED}[fault]()
    script = Script(step, pair_ok())
    pair = get_pair(make_client(script, retry=RetryPolicy(max_attempts=4, jitter=0)))
    assert pair.access.get_secret_value() == ACCESS
    assert script.calls == 2


def test_create_stac_fails_clearly_when_a_retried_call_then_times_out(
    make_client: Callable[..., Any],
) -> None:
    script = Script(httpx.Response(503), httpx.ReadTimeout("slow"), stac_ok())
    with pytest.raises(APIUnavailableError, match="may have created the token"):
        create_stac(make_client(script, retry=RetryPolicy(max_attempts=4, jitter=0)))
    assert script.calls == 2


@pytest.mark.parametrize("endpoint", [TOKEN_PAIR_PATH, CREATE_STAC_PATH])
@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(400, json={"detail": "bad"}),
        httpx.Response(401, json={"detail": "bad"}),
        httpx.Response(403, json={"detail": "bad"}),
        httpx.Response(404, json={"detail": "bad"}),
        httpx.Response(422, json={"detail": []}),
        httpx.Response(418),
        httpx.Response(200, text="<html/>", headers={"Content-Type": "text/html"}),
        httpx.Response(200, json={}),
    ],
    ids=["400", "401", "403", "404", "422", "418", "200-html", "200-empty"],
)
def test_permanent_failures_make_exactly_one_call(
    make_client: Callable[..., Any], recorder: Recorder, endpoint: str, response: httpx.Response
) -> None:
    script = Script(response, repeat_last=True)
    with pytest.raises(CarbonMapperAPIError) as info:
        CALLS[endpoint](make_client(script, retry=RetryPolicy(max_attempts=5)))
    assert not info.value.transient
    assert script.calls == 1
    assert recorder.sleeps == []
    assert recorder.warnings == []


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_attempts_exhausted_raises_after_max_attempts(
    make_client: Callable[..., Any], recorder: Recorder, max_attempts: int
) -> None:
    script = Script(httpx.Response(503), repeat_last=True)
    retry = RetryPolicy(max_attempts=max_attempts, backoff=1, jitter=0)
    with pytest.raises(APIUnavailableError):
        get_pair(make_client(script, retry=retry))
    assert script.calls == max_attempts
    assert recorder.sleeps == [2.0**i for i in range(max_attempts - 1)]


def test_exhausted_raises_the_last_error(make_client: Callable[..., Any]) -> None:
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(502),
        httpx.Response(504),
        pair_ok(),
    )
    with pytest.raises(APIUnavailableError) as info:
        get_pair(make_client(script, retry=RetryPolicy(max_attempts=4, jitter=0)))
    assert info.value.status_code == 504
    assert script.calls == 4


def test_transient_then_permanent_stops(
    make_client: Callable[..., Any], recorder: Recorder
) -> None:
    script = Script(httpx.Response(500), httpx.Response(401), pair_ok())
    with pytest.raises(BadCredentialsError):
        get_pair(make_client(script, retry=RetryPolicy(max_attempts=4, jitter=0)))
    assert script.calls == 2
    assert recorder.sleeps == [1.0]


def test_from_settings_uses_retry_and_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recorder: Recorder
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.upper().startswith("CM_"):
            monkeypatch.delenv(name)
    settings = load_settings(
        base_url="https://api.example.test/api/v1",
        timeout=8,
        max_attempts=2,
        retry_backoff=0.25,
        retry_after_cap=9,
    )
    script = Script(httpx.Response(503), repeat_last=True)
    with CarbonMapperClient.from_settings(
        settings, transport=httpx.MockTransport(script), sleep=recorder.sleep, logger=recorder
    ) as client:
        assert client.base_url == BASE_URL
        assert client.retry.max_attempts == 2
        assert client.retry.backoff == 0.25
        assert client.retry.retry_after_cap == 9
        with pytest.raises(APIUnavailableError):
            get_pair(client)
    assert script.calls == 2
    assert len(recorder.sleeps) == 1
    assert 0.2 <= recorder.sleeps[0] <= 0.3


def test_context_manager_closes_the_pool() -> None:
    with CarbonMapperClient(BASE_URL, transport=httpx.MockTransport(Script())) as client:
        assert not client._http.is_closed
    assert client._http.is_closed


# --- secrets never leak ----------------------------------------------------------------


def _echoing_422() -> httpx.Response:
    detail = [{"loc": ["body", "payload", "password"], "msg": f"'{PASSWORD}' is too weak"}]
    return httpx.Response(422, json={"detail": detail})


PAIR_LEAKS: dict[str, Callable[[], Step]] = {
    "400-detail": lambda: httpx.Response(
        400, json={"detail": f"bad password {PASSWORD} for {EMAIL}"}
    ),
    "401-detail": lambda: httpx.Response(401, json={"detail": f"no account {EMAIL}/{PASSWORD}"}),
    "403-message": lambda: httpx.Response(403, json={"message": f"password={PASSWORD}"}),
    "404-messages": lambda: httpx.Response(
        404, json={"messages": [{"message": PASSWORD}, {"message": EMAIL}]}
    ),
    "422-detail-list": _echoing_422,
    "422-loc-is-secret": lambda: httpx.Response(
        422, json={"detail": [{"loc": ["body", PASSWORD], "msg": "bad"}]}
    ),
    "400-truncation-edge": lambda: httpx.Response(400, json={"detail": "x" * 290 + PASSWORD}),
    "418": lambda: httpx.Response(418, json={"detail": PASSWORD}),
    "429": lambda: httpx.Response(429, json={"detail": PASSWORD}, headers={"Retry-After": "3"}),
    "500": lambda: httpx.Response(500, json={"detail": PASSWORD}),
    "502-html": lambda: httpx.Response(
        502, text=f"<html>{PASSWORD}</html>", headers={"Content-Type": "text/html"}
    ),
    "200-html": lambda: httpx.Response(
        200, text=f"<html>{PASSWORD}</html>", headers={"Content-Type": "text/html"}
    ),
    "200-bad-json": lambda: httpx.Response(200, text=f"{{{PASSWORD}"),
    "200-missing-key": lambda: httpx.Response(200, json={"password": PASSWORD, "email": EMAIL}),
    "connect-error": lambda: httpx.ConnectError(f"refused {PASSWORD}"),
    "read-timeout": lambda: httpx.ReadTimeout("slow"),
}

STAC_LEAKS: dict[str, Callable[[], Step]] = {
    "400-detail": lambda: httpx.Response(400, json={"detail": f"bad token {ACCESS}"}),
    "401-detail": lambda: httpx.Response(401, json={"detail": f"token {ACCESS} expired"}),
    "403-messages": lambda: httpx.Response(403, json={"messages": [{"message": ACCESS}]}),
    "422-detail-list": lambda: httpx.Response(
        422, json={"detail": [{"loc": ["header", "Authorization"], "msg": f"Bearer {ACCESS}"}]}
    ),
    "429": lambda: httpx.Response(429, json={"detail": ACCESS}),
    "503": lambda: httpx.Response(503, json={"detail": ACCESS}),
    "200-missing-key": lambda: httpx.Response(200, json={"token": STAC_OPAQUE, "a": ACCESS}),
    "200-empty-token": lambda: httpx.Response(200, json={"token_value": "", "a": ACCESS}),
    "connect-error": lambda: httpx.ConnectError(f"refused {ACCESS}"),
    "read-timeout": lambda: httpx.ReadTimeout(f"slow {ACCESS}"),
}


def _leak_check(
    make_client: Callable[..., Any], recorder: Recorder, endpoint: str, step: Step
) -> CarbonMapperAPIError:
    script = Script(step, repeat_last=True)
    with pytest.raises(CarbonMapperAPIError) as info:
        CALLS[endpoint](make_client(script, retry=RetryPolicy(max_attempts=2, jitter=0)))
    error = info.value
    assert_no_secrets(str(error), repr(error), *map(str, error.args), *recorder.warnings)
    assert_no_secrets(getattr(error, "api_message", ""))
    assert error.__cause__ is None
    return error


@pytest.mark.parametrize("case", sorted(PAIR_LEAKS))
def test_token_pair_errors_never_show_secrets(
    make_client: Callable[..., Any], recorder: Recorder, case: str
) -> None:
    error = _leak_check(make_client, recorder, TOKEN_PAIR_PATH, PAIR_LEAKS[case]())
    if case.startswith(("400", "401", "403", "404", "422")):
        # the API's words are kept, with the secret masked rather than dropped
        assert "**********" in str(error)
    if case == "400-truncation-edge":
        assert PASSWORD[:6] not in str(error)


@pytest.mark.parametrize("case", sorted(STAC_LEAKS))
def test_create_stac_errors_never_show_secrets(
    make_client: Callable[..., Any], recorder: Recorder, case: str
) -> None:
    error = _leak_check(make_client, recorder, CREATE_STAC_PATH, STAC_LEAKS[case]())
    if case.startswith(("400", "401", "403", "422")):
        assert "**********" in str(error)


def test_retry_warnings_never_show_secrets(
    make_client: Callable[..., Any], recorder: Recorder
) -> None:
    script = Script(
        httpx.Response(503, json={"detail": PASSWORD}),
        httpx.Response(429, json={"detail": PASSWORD}),
        pair_ok(),
    )
    get_pair(make_client(script))
    assert len(recorder.warnings) == 2
    assert_no_secrets(*recorder.warnings)


def test_overlapping_secrets_are_fully_masked(make_client: Callable[..., Any]) -> None:
    email_ = "ab@c.io"
    password = "Zq9-ab@c.io-Wx7"  # contains the e-mail
    script = Script(httpx.Response(400, json={"detail": f"bad password {password}"}))
    client = make_client(script)
    with pytest.raises(InvalidRequestError) as info:
        client.get_token_pair(SecretStr(email_), SecretStr(password))
    assert "Zq9" not in str(info.value)
    assert "Wx7" not in str(info.value)


def test_result_and_client_reprs_never_show_secrets(make_client: Callable[..., Any]) -> None:
    stac_token = jwt(exp=1_900_000_000, scope="stac")
    script = Script(pair_ok(), httpx.Response(200, json={"token_value": stac_token}))
    client = make_client(script)
    pair = get_pair(client)
    issued = client.create_stac_token(pair.access, "n", REQUESTED)
    texts = [
        repr(pair),
        str(pair),
        pair.model_dump_json(),
        repr(issued),
        str(issued),
        issued.model_dump_json(),
        repr(client),
        str(client),
    ]
    for text in texts:
        assert ACCESS not in text
        assert REFRESH not in text
        assert stac_token not in text
        assert PASSWORD not in text
        assert EMAIL not in text
    assert repr(client) == f"CarbonMapperClient(base_url={BASE_URL!r})"
    assert "**********" in repr(pair)
    assert "**********" in repr(issued)
