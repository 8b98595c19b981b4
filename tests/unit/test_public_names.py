"""`cm_tasks`'s public names: one list (its imports), lazy where they are costly."""

from __future__ import annotations

import importlib

import pytest

import cm_tasks


def test_every_exported_name_resolves_and_is_listed() -> None:
    assert len(cm_tasks.__all__) == len(set(cm_tasks.__all__)) >= 40
    for name in cm_tasks.__all__:
        assert getattr(cm_tasks, name) is not None, name
        assert name in dir(cm_tasks), name


def test_the_lazy_names_come_from_the_module_that_defines_them() -> None:
    assert set(cm_tasks._LAZY) <= set(cm_tasks.__all__)
    assert {"get_stac_token", "refresh_stac_token", "check_stac_token"} <= set(cm_tasks._LAZY)
    for name, module in cm_tasks._LAZY.items():
        assert getattr(cm_tasks, name) is getattr(importlib.import_module(module), name)


def test_the_eager_names_are_the_block_the_errors_and_the_version() -> None:
    eager = set(cm_tasks.__all__) - set(cm_tasks._LAZY)
    assert eager == {
        "__version__",
        "CarbonMapperStacToken",
        *(
            name
            for name in cm_tasks.__all__
            if name.endswith("Error") and name != "StacTokenExpiringError"
        ),
    }


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        cm_tasks.no_such_name  # noqa: B018
