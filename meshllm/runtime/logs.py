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


WARN_INTERVAL_S = 10.0
"""Least time between two warnings of one kind about what peers sent."""


MAX_KINDS = 1024
"""Kinds one `Throttle` remembers (a peer can make new ids, and so new kinds)."""
OTHER_KINDS = "(other peers)"


class Throttle:
    """At most one log line per `interval` for each kind of trouble; the rest are counted.

    For warnings whose cause and rate a peer controls. Sans-I/O: the caller passes the
    time. `kind` may name a peer (one line per peer); what it holds is bounded by
    `MAX_KINDS`.
    """

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        self.interval = interval
        self.next_at: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def allow(self, kind: str, now: float) -> int | None:
        """None to stay silent; else how many lines of this kind were skipped since the last.

        At most `MAX_KINDS` kinds are kept: past that, kinds whose interval has ended are
        forgotten, and while all are in theirs a new kind shares one line with the rest."""
        if kind not in self.next_at and len(self.next_at) >= MAX_KINDS:
            self._forget(now)
            if len(self.next_at) >= MAX_KINDS:
                kind = OTHER_KINDS
        if now < self.next_at.get(kind, 0.0):
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            return None
        self.next_at[kind] = now + self.interval
        return self.skipped.pop(kind, 0)

    def _forget(self, now: float) -> None:
        for kind, at in list(self.next_at.items()):
            if at <= now:
                del self.next_at[kind]
                self.skipped.pop(kind, None)
