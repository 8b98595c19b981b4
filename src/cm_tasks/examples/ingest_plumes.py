"""Example ingest flow `ingest-plumes`: search Carbon Mapper's STAC API and download the data.

What a Carbon Mapper user runs to keep a local copy of plume data: search (collections,
datetime range, bbox or GeoJSON, Query extension such as `{"cm:emission": {"gt": 1000}}`),
download the matching assets with bounded concurrency, optionally fetch the plume CSV, and
leave a table of what was fetched on the run's page. Re-runs skip files that are complete.

No parameter is secret: the STAC token comes from `get_stac_token()` (the block named by
`token_block`, refreshed inline if it is about to expire).

The flow is async: all downloads share one `httpx.AsyncClient` and a fixed pool of
`concurrency` workers, so it is fast at any fan-out and its memory does not grow with the number
or size of the assets. (An async flow also skips the ~1 s a sync flow spends joining its
heartbeat thread on exit.) Call it with `asyncio.run(ingest_plumes(...))` or `await` it.

Run it: `python -m cm_tasks.examples.ingest_plumes` (against `CM_BASE_URL`), or deploy it from
the installed package with its module-path entrypoint, e.g.
`ingest_plumes.to_deployment(name="ingest-plumes", entrypoint_type=EntrypointType.MODULE_PATH)`
or the `ingest-plumes` deployment of `prefect.yaml`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from cm_tasks import aget_stac_token
from cm_tasks.ingest import (
    DEFAULT_CONCURRENCY,
    DEFAULT_OUTPUT_DIR,
    check_concurrency,
    download_assets,
    fetch_plume_csv,
    plan_downloads,
    search_body,
    search_stac_items,
)

__all__ = ["ingest_plumes"]


@flow(name="ingest-plumes", persist_result=False)
async def ingest_plumes(
    collections: list[str] | None = None,
    datetime: str | None = None,
    bbox: list[float] | None = None,
    intersects: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
    max_items: int | None = 100,
    asset_keys: list[str] | None = None,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    concurrency: int = DEFAULT_CONCURRENCY,
    plume_csv: bool = False,
    token_block: str | None = None,
) -> dict[str, Any]:
    """Download Carbon Mapper STAC assets (and optionally the plume CSV) to a directory.

    Args:
        collections: STAC collections to search, e.g. ["l4a-ch4"]. Default: all.
        datetime: RFC 3339 instant or interval, e.g. "2024-01-01/2024-06-30" (".." for open).
        bbox: [west, south, east, north] in degrees. Give bbox or intersects, not both.
        intersects: a GeoJSON geometry the items must intersect.
        query: STAC Query extension, e.g. {"cm:emission": {"gt": 1000}}.
        max_items: Stop after this many items (None: every match). Default 100.
        asset_keys: Asset keys to download, e.g. ["cmf"]. Default: every asset.
        output_dir: Where files go: <output_dir>/<collection>/<item id>/<file>.
        concurrency: Parallel downloads, 1 to 64. Default 8.
        plume_csv: Also fetch the plume CSV for the same datetime and area to
            <output_dir>/plumes.csv.
        token_block: CarbonMapperStacToken block. Default: CM_TOKEN_BLOCK.

    Returns:
        Counts of items and files (downloaded, skipped, failed), bytes written, the output
        directory and the CSV row count. Never the token.
    """
    logger = get_run_logger()
    check_concurrency(concurrency)
    body = search_body(
        collections=collections, datetime=datetime, bbox=bbox, intersects=intersects, query=query
    )
    # Fails fast, before any search, if no token can be had; refreshes inline if need be.
    await aget_stac_token(token_block)
    out = Path(output_dir).expanduser()
    items = await search_stac_items(body, max_items=max_items, token_block=token_block)
    assets = plan_downloads(items, out, asset_keys)
    logger.info("%d items matched; %d assets to fetch into %s.", len(items), len(assets), out)
    results = await download_assets(assets, concurrency=concurrency, token_block=token_block)

    csv_rows = None
    if plume_csv:
        csv_rows = await fetch_plume_csv(
            out / "plumes.csv",
            datetime=datetime,
            bbox=bbox,
            intersects=intersects,
            token_block=token_block,
        )

    await acreate_table_artifact(
        [
            {
                "item": r.asset.item_id,
                "collection": r.asset.collection,
                "asset": r.asset.asset_key,
                "emission (kg/h)": r.asset.emission,
                "bytes": r.bytes,
                "status": r.status + (f": {r.error}" if r.error else ""),
                "file": str(r.asset.path),
            }
            for r in results
        ],
        key="ingest-plumes",
        description=f"Carbon Mapper assets fetched into {out}",
    )
    counts = {s: sum(r.status == s for r in results) for s in ("downloaded", "skipped", "failed")}
    summary = {
        "items": len(items),
        "files": len(results),
        **counts,
        "bytes_downloaded": sum(r.bytes for r in results if r.status == "downloaded"),
        "output_dir": str(out),
        "plume_csv_rows": csv_rows,
    }
    logger.info(
        "%d downloaded, %d already complete, %d failed.",
        counts["downloaded"],
        counts["skipped"],
        counts["failed"],
    )
    if counts["failed"]:
        failed = [f"{r.asset.item_id}/{r.asset.asset_key} ({r.error})" for r in results if r.error]
        raise RuntimeError(
            f"{counts['failed']} of {len(results)} downloads failed: {', '.join(failed[:10])}. "
            "Run the flow again: complete files are skipped."
        )
    return summary


if __name__ == "__main__":
    print(asyncio.run(ingest_plumes()))
