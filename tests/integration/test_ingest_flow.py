"""The example ingest flow and cm_tasks.ingest, end to end against the emulator.

The flow is async: the tests await it on the session's event loop (pytest-asyncio, auto mode).
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import inspect
import json
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import State

import cm_tasks.ingest
from cm_tasks import (
    CarbonMapperStacToken,
    ConfigurationError,
    async_stac_http_client,
    clear_token_cache,
)
from cm_tasks.ingest import (
    AssetFile,
    download_all,
    fetch_plume_csv_to,
    iter_search,
    plan_downloads,
    search_body,
)
from cm_tasks.testing import CarbonMapperEmulator, Fault
from tests.support import REPO_ROOT
from tests.support.token_helpers import CREATE_STAC, assert_no_secrets, save_token, stored_token

FLOW_FILE = REPO_ROOT / "flows" / "ingest_plumes.py"


def _load_flow_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ingest_plumes_flow", FLOW_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ingest_plumes = _load_flow_module().ingest_plumes


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def _run_record(flow_run_id: Any) -> tuple[list[Any], str]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
        flow_run = client.read_flow_run(flow_run_id)
    text = "\n".join(
        [log.message for log in logs]
        + [json.dumps(a.data, default=str) + str(a.description) for a in artifacts]
        + [repr(flow_run.parameters), str(flow_run.state.message if flow_run.state else "")]
    )
    return artifacts, text


async def _search(body: dict[str, Any], max_items: int | None = None) -> list[dict[str, Any]]:
    async with async_stac_http_client() as http:
        return [item async for item in iter_search(http, body, max_items)]


SEARCH = {"collections": ["l4a-ch4"], "query": {"cm:emission": {"gt": 300}}, "max_items": 5}


async def _result(state: State[Any]) -> Any:
    # `State.aresult()` is newer than Prefect 3.2 and not what these tests are about; in async
    # code `State.result()` gives an awaitable on every supported Prefect (3.2 to 3.9).
    result = state.result()
    return await result if inspect.isawaitable(result) else result


async def test_flow_downloads_matching_assets_with_artifacts(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    out = tmp_path / "data"

    state = await ingest_plumes(**SEARCH, output_dir=str(out), plume_csv=True, return_state=True)

    summary = await _result(state)
    assert state.is_completed()
    files = _files(out)
    item_dirs = {Path(name).parent for name in files if name != "plumes.csv"}
    assert summary["items"] == len(item_dirs) == 5
    assert summary["downloaded"] == summary["files"] == 10
    assert summary["skipped"] == summary["failed"] == 0
    for name in files:
        if name == "plumes.csv":
            continue
        collection, item_id, file_name = Path(name).parts
        assert collection == "l4a-ch4"
        assert (out / name).read_bytes() == emu.asset_bytes(item_id, file_name)
    assert summary["bytes_downloaded"] == sum(s for n, s in files.items() if n != "plumes.csv")
    with (out / "plumes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["plume_csv_rows"] == 60
    assert emu.requests(CREATE_STAC) == 0

    artifacts, text = _run_record(state.state_details.flow_run_id)
    by_type = {a.type: a for a in artifacts}
    assert by_type["progress"].data == 100.0
    table = by_type["table"]
    assert table.key == "ingest-plumes"
    assert "emission (kg/h)" in str(table.data)
    assert "cmf" in str(table.data)
    assert_no_secrets(text, emu)


async def test_rerun_skips_complete_files(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    await ingest_plumes(**SEARCH, output_dir=str(tmp_path))
    first = _files(tmp_path)
    downloads = sum(n for (m, p, s), n in _asset_gets(emu).items())

    summary = await ingest_plumes(**SEARCH, output_dir=str(tmp_path))

    assert summary["skipped"] == 10
    assert summary["downloaded"] == 0
    assert _files(tmp_path) == first
    assert sum(_asset_gets(emu).values()) == downloads  # no asset fetched again


def _asset_gets(emu: CarbonMapperEmulator) -> dict[tuple[str, str, int], int]:
    counts: dict[tuple[str, str, int], int] = {}
    for entry in emu.request_log:
        if entry[1].startswith("stac/assets/"):
            counts[entry] = counts.get(entry, 0) + 1
    return counts


async def test_failed_download_leaves_no_partial_file_and_rerun_completes(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    items = await _search(search_body(collections=["l4a-ch4"]), 2)
    victim = items[1]
    emu.fail(f"stac/assets/{victim['id']}/cmf.tif", Fault.status(503))

    state = await ingest_plumes(
        collections=["l4a-ch4"], max_items=2, output_dir=str(tmp_path), return_state=True
    )

    assert state.is_failed()
    assert "1 of 4 downloads failed" in str(state.message)
    assert victim["id"] in str(state.message)
    files = _files(tmp_path)
    assert len(files) == 3
    assert not any(Path(name).name.startswith(".") for name in files)  # no temporary files

    summary = await ingest_plumes(collections=["l4a-ch4"], max_items=2, output_dir=str(tmp_path))

    assert summary["downloaded"] == 1
    assert summary["skipped"] == 3
    path = tmp_path / "l4a-ch4" / victim["id"] / "cmf.tif"
    assert path.read_bytes() == emu.asset_bytes(victim["id"], "cmf")


async def test_wrong_size_file_is_downloaded_again(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    await ingest_plumes(collections=["l3a-ime"], max_items=1, output_dir=str(tmp_path))
    (path,) = [p for p in tmp_path.rglob("cmf.tif")]
    path.write_bytes(b"truncated")

    summary = await ingest_plumes(collections=["l3a-ime"], max_items=1, output_dir=str(tmp_path))

    assert summary["downloaded"] == 1
    assert summary["skipped"] == 1
    assert path.read_bytes() == emu.asset_bytes(path.parent.name, "cmf")


async def test_search_pages_with_bbox_datetime_and_query(
    carbon_mapper_token_block: CarbonMapperStacToken, carbon_mapper_emulator: CarbonMapperEmulator
) -> None:
    body = search_body(
        bbox=[-105.0, 30.0, -101.0, 33.5],
        datetime="2023-01-01T00:00:00Z/2024-12-31T23:59:59Z",
        query={"cm:emission": {"gte": 200}},
        limit=3,
    )
    items = await _search(body)
    capped = await _search(body, max_items=4)

    assert len(items) > 3  # more than one page
    assert [i["id"] for i in capped] == [i["id"] for i in items[:4]]
    for item in items:
        west, south, east, north = item["bbox"]
        assert west <= -101.0
        assert east >= -105.0
        assert south <= 33.5
        assert north >= 30.0
        assert item["properties"]["cm:emission"] >= 200
    assert carbon_mapper_emulator.requests("stac/search") >= 3


async def test_plume_csv_follows_link_header_pages(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    path = tmp_path / "plumes.csv"
    async with async_stac_http_client() as http:
        rows = await fetch_plume_csv_to(http, path, datetime="2023-01-01/2024-12-31", page_size=7)

    lines = path.read_text().splitlines()
    assert rows == len(lines) - 1 == 60
    assert lines[0].startswith("plume_id,")
    assert sum(line.startswith("plume_id,") for line in lines) == 1
    assert carbon_mapper_emulator.requests("catalog/plume-csv") == 9


def test_plan_refuses_unsafe_names(tmp_path: Path) -> None:
    item = {"id": "../../etc", "collection": "x", "assets": {"a": {"href": "http://h/a.tif"}}}
    with pytest.raises(ValueError, match="unsafe item id"):
        plan_downloads([item], tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"bbox": [1, 2, 3, 4], "intersects": {"type": "Point", "coordinates": [1, 2]}},
            "not both",
        ),
        ({"bbox": [1, 2, 3]}, "give 4"),
        ({"concurrency": 0}, "1 to 64"),
    ],
)
async def test_flow_rejects_bad_parameters_before_any_request(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await ingest_plumes(output_dir=str(tmp_path), **kwargs)
    assert carbon_mapper_emulator.requests() == 0


async def test_flow_renews_a_rejected_token_once(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    save_token(emu, "revoked-token-value", timedelta(days=10))  # looks valid; the API refuses it
    clear_token_cache()

    state = await ingest_plumes(**SEARCH, output_dir=str(tmp_path), return_state=True)

    summary = await _result(state)
    assert summary["downloaded"] == 10
    assert emu.requests(CREATE_STAC) == 1
    assert stored_token() == emu.issued_stac_tokens[-1]
    _, text = _run_record(state.state_details.flow_run_id)
    assert_no_secrets(text, emu)


def _tracking_download_one(
    monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None
) -> dict[str, int]:
    """Wrap download_one to record the most downloads and asyncio tasks alive at once."""
    real = cm_tasks.ingest.download_one
    seen = {"in_flight": 0, "max_in_flight": 0, "max_tasks": 0}

    async def tracking(http: Any, asset: AssetFile) -> Any:
        seen["in_flight"] += 1
        seen["max_in_flight"] = max(seen["max_in_flight"], seen["in_flight"])
        seen["max_tasks"] = max(seen["max_tasks"], len(asyncio.all_tasks()))
        try:
            if asset.item_id == fail_on:
                await asyncio.sleep(0.05)  # the other workers are waiting for their responses
                raise OSError("No space left on device")
            return await real(http, asset)
        finally:
            seen["in_flight"] -= 1

    monkeypatch.setattr(cm_tasks.ingest, "download_one", tracking)
    return seen


async def test_download_all_runs_a_fixed_pool_of_workers(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    items = await _search(search_body(collections=["l4a-ch4"]), 9)
    assets = plan_downloads(items, tmp_path)
    emu.latency = 0.05  # so that downloads overlap
    seen = _tracking_download_one(monkeypatch)
    progress: list[tuple[int, int]] = []
    baseline = len(asyncio.all_tasks())

    async with async_stac_http_client() as http:
        results = await download_all(http, assets, 3, lambda d, t: progress.append((d, t)))

    assert [r.asset for r in results] == assets  # in the order of the assets
    assert {r.status for r in results} == {"downloaded"}
    assert seen["max_in_flight"] == 3
    assert seen["max_tasks"] <= baseline + 3  # 3 workers, not one task per asset (18 here)
    assert progress == [(n, 18) for n in range(1, 19)]
    for r in results:
        assert r.asset.path.read_bytes() == emu.asset_bytes(r.asset.item_id, r.asset.path.name)


async def test_an_unexpected_error_stops_every_worker_and_leaves_no_temporary_file(
    carbon_mapper_token_block: CarbonMapperStacToken,
    carbon_mapper_emulator: CarbonMapperEmulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    emu = carbon_mapper_emulator
    items = await _search(search_body(collections=["l4a-ch4"]), 4)
    assets = plan_downloads(items, tmp_path)
    emu.latency = 0.5  # the other downloads are still waiting when the error comes
    _tracking_download_one(monkeypatch, fail_on=items[0]["id"])

    async with async_stac_http_client() as http:
        with pytest.raises(OSError, match="No space left"):  # as raised, not an ExceptionGroup
            await download_all(http, assets, 8)

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial or temporary file
