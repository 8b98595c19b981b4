"""Ingest I/O against a misbehaving API, over real HTTP to the emulator and its quirks.

Paging by the STAC API spec's `merge: true` links, links that repeat a page, page caps,
compressed downloads, assets that share a file name, CSV pages without a final newline, and
errors that must not carry the STAC token in their attached request.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cm_tasks import CarbonMapperStacToken, ConfigurationError, async_stac_http_client
from cm_tasks.errors import UnexpectedResponseError
from cm_tasks.ingest import (
    AssetFile,
    download_all,
    download_one,
    fetch_plume_csv_to,
    iter_search,
    plan_downloads,
    search_body,
)
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support.leaks import Secrets, assert_no_leak

FILTERED = search_body(collections=["l4a-ch4"], query={"cm:emission": {"gt": 300}}, limit=3)
# A guard against the old behaviour (endless paging) hanging the suite; not a timing check.
HANG_GUARD_SECONDS = 60


async def _search(body: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    async with async_stac_http_client() as http:
        return [item async for item in iter_search(http, body, **kwargs)]


async def _collect_at_most(body: dict[str, Any], items: list[dict[str, Any]], cap: int) -> None:
    async with async_stac_http_client() as http:
        async for item in iter_search(http, body):
            items.append(item)
            if len(items) >= cap:  # paging that never ends: do not wait for it
                return


async def _csv(path: Path, **kwargs: Any) -> int:
    async with async_stac_http_client() as http:
        return await asyncio.wait_for(
            fetch_plume_csv_to(http, path, datetime="2023-01-01/2024-12-31", **kwargs),
            HANG_GUARD_SECONDS,
        )


# --- paging (item 9) -------------------------------------------------------------------------


async def test_merge_next_links_keep_the_search_filters(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    expected = await _search(FILTERED)
    carbon_mapper_emulator.quirks = {"merge-next"}

    merged = await _search(FILTERED)

    assert len(expected) > 3  # more than one page
    assert [i["id"] for i in merged] == [i["id"] for i in expected]
    assert all(i["collection"] == "l4a-ch4" for i in merged)
    assert all(i["properties"]["cm:emission"] > 300 for i in merged)


async def test_search_whose_next_link_repeats_stops_with_a_clear_error(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    carbon_mapper_emulator.quirks = {"repeat-next"}
    items: list[dict[str, Any]] = []

    with pytest.raises(UnexpectedResponseError, match="repeats itself") as raised:
        await _collect_at_most(FILTERED, items, 100)

    assert len(items) == 3  # page 1 once
    assert carbon_mapper_emulator.requests("stac/search") == 1  # the repeat is never sent
    assert "stac/search" in str(raised.value)


async def test_search_pages_are_capped(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    with pytest.raises(UnexpectedResponseError, match="more pages after 2") as raised:
        await _search(FILTERED, max_pages=2)
    assert "max_pages" in str(raised.value)
    assert carbon_mapper_emulator.requests("stac/search") == 2
    with pytest.raises(ConfigurationError, match="max_pages is 0"):
        await _search(FILTERED, max_pages=0)


async def test_plume_csv_whose_next_link_repeats_stops_with_a_clear_error(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    carbon_mapper_emulator.quirks = {"repeat-next"}

    with pytest.raises(UnexpectedResponseError, match="repeats itself"):
        await _csv(tmp_path / "plumes.csv", page_size=7)

    assert carbon_mapper_emulator.requests("catalog/plume-csv") == 1
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary file


async def test_plume_csv_pages_are_capped(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    with pytest.raises(UnexpectedResponseError, match="more pages after 3"):
        await _csv(tmp_path / "plumes.csv", page_size=7, max_pages=3)
    assert carbon_mapper_emulator.requests("catalog/plume-csv") == 3


# --- errors carry no token (item 8) ----------------------------------------------------------


async def test_search_and_csv_errors_do_not_carry_the_token(
    carbon_mapper_token_block: CarbonMapperStacToken, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    with pytest.raises(httpx.HTTPStatusError, match="400") as search_error:
        await _search({"collections": ["l4a-ch4"], "limit": 0})
    errors.append(search_error.value)
    with pytest.raises(httpx.HTTPStatusError, match="422") as csv_error:
        await _csv(tmp_path / "plumes.csv", page_size=0)
    errors.append(csv_error.value)

    assert_no_leak(Secrets({"stac token": carbon_mapper_token_block.get()}), exceptions=errors)
    # still useful to a caller: the status, the API's reason and where it came from
    assert search_error.value.response.status_code == 400
    assert "limit" in search_error.value.response.text
    assert search_error.value.request.url.path.endswith("stac/search")
    assert "Authorization" not in search_error.value.request.headers


async def test_dropped_connections_in_search_and_csv_do_not_carry_the_token(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    # A transport error (here the connection closed without an answer) is raised by httpx
    # with the request it was sending attached: the STAC token in its headers.
    errors: list[BaseException] = []
    carbon_mapper_emulator.fail("stac/search", Fault.drop())
    with pytest.raises(httpx.RemoteProtocolError) as search_error:
        await _search(FILTERED)
    errors.append(search_error.value)
    carbon_mapper_emulator.fail("catalog/plume-csv", Fault.drop())
    with pytest.raises(httpx.RemoteProtocolError) as csv_error:
        await _csv(tmp_path / "plumes.csv")
    errors.append(csv_error.value)

    assert_no_leak(Secrets({"stac token": carbon_mapper_token_block.get()}), exceptions=errors)
    # still says what failed and where
    assert search_error.value.request.url.path.endswith("stac/search")
    assert csv_error.value.request.url.path.endswith("catalog/plume-csv")
    assert "Authorization" not in csv_error.value.request.headers


# --- downloads (items 10 and 11) -------------------------------------------------------------


ASSET = bytes(range(256)) * 400


@contextlib.contextmanager
def _short_body_server(head: bytes, body: bytes) -> Iterator[str]:
    """A real HTTP server that answers every GET with head + body, then closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener is closed at the end of the test
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(head + body)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/plume.tif"
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("head", "body"),
    [
        # no Content-Length: the body ends when the connection closes, here half-way
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", ASSET[: len(ASSET) // 2]),
        # a complete chunked body holding a gzip stream that was cut short
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            (lambda z: b"%x\r\n%s\r\n0\r\n\r\n" % (len(z), z))(gzip.compress(ASSET)[:-200]),
        ),
    ],
    ids=["close-delimited", "cut-gzip"],
)
async def test_a_short_body_is_not_renamed_into_place(
    tmp_path: Path, head: bytes, body: bytes
) -> None:
    with _short_body_server(head, body) as href:
        asset = AssetFile("i", "c", "data", href, tmp_path / "plume.tif", len(ASSET), None)
        async with httpx.AsyncClient() as http:
            result = await download_one(http, asset)

    assert result.status == "failed"
    assert f"of {len(ASSET)} bytes" in result.error
    assert list(tmp_path.iterdir()) == []  # neither the short file nor a temporary one


