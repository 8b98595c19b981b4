"""Deterministic synthetic STAC catalogue: collections, plume items, asset bytes, filters.

Everything here is a pure function of constants, so every emulator (and every test run) serves
the same items and the same asset bytes.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

COLLECTIONS: dict[str, tuple[str, str]] = {
    "l2b-cmf": ("L2B Concentration Map", "Column methane enhancement (matched filter) scenes."),
    "l3a-ime": ("L3A Integrated Mass Enhancement", "Plume integrated mass enhancement rasters."),
    "l4a-ch4": ("L4A Methane Emissions", "Methane plume emission rate estimates."),
    "l2b-co2": ("L2B CO2 Concentration Map", "Column CO2 enhancement (matched filter) scenes."),
}
ASSET_KEYS: dict[str, tuple[str, list[str]]] = {
    "rgb": ("True-colour RGB quicklook", ["visual"]),
    "cmf": ("Concentration map (matched filter)", ["data"]),
}
ASSET_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
ITEM_COUNT = 60
LARGE_ASSET_SIZE = 6 * 1024 * 1024
CHUNK_SIZE = 64 * 1024
_TIFF_MAGIC = b"II*\x00"
_EPOCH = datetime(2023, 1, 1, tzinfo=timezone.utc)
_SPAN_SECONDS = int((datetime(2025, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds())
# (lon, lat, jitter degrees, sector): Permian basin, San Juan basin, Los Angeles, Central Valley.
_SITES = [
    (-103.5, 32.0, 1.2, "1B2"),
    (-102.3, 31.6, 0.9, "1B2"),
    (-107.9, 36.7, 0.5, "1B2"),
    (-118.2, 34.0, 0.3, "6A"),
    (-119.6, 36.3, 0.6, "4B"),
]
_PLUME_HALF_WIDTH = 0.01


@dataclass(frozen=True)
class Plume:
    """One synthetic plume observation, the source of a STAC item and a plume-CSV row."""

    item_id: str
    collection: str
    when: datetime
    lon: float
    lat: float
    gas: str
    sector: str
    emission: float
    uncertainty: float
    asset_sizes: tuple[tuple[str, int], ...]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Return ``(west, south, east, north)`` of the plume footprint."""
        h = _PLUME_HALF_WIDTH
        return (self.lon - h, self.lat - h, self.lon + h, self.lat + h)

    @property
    def plume_id(self) -> str:
        """Return a Carbon Mapper style plume id."""
        return f"{self.gas}_{self.sector}_250m_{self.lon:.5f}_{self.lat:.5f}"


