"""The installed version of cm-tasks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cm-tasks")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
