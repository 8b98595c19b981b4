"""`cm-tasks emulator`: a port that is taken is one `Error:` line, not a traceback."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from cm_tasks.cli import app


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["emulator", "--port", str(port)])

    assert result.exit_code == 1
    assert "Error:" in result.output
    assert f"127.0.0.1:{port}" in result.output
    assert "--port" in result.output
    assert "Traceback" not in result.output