def iso(when: datetime) -> str:
    """Format a UTC datetime as ISO 8601 with a ``Z`` suffix."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _build_plumes() -> list[Plume]:
    # Not for security: a fixed seed keeps the catalogue identical across runs.
    rng = random.Random(20240607)  # noqa: S311
    names = list(COLLECTIONS)
    plumes = []
    for n in range(ITEM_COUNT):
        collection = names[n % len(names)]
        when = _EPOCH + timedelta(seconds=rng.randrange(_SPAN_SECONDS))
        lon0, lat0, jitter, sector = _SITES[n % len(_SITES)]
        gas = "CO2" if collection == "l2b-co2" else "CH4"
        emission = round(rng.lognormvariate(6.6, 1.1), 1)
        sizes = tuple((key, rng.randrange(4_096, 40_960)) for key in ASSET_KEYS)
        plumes.append(
            Plume(
                item_id=f"emu{when:%Y%m%dt%H%M%S}p{n:04d}-{collection}",
                collection=collection,
                when=when,
                lon=round(lon0 + rng.uniform(-jitter, jitter), 5),
                lat=round(lat0 + rng.uniform(-jitter, jitter), 5),
                gas=gas,
                sector="1A1" if gas == "CO2" else sector,
                emission=emission,
                uncertainty=round(emission * rng.uniform(0.1, 0.4), 1),
                asset_sizes=sizes,
            )
        )
    plumes.sort(key=lambda p: (p.when, p.item_id), reverse=True)
    # One multi-megabyte asset so clients can check they stream downloads instead of buffering.
    first = plumes[0]
    big = tuple((k, LARGE_ASSET_SIZE if k == "cmf" else s) for k, s in first.asset_sizes)
    plumes[0] = replace(first, asset_sizes=big)
    return plumes


PLUMES: list[Plume] = _build_plumes()
PLUMES_BY_ID: dict[str, Plume] = {p.item_id: p for p in PLUMES}
LARGE_ASSET: tuple[str, str] = (PLUMES[0].item_id, "cmf")


def asset_key(name: str) -> str:
    """Return the asset key for ``name``, which may be the key or the file name (``cmf.tif``)."""
    return name.removesuffix(".tif")


def asset_size(item_id: str, name: str) -> int | None:
    """Return the byte size of an asset, or None if the item or asset does not exist."""
    plume = PLUMES_BY_ID.get(item_id)
    if plume is None:
        return None
    return dict(plume.asset_sizes).get(asset_key(name))


def asset_chunks(item_id: str, name: str) -> Iterator[bytes]:
    """Yield the deterministic content of an asset in chunks; empty if it does not exist."""
    size = asset_size(item_id, name)
    if size is None:
        return
    key = asset_key(name)
    sent = 0
    index = 0
    while sent < size:
        # Not for security: seeded so that every download of an asset has identical bytes.
        rng = random.Random(f"{item_id}/{key}/{index}")  # noqa: S311
        chunk = rng.randbytes(min(CHUNK_SIZE, size - sent))
        if index == 0:
            chunk = (_TIFF_MAGIC + chunk[len(_TIFF_MAGIC) :])[: len(chunk)]
        yield chunk
        sent += len(chunk)
        index += 1


def geometry_bbox(geometry: dict[str, Any]) -> tuple[float, float, float, float]:
    """Return the bounding box of a GeoJSON geometry, feature or feature collection.

    Raises:
        ValueError: If it holds no coordinates.
    """
    xs: list[float] = []
    ys: list[float] = []

    def walk(node: Any) -> None:
        if (
            isinstance(node, (list, tuple))
            and len(node) >= 2
            and all(isinstance(v, (int, float)) for v in node)
        ):
            xs.append(float(node[0]))
            ys.append(float(node[1]))
        elif isinstance(node, (list, tuple)):
            for child in node:
                walk(child)

    kind = geometry.get("type")
    if kind == "Feature":
        return geometry_bbox(geometry.get("geometry") or {})
    if kind == "FeatureCollection":
        walk([f.get("geometry", {}).get("coordinates") for f in geometry.get("features", [])])
    elif kind == "GeometryCollection":
        walk([g.get("coordinates") for g in geometry.get("geometries", [])])
    else:
        walk(geometry.get("coordinates"))
    if not xs:
        raise ValueError("geometry has no coordinates")
    return (min(xs), min(ys), max(xs), max(ys))


def bbox_overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    """Return True if two 2D ``(west, south, east, north)`` boxes intersect."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def parse_instant(text: str) -> datetime:
    """Parse an RFC 3339 datetime or a date; naive values are taken as UTC.

    Raises:
        ValueError: If ``text`` is neither.
    """
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def parse_interval(text: str) -> tuple[datetime | None, datetime | None]:
    """Parse a STAC ``datetime`` value: an instant, or ``start/end`` with ``..`` for open ends.

    A lone instant becomes the interval ``[instant, instant]``; a date-only end covers that day.

    Raises:
        ValueError: If it cannot be parsed or the start is after the end.
    """
    if "/" not in text:
        instant = parse_instant(text)
        return instant, _end_of(text, instant)
    start_text, end_text = text.split("/", 1)
    start = None if start_text in ("", "..") else parse_instant(start_text)
    end = None if end_text in ("", "..") else _end_of(end_text, parse_instant(end_text))
    if start and end and start > end:
        raise ValueError("datetime interval start is after its end")
    return start, end


