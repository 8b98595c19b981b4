"""Building blocks of an ingest flow: search the STAC API, download assets, fetch the plume CSV.

Used by the example flow `flows/ingest_plumes.py`; reusable in your own flows. The I/O is
async (one `httpx.AsyncClient` for all downloads) and every request authenticates with
`CarbonMapperAuth` (the token comes from `aget_stac_token()`; a 401 renews it once).

Downloads stream to a temporary file next to the target and are renamed into place only once
every byte has arrived, so a file at its final path is always complete: a re-run skips it
(when its size matches the asset's `file:size`) and an interrupted run leaves nothing
half-written behind. Memory stays flat: a fixed pool of `concurrency` workers, each holding
one 64 KiB buffer, whatever the number and size of the assets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from prefect import task
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

from cm_tasks.access import DEFAULT_MIN_VALID
from cm_tasks.auth import async_stac_http_client
from cm_tasks.errors import ConfigurationError, UnexpectedResponseError
from cm_tasks.settings import load_settings

DEFAULT_OUTPUT_DIR = "./data/carbon-mapper"
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64
SEARCH_PAGE_SIZE = 100
CSV_PAGE_SIZE = 1000
MAX_PAGES = 1000
"""Most pages a search or the plume CSV may take (100,000 items, 1,000,000 CSV rows at the
default page sizes): a catalogue whose `next` links never end fails instead of running on."""
CHUNK_SIZE = 64 * 1024
PROGRESS_STEP = 5.0
"""The progress artifact is updated every this many percent (and at 100 %)..."""
PROGRESS_INTERVAL = 1.0
"""...but at most once per this many seconds: each update is a Prefect API call."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
_MIN_QUOTED = 8  # header words shorter than this (e.g. "Bearer") are no secret to withhold
_NAME_MAX = 255  # bytes in one path component on common file systems (ASCII here: chars)


@dataclass(frozen=True)
class AssetFile:
    """One asset to download and where it goes."""

    item_id: str
    collection: str
    asset_key: str
    href: str
    path: Path
    size: int | None
    emission: float | None


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one asset: downloaded, skipped (already complete) or failed."""

    asset: AssetFile
    status: Literal["downloaded", "skipped", "failed"]
    bytes: int
    error: str = ""


def _safe_name(value: str, what: str) -> str:
    # Names come from the API and become path components: nothing that could climb out.
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"unsafe {what} {value!r} in a STAC item; not writing it to disk")
    if len(value) > _NAME_MAX:
        raise ValueError(
            f"{what} {value[:40]!r}... in a STAC item is {len(value)} characters long; a file "
            f"system takes at most {_NAME_MAX}: not writing it to disk"
        )
    return value


def check_concurrency(concurrency: int) -> int:
    """Return concurrency if it is within 1..64, else raise ConfigurationError saying so."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigurationError(
            f"concurrency is {concurrency}; use 1 to {MAX_CONCURRENCY} parallel downloads "
            f"(default {DEFAULT_CONCURRENCY})."
        )
    return concurrency


def search_body(
    *,
    collections: Sequence[str] | None = None,
    datetime: str | None = None,
    bbox: Sequence[float] | None = None,
    intersects: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
    limit: int = SEARCH_PAGE_SIZE,
) -> dict[str, Any]:
    """The JSON body of a `POST stac/search`, checked.

    Raises:
        ConfigurationError: bbox and intersects are both given, or bbox has the wrong length.
    """
    if bbox is not None and intersects is not None:
        raise ConfigurationError("Give bbox or intersects, not both.")
    if bbox is not None and len(bbox) not in (4, 6):
        raise ConfigurationError(
            f"bbox has {len(bbox)} numbers; give 4: [west, south, east, north] in degrees."
        )
    body: dict[str, Any] = {"limit": limit}
    if collections:
        body["collections"] = list(collections)
    if datetime:
        body["datetime"] = datetime
    if bbox is not None:
        body["bbox"] = list(bbox)
    if intersects is not None:
        body["intersects"] = intersects
    if query:
        body["query"] = query
    return body


def _next_request(
    page: dict[str, Any], previous_body: dict[str, Any] | None
) -> tuple[str, str, dict[str, Any] | None] | None:
    for link in page.get("links", []):
        if isinstance(link, dict) and link.get("rel") == "next" and link.get("href"):
            method = str(link.get("method", "GET")).upper()
            body = link.get("body") if method == "POST" else None
            body = body if isinstance(body, dict) else None
            if method == "POST" and link.get("merge") is True:
                # STAC API: the link's body (often just the paging token) is merged into the
                # previous request's, so the collections, query and other filters carry over.
                body = {**(previous_body or {}), **(body or {})}
            return str(link["href"]), method, body
    return None


