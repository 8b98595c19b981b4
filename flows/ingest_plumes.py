"""Entry point of the example `ingest-plumes` flow for checkouts and older prefect.yaml files.

The flow ships with the package: `cm_tasks.examples.ingest_plumes` (run it with
`python -m cm_tasks.examples.ingest_plumes`). This file only re-exports it, so that
`flows/ingest_plumes.py:ingest_plumes` entrypoints keep working.
"""

import asyncio

from cm_tasks.examples.ingest_plumes import ingest_plumes

__all__ = ["ingest_plumes"]

if __name__ == "__main__":
    print(asyncio.run(ingest_plumes()))
