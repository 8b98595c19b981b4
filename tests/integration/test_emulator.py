"""Tests of the bundled Carbon Mapper API emulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pystac_client import Client

from cm_tasks._jwt import decode_claims
from cm_tasks.testing import DEMO_EMAIL, CarbonMapperEmulator, Fault, run_emulator
from cm_tasks.testing._jwt import encode_hs256


@pytest.fixture
def emu(carbon_mapper_emulator: CarbonMapperEmulator) -> CarbonMapperEmulator:
    return carbon_mapper_emulator


@pytest.fixture
def client(emu: CarbonMapperEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emu.base_url, timeout=5) as c:
        yield c


def _login(client: httpx.Client, emu: CarbonMapperEmulator) -> httpx.Response:
    return client.post("token/pair", json={"email": emu.email, "password": emu.password})


def _access(client: httpx.Client, emu: CarbonMapperEmulator) -> str:
    response = _login(client, emu)
    response.raise_for_status()
    return str(response.json()["access"])


def _in_days(days: int) -> str:
    return (datetime.now(timezone.utc).date() + timedelta(days=days)).isoformat()


def _create_stac(client: httpx.Client, access: str, **body: Any) -> httpx.Response:
    payload = {"name": "weekly", "expiration_date": _in_days(7), **body}
    return client.post(
        "account/tokens/create-stac", json=payload, headers={"Authorization": f"Bearer {access}"}
    )


@pytest.fixture
def stac_token(client: httpx.Client, emu: CarbonMapperEmulator) -> str:
    response = _create_stac(client, _access(client, emu))
    response.raise_for_status()
    return str(response.json()["token_value"])


# --- token/pair and token/refresh ------------------------------------------------------------


def test_token_pair_issues_short_lived_access_jwt(client, emu):
    response = _login(client, emu)

    assert response.status_code == 200
    body = response.json()
    assert body["email"] == DEMO_EMAIL
    claims = decode_claims(body["access"])
    assert claims is not None
    assert claims["token_type"] == "access"
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 5
    assert {"jti", "user_id"} <= claims.keys()
    assert emu.issued_access_tokens == [body["access"]]
    assert emu.issued_refresh_tokens == [body["refresh"]]


def test_token_pair_rejects_wrong_password_with_ninja_jwt_error(client, emu):
    response = client.post("token/pair", json={"email": emu.email, "password": "nope-secret"})

    assert response.status_code == 401
    assert response.json() == {
        "detail": "No active account found with the given credentials",
        "code": "authentication_failed",
    }
    assert emu.issued_access_tokens == []


@pytest.mark.parametrize(
    ("content", "missing"),
    [
        (json.dumps({"email": "someone@example.org"}), ["password"]),
        (json.dumps({}), ["email", "password"]),
        (json.dumps({"email": 7, "password": "hunter2-secret"}), ["email"]),
        ("not json at all hunter2-secret", None),
    ],
)
def test_token_pair_validation_errors_are_422_without_echo(client, content, missing):
    response = client.post(
        "token/pair", content=content, headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    errors = response.json()["detail"]
    assert isinstance(errors, list)
    if missing is not None:
        assert [e["loc"][-1] for e in errors] == missing
    assert "hunter2-secret" not in response.text
    assert "someone@example.org" not in response.text


def test_add_user_survives_reset(client, emu):
    emu.add_user("second@carbonmapper.example", "another-fake-pass")
    emu.reset()

    response = client.post(
        "token/pair",
        json={"email": "second@carbonmapper.example", "password": "another-fake-pass"},
    )

    assert response.status_code == 200


def test_token_refresh_rotates_and_rejects_garbage(client, emu):
    refresh = _login(client, emu).json()["refresh"]

    ok = client.post("token/refresh", json={"refresh": refresh})
    bad = client.post("token/refresh", json={"refresh": "not-a-token"})
    access_as_refresh = client.post("token/refresh", json={"refresh": ok.json()["access"]})

    assert ok.status_code == 200
    assert set(ok.json()) == {"access", "refresh"}
    assert bad.status_code == access_as_refresh.status_code == 401
    assert bad.json() == {"detail": "Token is invalid or expired", "code": "token_not_valid"}


# --- account/tokens/create-stac ------------------------------------------------------------


def test_create_stac_returns_scoped_jwt_expiring_at_midnight_utc(client, emu):
    expiry = _in_days(7)

    response = _create_stac(client, _access(client, emu), expiration_date=expiry)

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "weekly"
    assert body["expiration_date"] == expiry
    assert body["scopes"] == ["stac", "catalog:read"]
    assert isinstance(body["id"], int)
    assert datetime.fromisoformat(body["created"].replace("Z", "+00:00")).tzinfo is not None
    claims = decode_claims(body["token_value"])
    assert claims is not None
    midnight = datetime.combine(date.fromisoformat(expiry), datetime.min.time(), timezone.utc)
    assert claims["exp"] == int(midnight.timestamp())
    assert claims["scope"] == "stac catalog:read"
    assert claims["token_type"] == "access"
    assert claims["groups"] == "Public"
    assert claims["is_staff"] is False
    assert claims["is_superuser"] is False
    assert emu.issued_stac_tokens == [body["token_value"]]
    assert emu.stac_token_requests == [{"name": "weekly", "expiration_date": expiry}]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer not-a-jwt",
        "Token something",
        "Bearer " + encode_hs256({"token_type": "access", "exp": 2**40}, b"other-key"),
    ],
)
def test_create_stac_requires_a_valid_bearer_access_token(client, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    response = client.post(
        "account/tokens/create-stac",
        json={"name": "x", "expiration_date": _in_days(7)},
        headers=headers,
    )

    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized"}


def test_create_stac_rejects_a_stac_token_as_credentials(client, stac_token):
    response = _create_stac(client, stac_token)

    assert response.status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 101},
        {"name": None},
        {"expiration_date": "07/01/2030"},
        {"expiration_date": "2030-02-30"},
        {"expiration_date": 0},
        {"expiration_date": -3},
        {"expiration_date": 366},
    ],
)
def test_create_stac_rejects_bad_input_with_422(client, emu, body):
    # A day count becomes a date here, not at collection: a run that crosses midnight UTC
    # would otherwise send 366 days ahead of yesterday, which is valid.
    if isinstance(body.get("expiration_date"), int):
        body = {**body, "expiration_date": _in_days(body["expiration_date"])}
    response = _create_stac(client, _access(client, emu), **body)

    assert response.status_code == 422
    errors = response.json()["detail"]
    assert errors
    assert all(e["msg"] for e in errors)
    assert emu.issued_stac_tokens == []


def test_create_stac_accepts_365_days_and_100_char_names(client, emu):
    response = _create_stac(
        client, _access(client, emu), name="n" * 100, expiration_date=_in_days(365)
    )

    assert response.status_code == 200


# --- faults -------------------------------------------------------------------------------


def test_fault_status_default_body_and_times(client, emu):
    emu.fail("token/pair", Fault.status(503, times=2))

    codes = [_login(client, emu).status_code for _ in range(3)]

    assert codes == [503, 503, 200]
    assert emu.requests("token/pair") == 3


def test_fault_status_custom_body_headers_and_content_type(client, emu):
    emu.fail(
        "token/pair",
        Fault.status(500, {"error": "boom"}, headers={"X-Trace": "abc"}),
        Fault.status(400, "plain words"),
        Fault.status(502, b"<xml/>", content_type="application/xml"),
    )

    first, second, third = (_login(client, emu) for _ in range(3))

    assert (first.status_code, first.json(), first.headers["x-trace"]) == (
        500,
        {"error": "boom"},
        "abc",
    )
    assert second.headers["content-type"].startswith("text/plain")
    assert second.text == "plain words"
    assert (third.headers["content-type"], third.content) == ("application/xml", b"<xml/>")


def test_fault_default_error_body_is_json_detail(client, emu):
    emu.fail("token/pair", Fault.status(500))

    response = _login(client, emu)

    assert response.json() == {"detail": "Internal Server Error"}


def test_fault_rate_limited_sends_integer_retry_after(client, emu):
    emu.fail("account/tokens/create-stac", Fault.rate_limited(2.5))

    response = _create_stac(client, _access(client, emu))

    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert "throttled" in response.json()["detail"]


def test_fault_html_page(client, emu):
    emu.fail("token/pair", Fault.html(502), Fault.html())

    first, second = _login(client, emu), _login(client, emu)

    assert first.status_code == 502
    assert first.headers["content-type"].startswith("text/html")
    assert "<html>" in first.text
    assert second.status_code == 200
    assert second.headers["content-type"].startswith("text/html")


def test_fault_malformed_json(client, emu):
    emu.fail("token/pair", Fault.malformed_json())

    response = _login(client, emu)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()


@pytest.mark.parametrize(
    ("path", "key"), [("token/pair", "access"), ("account/tokens/create-stac", "token_value")]
)
def test_fault_missing_key(client, emu, path, key):
    access = _access(client, emu)
    emu.fail(path, Fault.missing_key())

    response = _login(client, emu) if path == "token/pair" else _create_stac(client, access)

    assert response.status_code == 200
    assert isinstance(response.json(), dict)
    assert key not in response.json()


def test_fault_drop_raises_transport_error_and_server_keeps_serving(client, emu):
    emu.fail("token/pair", Fault.drop(times=2))

    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            _login(client, emu)

    assert _login(client, emu).status_code == 200
    assert emu.requests("token/pair") == 3
    assert [status for _, _, status in emu.request_log] == [0, 0, 200]


def test_fault_delay_triggers_read_timeout_then_recovers(client, emu):
    emu.fail("token/pair", Fault.delay(3))

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post("token/pair", json={"email": emu.email, "password": emu.password}, timeout=0.2)

    assert time.monotonic() - started < 3  # gave up before the delayed answer came
    assert _login(client, emu).status_code == 200


def test_fault_delay_short_then_normal_response(client, emu):
    emu.fail("stac", Fault.delay(0.2))

    started = time.monotonic()
    response = client.get("stac/")

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_faults_apply_in_order_only_to_their_path_and_can_be_cleared(client, emu):
    emu.fail("token/pair", Fault.status(500), Fault.status(502))

    assert client.get("stac/").status_code == 200
    assert _login(client, emu).status_code == 500
    emu.clear_faults()
    assert _login(client, emu).status_code == 200


def test_fault_times_must_be_positive():
    with pytest.raises(ValueError, match="times"):
        Fault.status(500, times=0)


# --- counters, logs, reset, latency --------------------------------------------------------


def test_counters_log_and_reset(client, emu):
    _login(client, emu)
    client.get("stac/")
    client.get("stac/search", params={"limit": 1})
    emu.fail("token/pair", Fault.status(500))
    emu.latency = 0.01

    assert emu.requests() == 3
    assert emu.requests("stac/") == emu.requests("stac") == 1
    assert emu.requests("stac/search") == 1
    assert emu.request_log == [
        ("POST", "token/pair", 200),
        ("GET", "stac", 200),
        ("GET", "stac/search", 200),
    ]

    emu.reset()

    assert emu.requests() == 0
    assert emu.request_log == []
    assert emu.issued_access_tokens == []
    assert emu.latency == 0.0
    assert _login(client, emu).status_code == 200


def test_latency_delays_every_request(client, emu):
    emu.latency = 0.15

    started = time.monotonic()
    client.get("stac/")
    client.get("stac/collections")

    assert time.monotonic() - started >= 0.3


def test_unknown_paths_are_json_404(client):
    response = client.get("no/such/thing")

    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_run_emulator_on_given_port_with_latency():
    with run_emulator(latency=0.05) as first:
        port = first.port
        assert first.latency == 0.05
    with run_emulator(port=port) as again:
        assert again.base_url == f"http://127.0.0.1:{port}/api/v1/"
        assert httpx.get(again.base_url + "stac/").status_code == 200


def test_emulator_context_manager_and_double_stop():
    emulator = CarbonMapperEmulator()
    with emulator as running:
        assert httpx.get(running.base_url + "stac/").status_code == 200
    emulator.stop()
    with pytest.raises(RuntimeError):
        _ = emulator.base_url


# --- STAC -----------------------------------------------------------------------------------


def test_stac_landing_page_links_are_absolute(client, emu):
    body = client.get("stac/").json()

    assert any(c.endswith("/item-search") for c in body["conformsTo"])
    assert any(c.endswith("/item-search#query") for c in body["conformsTo"])
    rels = {link["rel"] for link in body["links"]}
    assert {"self", "root", "data", "search"} <= rels
    assert all(link["href"].startswith(emu.base_url) for link in body["links"])


def test_stac_collections_and_collection(client):
    collections = client.get("stac/collections").json()["collections"]
    ids = {c["id"] for c in collections}

    assert {"l2b-cmf", "l3a-ime", "l4a-ch4"} <= ids
    assert client.get("stac/collections/l3a-ime").json()["id"] == "l3a-ime"
    assert client.get("stac/collections/nope").status_code == 404


def test_collection_items_page_with_next_link(client):
    first = client.get("stac/collections/l2b-cmf/items", params={"limit": 4}).json()
    next_link = next(link for link in first["links"] if link["rel"] == "next")
    second = client.get(next_link["href"]).json()

    assert len(first["features"]) == 4
    assert {f["collection"] for f in first["features"] + second["features"]} == {"l2b-cmf"}
    assert {f["id"] for f in first["features"]}.isdisjoint(f["id"] for f in second["features"])


def _all_items(emu: CarbonMapperEmulator) -> list[dict[str, Any]]:
    body = httpx.post(emu.base_url + "stac/search", json={"limit": 1000}).json()
    return list(body["features"])


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_pystac_client_search_with_query_and_paging(emu, method):
    catalog = Client.open(emu.base_url + "stac/")
    expected = sorted(
        item["id"]
        for item in _all_items(emu)
        if item["collection"] in ("l2b-cmf", "l3a-ime") and item["properties"]["cm:emission"] > 500
    )

    search = catalog.search(
        collections=["l2b-cmf", "l3a-ime"],
        query={"cm:emission": {"gt": 500}},
        limit=3,
        method=method,
    )
    found = sorted(item.id for item in search.items())

    assert len(expected) > 3  # several pages
    assert found == expected


def test_pystac_client_max_items_datetime_and_bbox(emu):
    catalog = Client.open(emu.base_url + "stac/")
    all_items = _all_items(emu)

    limited = list(catalog.search(max_items=7, limit=3).items())
    in_2023 = list(catalog.search(datetime="2023-01-01/2023-12-31", limit=100).items())
    permian = list(catalog.search(bbox=[-105, 30, -100, 34], limit=100).items())
    open_end = list(catalog.search(datetime="2024-07-01/..", limit=100).items())

    assert len(limited) == 7
    assert in_2023
    assert all(i.datetime is not None and i.datetime.year == 2023 for i in in_2023)
    assert len(in_2023) < len(all_items)
    assert permian
    assert all(-105 <= i.bbox[0] <= -100 and 30 <= i.bbox[1] <= 34 for i in permian)
    assert all(
        i.datetime is not None and i.datetime >= datetime(2024, 7, 1, tzinfo=timezone.utc)
        for i in open_end
    )


def test_search_intersects_ids_and_query_ops(client, emu):
    item = _all_items(emu)[5]
    west, south, east, north = item["bbox"]
    point = {"type": "Point", "coordinates": [(west + east) / 2, (south + north) / 2]}
    emission = item["properties"]["cm:emission"]

    by_point = client.post("stac/search", json={"intersects": point, "limit": 100}).json()
    by_id = client.get("stac/search", params={"ids": item["id"]}).json()
    by_eq = client.post(
        "stac/search", json={"query": {"cm:emission": {"eq": emission}, "cm:gas": {"neq": "X"}}}
    ).json()
    bad_op = client.post("stac/search", json={"query": {"cm:emission": {"like": 1}}})

    assert item["id"] in {f["id"] for f in by_point["features"]}
    assert [f["id"] for f in by_id["features"]] == [item["id"]]
    assert item["id"] in {f["id"] for f in by_eq["features"]}
    assert bad_op.status_code == 400


def test_search_default_limit_and_counts(client):
    body = client.get("stac/search").json()

    assert body["type"] == "FeatureCollection"
    assert body["numberReturned"] == len(body["features"]) == 10
    assert body["numberMatched"] >= 50


# --- assets ---------------------------------------------------------------------------------


def _asset_href(emu: CarbonMapperEmulator, index: int = 3, key: str = "cmf") -> tuple[str, str]:
    item = _all_items(emu)[index]
    return item["id"], item["assets"][key]["href"]


def test_asset_download_needs_stac_token(client, emu, stac_token):
    item_id, href = _asset_href(emu)
    access = _access(client, emu)

    anonymous = client.get(href)
    wrong_scope = client.get(href, headers={"Authorization": f"Bearer {access}"})
    ok = client.get(href, headers={"Authorization": f"Bearer {stac_token}"})

    assert anonymous.status_code == 401
    assert anonymous.json() == {"detail": "Unauthorized"}
    assert wrong_scope.status_code == 403
    assert wrong_scope.json() == {"detail": "Missing scope stac"}
    assert ok.status_code == 200
    assert ok.content == emu.asset_bytes(item_id, "cmf")
    assert int(ok.headers["content-length"]) == emu.asset_size(item_id, "cmf.tif")


def test_asset_hrefs_and_file_size_match(emu):
    item = _all_items(emu)[0]

    for key, asset in item["assets"].items():
        assert asset["href"].startswith(emu.base_url + "stac/assets/")
        assert asset["file:size"] == emu.asset_size(item["id"], key)


def test_large_asset_streams_exact_bytes(client, emu, stac_token):
    item_id, key = emu.large_asset
    url = f"stac/assets/{item_id}/{key}.tif"
    received = bytearray()

    with client.stream("GET", url, headers={"Authorization": f"Bearer {stac_token}"}) as r:
        for chunk in r.iter_bytes():
            received += chunk

    assert emu.asset_size(item_id, key) > 4 * 1024 * 1024
    assert bytes(received) == emu.asset_bytes(item_id, key)


def test_unknown_asset_is_404(client, stac_token):
    response = client.get(
        "stac/assets/nope/cmf.tif", headers={"Authorization": f"Bearer {stac_token}"}
    )

    assert response.status_code == 404


# --- catalog/plume-csv ----------------------------------------------------------------------


def test_plume_csv_pages_with_link_header(client, emu, stac_token):
    headers = {"Authorization": f"Bearer {stac_token}"}
    url: str | None = emu.base_url + "catalog/plume-csv?limit=25"
    rows: list[dict[str, str]] = []
    pages = 0

    while url:
        response = client.get(url, headers=headers)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        rows += csv.DictReader(io.StringIO(response.text))
        url = response.links.get("next", {}).get("url")
        pages += 1

    assert pages == 3
    assert len(rows) == len(_all_items(emu))
    assert {"plume_id", "datetime", "gas", "emission_auto", "latitude", "longitude"} <= rows[
        0
    ].keys()


def test_plume_csv_filters_by_datetime_and_needs_token(client, emu, stac_token):
    access = _access(client, emu)
    params = {"datetime": "2024-01-01/2024-12-31"}

    ok = client.get(
        "catalog/plume-csv", params=params, headers={"Authorization": f"Bearer {stac_token}"}
    )
    anonymous = client.get("catalog/plume-csv")
    wrong_scope = client.get("catalog/plume-csv", headers={"Authorization": f"Bearer {access}"})
    too_many = client.get(
        "catalog/plume-csv",
        params={"limit": 1001},
        headers={"Authorization": f"Bearer {stac_token}"},
    )

    rows = list(csv.DictReader(io.StringIO(ok.text)))
    assert rows
    assert all(r["datetime"].startswith("2024") for r in rows)
    assert "link" not in ok.headers
    assert anonymous.status_code == 401
    assert wrong_scope.status_code == 403
    assert too_many.status_code == 422
