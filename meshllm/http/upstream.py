"""A minimal HTTP/1.1 client on an asyncio Protocol, for the hop to llama-server.

The proxy's cost is dominated by its HTTP client, so this one does only what
the hop needs: keep-alive pooling, Content-Length and chunked bodies, and
streaming the body out as it arrives. It parses in `data_received` (no stream
reader, no task per read): the head once, then the body pieces are queued for
the consumer, which is woken through one future per wait. llama-server closes
the connection after a streamed response although it advertised keep-alive, so
a pooled connection can be dead when reused: a request whose connection fails
before any response byte arrives is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

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
MAX_HEADER_BYTES = 64 * 1024
PAUSE_BYTES = 1024 * 1024
"""Stop reading from the upstream while this much body waits for the consumer."""

# Body states of a Connection.
_HEAD = 0  # waiting for the response head
_LENGTH = 1  # Content-Length body
_CHUNK_SIZE = 2  # chunked: waiting for a chunk-size line
_CHUNK_DATA = 3  # chunked: waiting for the rest of a chunk (data + CRLF)
_TRAILERS = 4  # chunked: after the last chunk, until the empty line
_EOF = 5  # body delimited by the connection closing
_DONE = 6  # the whole response has arrived
_IDLE = 7  # no request in flight
_GOT_HEAD = 8  # head arrived, not yet parsed: body bytes wait in the buffer


class UpstreamError(ConnectionError):
    """The upstream server could not be reached or broke the protocol."""


class _StaleConnection(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.state = _IDLE
        self.got_bytes = False
        self.head: bytes | None = None
        self.pieces: list[bytes] = []
        self.queued = 0
        self.paused = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.left = 0  # Content-Length: body bytes still to come; chunked: chunk bytes + 2

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self.state
        if self.error is not None:
            pass  # already failed; this close is ours
        elif state == _EOF and exc is None:
            if self.buf:
                self.pieces.append(bytes(self.buf))
                self.buf.clear()
            self.state = _DONE
        elif state == _HEAD:
            if self.got_bytes:
                self.error = UpstreamError("upstream closed mid-headers")
            else:
                self.error = _StaleConnection(str(exc))
        elif state == _GOT_HEAD:
            pass  # begin_body sees `closed`
        elif state not in (_DONE, _IDLE):
            self.error = UpstreamError(f"upstream closed mid-body: {exc or 'connection closed'}")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.state in (_DONE, _IDLE):
            self.close()  # bytes nobody asked for: the connection cannot be reused
            return
        self.buf += data
        try:
            self._parse()
        except UpstreamError as exc:
            self._fail(exc)
        except ValueError as exc:
            self._fail(UpstreamError(f"upstream broke the response: {exc}"))
        if self.queued > PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells the rest

    # -- for Pool and Response --------------------------------------------------------

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, data: bytes) -> None:
        self.buf.clear()
        self.pieces.clear()
        self.queued = 0
        self.got_bytes = False
        self.head = None
        self.error = None
        self.state = _HEAD
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

    # -- parsing ------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        if self.state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise UpstreamError("upstream headers too large")
                return
            if end > MAX_HEADER_BYTES:
                raise UpstreamError("upstream headers too large")
            self.head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self.state = _GOT_HEAD
            return
        if self.state != _GOT_HEAD:
            self._parse_body()

    def begin_body(self, length: int | None, chunked: bool) -> None:
        """Called once the head is parsed: how the body is delimited."""
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.state = _LENGTH
            self.left = length
        else:
            self.state = _EOF
        self._parse_body()
        if self.closed and self.error is None and self.state != _DONE:
            # Closed before the head was parsed: what came is all there is.
            if self.state == _EOF:
                self.state = _DONE
            else:
                self.error = UpstreamError("upstream closed mid-body")

    def _parse_body(self) -> None:
        buf = self.buf
        state = self.state
        if state == _LENGTH:
            if buf:
                take = min(len(buf), self.left)
                piece = bytes(buf) if take == len(buf) else bytes(buf[:take])
                buf.clear()  # bytes beyond the body: dropped (see data_received)
                self.left -= take
                self.pieces.append(piece)
                self.queued += take
            if self.left == 0:
                self.state = _DONE
            return
        if state == _EOF:
            if buf:
                self.pieces.append(bytes(buf))
                self.queued += len(buf)
                buf.clear()
            return
        while True:
            if state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise UpstreamError("upstream chunk-size line too long")
                    break
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError(f"negative chunk size {size}")
                del buf[: eol + 2]
                if size == 0:
                    state = _TRAILERS
                else:
                    self.left = size + 2
                    state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buf) < self.left:
                    break
                size = self.left - 2
                if buf[size : size + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self.pieces.append(bytes(buf[:size]))
                self.queued += size
                del buf[: size + 2]
                state = _CHUNK_SIZE
            else:  # _TRAILERS (none from llama-server) end with an empty line.
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                del buf[: eol + 2]
                if eol == 0:
                    state = _DONE
                    break
        self.state = state


class Response:
    """A response whose body is read on demand with `body()` or `iter_body()`."""

    def __init__(
        self,
        pool: Pool,
        conn: Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.status = status
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.keep_alive = keep_alive
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
        return conn is not None and conn.state == _DONE and conn.error is None

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
                if conn.state == _DONE:
                    break
                if conn.closed:
                    raise UpstreamError("upstream closed mid-body")
                await conn.wait()
            if self.length is None and not self.chunked:
                self.keep_alive = False
            self._done = True
        finally:
            self.release()

    async def body(self) -> bytes:
        conn = self.conn
        if conn is not None and conn.state == _DONE and conn.error is None:
            pieces = conn.take()  # all there: no iteration
            if self.length is None and not self.chunked:
                self.keep_alive = False
            self._done = True
            self.release()
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return b"".join([chunk async for chunk in self.iter_body()])

    def release(self) -> None:
        """Return the connection to the pool if it can carry another request."""
        if self.conn is None:
            return
        conn, self.conn = self.conn, None  # type: ignore[assignment]
        if self._done and self.keep_alive and not conn.buf:
            conn.state = _IDLE
            self.pool.put(conn)
        else:
            conn.close()


def _as_upstream(exc: Exception) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    return UpstreamError(f"upstream broke the response: {exc}")


class Pool:
    """Keep-alive connections to one host:port."""

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

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.unix_path is not None:
                _, proto = await loop.create_unix_connection(Connection, self.unix_path)
            else:
                _, proto = await loop.create_connection(Connection, self.host, self.port)
        except OSError as exc:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise UpstreamError(f"cannot connect to {where}: {exc}") from exc
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
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), b"host: ", self.host_header, b"\r\n"]
        for key, value in headers or ():
            head += [key, b": ", value, b"\r\n"]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        data = b"".join(head) + body
        while self.idle:
            conn = self.idle.pop()
            if not conn.usable():
                conn.close()
                continue
            try:
                return await self._exchange(conn, data)
            except _StaleConnection:
                conn.close()  # closed by the server while idle: try the next one
        conn = await self._connect()
        try:
            return await self._exchange(conn, data)
        except _StaleConnection as exc:
            conn.close()
            raise UpstreamError(f"{self.host}:{self.port} closed the connection") from exc

    async def _exchange(self, conn: Connection, data: bytes) -> Response:
        try:
            conn.start(data)
            while conn.head is None:
                if conn.error is not None:
                    raise conn.error
                if conn.closed:
                    if conn.got_bytes:
                        raise UpstreamError("upstream closed mid-headers")
                    raise _StaleConnection("connection closed")
                await conn.wait()
        except _StaleConnection:
            raise
        except BaseException:
            conn.close()
            raise
        return _parse_head(self, conn, conn.head)


def _parse_head(pool: Pool, conn: Connection, head: bytes) -> Response:
    lines = head[:-4].split(b"\r\n")
    try:
        _, status_text = lines[0].split(b" ", 2)[:2]
        status = int(status_text)
    except ValueError as exc:
        conn.close()
        raise UpstreamError(f"bad status line {lines[0]!r}") from exc
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    keep_alive = True
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        value = value.strip()
        headers.append((key, value))
        if key == b"content-length":
            length = int(value) if value.isdigit() else -1
            if length < 0:
                conn.close()
                raise UpstreamError(f"bad Content-Length {value!r}")
        elif key == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif key == b"connection":
            keep_alive = value.lower() != b"close"
    try:
        conn.begin_body(None if chunked else length, chunked)
    except ValueError as exc:
        conn._fail(UpstreamError(f"upstream broke the response: {exc}"))
    except UpstreamError as exc:
        conn._fail(exc)
    return Response(pool, conn, status, headers, length, chunked, keep_alive)


async def get_status(host: str, port: int, path: str, timeout: float = 2.0) -> int:
    """Status code of a GET (used for llama-server's /health); raises on no answer."""
    pool = Pool(host, port)
    try:
        async with asyncio.timeout(timeout):
            resp = await pool.request("GET", path)
            await resp.body()
            return resp.status
    finally:
        pool.close()