async def test_a_file_name_of_the_longest_allowed_length_downloads(tmp_path: Path) -> None:
    # 254 characters is a legal file name, but its temporary name (".<name>.<random>") was
    # not: the OSError stopped every download of the batch.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(ASSET)
    with _short_body_server(head, ASSET) as href:
        path = tmp_path / ("n" * 250 + ".tif")
        asset = AssetFile("i", "c", "data", href, path, len(ASSET), None)
        async with httpx.AsyncClient() as http:
            [result] = await download_all(http, [asset])

    assert result.status == "downloaded", result.error
    assert path.read_bytes() == ASSET


def test_a_file_name_too_long_for_a_file_system_is_refused_when_planning(tmp_path: Path) -> None:
    item = {"id": "i", "assets": {"data": {"href": "https://x.example/" + "n" * 300 + ".tif"}}}
    with pytest.raises(ValueError, match="304 characters long"):
        plan_downloads([item], tmp_path)


async def _small_items(emulator: CarbonMapperEmulator, count: int) -> list[dict[str, Any]]:
    large_item = emulator.large_asset[0]
    items = await _search(search_body(collections=["l4a-ch4"], limit=10), max_items=10)
    return [i for i in items if i["id"] != large_item][:count]


async def test_gzip_encoded_downloads_complete(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emulator = carbon_mapper_emulator
    items = await _small_items(emulator, 2)
    emulator.quirks = {"gzip"}
    assets = plan_downloads(items, tmp_path)
    async with async_stac_http_client() as http:
        # the emulator really compresses: Content-Length is the size on the wire
        probe = await http.get(assets[0].href)
        results = await download_all(http, assets, concurrency=2)

    assert probe.headers["content-encoding"] == "gzip"
    assert int(probe.headers["content-length"]) == probe.num_bytes_downloaded
    assert probe.num_bytes_downloaded != len(probe.content)
    assert [r.status for r in results] == ["downloaded"] * len(assets), [r.error for r in results]
    for asset in assets:
        assert asset.path.read_bytes() == emulator.asset_bytes(asset.item_id, asset.asset_key)


async def test_assets_sharing_a_file_name_are_all_kept(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emulator = carbon_mapper_emulator
    emulator.quirks = {"same-file-names"}
    items = await _small_items(emulator, 2)
    assets = plan_downloads(items, tmp_path)
    async with async_stac_http_client() as http:
        results = await download_all(http, assets, concurrency=2)

    assert {Path(a.href).name for a in assets} == {"plume.tif"}  # the quirk is on
    assert len({a.path for a in assets}) == len(assets) == 4
    assert [r.status for r in results] == ["downloaded"] * 4
    for asset in assets:
        assert asset.path.parent.name == asset.asset_key
        assert asset.path.read_bytes() == emulator.asset_bytes(asset.item_id, asset.asset_key)


def test_distinct_file_names_keep_the_usual_layout(tmp_path: Path) -> None:
    item = {
        "id": "item-1",
        "collection": "c",
        "assets": {
            "a": {"href": "http://h/x/a.tif"},
            "b": {"href": "http://h/y/b.tif"},
            "c": {"href": "http://h/z/b.tif"},
        },
    }
    paths = [p.path.relative_to(tmp_path).as_posix() for p in plan_downloads([item], tmp_path)]
    assert paths == ["c/item-1/a.tif", "c/item-1/b/b.tif", "c/item-1/c/b.tif"]


async def test_csv_pages_without_a_final_newline_are_joined_row_by_row(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    expected_rows = await _csv(tmp_path / "expected.csv", page_size=7)
    carbon_mapper_emulator.quirks = {"csv-no-final-newline"}

    rows = await _csv(tmp_path / "plumes.csv", page_size=7)

    text = (tmp_path / "plumes.csv").read_text()
    assert text == (tmp_path / "expected.csv").read_text()
    records = list(csv.reader(io.StringIO(text)))
    assert rows == expected_rows == len(records) - 1 == 60
    assert {len(r) for r in records} == {len(records[0])}
