"""A minimal HTTP/1.1 client on asyncio streams, for the hop to llama-server.

The proxy's cost is dominated by its HTTP client, so this one does only what
the hop needs: keep-alive pooling, Content-Length and chunked bodies, and
streaming the body out as it arrives. llama-server closes the connection after
a streamed response although it advertised keep-alive, so a pooled connection
can be dead when reused: a request whose connection fails before any response
byte arrives is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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


class UpstreamError(ConnectionError):
    """The upstream server could not be reached or broke the protocol."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


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

    async def iter_body(self) -> AsyncIterator[bytes]:
        reader = self.conn.reader
        try:
            if self.chunked:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        # Trailers (none from llama-server) end with an empty line.
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass
                        break
                    chunk = await reader.readexactly(size + 2)
                    yield chunk[:-2]
            elif self.length is not None:
                left = self.length
                while left > 0:
                    chunk = await reader.read(min(left, 65536))
                    if not chunk:
                        raise UpstreamError("upstream closed mid-body")
                    left -= len(chunk)
                    yield chunk
            else:
                while chunk := await reader.read(65536):
                    yield chunk
                self.keep_alive = False
            self._done = True
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise UpstreamError(f"upstream broke the response: {exc}") from exc
        finally:
            self.release()

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_body()])

    def release(self) -> None:
        """Return the connection to the pool if it can carry another request."""
        if self.conn is None:
            return
        conn, self.conn = self.conn, None  # type: ignore[assignment]
        if self._done and self.keep_alive:
            self.pool.put(conn)
        else:
            conn.close()


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
        try:
            if self.unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(
                    self.unix_path, limit=MAX_HEADER_BYTES
                )
            else:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_HEADER_BYTES
                )
        except OSError as exc:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise UpstreamError(f"cannot connect to {where}: {exc}") from exc
        return Connection(reader, writer)

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
            conn.writer.write(data)
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _StaleConnection from exc
            conn.close()
            raise UpstreamError("upstream closed mid-headers") from exc
        except (ConnectionError, asyncio.LimitOverrunError) as exc:
            conn.close()
            if isinstance(exc, ConnectionError):
                raise _StaleConnection from exc
            raise UpstreamError("upstream headers too large") from exc
        except BaseException:
            conn.close()
            raise
        return _parse_head(self, conn, head)


class _StaleConnection(Exception):
    pass


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
