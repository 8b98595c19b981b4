"""A local emulator of the Carbon Mapper platform API, for tests and offline demos.

Import it only where needed (tests, the ``serve`` CLI): it pulls in uvicorn and Starlette.
The pytest plugin ``cm_tasks.testing.pytest_plugin`` provides the ``carbon_mapper_emulator``
fixture; ``python -m cm_tasks.testing`` serves it interactively.
"""

from cm_tasks.testing._emulator import (
    DEMO_EMAIL,
    DEMO_PASSWORD,
    CarbonMapperEmulator,
    run_emulator,
)
from cm_tasks.testing._faults import Fault

__all__ = ["DEMO_EMAIL", "DEMO_PASSWORD", "CarbonMapperEmulator", "Fault", "run_emulator"]
