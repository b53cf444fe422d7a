"""A minimal HTTP/1.1 keep-alive client on an asyncio Protocol: the load generator.

Both paths (direct to llama-server, through the node) are driven by this same
code, so whatever it costs is paid equally by both. It is deliberately cheaper
than httpx or requests, whose per-request CPU would otherwise dominate on a
small machine. It does only what the benchmark needs:

- requests are prebuilt bytes (`build_request`), written in one call;
- responses with Content-Length or chunked bodies; the body is not kept, only
  its size, except the SSE events of a stream, whose arrival times are taken;
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

MAX_HEAD = 64 * 1024
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


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\n"
        f"host: {host}:{port}\r\n"
        "content-type: application/json\r\n"
        "accept: */*\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.reply = Reply()
        self.keep_alive = True
        self.got_bytes = False
        self.sse = False
        self.events = bytearray()
        self._reset()

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
        now = time.perf_counter()
        self.got_bytes = True
        self.buf += data
        try:
            self._parse(now)
        except HTTPError as exc:
            self._fail(exc)
        except ValueError as exc:
            self._fail(HTTPError(f"bad response: {exc}"))

    # -- request --------------------------------------------------------------

    async def request(self, data: bytes, sse: bool = False) -> Reply:
        """Send a prebuilt request and wait for the whole response."""
        if self.closed or self.transport is None:
            raise StaleConnection("connection already closed")
        self._reset()
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

    def _reset(self) -> None:
        self.reply = Reply()
        self.got_bytes = False
        self.buf.clear()
        self.events.clear()
        self.head_done = False
        self.length: int | None = None
        self.chunked = False
        self.chunk_left = -1  # bytes left in the current chunk (incl. CRLF); -1: need size

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

    def _parse(self, now: float) -> None:
        buf = self.buf
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HTTPError("response head too large")
                return
            self._parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            self.head_done = True
        if self.chunked:
            self._parse_chunked(now)
        elif self.length is not None:
            self.reply.body_bytes += len(buf)
            if self.sse:
                self._feed_events(bytes(buf), now)
            buf.clear()
            if self.reply.body_bytes >= self.length:
                self._finish(now)
        else:
            raise HTTPError("response has neither Content-Length nor chunked body")

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        self.reply.status = int(parts[1])
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                self.length = int(value)
            elif key == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif key == b"connection":
                self.keep_alive = value.strip().lower() != b"close"
        if not 200 <= self.reply.status < 300:
            # Read no further: the connection is dropped and the caller told.
            raise HTTPError(f"HTTP {self.reply.status}")

    def _parse_chunked(self, now: float) -> None:
        buf = self.buf
        while True:
            if self.chunk_left == -2:  # after the last chunk: its closing CRLF
                if len(buf) < 2:
                    return
                del buf[:2]
                self._finish(now)
                return
            if self.chunk_left == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[: eol + 2]
                # No trailers from the servers measured here: size 0 ends the body.
                self.chunk_left = size + 2 if size else -2
                continue
            take = min(self.chunk_left, len(buf))
            if take == 0:
                return
            data = min(take, max(self.chunk_left - 2, 0))  # the rest is the chunk's CRLF
            if data:
                self.reply.body_bytes += data
                if self.sse:
                    self._feed_events(bytes(buf[:data]), now)
            del buf[:take]
            self.chunk_left -= take
            if self.chunk_left == 0:
                self.chunk_left = -1

    def _feed_events(self, data: bytes, now: float) -> None:
        events = self.events
        events += data
        while (end := events.find(b"\n\n")) >= 0:
            event = bytes(events[:end])
            del events[: end + 2]
            self.reply.events += 1
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
