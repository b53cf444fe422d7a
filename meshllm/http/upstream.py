"""A minimal HTTP/1.1 client on an asyncio Protocol, for the hop to llama-server.

The proxy's cost is dominated by its HTTP client, so this one does only what
the hop needs: keep-alive pooling and streaming the body out as it arrives.
Responses are parsed in `data_received` by the one shared parser
(`meshllm.http.h1`); body pieces are queued for the consumer, which is woken
through one future per wait. llama-server closes the connection after a
streamed response although it advertised keep-alive, so a pooled connection
can be dead when reused: a request whose connection fails before any
response byte arrives is retried once on a fresh connection.

`Pool.request` writes an HTTP/1.1 request; `Pool.exchange` sends bytes the
caller framed itself (the Proxy's hop to the Tunnel sends a tunnel frame) and
reads an HTTP/1.1 response all the same.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Protocol, cast

from meshllm.http.h1 import MAX_HEAD_BYTES, ResponseError, ResponseReader

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"host",
    }
)
MAX_HEADER_BYTES = MAX_HEAD_BYTES
PAUSE_BYTES = 1024 * 1024
"""Stop reading from the upstream while this much body waits for the consumer. With
the chunk a parser holds (`h1.CHUNK_HOLD_BYTES`) and one socket read, it bounds
what one response can occupy here however fast the upstream and slow the client."""


_REQUEST_TARGET = re.compile(r"/[\x21-\x7e]*")
"""A request target in origin form: printable ASCII, no space or control character."""
_METHOD = re.compile(r"[A-Z]+")


class UpstreamError(ConnectionError):
    """The upstream server could not be reached or broke the protocol."""


class UpstreamUnreachable(UpstreamError):
    """No response at all: the connection was refused, or closed before any byte of
    an answer (the server is down or restarting; another replica may answer)."""


class UpstreamRefused(UpstreamUnreachable):
    """The connection itself failed: nothing listens there (the server is down)."""


class _StaleConnection(Exception):
    pass


class Connection(ResponseReader, asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        ResponseReader.__init__(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        """A request is in flight: its response has not been read to the end."""
        self.got_bytes = False
        self.queued = 0
        self.paused = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.error is None and self.busy and not (exc is None and self.closed_cleanly()):
            if not self.got_bytes:
                self.error = _StaleConnection(str(exc))
            elif not self.head_done:
                self.error = UpstreamError("upstream closed mid-headers")
            else:
                reason = exc or "connection closed"
                self.error = UpstreamError(f"upstream closed mid-body: {reason}")
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:
            self.close()  # bytes nobody asked for: the connection cannot be reused
            return
        self.got_bytes = True
        done = self.done
        try:
            self.feed(data)
        except ResponseError as exc:
            if self.done and not done:
                # Bytes after a complete response (a body longer than its
                # Content-Length): the response stands, the connection cannot be reused.
                self.keep_alive = False
                self.close()
            else:
                self._fail(UpstreamError(f"upstream broke the response: {exc}"))
        if self.queued > PAUSE_BYTES and not self.paused and self.transport is not None:
            # The consumer (a slow client) is behind: the upstream waits in its own
            # socket buffer, never in this process's memory.
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def body_piece(self, data: bytes) -> None:
        self.pieces.append(data)
        self.queued += len(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells the rest

    # -- for Pool and Response --------------------------------------------------------

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, data: bytes, no_body: bool = False) -> None:
        self.expect(no_body)
        self.queued = 0
        self.got_bytes = False
        self.error = None
        self.busy = True
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self) -> None:
        """Until something new arrived (head, body piece, end or error)."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        try:
            await waiter
        finally:
            self.waiter = None

    def take(self) -> list[bytes]:
        pieces = self.pieces
        self.pieces = []
        self.queued = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return pieces

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.close()


