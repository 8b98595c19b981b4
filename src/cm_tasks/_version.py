"""The version of cm-tasks: the single source, read by pyproject.toml at build time.

A constant rather than `importlib.metadata.version()`, which scans the installed
distributions and would add tens of milliseconds to `import cm_tasks`.
"""

__version__ = "0.2.0"
