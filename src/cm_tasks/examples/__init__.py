"""Example flows that ship with cm-tasks, to run as they are or to copy.

`cm_tasks.examples.ingest_plumes`: search Carbon Mapper's STAC API and download the matching
assets (`python -m cm_tasks.examples.ingest_plumes`, or deploy it with the module-path
entrypoint `cm_tasks.examples.ingest_plumes.ingest_plumes`).
"""