class Response:
    """A response whose body is read on demand with `body()` or `iter_body()`."""

    def __init__(self, pool: Pool, conn: Connection) -> None:
        self.pool = pool
        self.conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.length = conn.length
        self.chunked = conn.chunked
        self.keep_alive = conn.keep_alive
        self._done = False

    def forward_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers to pass on to the client (hop-by-hop ones removed)."""
        out = [(k, v) for k, v in self.headers if k not in HOP_BY_HOP]
        if self.length is not None and not self.chunked:
            out.append((b"content-length", str(self.length).encode()))
        return out

    def complete(self) -> bool:
        """True when the whole body has already arrived (`body()` will not wait)."""
        conn = self.conn
        return conn is not None and conn.done and conn.error is None

    async def iter_body(self) -> AsyncIterator[bytes]:
        conn = self.conn
        try:
            while True:
                if conn.pieces:
                    for piece in conn.take():
                        yield piece
                    continue
                if conn.error is not None:
                    raise _as_upstream(conn.error)
                if conn.done:
                    break
                if conn.closed:
                    raise UpstreamError("upstream closed mid-body")
                await conn.wait()
            self._done = True
        finally:
            self.release()

    async def body(self) -> bytes:
        conn = self.conn
        if conn is not None and conn.done and conn.error is None:
            pieces = conn.take()  # all there: no iteration
            self._done = True
            self.release()
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return b"".join([chunk async for chunk in self.iter_body()])

    def release(self) -> None:
        """Return the connection to the pool if it can carry another request."""
        if self.conn is None:
            return
        conn, self.conn = self.conn, None  # type: ignore[assignment]
        conn.busy = False
        if self._done and conn.keep_alive:
            self.pool.put(conn)
        else:
            conn.close()


def _as_upstream(exc: Exception) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    return UpstreamError(f"upstream broke the response: {exc}")


class Upstream(Protocol):
    """What the Proxy forwards a request to: a `Pool`, or a route through the Tunnel."""

    where: str
    """For messages: where the requests go."""

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Response: ...


class Pool:
    """Keep-alive connections to one host:port (or one unix socket)."""

    def __init__(
        self, host: str, port: int, max_idle: int = 64, unix_path: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        """Connect to this unix socket instead of host:port (the Tunnel's)."""
        self.max_idle = max_idle
        self.idle: list[Connection] = []
        self.host_header = f"{host}:{port}".encode()
        self.where = unix_path or f"{host}:{port}"

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.unix_path is not None:
                _, proto = await loop.create_unix_connection(Connection, self.unix_path)
            else:
                _, proto = await loop.create_connection(Connection, self.host, self.port)
        except OSError as exc:
            raise UpstreamRefused(f"cannot connect to {self.where}: {exc}") from exc
        return proto

    def put(self, conn: Connection) -> None:
        if len(self.idle) < self.max_idle and conn.usable():
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        if not _REQUEST_TARGET.fullmatch(path) or not _METHOD.fullmatch(method):
            # Whatever a caller passes, it cannot add a line to the request head.
            raise UpstreamError(
                f"refused to send an unsafe request line: {method[:20]!r} {path[:200]!r}"
            )
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), b"host: ", self.host_header, b"\r\n"]
        for key, value in headers or ():
            head += [key, b": ", value, b"\r\n"]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        return await self.exchange(b"".join(head) + body, method == "HEAD")

    async def exchange(self, data: bytes, no_body: bool = False) -> Response:
        """Send `data` (a whole request, framed by the caller) and wait for the response head."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.usable():
                conn.close()
                continue
            try:
                return await self._exchange(conn, data, no_body)
            except _StaleConnection:
                # Closed by the server while idle: once, then a fresh connection (a request
                # that makes the server drop connections must not be sent down every one).
                conn.close()
                break
        conn = await self._connect()
        try:
            return await self._exchange(conn, data, no_body)
        except _StaleConnection as exc:
            conn.close()
            raise UpstreamUnreachable(f"{self.where} closed the connection") from exc

    async def _exchange(self, conn: Connection, data: bytes, no_body: bool) -> Response:
        try:
            conn.start(data, no_body)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if conn.closed:
                    raise _StaleConnection("connection closed")
                await conn.wait()
        except _StaleConnection:
            raise
        except BaseException:
            conn.close()
            raise
        return Response(self, conn)


async def get_status(host: str, port: int, path: str, timeout: float = 2.0) -> int:
    """Status code of a GET (used for llama-server's /health); raises on no answer.

    The body is not read (the connection is closed instead): a server that answers
    with an endless one costs nothing here."""
    pool = Pool(host, port)
    try:
        async with asyncio.timeout(timeout):
            resp = await pool.request("GET", path)
            resp.release()
            return resp.status
    finally:
        pool.close()
