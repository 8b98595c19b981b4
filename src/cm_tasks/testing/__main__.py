"""Serve the Carbon Mapper API emulator until Ctrl-C: ``python -m cm_tasks.testing``."""

from __future__ import annotations

import argparse
import threading

from cm_tasks.testing._emulator import run_emulator


def serve(port: int, latency: float) -> None:
    """Serve the emulator on 127.0.0.1:``port`` until interrupted, printing how to use it.

    Args:
        port: TCP port; 0 picks a free one.
        latency: Delay in seconds applied to every request.
    """
    with run_emulator(port=port, latency=latency) as emu:
        # A demo account on a local fake server: printing its password is the point.
        print(f"Carbon Mapper API emulator serving at {emu.base_url}")
        print(f"  email:    {emu.email}")
        print(f"  password: {emu.password}")
        print(f"  STAC:     {emu.base_url}stac/")
        print("Press Ctrl-C to stop.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("Stopping.")


def main(argv: list[str] | None = None) -> None:
    """Parse command-line arguments and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m cm_tasks.testing",
        description="Serve a local emulator of the Carbon Mapper platform API.",
    )
    parser.add_argument("--port", type=int, default=8787, help="TCP port (default: 8787)")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="delay per request in seconds (default: 0)"
    )
    args = parser.parse_args(argv)
    serve(args.port, args.latency)


if __name__ == "__main__":
    main()
