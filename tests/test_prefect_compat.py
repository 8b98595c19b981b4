"""What differs between the supported Prefect versions (3.2 to 3.9), and how cm-tasks meets it.

`make compat` runs the whole suite on Prefect 3.2, 3.4 and the newest; these tests pin down the
places where cm-tasks does something version-dependent, so each runs on every version.
"""

import threading
from collections.abc import Callable
from typing import Any

import prefect
import pytest
from packaging.version import Version
from prefect.utilities.callables import parameter_schema

from cm_tasks import TokenBlockError, _refresh_lease, refresh_stac_token
from cm_tasks._refresh_lease import prefect_has_leases, refresh_lease
from cm_tasks.watchdog import check_stac_token


@pytest.mark.parametrize(
    ("flow", "parameters"),
    [
        (refresh_stac_token, {"token_name": "nightly", "lifetime_days": 3, "token_block": "a-b"}),
        (check_stac_token, {"threshold_days": 2.5, "token_block": "a-b"}),
    ],
)
def test_flow_parameter_models_build_with_descriptions(
    flow: Callable[..., Any], parameters: dict[str, Any]
) -> None:
    # Postponed annotations with Annotated aliases made this raise on Prefect 3.2 and 3.4
    # ("Refresh_Stac_TokenModel is not fully defined; you should define TokenName").
    validated = flow.validate_parameters(parameters)  # type: ignore[attr-defined]
    # Prefect 3.4 also fills in the defaults of the other parameters; 3.2 and 3.9 do not.
    assert {name: validated[name] for name in parameters} == parameters
    properties = parameter_schema(flow.fn).properties  # type: ignore[attr-defined]
    assert set(parameters) <= set(properties)
    assert all(p.get("description") for p in properties.values())


def test_leases_are_used_only_where_prefect_has_them() -> None:
    # Prefect 3.2 has no leases: its concurrency() raised TypeError on lease_duration=, and
    # its client has no increment-with-lease.
    assert prefect_has_leases() == (Version(prefect.__version__) >= Version("3.4"))


def test_one_lease_holder_at_a_time_on_every_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # The single-refresh guarantee, with or without leases: while one holder has the slot,
    # another acquisition waits and times out; once released, the next one gets it.
    monkeypatch.setattr(_refresh_lease, "LEASE_MARGIN_SECONDS", 0.0)
    monkeypatch.setenv("CM_TIMEOUT", "0.5")
    monkeypatch.setenv("CM_MAX_ATTEMPTS", "1")  # the wait: 2 calls x 3 x 0.5 s = 3 s
    block = "compat-lease-test"
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with refresh_lease(block):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(TokenBlockError, match="Waited 3 s"), refresh_lease(block):
            pass
    finally:
        release.set()
        holder.join(60)
    with refresh_lease(block):
        pass
