"""A throw-away PostgreSQL 15 server on 127.0.0.1, from this machine's Debian packages.

`initdb` refuses to run as root, so when the tests run as root (as CI does) the cluster is
created and started as the `postgres` user. Everything lives in one temporary directory,
which is removed afterwards; the server is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .prefect_server import free_port

PG_BIN = Path(os.environ.get("CM_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def postgres_available() -> bool:
    """Whether PostgreSQL's server binaries are installed where the tests look."""
    return (PG_BIN / "initdb").exists() and (PG_BIN / "postgres").exists()


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@contextlib.contextmanager
def postgres_server(database: str = "prefect") -> Iterator[str]:
    """Run PostgreSQL in a temp dir; yields a `postgresql+asyncpg://` URL for Prefect."""
    root = Path(tempfile.mkdtemp(prefix="cm-tasks-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    log = root / "postgres.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
            ),
            check=True,
            capture_output=True,
        )
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                _as_postgres(
                    [
                        str(PG_BIN / "postgres"),
                        "-D",
                        str(data),
                        "-p",
                        str(port),
                        "-h",
                        "127.0.0.1",
                        "-k",
                        str(sockets),
                        "-c",
                        "max_connections=200",
                        "-c",
                        "fsync=off",
                    ]
                ),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _wait_ready(port, process, log)
        subprocess.run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                database,
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited at start:\n{log.read_text()[-2000:]}")
        ready = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
            check=False,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"PostgreSQL did not start in 30 s:\n{log.read_text()[-2000:]}")
