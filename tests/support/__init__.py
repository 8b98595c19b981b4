"""Helpers shared by the test tiers (tests/unit, tests/integration, tests/e2e).

Test modules never import from each other: what two of them need lives here.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout: prefect.yaml, flows/, docs/."""

SCRIPTS = Path(__file__).resolve().parent / "scripts"
"""Programs the end-to-end tests run in processes of their own."""
