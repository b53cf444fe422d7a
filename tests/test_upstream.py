"""The HTTP/1.1 client for the hop to llama-server (meshllm.http.upstream).

Runs against a tiny asyncio HTTP server in the test process: each test gives it
a `respond` coroutine that writes exactly the bytes it wants on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import pytest

from meshllm.http.h1 import CHUNK_HOLD_BYTES, MAX_HEADERS, ResponseReader
from meshllm.http.upstream import PAUSE_BYTES, Pool, UpstreamError, get_status

T = TypeVar("T")
TEST_TIMEOUT_S = 10.0
WAIT_S = 5.0


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT_S) -> T:
    """Run one async test body with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    conn: int
    """Index of the connection (0 = the server's first) that carried it."""


Responder = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
"""Writes a response; returns False to close the connection afterwards."""


async def read_request(reader: asyncio.StreamReader, conn: int) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body, conn)


def response(body: bytes = b"ok", status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def wait_eof(reader: asyncio.StreamReader, timeout: float = WAIT_S) -> bool:
    """True once the peer has closed its side (whatever it still sent is dropped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except (TimeoutError, ConnectionError):
        return False


@dataclass
class FakeServer:
    """A tiny HTTP/1.1 server on 127.0.0.1, port 0; use with `async with`."""

    respond: Responder
    port: int = 0
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    """Connections that have ended, by index."""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = self.connections
        self.connections += 1
        try:
            while (req := await read_request(reader, conn)) is not None:
                self.requests.append(req)
                if not await self.respond(req, reader, writer):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass  # a cancelled handler ends quietly (asyncio logs cancelled ones)
        finally:
            self.closed.append(conn)
            writer.close()
            self._tasks.discard(task)

    async def wait_closed(self, conn: int, timeout: float = WAIT_S) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while conn not in self.closed:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"connection {conn} still open; closed: {self.closed}")
            await asyncio.sleep(0.005)


def ok(body: bytes = b"ok", *headers: str) -> Responder:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(body, headers=headers))
        await w.drain()
        return True

    return respond


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- bodies ---------------------------------------------------------------------------------


def test_content_length_body() -> None:
    async def main() -> None:
        async with FakeServer(ok(b'{"x": 1}', "X-Thing: yes", "Connection: keep-alive")) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request(
                "POST", "/v1/chat/completions", b'{"a":1}', [(b"content-type", b"application/json")]
            )
            assert resp.status == 200
            assert resp.length == 8 and not resp.chunked
            assert await resp.body() == b'{"x": 1}'
            assert (b"x-thing", b"yes") in resp.forward_headers()
            assert (b"content-length", b"8") in resp.forward_headers()
            assert b"connection" not in dict(resp.forward_headers())
            (req,) = srv.requests
            assert (req.method, req.path, req.body) == ("POST", "/v1/chat/completions", b'{"a":1}')
            assert req.headers["content-type"] == "application/json"
            assert req.headers["content-length"] == "7"
            assert req.headers["host"] == f"127.0.0.1:{srv.port}"
            pool.close()

    run(main())


def test_large_body_in_several_reads() -> None:
    big = bytes(range(256)) * 1024  # 256 KiB, more than one read

    async def main() -> None:
        async with FakeServer(ok(big)) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("GET", "/big")
            parts = [part async for part in resp.iter_body()]
            assert len(parts) > 1 and b"".join(parts) == big
            pool.close()

    run(main())


def test_chunked_body_is_streamed_chunk_by_chunk() -> None:
    async def main() -> None:
        release = asyncio.Event()
        finished = asyncio.Event()

        async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            w.write(CHUNKED_HEAD + chunk(b"data: one\n\n"))
            await w.drain()
            await asyncio.wait_for(release.wait(), WAIT_S)
            w.write(b"a;ext=1\r\ndata: two\n\r\n" + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await w.drain()
            finished.set()
            return True

        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("POST", "/v1/chat/completions", b"{}")
            assert resp.chunked and resp.length is None
            assert (b"content-type", b"text/event-stream") in resp.forward_headers()
            assert b"content-length" not in dict(resp.forward_headers())
            body = resp.iter_body()
            first = await asyncio.wait_for(anext(body), WAIT_S)
            assert first == b"data: one\n\n"
            assert not finished.is_set(), "the first chunk came only after the whole body"
            release.set()
            rest = [c async for c in body]
            assert rest == [b"data: two\n", b"data: [DONE]\n\n"]
            assert finished.is_set()
            assert len(pool.idle) == 1  # a complete chunked response keeps the connection
            pool.close()

    run(main())


def test_body_delimited_by_close() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\n\r\nno length, ends at close")
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("GET", "/")
            assert await resp.body() == b"no length, ends at close"
            assert pool.idle == []
            pool.close()

    run(main())


def test_error_status_is_passed_on() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(b'{"error": "busy"}', status="503 Service Unavailable"))
        return True

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("POST", "/x", b"{}")
            assert resp.status == 503 and await resp.body() == b'{"error": "busy"}'
            pool.close()

    run(main())


# -- connection reuse ------------------------------------------------------------------------


def test_keep_alive_connection_is_reused() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            pool = Pool("127.0.0.1", srv.port)
            for i in range(5):
                resp = await pool.request("POST", f"/r{i}", b"{}")
                assert await resp.body() == b"ok"
                assert len(pool.idle) == 1
            assert srv.connections == 1
            assert [r.conn for r in srv.requests] == [0] * 5
            assert [r.path for r in srv.requests] == [f"/r{i}" for i in range(5)]
            pool.close()
            await srv.wait_closed(0)

    run(main())


def test_concurrent_requests_use_separate_connections() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resps = await asyncio.gather(*(pool.request("GET", "/") for _ in range(3)))
            assert [await r.body() for r in resps] == [b"ok"] * 3
            assert srv.connections == 3 and len(pool.idle) == 3
            resp = await pool.request("GET", "/")
            await resp.body()
            assert srv.connections == 3
            pool.close()

    run(main())


def test_connection_closed_by_server_after_response_is_not_reused() -> None:
    # llama-server closes after a streamed response although it said keep-alive.
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response())
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            assert await (await pool.request("GET", "/1")).body() == b"ok"
            await srv.wait_closed(0)
            resp = await pool.request("GET", "/2")
            assert await resp.body() == b"ok"
            assert srv.connections == 2
            assert [r.conn for r in srv.requests] == [0, 1]
            pool.close()

    run(main())


def test_stale_pooled_connection_is_retried_on_a_fresh_one() -> None:
    # The server takes the next request on the pooled connection and closes it
    # without a byte of response: the client retries once on a new connection.
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if req.path == "/2" and req.conn == 0:
            return False
        w.write(response(req.path.encode()))
        await w.drain()
        return True

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            assert await (await pool.request("POST", "/1", b"{}")).body() == b"/1"
            assert len(pool.idle) == 1
            resp = await pool.request("POST", "/2", b'{"n": 2}')
            assert await resp.body() == b"/2"
            assert srv.connections == 2
            assert [(r.path, r.conn) for r in srv.requests] == [("/1", 0), ("/2", 0), ("/2", 1)]
            assert srv.requests[2].body == b'{"n": 2}'
            pool.close()

    run(main())


def test_fresh_connection_closed_without_response_is_an_error() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            with pytest.raises(UpstreamError, match="closed the connection"):
                await pool.request("GET", "/")
            assert srv.connections == 1  # no endless retrying
            pool.close()

    run(main())


def test_connection_close_response_is_not_reused() -> None:
    async def main() -> None:
        # The server would keep the connection open: the client must close it.
        async with FakeServer(ok(b"ok", "Connection: close")) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("GET", "/1")
            assert not resp.keep_alive
            assert await resp.body() == b"ok"
            assert pool.idle == []
            await srv.wait_closed(0)
            assert await (await pool.request("GET", "/2")).body() == b"ok"
            assert srv.connections == 2
            pool.close()

    run(main())


def test_abandoned_body_closes_the_connection() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + chunk(b"first"))
        await w.drain()
        await wait_eof(r)
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("GET", "/")
            body = resp.iter_body()
            assert await asyncio.wait_for(anext(body), WAIT_S) == b"first"
            await body.aclose()  # type: ignore[attr-defined]
            await srv.wait_closed(0)
            assert pool.idle == []
            pool.close()

    run(main())


def test_max_idle_bounds_the_pool() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            pool = Pool("127.0.0.1", srv.port, max_idle=2)
            resps = await asyncio.gather(*(pool.request("GET", "/") for _ in range(4)))
            for r in resps:
                await r.body()
            assert len(pool.idle) == 2
            pool.close()
            assert pool.idle == []

    run(main())


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    ],
)
def test_malformed_response_head_is_an_upstream_error(head: bytes) -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(head)
        await w.drain()
        await wait_eof(r)
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            with pytest.raises(UpstreamError):
                await pool.request("GET", "/")
            await srv.wait_closed(0)  # the broken connection is closed, not pooled
            assert pool.idle == []

    run(main())


def test_headers_too_large_is_an_upstream_error() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            with pytest.raises(UpstreamError, match="too large"):
                await Pool("127.0.0.1", srv.port).request("GET", "/")

    run(main())


def test_connection_refused_is_an_upstream_error() -> None:
    async def main() -> None:
        port = closed_port()
        with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
            await Pool("127.0.0.1", port).request("POST", "/", b"{}")

    run(main())


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/a\r\nx: y"), ("POST", "/a b"), ("POST", "a"), ("GET /a HTTP/1.1\r\n", "/")],
)
def test_a_request_line_that_would_add_a_line_is_refused(method: str, path: str) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            with pytest.raises(UpstreamError, match="unsafe request line"):
                await Pool("127.0.0.1", srv.port).request(method, path, b"{}")
            assert srv.requests == []

    run(main())


@pytest.mark.parametrize(
    "sent",
    [
        response(b"0123456789" * 10)[:-90],  # Content-Length 100, 10 bytes sent
        CHUNKED_HEAD + chunk(b"whole") + b"20\r\nonly part of it",
        CHUNKED_HEAD + chunk(b"whole"),  # no terminating chunk
        CHUNKED_HEAD + b"zz\r\nnot hex\r\n",
    ],
    ids=["content-length", "chunk-cut", "no-last-chunk", "bad-chunk-size"],
)
def test_server_dying_mid_body_is_an_upstream_error(sent: bytes) -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(sent)
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("GET", "/")
            assert resp.status == 200
            with pytest.raises(UpstreamError):
                await resp.body()
            assert pool.idle == []

    run(main())


def test_server_dying_mid_headers_is_an_upstream_error() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            with pytest.raises(UpstreamError, match="mid-headers"):
                await Pool("127.0.0.1", srv.port).request("GET", "/")

    run(main())


def test_get_status() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        status = "200 OK" if req.path == "/health" else "503 Loading"
        w.write(response(b"{}", status=status))
        return True

    async def main() -> None:
        async with FakeServer(respond) as srv:
            assert await get_status("127.0.0.1", srv.port, "/health") == 200
            assert await get_status("127.0.0.1", srv.port, "/other") == 503
            assert [r.method for r in srv.requests] == ["GET", "GET"]
        with pytest.raises(UpstreamError):
            await get_status("127.0.0.1", closed_port(), "/health")

    run(main())


def test_get_status_times_out_on_a_silent_server() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await wait_eof(r)
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            with pytest.raises(TimeoutError):
                await get_status("127.0.0.1", srv.port, "/health", timeout=0.2)

    run(main())


def test_get_status_does_not_read_an_endless_body() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD)
        with contextlib.suppress(ConnectionError):
            while True:
                w.write(chunk(b"x" * 65536))
                await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            assert await get_status("127.0.0.1", srv.port, "/health", timeout=WAIT_S) == 200

    run(main())


def test_bytes_past_the_content_length_end_the_connection_not_the_response() -> None:
    async def main() -> None:
        data = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello" + b"HTTP/1.1 200 OK\r\n" * 10
        async with FakeServer(one_shot(data)) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("POST", "/")
            assert await resp.body() == b"hello"
            assert not pool.idle  # not reused
            await srv.wait_closed(0)

    run(main())


# -- the shared response parser's bounds and details (meshllm.http.h1) ------------------------


def one_shot(data: bytes) -> Responder:
    """Writes `data` as the whole response, then waits for the client to hang up."""

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(data)
        await w.drain()
        await wait_eof(r)
        return False

    return respond


async def read_all(srv: FakeServer, method: str = "POST") -> tuple[int, list[bytes]]:
    resp = await Pool("127.0.0.1", srv.port).request(method, "/")
    return resp.status, [piece async for piece in resp.iter_body()]


@pytest.mark.parametrize(
    ("tail", "what"),
    [
        (b"0\r\nX-T: " + b"t" * 100_000 + b"\r\n\r\n", "trailers too large"),
        (b"5;ext=" + b"e" * 300_000, "a chunk-size line that never ends"),
        (b"0\r\n" + b"X-T: 1\r\n" * 20_000 + b"\r\n", "too many trailers"),
    ],
)
def test_unbounded_framing_is_an_upstream_error(tail: bytes, what: str) -> None:
    async def main() -> None:
        async with FakeServer(one_shot(CHUNKED_HEAD + chunk(b"data: 1\n\n") + tail)) as srv:
            with pytest.raises(UpstreamError, match=r"too large|too many"):
                await read_all(srv)
            await srv.wait_closed(0)

    run(main())


def test_too_many_header_fields_is_an_upstream_error() -> None:
    # 20,000 empty fields are far under the byte bound, but each would be a stored pair.
    head = b"HTTP/1.1 200 OK\r\n" + b"X: \r\n" * (MAX_HEADERS + 1) + b"content-length: 0\r\n\r\n"

    async def main() -> None:
        async with FakeServer(one_shot(head)) as srv:
            with pytest.raises(UpstreamError, match="too many header"):
                await read_all(srv)

    run(main())


def test_endless_chunk_is_passed_on_in_bounded_pieces() -> None:
    # One chunk that claims 1 GiB: it is held whole only up to CHUNK_HOLD_BYTES.
    sent = 8 * CHUNK_HOLD_BYTES

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + b"40000000\r\n")
        for _ in range(sent // 65536):
            w.write(b"x" * 65536)
            await w.drain()
        await wait_eof(r)
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            resp = await Pool("127.0.0.1", srv.port).request("POST", "/")
            got = 0
            body = resp.iter_body()
            async for piece in body:
                assert len(piece) <= 2 * CHUNK_HOLD_BYTES
                got += len(piece)
                if got >= sent - CHUNK_HOLD_BYTES:
                    break
            await body.aclose()  # type: ignore[attr-defined]

    run(main())


def test_a_consumer_that_stops_reading_pauses_the_upstream() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD)
        while True:  # endless small events, as fast as the client takes them
            w.write(chunk(b"data: " + b"x" * 4000 + b"\n\n") * 16)
            await w.drain()

    async def main() -> None:
        async with FakeServer(respond) as srv:
            resp = await Pool("127.0.0.1", srv.port).request("POST", "/")
            conn = resp.conn
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while not conn.paused:  # nothing consumes: reading stops
                assert asyncio.get_running_loop().time() < deadline, "never paused"
                await conn.wait()
            held = sum(map(len, conn.pieces))
            assert held == conn.queued
            assert PAUSE_BYTES < held <= PAUSE_BYTES + 512 * 1024
            assert conn.take()  # taking what waits resumes reading
            assert not conn.paused
            resp.release()

    run(main())


def test_head_sent_byte_by_byte_is_still_bounded() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(100):
            w.write(b"s" * 1000)
            await w.drain()
        await wait_eof(r)
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            with pytest.raises(UpstreamError, match="too large"):
                await read_all(srv)

    run(main())


def test_chunks_are_passed_on_whole_even_when_split_across_reads() -> None:
    event = b"data: " + b"x" * 3000 + b"\n\n"

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        data = CHUNKED_HEAD + chunk(event) + chunk(b"data: 2\n\n") + b"0\r\n\r\n"
        for i in range(0, len(data), 700):
            w.write(data[i : i + 700])
            await w.drain()
            await asyncio.sleep(0.001)
        return True

    async def main() -> None:
        async with FakeServer(respond) as srv:
            assert await read_all(srv) == (200, [event, b"data: 2\n\n"])

    run(main())


def test_interim_response_is_skipped() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"final", headers=("X-A: 1",))

    async def main() -> None:
        async with FakeServer(one_shot(data)) as srv:
            resp = await Pool("127.0.0.1", srv.port).request("POST", "/")
            assert (resp.status, resp.headers) == (200, [(b"content-length", b"5"), (b"x-a", b"1")])
            assert await resp.body() == b"final"

    run(main())


def test_head_response_has_no_body_and_the_connection_is_not_reused() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"a body HEAD does not get")) as srv:
            pool = Pool("127.0.0.1", srv.port)
            resp = await pool.request("HEAD", "/")
            assert resp.status == 200 and resp.length == 0
            assert await resp.body() == b""
            assert pool.idle == []

    run(main())


@pytest.mark.parametrize(
    ("coding", "chunked"),
    [
        (b"chunked", True),
        (b"Chunked ", True),
        (b"gzip, chunked", True),
        (b"xchunked", False),
        (b"chunked, gzip", False),
    ],
)
def test_chunked_is_decided_as_llhttp_decides(coding: bytes, chunked: bool) -> None:
    # A parser that calls a body chunked while llhttp reads it to the close would
    # hold it back and report a complete response as cut short.
    reader = ResponseReader()
    reader.expect()
    reader.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n\r\n")
    assert reader.chunked is chunked
    assert reader.head_done
