"""Logging set-up shared by the root process and every actor."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-5s %(processName)s %(name)s: %(message)s"


def setup(level: str = "INFO", process_name: str | None = None) -> None:
    if process_name is not None:
        import multiprocessing

        multiprocessing.current_process().name = process_name
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "quic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
