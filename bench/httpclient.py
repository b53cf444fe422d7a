"""A minimal HTTP/1.1 keep-alive client on an asyncio Protocol: the load generator.

Both paths (direct to llama-server, through the node) are driven by this same
code, so whatever it costs is paid equally by both. It is deliberately cheaper
than httpx or requests, whose per-request CPU would otherwise dominate on a
small machine. It does only what the benchmark needs:

- requests are prebuilt bytes (`build_request`), written in one call;
- responses with Content-Length or chunked bodies, parsed by meshllm's own
  response parser (`meshllm.http.h1`, on httptools); the body is not kept,
  only its size, except the SSE events of a stream, whose arrival times are
  taken;
- a response that says `Connection: close` (llama-server after a streamed
  response, or at its keep-alive limit) or a server that closes the socket
  marks the connection dead; `Endpoint` reconnects *before* the next request's
  clock starts, and retries a request once if the connection turns out closed
  before any response byte arrived (counted in `Endpoint.retries`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

from meshllm.http.h1 import ResponseError, ResponseReader

CONTENT_MARK = b'"content":"'


class HTTPError(Exception):
    """A non-2xx status, a protocol error or a lost connection mid-response."""


class StaleConnection(HTTPError):
    """The connection was closed before any byte of the response arrived."""


@dataclass(slots=True)
class Reply:
    """What one request returned, with perf_counter() timestamps."""

    status: int = 0
    body_bytes: int = 0
    t_done: float = 0.0
    # SSE only: events with a content token (first, last arrival) and their count.
    t_first_token: float = 0.0
    t_last_token: float = 0.0
    tokens: int = 0
    events: int = 0
    last_data: bytes = b""
    """SSE only: the last `data: {...}` event (llama-server's usage and timings)."""


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\n"
        f"host: {host}:{port}\r\n"
        "content-type: application/json\r\n"
        "accept: */*\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class Connection(ResponseReader, asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time (meshllm's own response parser)."""

    def __init__(self) -> None:
        ResponseReader.__init__(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[Reply] | None = None
        self.reply = Reply()
        self.got_bytes = False
        self.checked = False
        self.sse = False
        self.events = bytearray()
        self.now = 0.0

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.got_bytes:
                waiter.set_exception(HTTPError(f"connection lost mid-response: {exc}"))
            else:
                waiter.set_exception(StaleConnection(str(exc)))

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        self.got_bytes = True
        try:
            self.feed(data)
            if self.head_done and not self.checked:
                self._check_head()
        except ResponseError as exc:
            self._fail(HTTPError(f"bad response: {exc}"))
            return
        except HTTPError as exc:
            self._fail(exc)
            return
        if self.done:
            self._finish(self.now)

    # -- request --------------------------------------------------------------

    async def request(self, data: bytes, sse: bool = False) -> Reply:
        """Send a prebuilt request and wait for the whole response."""
        if self.closed or self.transport is None:
            raise StaleConnection("connection already closed")
        self.expect()
        self.reply = Reply()
        self.got_bytes = False
        self.checked = False
        self.events.clear()
        self.sse = sse
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.transport.write(data)
        try:
            return await waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing ----------------------------------------------------------------

    def _check_head(self) -> None:
        self.checked = True
        self.reply.status = self.status
        if not 200 <= self.status < 300:
            # Read no further: the connection is dropped and the caller told.
            raise HTTPError(f"HTTP {self.status}")
        if self.length is None and not self.chunked:
            raise HTTPError("response has neither Content-Length nor chunked body")

    def body_piece(self, data: bytes) -> None:
        self.reply.body_bytes += len(data)
        if self.sse:
            self._feed_events(data, self.now)

    def _fail(self, exc: HTTPError) -> None:
        self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _finish(self, now: float) -> None:
        self.reply.t_done = now
        if not self.keep_alive:
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.reply)

    def _feed_events(self, data: bytes, now: float) -> None:
        events = self.events
        events += data
        while (end := events.find(b"\n\n")) >= 0:
            event = bytes(events[:end])
            del events[: end + 2]
            self.reply.events += 1
            if event.startswith(b"data: {"):
                self.reply.last_data = event
            if CONTENT_MARK in event:
                if self.reply.tokens == 0:
                    self.reply.t_first_token = now
                self.reply.t_last_token = now
                self.reply.tokens += 1


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Connection, host, port)
    return proto


@dataclass(slots=True)
class Endpoint:
    """A server plus one keep-alive connection to it, reopened when it dies."""

    host: str
    port: int
    conn: Connection | None = None
    retries: int = 0
    connects: int = 0
    errors: list[str] = field(default_factory=list)

    def request_bytes(self, path: str, body: bytes) -> bytes:
        return build_request(self.host, self.port, path, body)

    async def ready(self) -> Connection:
        """An open connection; call before starting a request's clock."""
        if self.conn is None or self.conn.closed:
            self.conn = await connect(self.host, self.port)
            self.connects += 1
        return self.conn

    async def call(self, data: bytes, sse: bool = False) -> Reply:
        conn = await self.ready()
        try:
            return await conn.request(data, sse)
        except StaleConnection:
            # Closed by the server while idle: once more on a fresh connection.
            self.retries += 1
            self.conn = None
            conn = await self.ready()
            return await conn.request(data, sse)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
