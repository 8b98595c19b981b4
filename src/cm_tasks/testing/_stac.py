"""STAC API and catalogue routes of the emulator.

The STAC catalogue is public; asset downloads and ``catalog/plume-csv`` need a STAC-scoped token.

Paging:
    * ``stac/search`` and ``stac/collections/{id}/items`` return at most ``limit`` features
      (default 10, at most 1000) and, when more match, a ``rel="next"`` link carrying an opaque
      ``token``: for GET a URL with ``?token=...``, for POST a link with ``method: "POST"`` and the
      full request ``body`` including ``token`` (what pystac-client follows).
    * ``catalog/plume-csv`` takes ``limit`` (1..1000, default 1000) and ``offset`` (default 0). The
      real API's paging is undocumented; the emulator answers with a
      ``Link: <url>; rel="next"`` header (the same query with ``offset`` advanced) whenever more
      rows exist, and no ``Link`` header on the last page.

Quirks (``CarbonMapperEmulator.quirks``) change this: ``merge-next`` links with a body of
only the token and ``merge: true``, ``repeat-next`` links to the same page again, and
``csv-no-final-newline``, ``gzip`` and ``same-file-names`` as their names say.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cm_tasks.testing import _catalog as cat
from cm_tasks.testing._faults import Quirk
from cm_tasks.testing._http import api_base, bearer_token, detail, invalid
from cm_tasks.testing._state import EmulatorState

PREFIX = "/api/v1/"
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
CSV_COLUMNS = (
    "plume_id",
    "datetime",
    "gas",
    "sector",
    "emission_auto",
    "emission_uncertainty_auto",
    "latitude",
    "longitude",
    "instrument",
    "stac_item_id",
    "collection",
)
CONFORMS_TO = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0-rc.1/item-search#query",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
_GEOJSON = "application/geo+json"
_JSON = "application/json"
_TOKEN_PREFIX = "page-"
SHARED_FILE_NAME = "plume.tif"


class _BadRequest(ValueError):
    """A search parameter is invalid; the message is safe to return."""


@dataclass
class _Search:
    collections: list[str] | None = None
    ids: list[str] | None = None
    bbox: tuple[float, float, float, float] | None = None
    start: datetime | None = None
    end: datetime | None = None
    query: dict[str, Any] | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0


def stac_error(status: int, code: str, description: str) -> JSONResponse:
    """Return a STAC API error response (``{"code", "description"}``)."""
    return JSONResponse({"code": code, "description": description}, status_code=status)


def _as_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _BadRequest(f"{name} must be a list of strings")


def _as_json(value: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise _BadRequest(f"{name} is not valid JSON") from None


def _as_bbox(value: Any) -> tuple[float, float, float, float]:
    try:
        parts = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise _BadRequest("bbox must be 4 or 6 numbers") from None
    if len(parts) == 6:
        parts = [parts[0], parts[1], parts[3], parts[4]]
    if len(parts) != 4:
        raise _BadRequest("bbox must be 4 or 6 numbers")
    return (parts[0], parts[1], parts[2], parts[3])


def _parse_search(raw: dict[str, Any]) -> _Search:
    """Parse search parameters from a query string (all strings) or a POST body."""
    search = _Search()
    if raw.get("collections"):
        search.collections = _as_list(raw["collections"], "collections")
    if raw.get("ids"):
        search.ids = _as_list(raw["ids"], "ids")
    if raw.get("bbox") is not None and raw.get("intersects") is not None:
        raise _BadRequest("only one of bbox and intersects may be given")
    if raw.get("bbox") is not None:
        search.bbox = _as_bbox(raw["bbox"])
    if raw.get("intersects") is not None:
        geometry = _as_json(raw["intersects"], "intersects")
        try:
            search.bbox = cat.geometry_bbox(geometry)
        except (AttributeError, TypeError, ValueError):
            raise _BadRequest("intersects must be a GeoJSON geometry") from None
    if raw.get("datetime"):
        try:
            search.start, search.end = cat.parse_interval(str(raw["datetime"]))
        except ValueError:
            raise _BadRequest("datetime must be an RFC 3339 instant or interval") from None
    if raw.get("query"):
        query = _as_json(raw["query"], "query")
        if not isinstance(query, dict):
            raise _BadRequest("query must be an object")
        search.query = query
    if raw.get("limit") is not None:
        try:
            limit = int(raw["limit"])
        except (TypeError, ValueError):
            raise _BadRequest("limit must be an integer") from None
        if limit < 1:
            raise _BadRequest("limit must be at least 1")
        search.limit = min(limit, MAX_LIMIT)
    if raw.get("token"):
        token = str(raw["token"])
        if not token.startswith(_TOKEN_PREFIX) or not token[len(_TOKEN_PREFIX) :].isdigit():
            raise _BadRequest("invalid paging token")
        search.offset = int(token[len(_TOKEN_PREFIX) :])
    return search


def _matches(plume: cat.Plume, search: _Search) -> bool:
    if search.collections is not None and plume.collection not in search.collections:
        return False
    if search.ids is not None and plume.item_id not in search.ids:
        return False
    if search.bbox is not None and not cat.bbox_overlaps(plume.bbox, search.bbox):
        return False
    if search.start is not None and plume.when < search.start:
        return False
    if search.end is not None and plume.when > search.end:
        return False
    return search.query is None or cat.matches_query(cat.item_properties(plume), search.query)


def _filter(search: _Search) -> list[cat.Plume]:
    try:
        return [p for p in cat.PLUMES if _matches(p, search)]
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None


def _item(plume: cat.Plume, base: str, quirks: frozenset[Quirk]) -> dict[str, Any]:
    item = cat.to_item(plume, base)
    if "same-file-names" in quirks:
        for key, asset in item["assets"].items():
            asset["href"] = f"{base}stac/assets/{plume.item_id}/{key}/{SHARED_FILE_NAME}"
    return item


def _feature_collection(
    request: Request,
    search: _Search,
    raw: dict[str, Any],
    method: str,
    quirks: frozenset[Quirk] = frozenset(),
) -> dict[str, Any]:
    base = api_base(request)
    matched = _filter(search)
    page = matched[search.offset : search.offset + search.limit]
    links: list[dict[str, Any]] = [
        {"rel": "root", "href": f"{base}stac/", "type": _JSON},
        {"rel": "self", "href": str(request.url), "type": _GEOJSON},
    ]
    if search.offset + search.limit < len(matched):
        token = f"{_TOKEN_PREFIX}{search.offset + search.limit}"
        if "repeat-next" in quirks:  # exactly the request just answered
            links.append({"rel": "next", "href": str(request.url), "type": _GEOJSON})
            if method == "POST":
                links[-1].update(method="POST", body=dict(raw), merge=False)
        elif method == "POST":
            merge = "merge-next" in quirks
            links.append(
                {
                    "rel": "next",
                    "href": str(request.url),
                    "type": _GEOJSON,
                    "method": "POST",
                    "body": {"token": token} if merge else {**raw, "token": token},
                    "merge": merge,
                }
            )
        else:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            href = str(request.url.replace(query=urlencode([*params, ("token", token)])))
            links.append({"rel": "next", "href": href, "type": _GEOJSON})
    return {
        "type": "FeatureCollection",
        "features": [_item(p, base, quirks) for p in page],
        "links": links,
        "numberMatched": len(matched),
        "numberReturned": len(page),
    }


def _gzip_asset(request: Request, item_id: str, filename: str) -> Response | None:
    """The asset compressed (the ``gzip`` quirk), or None when the client does not accept it."""
    if "gzip" not in request.headers.get("accept-encoding", ""):
        return None
    body = gzip.compress(b"".join(cat.asset_chunks(item_id, filename)))
    # Response sets Content-Length to the compressed size, as a real server does
    return Response(body, media_type=cat.ASSET_MEDIA_TYPE, headers={"content-encoding": "gzip"})


def _csv_page(request: Request) -> tuple[str, int, int, int] | JSONResponse:
    """Return ``(csv text, offset, limit, total)`` or a 422 response."""
    errors: list[dict[str, Any]] = []
    numbers: dict[str, int] = {}
    for name, default, low, high in (("limit", MAX_LIMIT, 1, MAX_LIMIT), ("offset", 0, 0, None)):
        loc = ["query", name]
        try:
            value = int(request.query_params.get(name, default))
        except ValueError:
            errors.append(
                {"type": "int_parsing", "loc": loc, "msg": "Input should be a valid integer"}
            )
            continue
        if value < low:
            msg = f"Input should be greater than or equal to {low}"
            errors.append({"type": "greater_than_equal", "loc": loc, "msg": msg})
        elif high is not None and value > high:
            msg = f"Input should be less than or equal to {high}"
            errors.append({"type": "less_than_equal", "loc": loc, "msg": msg})
        numbers[name] = value
    raw = {k: request.query_params.get(k) for k in ("datetime", "intersects", "bbox")}
    try:
        matched = _filter(_parse_search(raw))
    except _BadRequest as exc:
        errors.append({"type": "value_error", "loc": ["query"], "msg": f"Value error, {exc}"})
    if errors:
        return invalid(errors)
    offset, limit = numbers["offset"], numbers["limit"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in matched[offset : offset + limit]:
        writer.writerow(
            [
                p.plume_id,
                cat.iso(p.when),
                p.gas,
                p.sector,
                p.emission,
                p.uncertainty,
                p.lat,
                p.lon,
                "tan",
                p.item_id,
                p.collection,
            ]
        )
    return out.getvalue(), offset, limit, len(matched)


def stac_routes(state: EmulatorState) -> list[Route]:
    """Return the STAC and catalogue routes bound to ``state``."""

    def scoped(request: Request, scope: str) -> Response | None:
        """Return an error response unless the request carries a token with ``scope``."""
        token = bearer_token(request)
        claims = state.verify(token, "access") if token else None
        if claims is None:
            return detail(401, "Unauthorized")
        if scope not in str(claims.get("scope", "")).split():
            return detail(403, f"Missing scope {scope}")
        return None

    async def landing(request: Request) -> Response:
        stac = f"{api_base(request)}stac/"
        return JSONResponse(
            {
                "type": "Catalog",
                "stac_version": "1.0.0",
                "id": "carbon-mapper",
                "title": "Carbon Mapper STAC API (cm-tasks emulator)",
                "description": "Synthetic plume catalogue served by cm_tasks.testing.",
                "conformsTo": CONFORMS_TO,
                "links": [
                    {"rel": "self", "href": stac, "type": _JSON},
                    {"rel": "root", "href": stac, "type": _JSON},
                    {"rel": "data", "href": f"{stac}collections", "type": _JSON},
                    {"rel": "conformance", "href": f"{stac}conformance", "type": _JSON},
                    {"rel": "search", "href": f"{stac}search", "type": _GEOJSON, "method": "GET"},
                    {"rel": "search", "href": f"{stac}search", "type": _GEOJSON, "method": "POST"},
                ],
            }
        )

    async def conformance(request: Request) -> Response:
        del request  # required by Starlette's endpoint signature
        return JSONResponse({"conformsTo": CONFORMS_TO})

    async def collections(request: Request) -> Response:
        base = api_base(request)
        return JSONResponse(
            {
                "collections": [cat.to_collection(c, base) for c in cat.COLLECTIONS],
                "links": [
                    {"rel": "root", "href": f"{base}stac/", "type": _JSON},
                    {"rel": "self", "href": f"{base}stac/collections", "type": _JSON},
                ],
            }
        )

    async def collection(request: Request) -> Response:
        collection_id = request.path_params["collection_id"]
        if collection_id not in cat.COLLECTIONS:
            return stac_error(404, "NotFoundError", "Collection not found")
        return JSONResponse(cat.to_collection(collection_id, api_base(request)))

    async def collection_items(request: Request) -> Response:
        collection_id = request.path_params["collection_id"]
        if collection_id not in cat.COLLECTIONS:
            return stac_error(404, "NotFoundError", "Collection not found")
        raw: dict[str, Any] = dict(request.query_params)
        raw["collections"] = [collection_id]
        raw.pop("ids", None)
        try:
            body = _feature_collection(request, _parse_search(raw), raw, "GET", state.quirks)
        except _BadRequest as exc:
            return stac_error(400, "BadRequest", str(exc))
        return JSONResponse(body, media_type=_GEOJSON)

    async def item(request: Request) -> Response:
        plume = cat.PLUMES_BY_ID.get(request.path_params["item_id"])
        if plume is None or plume.collection != request.path_params["collection_id"]:
            return stac_error(404, "NotFoundError", "Item not found")
        return JSONResponse(_item(plume, api_base(request), state.quirks), media_type=_GEOJSON)

    async def search(request: Request) -> Response:
        raw: Any
        if request.method == "POST":
            try:
                raw = json.loads(await request.body() or b"{}")
            except ValueError:
                return stac_error(400, "BadRequest", "request body is not valid JSON")
            if not isinstance(raw, dict):
                return stac_error(400, "BadRequest", "request body must be a JSON object")
        else:
            raw = dict(request.query_params)
        try:
            body = _feature_collection(
                request, _parse_search(raw), raw, request.method, state.quirks
            )
        except _BadRequest as exc:
            return stac_error(400, "BadRequest", str(exc))
        return JSONResponse(body, media_type=_GEOJSON)

    async def asset(request: Request) -> Response:
        denied = scoped(request, "stac")
        if denied is not None:
            return denied
        item_id, filename = request.path_params["item_id"], request.path_params["filename"]
        if "key" in request.path_params:  # .../<key>/plume.tif: the same-file-names links
            filename = f"{request.path_params['key']}.tif"
        size = cat.asset_size(item_id, filename) if filename.endswith(".tif") else None
        if size is None:
            return detail(404, "Not Found")
        if "gzip" in state.quirks and (packed := _gzip_asset(request, item_id, filename)):
            return packed
        chunks: Iterator[bytes] = cat.asset_chunks(item_id, filename)
        if size <= cat.CHUNK_SIZE:
            # One chunk: sent whole, sparing the thread hop a sync stream costs per chunk.
            return Response(b"".join(chunks), media_type=cat.ASSET_MEDIA_TYPE)
        return StreamingResponse(
            chunks,
            media_type=cat.ASSET_MEDIA_TYPE,
            headers={"content-length": str(size)},
        )

    async def plume_csv(request: Request) -> Response:
        denied = scoped(request, "catalog:read")
        if denied is not None:
            return denied
        page = _csv_page(request)
        if isinstance(page, Response):
            return page
        text, offset, limit, total = page
        quirks = state.quirks
        if "csv-no-final-newline" in quirks:
            text = text.rstrip("\n")
        headers = {"content-disposition": 'attachment; filename="plumes.csv"'}
        if offset + limit < total:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
            query = urlencode([*params, ("offset", str(offset + limit))])
            # repeat-next: exactly the request just answered
            url = request.url if "repeat-next" in quirks else request.url.replace(query=query)
            headers["link"] = f'<{url}>; rel="next"'
        return Response(text, media_type="text/csv", headers=headers)

    stac = f"{PREFIX}stac"
    return [
        Route(f"{stac}/", landing, methods=["GET"]),
        Route(stac, landing, methods=["GET"]),
        Route(f"{stac}/conformance", conformance, methods=["GET"]),
        Route(f"{stac}/collections", collections, methods=["GET"]),
        Route(f"{stac}/collections/{{collection_id}}", collection, methods=["GET"]),
        Route(f"{stac}/collections/{{collection_id}}/items", collection_items, methods=["GET"]),
        Route(f"{stac}/collections/{{collection_id}}/items/{{item_id}}", item, methods=["GET"]),
        Route(f"{stac}/search", search, methods=["GET", "POST"]),
        Route(f"{stac}/assets/{{item_id}}/{{filename}}", asset, methods=["GET"]),
        Route(f"{stac}/assets/{{item_id}}/{{key}}/{{filename}}", asset, methods=["GET"]),
        Route(f"{PREFIX}catalog/plume-csv", plume_csv, methods=["GET"]),
    ]