def _bare_status_error(message: str, response: httpx.Response) -> httpx.HTTPStatusError:
    """An HTTPStatusError for response, carrying no authenticated request.

    The request that failed holds the STAC token in its headers, and whoever catches the
    error can read `exc.request`: the error gets a copy with the method and URL only, and a
    response with the status, content type and body.
    """
    request = httpx.Request(response.request.method, response.request.url)
    content_type = response.headers.get("content-type")
    copy = httpx.Response(
        response.status_code,
        headers={"content-type": content_type} if content_type else None,
        content=response.content,
        request=request,
    )
    return httpx.HTTPStatusError(message, request=request, response=copy)


async def _request(http: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """http.request, whose transport errors (time-outs, dropped connections) carry no token.

    httpx attaches the request it was sending, STAC token in its headers, to the error: the
    error is raised again as a copy of the same type with a bare request (method and URL) and a
    message that quotes no header value (h11 quotes an illegal one: `Illegal header value
    b'Bearer <token>\\n'`), outside the except block so the original is not its __context__.
    """
    try:
        return await http.request(method, url, **kwargs)
    except httpx.RequestError as exc:
        try:
            sent: httpx.Request | None = exc.request
        except RuntimeError:  # no request attached
            sent = None
        bare = httpx.Request(method, http.base_url.join(url))
        if sent is not None:
            bare = httpx.Request(sent.method, sent.url)
        error = type(exc)(_message_without_headers(exc, sent, http), request=bare)
    raise error


def _message_without_headers(
    exc: httpx.RequestError, sent: httpx.Request | None, http: httpx.AsyncClient
) -> str:
    """str(exc), unless it quotes any part of a credential header that was (or would be) sent.

    A quoted value withholds the whole message: a partial mask could leave an escaped
    remainder readable.
    """
    message = str(exc)
    headers = [*http.headers.raw, *(sent.headers.raw if sent is not None else ())]
    for name, value in headers:
        if name.lower() not in _CREDENTIAL_HEADERS:
            continue
        for word in value.split():
            forms = {word.decode("latin-1"), repr(word)[2:-1]}
            if len(word) >= _MIN_QUOTED and any(form in message for form in forms):
                return (
                    f"{type(exc).__name__}: the request could not be sent (the error quoted a "
                    "request header, so its text is withheld). A token with a space or "
                    "control character is the usual cause: run the refresh to replace it."
                )
    return message


class _PageGuard:
    """Stops paging that repeats a request or runs past `max_pages`, with a clear error."""

    def __init__(self, http: httpx.AsyncClient, endpoint: str, max_pages: int) -> None:
        if max_pages < 1:
            raise ConfigurationError(f"max_pages is {max_pages}; it must be at least 1.")
        self._http = http
        self._endpoint = endpoint
        self._max_pages = max_pages
        self._seen: set[tuple[str, str, str]] = set()

    def check(self, method: str, url: str, body: dict[str, Any] | None = None) -> None:
        """Raise UnexpectedResponseError if this request was made already or is one too many."""
        # Compared decoded, in any order: a link may encode the same query differently.
        target = self._http.base_url.join(url)
        query = sorted(target.params.multi_items())
        key = (
            method,
            f"{target.copy_with(query=None)} {query}",
            json.dumps(body, sort_keys=True, default=str),
        )
        if key in self._seen:
            raise UnexpectedResponseError(
                f"The API's paging repeats itself: page {len(self._seen) + 1} of "
                f"{self._endpoint} links back to a page already read. Stopped rather than "
                "loop; narrow the search or report it to the Carbon Mapper platform.",
                endpoint=self._endpoint,
            )
        if len(self._seen) >= self._max_pages:
            raise UnexpectedResponseError(
                f"{self._endpoint} still had more pages after {self._max_pages}: stopped there. "
                "Narrow the search (collections, datetime, bbox, query), set max_items, or "
                "raise max_pages.",
                endpoint=self._endpoint,
            )
        self._seen.add(key)


async def iter_search(
    http: httpx.AsyncClient,
    body: dict[str, Any],
    max_items: int | None = None,
    max_pages: int = MAX_PAGES,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the items of a STAC search, following `next` links until max_items.

    A `next` link with `merge: true` is merged into the previous request body, as the STAC API
    specifies. Paging stops with an error when a link repeats a request already made, or after
    max_pages pages.

    Raises:
        httpx.HTTPStatusError: the API rejected the search (the message has its reason; the
            attached request has the method and URL only, never the token).
        UnexpectedResponseError: the `next` links repeat a request, or go past max_pages.
        ConfigurationError: max_pages is below 1.

    Example:
        ```python
        import asyncio
        from cm_tasks import async_stac_http_client
        from cm_tasks.ingest import iter_search, search_body

        async def ids() -> list[str]:
            async with async_stac_http_client() as http:
                body = search_body(collections=["l4a-ch4"])
                return [item["id"] async for item in iter_search(http, body, max_items=5)]

        print(asyncio.run(ids()))
        ```
    """
    if max_items is not None:
        body = {**body, "limit": min(int(body.get("limit", SEARCH_PAGE_SIZE)), max_items)}
    guard = _PageGuard(http, "stac/search", max_pages)
    request: tuple[str, str, dict[str, Any] | None] | None = ("stac/search", "POST", body)
    seen = 0
    while request is not None:
        url, method, json_body = request
        guard.check(method, url, json_body)
        response = await _request(http, method, url, json=json_body)
        if response.is_error:
            raise _bare_status_error(
                f"The STAC search failed ({response.status_code} from {url}): "
                f"{response.text[:300]}",
                response,
            )
        page = response.json()
        for feature in page.get("features", []):
            yield feature
            seen += 1
            if max_items is not None and seen >= max_items:
                return
        request = _next_request(page, json_body)


def plan_downloads(
    items: Iterable[dict[str, Any]], output_dir: Path, asset_keys: Sequence[str] | None = None
) -> list[AssetFile]:
    """Where each asset of the items goes: `<output_dir>/<collection>/<item id>/<file name>`.

    Assets of one item whose links end in the same file name go to
    `<item id>/<asset key>/<file name>` instead, so that no asset overwrites another.
    """
    files = []
    for item in items:
        item_id = _safe_name(str(item.get("id", "")), "item id")
        collection = _safe_name(str(item.get("collection") or "items"), "collection")
        emission = item.get("properties", {}).get("cm:emission")
        chosen = [
            (key, asset)
            for key, asset in sorted(item.get("assets", {}).items())
            if asset_keys is None or key in asset_keys
        ]
        names = {
            key: _safe_name(PurePosixPath(urlsplit(str(a["href"])).path).name or key, "file name")
            for key, a in chosen
        }
        shared = {n for n in names.values() if list(names.values()).count(n) > 1}
        for key, asset in chosen:
            folder = output_dir / collection / item_id
            if names[key] in shared:
                folder = folder / _safe_name(key, "asset key")
            size = asset.get("file:size")
            files.append(
                AssetFile(
                    item_id=item_id,
                    collection=collection,
                    asset_key=key,
                    href=str(asset["href"]),
                    path=folder / names[key],
                    size=size if isinstance(size, int) else None,
                    emission=float(emission) if isinstance(emission, int | float) else None,
                )
            )
    return files


def _complete(asset: AssetFile) -> bool:
    try:
        size = asset.path.stat().st_size
    except FileNotFoundError:
        return False
    # Only whole files are ever renamed into place, so without a known size any file will do.
    return asset.size is None or size == asset.size


async def download_one(http: httpx.AsyncClient, asset: AssetFile) -> DownloadResult:
    """Stream one asset to its path (temporary file + rename); skip it if already complete.

    HTTP errors become a "failed" result (the file is left as it was); any other error, such
    as a full disk, is raised. Either way no temporary file is left behind.
    """
    if _complete(asset):
        return DownloadResult(asset, "skipped", asset.path.stat().st_size)
    asset.path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name adds 10 characters: cut so that a name of the longest length a
    # file system allows (255 bytes) still has a temporary file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{asset.path.name[:64]}.", dir=asset.path.parent)
    try:
        written = received = 0
        with os.fdopen(fd, "wb") as out:
            async with http.stream("GET", asset.href) as response:
                if response.is_error:
                    return DownloadResult(
                        asset, "failed", 0, f"{response.status_code} {response.reason_phrase}"
                    )
                expected = response.headers.get("content-length")
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    # Writing 64 KiB to the page cache takes microseconds: less than the hop
                    # to a worker thread that an async file API would cost (measured).
                    out.write(chunk)
                    written += len(chunk)
                # Content-Length counts the bytes sent, before any Content-Encoding is undone
                received = response.num_bytes_downloaded
        if expected is not None and received != int(expected):
            return DownloadResult(asset, "failed", 0, f"got {received} of {expected} bytes")
        if asset.size is not None and written != asset.size:
            # A body without Content-Length ends when the connection closes, and a cut gzip
            # stream decodes without error: only the item's file:size shows it is short.
            return DownloadResult(
                asset, "failed", 0, f"got {written} of {asset.size} bytes (the item's file:size)"
            )
        os.replace(tmp_name, asset.path)
        tmp_name = ""
        return DownloadResult(asset, "downloaded", written)
    except httpx.HTTPError as exc:
        return DownloadResult(asset, "failed", 0, type(exc).__name__)
    finally:
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


async def download_all(
    http: httpx.AsyncClient,
    assets: Sequence[AssetFile],
    concurrency: int = DEFAULT_CONCURRENCY,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[DownloadResult]:
    """Download assets with at most `concurrency` at a time; results in the order of assets.

    A fixed pool of `concurrency` workers takes the assets one by one, so memory does not grow
    with their number. on_progress(done, total) is called after each asset; it must not block.

    Example:
        ```python
        import asyncio
        from pathlib import Path
        from cm_tasks import async_stac_http_client
        from cm_tasks.ingest import download_all, iter_search, plan_downloads, search_body

        async def fetch() -> None:
            async with async_stac_http_client() as http:
                items = [i async for i in iter_search(http, search_body(), max_items=10)]
                await download_all(http, plan_downloads(items, Path("data")), concurrency=8)

        asyncio.run(fetch())
        ```
    """
    check_concurrency(concurrency)
    results: list[DownloadResult | None] = [None] * len(assets)
    pending = iter(enumerate(assets))  # shared: each worker takes the next asset when free
    done = 0

    async def worker() -> None:
        nonlocal done
        for n, asset in pending:
            results[n] = await download_one(http, asset)
            done += 1
            if on_progress is not None:
                on_progress(done, len(assets))

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(assets)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        # gather does not stop the other workers: stop them (their temporary files go too)
        # and raise the first error as it is.
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return [r for r in results if r is not None]


async def fetch_plume_csv_to(
    http: httpx.AsyncClient,
    path: Path,
    *,
    datetime: str | None = None,
    bbox: Sequence[float] | None = None,
    intersects: dict[str, Any] | None = None,
    page_size: int = CSV_PAGE_SIZE,
    max_pages: int = MAX_PAGES,
) -> int:
    """Fetch every page of `catalog/plume-csv` (following `Link: rel="next"`) into one file.

    Each page's header line is dropped after the first page, and a page that does not end
    in a newline gets one, so no row is glued to the next page's first row. Paging stops
    with an error when a `next` link repeats a page already read, or after max_pages pages.

    Returns:
        The number of data rows written.

    Raises:
        httpx.HTTPStatusError: the API refused a page (the attached request has the method
            and URL only, never the token).
        UnexpectedResponseError: the `next` links repeat a page, or go past max_pages.
    """
    params: dict[str, str] = {"limit": str(page_size)}
    if datetime:
        params["datetime"] = datetime
    if bbox is not None:
        params["bbox"] = ",".join(str(v) for v in bbox)
    if intersects is not None:
        params["intersects"] = json.dumps(intersects, separators=(",", ":"))
    guard = _PageGuard(http, "catalog/plume-csv", max_pages)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    rows = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            url: str | None = "catalog/plume-csv"
            request_params: dict[str, str] | None = params
            first = True
            while url is not None:
                target = httpx.URL(url)  # URL(url, params=None) would drop url's own query
                guard.check("GET", str(target.copy_merge_params(request_params or {})))
                response = await _request(http, "GET", url, params=request_params)
                if response.is_error:
                    raise _bare_status_error(
                        f"The plume CSV could not be fetched ({response.status_code} from {url}).",
                        response,
                    )
                lines = response.text.splitlines(keepends=True)
                body = lines if first else lines[1:]  # one header line for the whole file
                out.writelines(body)
                if body and not body[-1].endswith(("\n", "\r")):
                    out.write("\n")  # else the next page's first row would join this row
                rows += len(lines) - 1 if lines else 0
                first = False
                next_link = response.links.get("next", {}).get("url")
                url, request_params = (next_link, None) if next_link else (None, None)
        os.replace(tmp_name, path)
        tmp_name = ""
    finally:
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
    return rows


class DownloadProgress:
    """Keeps a progress artifact up to date from its own asyncio task.

    Downloads only call `advance()` (no I/O); `run()` posts the percentage every
    `PROGRESS_STEP` percent (at most once per `PROGRESS_INTERVAL` seconds) and at 100 %, so a
    slow Prefect API never holds a download up.
    """

    def __init__(self, total: int, description: str) -> None:
        self.total = total
        self.done = 0
        self.description = description
        self._changed = asyncio.Event()

    @property
    def percent(self) -> float:
        """How far the downloads are, 0 to 100 (100 when there is nothing to download)."""
        return 100.0 if self.total == 0 else 100.0 * self.done / self.total

    def advance(self, done: int, total: int) -> None:
        """Record that `done` of `total` assets are finished (the `on_progress` callback)."""
        self.done, self.total = done, total
        self._changed.set()

    async def run(self) -> None:
        """Create the artifact and update it until 100 % is posted."""
        clock = asyncio.get_running_loop().time
        posted = self.percent
        artifact_id = await acreate_progress_artifact(posted, description=self.description)
        posted_at = clock()
        while posted < 100.0:
            await self._changed.wait()
            self._changed.clear()
            percent = self.percent
            due = percent - posted >= PROGRESS_STEP and clock() - posted_at >= PROGRESS_INTERVAL
            if due or percent >= 100.0:
                await aupdate_progress_artifact(artifact_id, percent)
                posted, posted_at = percent, clock()


# --- Prefect tasks ---------------------------------------------------------------------------


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # httpx builds a new one per client (loading the CA bundle: ~20 ms of CPU); one will do.
    return httpx.create_ssl_context()


def _client(token_block: str | None, min_valid: timedelta, **kwargs: Any) -> httpx.AsyncClient:
    # The block name is resolved here once: left None, the auth would re-read the settings
    # (environment and .env) on every request.
    name = load_settings().token_block if token_block is None else token_block
    return async_stac_http_client(name, min_valid=min_valid, verify=_tls_context(), **kwargs)


@task(name="search-stac-items", persist_result=False)
async def search_stac_items(
    body: dict[str, Any],
    max_items: int | None = None,
    token_block: str | None = None,
    min_valid: timedelta = DEFAULT_MIN_VALID,
) -> list[dict[str, Any]]:
    """Search the Carbon Mapper STAC API and return the matching items (STAC JSON).

    Example:
        ```python
        from prefect import flow
        from cm_tasks.ingest import search_body, search_stac_items

        @flow
        async def find() -> int:
            items = await search_stac_items(search_body(collections=["l4a-ch4"]), max_items=10)
            return len(items)
        ```
    """
    async with _client(token_block, min_valid) as http:
        return [item async for item in iter_search(http, body, max_items)]


@task(name="download-assets", persist_result=False)
async def download_assets(
    assets: list[AssetFile],
    concurrency: int = DEFAULT_CONCURRENCY,
    token_block: str | None = None,
    min_valid: timedelta = DEFAULT_MIN_VALID,
) -> list[DownloadResult]:
    """Download assets, at most `concurrency` at once over one client, with a progress artifact.

    Example:
        ```python
        from pathlib import Path
        from prefect import flow
        from cm_tasks.ingest import download_assets, plan_downloads, search_body
        from cm_tasks.ingest import search_stac_items

        @flow
        async def fetch() -> None:
            items = await search_stac_items(search_body(collections=["l4a-ch4"]), max_items=10)
            await download_assets(plan_downloads(items, Path("data")), concurrency=8)
        ```
    """
    check_concurrency(concurrency)
    progress = DownloadProgress(len(assets), f"Downloading {len(assets)} Carbon Mapper assets")
    # The artifact is created while the first downloads are already under way.
    reporter = asyncio.ensure_future(progress.run())
    try:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with _client(token_block, min_valid, limits=limits) as http:
            results = await download_all(http, assets, concurrency, progress.advance)
        await reporter
    finally:
        if not reporter.done():
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    return results


@task(name="fetch-plume-csv", persist_result=False)
async def fetch_plume_csv(
    path: Path,
    datetime: str | None = None,
    bbox: Sequence[float] | None = None,
    intersects: dict[str, Any] | None = None,
    token_block: str | None = None,
) -> int:
    """Fetch the plume CSV (`catalog/plume-csv`, every page) to path; returns its row count.

    Example:
        ```python
        from pathlib import Path
        from prefect import flow
        from cm_tasks.ingest import fetch_plume_csv

        @flow
        async def plumes() -> int:
            return await fetch_plume_csv(Path("data/plumes.csv"), datetime="2024-01-01/2024-12-31")
        ```
    """
    async with _client(token_block, DEFAULT_MIN_VALID) as http:
        return await fetch_plume_csv_to(
            http, path, datetime=datetime, bbox=bbox, intersects=intersects
        )
