"""uvicorn as an actor runs it: inside the actor's uvloop, without its signal handling."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn


class ActorServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the actor runtime (one shutdown path)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def actor_server(app: Any, graceful_s: int, **options: Any) -> ActorServer:
    """A quiet uvicorn server for `app` on the running loop (httptools, no access log)."""
    config = uvicorn.Config(
        app,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=graceful_s,
        **options,
    )
    return ActorServer(config)
