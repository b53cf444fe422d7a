"""uvicorn as an actor runs it: inside the actor's uvloop, without its signal handling,
and with the bounds on a request's head that uvicorn's httptools protocol lacks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from meshllm.http.errors import error_response

log = logging.getLogger("meshllm.http")

MAX_REQUEST_HEAD_BYTES = 64 * 1024
"""Request line and headers, a chunk-size line with its extensions, or trailers: at most
this many bytes may arrive without the parser reaching the next step."""
MAX_REQUEST_HEADERS = 100
"""Header fields in a request's head (and, apart, in its trailers)."""
HEAD_TIMEOUT_S = 30.0
"""How long a request's head may take from its first byte: a client that sends it a
byte at a time must not hold a connection (and its buffers) for ever."""
LINGER_S = 2.0
"""How long a refused connection is still read (and what arrives thrown away) before
it is closed: closing with unread bytes resets the connection, and the client would
lose the answer that says why."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request's head, chunk lines and trailers bounded.

    llhttp keeps no limit of its own, and uvicorn appends the URL and every header
    it is handed, so a client that never ends its head (one endless header, or
    endless headers) would grow the process without bound. The body needs nothing
    here: uvicorn stops reading while the app has not taken what arrived, and the
    Proxy caps what it takes (`proxy.read_body`). A request over a bound is answered
    431 and its connection closed (closed only, when a response is already under way);
    what the client still sends meanwhile is thrown away unparsed. A head that takes
    longer than `HEAD_TIMEOUT_S` from its first byte is answered 408.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stalled = 0
        """Bytes received since the parser last reached a step (head, body, chunk, end)."""
        self._progress = False
        self._fields = 0
        self._over: str | None = None
        """Why the request broke a bound (set before the parser is stopped)."""
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._over is not None:
            return
        self._progress = False
        super().data_received(data)
        if self._over is not None or self.transport.is_closing():
            return
        if self._progress:
            self._stalled = 0
            return
        self._stalled += len(data)
        if self._stalled > MAX_REQUEST_HEAD_BYTES:
            self._refuse(
                f"request head, chunk-size line or trailers over {MAX_REQUEST_HEAD_BYTES} bytes"
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a parser error, which a callback below raises on purpose
        # to stop the parser when a bound is broken.
        if self._over is not None:
            self._refuse(self._over)
        else:
            super().send_400_response(msg)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._over is None and not self.transport.is_closing():
            self._refuse(f"request head not complete within {HEAD_TIMEOUT_S:g} s", 408)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, why: str, status: int = 431) -> None:
        self._over = why
        self._stop_head_timer()
        client = self.client[0] if self.client else "?"
        log.warning("refused a request from %s: %s", client, why)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer is under way: it cannot be followed by one
            return
        code = "request_too_large" if status == 431 else "request_too_slow"
        self.transport.write(error_response(status, why, code, close=True))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    # -- parser callbacks: count header fields, note every step ------------------------

    def on_message_begin(self) -> None:
        self._fields = 0
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > MAX_REQUEST_HEADERS:
            self._over = f"more than {MAX_REQUEST_HEADERS} header fields"
            raise ValueError(self._over)  # stops the parser: see send_400_response
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._progress = True
        self._fields = 0  # from here on it counts trailers
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_chunk_complete(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        super().on_message_complete()


class ActorServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the actor runtime (one shutdown path)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def actor_server(app: Any, graceful_s: int, **options: Any) -> ActorServer:
    """A quiet uvicorn server for `app` on the running loop (bounded httptools, no access
    log, no websockets: nothing here speaks them, so no upgrade reaches an app). The
    client address is the connection's: no `X-Forwarded-For` is believed (uvicorn would
    from loopback, and anyone who reaches the node through a local relay could then
    name any address, for instance to get round the wrong-key limit)."""
    config = uvicorn.Config(
        app,
        loop="none",
        proxy_headers=False,
        http=BoundedHttpToolsProtocol,
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=graceful_s,
        **options,
    )
    return ActorServer(config)