def _end_of(text: str, instant: datetime) -> datetime:
    if len(text.strip()) == 10:  # a bare date: the whole day is included
        return instant + timedelta(days=1) - timedelta(microseconds=1)
    return instant


_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "in": lambda value, options: value in options,
}
QUERY_OPS = frozenset(_OPS)


def matches_query(properties: dict[str, Any], query: dict[str, Any]) -> bool:
    """Return True if ``properties`` satisfy a STAC Query-extension object.

    Raises:
        ValueError: On an unknown operator or an uncomparable value.
    """
    for prop, conditions in query.items():
        if not isinstance(conditions, dict):
            raise ValueError(f"query for {prop!r} must be an object of operators")
        value = properties.get(prop)
        for op, operand in conditions.items():
            if op not in _OPS:
                raise ValueError(f"unsupported query operator {op!r}")
            if value is None:
                return False
            try:
                if not _OPS[op](value, operand):
                    return False
            except TypeError as exc:
                raise ValueError(f"cannot compare {prop!r} with operator {op!r}") from exc
    return True


def item_properties(plume: Plume) -> dict[str, Any]:
    """Return the STAC item properties of a plume."""
    return {
        "datetime": iso(plume.when),
        "cm:emission": plume.emission,
        "cm:emission_uncertainty": plume.uncertainty,
        "cm:plume_id": plume.plume_id,
        "cm:gas": plume.gas,
        "cm:sector": plume.sector,
        "cm:instrument": "tan",
        "platform": "Tanager-1",
    }


def to_item(plume: Plume, api_base: str) -> dict[str, Any]:
    """Return the STAC item for a plume, with links and asset hrefs under ``api_base``."""
    stac = f"{api_base}stac"
    west, south, east, north = plume.bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    sizes = dict(plume.asset_sizes)
    assets = {
        key: {
            "href": f"{stac}/assets/{plume.item_id}/{key}.tif",
            "type": ASSET_MEDIA_TYPE,
            "title": title,
            "roles": roles,
            "file:size": sizes[key],
        }
        for key, (title, roles) in ASSET_KEYS.items()
    }
    coll = f"{stac}/collections/{plume.collection}"
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/file/v2.1.0/schema.json"],
        "id": plume.item_id,
        "collection": plume.collection,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [west, south, east, north],
        "properties": item_properties(plume),
        "links": [
            {
                "rel": "self",
                "href": f"{coll}/items/{plume.item_id}",
                "type": "application/geo+json",
            },
            {"rel": "parent", "href": coll, "type": "application/json"},
            {"rel": "collection", "href": coll, "type": "application/json"},
            {"rel": "root", "href": f"{stac}/", "type": "application/json"},
        ],
        "assets": assets,
    }


def to_collection(collection_id: str, api_base: str) -> dict[str, Any]:
    """Return the STAC collection document for ``collection_id``."""
    title, description = COLLECTIONS[collection_id]
    members = [p for p in PLUMES if p.collection == collection_id]
    boxes = [p.bbox for p in members]
    bbox = [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
    times = [p.when for p in members]
    href = f"{api_base}stac/collections/{collection_id}"
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": collection_id,
        "title": title,
        "description": description,
        "license": "CC-BY-4.0",
        "extent": {
            "spatial": {"bbox": [bbox]},
            "temporal": {"interval": [[iso(min(times)), iso(max(times))]]},
        },
        "links": [
            {"rel": "self", "href": href, "type": "application/json"},
            {"rel": "parent", "href": f"{api_base}stac/", "type": "application/json"},
            {"rel": "root", "href": f"{api_base}stac/", "type": "application/json"},
            {"rel": "items", "href": f"{href}/items", "type": "application/geo+json"},
        ],
    }
