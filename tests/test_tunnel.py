"""The Tunnel (meshllm.tunnel, actors.tunnel), run in-process.

The pure parts are tested directly. The rest runs two QUIC endpoints on
loopback in the test process: the local side (`TunnelClient`, serving a unix
socket like the Proxy's) and the remote side (`TunnelServer`) in front of the
tiny HTTP server of `tests.test_upstream` standing in for llama-server.
Requests go in as the Proxy sends them (`meshllm.tunnel.hop.TunnelRoute`: a
request frame over a pooled unix connection), or through the whole `ProxyApp`
with its `remote` hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from actors.tunnel import Tunnel
from meshllm.http.endpoints import MODEL_PATHS, READ_PATHS, tunnelled
from meshllm.http.errors import error_response
from meshllm.http.proxy import ProxyApp
from meshllm.http.upstream import Pool, Response, UpstreamError
from meshllm.mesh import wire
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.quic import Link, MeshEndpoint, key_to_pem, release_stream
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.runtime.bus import Bus
from meshllm.runtime.config import NodeConfig
from meshllm.runtime.messages import (
    ActorError,
    ExtraServer,
    LocalServerState,
    MeshView,
    Message,
    ModelRoute,
    RouteTable,
    RouteTarget,
    SuspectPeer,
)
from meshllm.tunnel.client import TunnelClient
from meshllm.tunnel.core import (
    LAST_CHUNK,
    PeerQuota,
    host_of,
    peers_to_drop,
    response_head,
    serving_port,
    tunnel_address,
)
from meshllm.tunnel.core import chunk as encode_chunk
from meshllm.tunnel.hop import (
    MAX_BODY_BYTES,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    FrameError,
    TunnelRequest,
    TunnelRoute,
    decode_request,
    encode_request,
    remote_via_tunnel,
    upstream_headers,
)
from meshllm.tunnel.server import TunnelServer, guard_control
from tests.test_proxy_app import CHAT, call
from tests.test_upstream import FakeServer, Request, Responder, chunk, ok, response

T = TypeVar("T")
WAIT_S = 5.0
PROMPT_S = 2.0
"""What "promptly" means when a peer dies: far below any read timeout."""
SECRET = b"tunnel-test-secret-0123456789abc"
KEYS = {name: load_or_create_key(None) for name in ("remote", "local", "evil")}
"""The test nodes' keys: a node's id is its key's (peers check it on every link)."""
REMOTE, LOCAL, EVIL = (node_id_of(KEYS[name]) for name in ("remote", "local", "evil"))
KEY_OF = {node_id_of(key): key for key in KEYS.values()}
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)
HEADERS = [(b"content-type", b"application/json")]


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def peer(node_id: str, tunnel_port: int, host: str = "127.0.0.1") -> PeerAnnouncement:
    return PeerAnnouncement(
        node_id=node_id, generation=1, addresses=(f"{host}:4000",), tunnel_port=tunnel_port
    )


# -- pure parts --------------------------------------------------------------------------------


def frame(**fields: Any) -> bytes:
    """A request frame's payload with `fields` changed (not checked on the way)."""
    base: dict[str, Any] = {
        "node": "n1",
        "model": "demo",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [[b"content-type", b"application/json"]],
        "body_length": 12,
    }
    return msgspec.msgpack.encode({**base, **fields})


def test_request_frame_round_trip() -> None:
    req = TunnelRequest("n1", "demo", "POST", "/v1/chat/completions", HEADERS_T, 12)
    data = encode_request(req)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_request(data[4:]) == req
    assert decode_request(frame()) == req
    # a newer Tunnel's extra field is ignored; a missing optional one defaults
    assert decode_request(frame(priority=3)) == req
    payload = msgspec.msgpack.encode(
        {"node": "n", "model": "m", "method": "POST", "path": "/v1/embeddings"}
    )
    assert decode_request(payload).body_length == 0


HEADERS_T = ((b"content-type", b"application/json"),)


@pytest.mark.parametrize(
    "payload",
    [
        b"hello",  # not msgpack
        msgspec.msgpack.encode([1, 2, 3]),  # not a map
        msgspec.msgpack.encode({"node": "n1"}),  # fields missing
        frame(node=""),
        frame(model=""),
        frame(body_length=-1),
        frame(body_length=1 << 40),
        frame(body_length="12"),
        frame(method="PO ST"),
        frame(method=""),
        frame(path="no-slash"),
        frame(path="/x HTTP/1.1\r\nhost: evil"),
        frame(path="/x\ny"),
        frame(headers=[[b"x-a", b"1\r\nx-b: 2"]]),
        frame(headers=[[b"bad name", b"1"]]),
        frame(headers=[[b"x-a"]]),
        # an unknown field nested deeper than the stack: skipped recursively by msgspec
        b"\x87" + frame()[1:] + b"\xa1x" + b"\x91" * 100_000 + b"\xc0",
    ],
)
def test_malformed_request_frame_is_refused(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_request(payload)


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        # what changes a server for all its users never goes through the tunnel
        ({"path": "/props"}, 403, "not_forwarded"),
        ({"path": "/slots/0?action=save"}, 403, "not_forwarded"),
        ({"path": "/slots/0"}, 403, "not_forwarded"),
        ({"path": "/lora-adapters"}, 403, "not_forwarded"),
        ({"path": "/v1/chat/completions/"}, 403, "not_forwarded"),
        ({"path": "/v1/stream"}, 403, "not_forwarded"),
        ({"method": "GET", "path": "/v1/chat/completions"}, 403, "not_forwarded"),
        ({"method": "GET", "path": "/models/load"}, 403, "not_forwarded"),
        ({"method": "DELETE"}, 403, "not_forwarded"),
        ({"method": "GET"}, 403, "not_forwarded"),
        ({"body_length": MAX_BODY_BYTES + 1}, 413, "body_too_large"),
        ({"headers": [[b"x-%d" % i, b"v"] for i in range(MAX_HEADERS + 1)]}, 431, None),
        ({"headers": [[b"x-big", b"v" * (MAX_HEADER_BYTES + 1)]]}, 431, None),
    ],
)
def test_what_the_proxy_would_not_forward_is_refused(
    fields: dict[str, Any], status: int, code: str | None
) -> None:
    with pytest.raises(FrameError) as caught:
        decode_request(frame(**fields))
    assert caught.value.status == status
    assert caught.value.code == (code or "headers_too_large")


def test_allowlist_and_limits_accept_what_the_proxy_forwards() -> None:
    for path in MODEL_PATHS:
        assert tunnelled("POST", path) and not tunnelled("GET", path)
        assert decode_request(frame(path=path)).path == path
        assert decode_request(frame(path=path + "?x=1")).path == path + "?x=1"
    for path in (*READ_PATHS, "/health", "/props?model=m"):
        assert decode_request(frame(method="GET", path=path)).path == path
    assert decode_request(frame(body_length=MAX_BODY_BYTES)).body_length == MAX_BODY_BYTES
    many = [[b"x-%d" % i, b"v"] for i in range(MAX_HEADERS)]
    assert len(decode_request(frame(headers=many)).headers) == MAX_HEADERS
    # the node's own limit replaces the default, both ways
    assert decode_request(frame(body_length=100), max_body=100).body_length == 100
    with pytest.raises(FrameError, match="limit of 99 bytes"):
        decode_request(frame(body_length=100), max_body=99)
    assert decode_request(frame(body_length=10**9), max_body=10**9).body_length == 10**9


def test_the_tunnel_allows_exactly_what_the_proxy_forwards() -> None:
    # One table for both: the Proxy's forwarding routes are built from it.
    from starlette.routing import Route

    from meshllm.http.proxy import ProxyApp

    app = ProxyApp()
    passed = {
        (method, r.path)
        for r in app.app.routes
        if isinstance(r, Route) and r.endpoint.handler == app.forward  # type: ignore[attr-defined]
        for method in r.methods or ()
        if method != "HEAD"
    }
    through_tunnel = {(m, p) for m, p in passed if tunnelled(m, p)}
    assert through_tunnel == {("POST", p) for p in MODEL_PATHS} | {("GET", p) for p in READ_PATHS}


def test_peer_quota_counts_each_peer_alone() -> None:
    quota = PeerQuota(streams=2, body_bytes=100)
    assert quota.open("evil") and quota.open("evil")
    assert not quota.open("evil")  # at its cap
    assert quota.open("honest")  # another peer is not affected
    quota.close("evil")
    assert quota.open("evil") and not quota.open("evil")
    for _ in range(3):
        quota.close("evil")
    quota.close("honest")
    assert quota.streams == {}  # closing more than was opened never goes negative
    assert quota.reserve("evil", 60) and not quota.reserve("evil", 41)
    assert quota.reserve("evil", 40) and quota.reserve("evil", 0)
    assert quota.reserve("honest", 100)
    quota.free("evil", 100)
    quota.free("honest", 100)
    assert quota.body_bytes == {}
    assert not quota.reserve("evil", 101)  # one body over the whole budget


def test_oversized_request_frame_is_refused() -> None:
    req = TunnelRequest("n1", "demo", "POST", "/" + "x" * MAX_FRAME_BYTES)
    with pytest.raises(FrameError):
        encode_request(req)


def test_upstream_headers_drop_what_the_hop_sets_itself() -> None:
    headers = (
        (b"content-type", b"application/json"),
        (b"host", b"x"),
        (b"content-length", b"9"),
        (b"connection", b"close"),
        (b"x-request-id", b"7"),
    )
    req = TunnelRequest("n1", "demo", "POST", "/x", headers)
    assert upstream_headers(req) == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"7"),
    ]


def test_response_head_frames_the_body() -> None:
    head = response_head(200, [(b"content-type", b"text/plain")], 5)
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n"
    head = response_head(599, [], None)
    assert head == b"HTTP/1.1 599 Unknown\r\ntransfer-encoding: chunked\r\n\r\n"
    assert encode_chunk(b"hello") + LAST_CHUNK == b"5\r\nhello\r\n0\r\n\r\n"


def test_error_response_is_raw_http_with_openai_error() -> None:
    raw = error_response(503, "busy", "model_not_served", retry_after=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"retry-after: 2" in lines and b"connection: close" not in lines
    assert f"content-length: {len(body)}".encode() in lines
    error = {"message": "busy", "type": "server_error", "param": None, "code": "model_not_served"}
    assert json.loads(body) == {"error": error}
    client_error = error_response(400, "no", "bad_request", close=True)
    assert b"\r\nconnection: close\r\n" in client_error
    assert json.loads(client_error.partition(b"\r\n\r\n")[2])["error"]["type"] == (
        "invalid_request_error"
    )


def test_peer_tunnel_address() -> None:
    assert host_of("10.0.0.2:4000") == "10.0.0.2"
    assert host_of("[::1]:4000") == "::1"
    assert host_of("example.org") == "example.org"
    assert tunnel_address(peer("a", 5000, "10.0.0.2")) == ("10.0.0.2", 5000)
    assert tunnel_address(peer("a", 0)) is None
    assert tunnel_address(PeerAnnouncement(node_id="a", generation=1, tunnel_port=5000)) is None


def test_peers_to_drop_when_gone_or_moved() -> None:
    old = {"a": ("h", 1), "b": ("h", 2), "c": ("h", 3), "d": None}
    new = {"a": ("h", 1), "c": ("h", 4), "d": None, "e": ("h", 5)}
    assert peers_to_drop(old, new) == ["b", "c"]
    assert peers_to_drop({}, new) == []


def test_serving_port_only_for_the_ready_model() -> None:
    ready = LocalServerState(model="demo", state="ready", port=8001)
    assert serving_port(ready, "demo") == (8001, "")
    for state, model in [
        (ready, "other"),
        (LocalServerState(), "demo"),
        (LocalServerState(model="demo", state="loading", port=8001), "demo"),
        (LocalServerState(model="demo", state="ready", port=0), "demo"),
        (LocalServerState(model="demo", state="ready", port=8001, paused=True), "demo"),
        (LocalServerState(model="demo", state="draining", port=8001), "demo"),
        (LocalServerState(extras=(ExtraServer("x", "ready", 5),), paused=True), "x"),
    ]:
        port, why = serving_port(state, model)
        assert port == 0 and why, (state, model)


def test_remote_hook_names_node_and_model() -> None:
    hook = remote_via_tunnel("/run/t.sock")
    route = hook(RouteTarget("n2", False, 9337, "demo"))
    assert route.pool.unix_path == "/run/t.sock"
    assert (route.node, route.model) == ("n2", "demo")
    other = hook(RouteTarget("n3", False, 9337, "b"))
    assert other.pool is route.pool and (other.node, other.model) == ("n3", "b")


# -- two endpoints on loopback -----------------------------------------------------------------


@dataclass
class Mesh:
    """A local TunnelClient and a remote TunnelServer, connected over loopback QUIC."""

    client: TunnelClient
    server: TunnelServer
    local: MeshEndpoint
    remote: MeshEndpoint
    path: str
    tunnel_port: int
    llama: FakeServer
    pool: Pool
    """The Proxy's pool of unix connections to the Tunnel."""
    suspects: list[tuple[str, str]] = field(default_factory=list)

    async def request(
        self, body: bytes = b'{"model": "demo"}', node: str = REMOTE, model: str = "demo"
    ) -> Response:
        route = TunnelRoute(self.pool, node, model)
        return await route.request("POST", "/v1/chat/completions", body, HEADERS)

    async def raw(self, data: bytes) -> bytes:
        """Send raw bytes to the tunnel's unix socket; everything it answers until it closes."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        writer.write(data)
        writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(-1), WAIT_S)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def mesh(
    tmp_path: Path,
    respond: Responder,
    model: str = "demo",
    server_kwargs: dict[str, Any] | None = None,
    **client_kwargs: Any,
) -> AsyncIterator[Mesh]:
    async with FakeServer(respond) as llama:
        ready = LocalServerState(model=model, state="ready", port=llama.port)
        server = TunnelServer(ready, **(server_kwargs or {}))
        remote = MeshEndpoint(REMOTE, SECRET, KEYS["remote"], _no_setup, server.handle_stream)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        await remote.listen(udp)
        local = MeshEndpoint(LOCAL, SECRET, KEYS["local"], _no_setup)
        suspects: list[tuple[str, str]] = []

        async def suspect(node_id: str, reason: str) -> None:
            suspects.append((node_id, reason))

        client_kwargs.setdefault("unknown_peer_wait_s", 0.05)
        client = TunnelClient(local, suspect=suspect, **client_kwargs)
        port = udp.getsockname()[1]
        client.set_view(MeshView("local", (peer(REMOTE, port),)))
        path = str(tmp_path / "t.sock")
        await client.serve(path)
        pool = Pool("meshllm-tunnel", 0, unix_path=path)
        try:
            yield Mesh(client, server, local, remote, path, port, llama, pool, suspects)
        finally:
            pool.close()
            server.close()
            await client.close()
            local.close()
            remote.close()
            await asyncio.sleep(0.05)  # let the close frames and transports go


async def _no_setup(link: Link) -> None:
    pass


async def _token(gate: asyncio.Queue[None], r: asyncio.StreamReader) -> bool:
    """True when `gate` lets the next chunk go; False when the client closed first."""
    token = asyncio.ensure_future(gate.get())
    closed = asyncio.ensure_future(r.read(1))  # the client sends nothing more: EOF
    done, _ = await asyncio.wait((token, closed), timeout=WAIT_S, return_when="FIRST_COMPLETED")
    token.cancel()
    closed.cancel()
    if not done:
        raise AssertionError("the test never released the next chunk")
    return token in done and closed not in done


def sse_responder(chunks: list[bytes], gate: asyncio.Queue[None]) -> Responder:
    """SSE over chunked encoding; each chunk waits for a token on `gate` (llama.cpp pacing).

    Like llama-server, it notices a closed connection while it is generating.
    """

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(SSE_HEAD)
        for data in chunks:
            if not await _token(gate, r):
                return False
            w.write(chunk(data))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        return False

    return respond


def closing(body: bytes, status: str = "200 OK") -> Responder:
    """A content-length response, then close (llama-server on `connection: close`)."""

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(body, status, ("Connection: close",)))
        await w.drain()
        return False

    return respond


async def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def within(seconds: float, what: str, aw: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        raise AssertionError(f"{what} took longer than {seconds}s") from None


def error_of(raw: bytes) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return int(lines[0].split(b" ")[1]), json.loads(body)["error"], headers


# -- round trips -------------------------------------------------------------------------------


def test_round_trip_with_content_length(tmp_path: Path) -> None:
    answer = bytes(range(256)) * 1200  # ~300 KB: many QUIC packets and several reads
    body = b'{"model": "demo", "pad": "' + b"x" * 200_000 + b'"}'

    async def main() -> None:
        async with mesh(tmp_path, closing(answer)) as m:
            for i in range(2):
                resp = await m.request(body)
                assert resp.status == 200 and resp.length == len(answer)
                assert await within(WAIT_S, "the body", resp.body()) == answer
                req = m.llama.requests[i]
                assert (req.method, req.path, req.body) == ("POST", "/v1/chat/completions", body)
                assert req.headers["content-type"] == "application/json"
                assert req.headers["content-length"] == str(len(body))
            # one QUIC connection per peer, reused by every request
            assert list(m.client.links) == [REMOTE] and len(m.remote.protocols) == 1
            assert m.suspects == []
            await wait_for("streams forgotten", lambda: not _readers(m))

    run(main())


def test_small_requests_share_a_kept_alive_llama_server_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, ok(b"hello", "Connection: keep-alive")) as m:
            for _ in range(3):
                resp = await m.request()
                assert resp.status == 200 and resp.keep_alive
                assert await within(WAIT_S, "the body", resp.body()) == b"hello"
            assert m.llama.connections == 1 and len(m.llama.requests) == 3
            assert all("connection" not in r.headers for r in m.llama.requests)
            assert m.suspects == []
            await wait_for("streams forgotten", lambda: not _readers(m))
            m.server.close()
            await m.llama.wait_closed(0)

    run(main())


def test_kept_alive_connection_closed_by_llama_server_is_replaced(tmp_path: Path) -> None:
    async def main() -> None:
        # Says nothing about closing, then closes: the next request finds it dead.
        async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            w.write(response(b"once"))
            await w.drain()
            return False

        async with mesh(tmp_path, respond) as m:
            for _ in range(3):
                resp = await m.request()
                assert await within(WAIT_S, "the body", resp.body()) == b"once"
            assert m.llama.connections == 3 and m.suspects == []

    run(main())


def _readers(m: Mesh) -> list[int]:
    """Tunnel streams still tracked by either side (the control stream aside)."""
    protos = [*m.remote.protocols, *(link.protocol for link in m.client.links.values())]
    tracked = [sid for p in protos for sid in p._stream_readers if sid != 0]
    for p in protos:
        tracked += [*p.abandoned, *p.stop_waiters]
    return tracked


def test_streaming_passes_chunk_by_chunk(tmp_path: Path) -> None:
    chunks = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()
        async with mesh(tmp_path, sse_responder(chunks, gate)) as m:
            resp = await m.request(b'{"model": "demo", "stream": true}')
            assert resp.status == 200 and resp.chunked
            body = resp.iter_body()
            for data in chunks:
                # The next chunk is only produced once this one came through.
                gate.put_nowait(None)
                assert await within(WAIT_S, "one chunk", anext(body)) == data
            assert [c async for c in body] == []

    run(main())


def test_silent_generation_outlives_the_quic_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long non-streaming generation sends nothing for a while; keepalive pings
    # must keep the connection from timing out under it.
    monkeypatch.setattr("meshllm.mesh.quic.IDLE_TIMEOUT_S", 0.4)

    async def slow(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1.2)
        w.write(response(b"done", headers=("Connection: close",)))
        await w.drain()
        return False

    async def main() -> None:
        async with mesh(tmp_path, slow, keepalive_s=0.1) as m:
            resp = await within(WAIT_S, "the slow answer", m.request())
            assert resp.status == 200 and await resp.body() == b"done"
            assert m.suspects == []

    run(main())


def test_through_the_proxy_app(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b'{"answer": 42}')) as m:
            app = ProxyApp(remote=remote_via_tunnel(m.path))
            target = RouteTarget(REMOTE, False, 9337, "demo")
            app.set_table(RouteTable((ModelRoute("demo", (target,), (REMOTE,)),)))
            c = call(app, CHAT, {"model": "demo", "messages": []})
            await within(WAIT_S, "the proxied request", c())
            assert (c.status, c.json()) == (200, {"answer": 42})

    run(main())


# -- errors answered by the local side ---------------------------------------------------------


def with_length(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def test_malformed_local_frame_is_400_and_closes(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never")) as m:
            for bad in (
                b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
                b"\xff\xff\xff\xff",  # oversized
                with_length(b"not msgpack"),
                with_length(frame(path="/x\r\nhost: evil")),
                with_length(frame(body_length=2)) + b"{}" + b"pipelined",
            ):
                raw = await m.raw(bad)  # answered, then closed by the Tunnel
                status, error, headers = error_of(raw)
                assert status == 400 and error["code"] == "bad_request", bad
                assert error["type"] == "invalid_request_error" and error["message"]
                assert headers[b"connection"] == b"close"
            assert await m.raw(b"") == b""  # connect and close: nothing to answer
            assert m.llama.requests == []
            # the Tunnel serves on, on a connection of the Proxy's pool
            resp = await within(WAIT_S, "a good request", m.request())
            assert resp.status == 200

    run(main())


def test_unix_connection_carries_request_after_request(tmp_path: Path) -> None:
    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()
        chunks = [b"data: 1\n\n", b"data: 2\n\n"]
        async with mesh(tmp_path, sse_responder(chunks, gate)) as m:
            seen = set()
            for _ in range(3):
                gate.put_nowait(None)
                gate.put_nowait(None)
                resp = await within(WAIT_S, "the response", m.request())
                assert resp.status == 200 and resp.chunked and resp.keep_alive
                assert await within(WAIT_S, "the body", resp.body()) == b"".join(chunks)
                seen |= {id(c) for c in m.client.connections}
                assert len(m.pool.idle) == 1
            # one unix connection, kept across requests (llama-server's closed each time)
            assert len(seen) == 1 and len(m.client.connections) == 1
            assert m.llama.connections == 3 and m.suspects == []

    run(main())


def test_malformed_frame_on_the_quic_stream_is_400(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never")) as m:
            link = await m.local.dial("127.0.0.1", m.tunnel_port)
            for garbage in (
                b"POST /x HTTP/1.1\r\n\r\n",  # an older Tunnel's HTTP head
                with_length(frame(method="BAD METHOD")),
                with_length(frame(body_length=100)) + b"short",
            ):
                reader, writer = await link.open_stream()
                writer.write(wire.encode_frame(wire.TunnelOpen("demo")) + garbage)
                writer.write_eof()
                raw = await within(WAIT_S, "the answer", reader.read(-1))
                status, error, _ = error_of(raw)
                assert status == 400 and error["code"] == "bad_request", garbage
            assert m.llama.requests == [] and not link.closed.is_set()
            link.close()

    run(main())


def test_unknown_node_is_502(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never")) as m:
            resp = await within(WAIT_S, "the 502", m.request(node="nobody"))
            assert resp.status == 502
            assert json.loads(await resp.body())["error"]["code"] == "peer_unknown"
            m.client.set_view(MeshView("local", (peer(REMOTE, 0),)))  # no tunnel port
            resp = await within(WAIT_S, "the 502", m.request())
            assert resp.status == 502
            assert json.loads(await resp.body())["error"]["code"] == "peer_unreachable"

    run(main())


def test_node_that_joins_a_moment_late_is_waited_for(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"ok"), unknown_peer_wait_s=WAIT_S) as m:
            view = MeshView("local", (peer(REMOTE, m.tunnel_port),))
            m.client.set_view(MeshView("local", ()))
            pending = asyncio.ensure_future(m.request())
            await asyncio.sleep(0.1)
            m.client.set_view(view)
            resp = await within(WAIT_S, "the response", pending)
            assert resp.status == 200 and await resp.body() == b"ok"

    run(main())


def test_dial_failure_is_503_and_suspects_the_peer(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never"), dial_timeout_s=0.3) as m:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
                silent.bind(("127.0.0.1", 0))  # bound, never answers
                port = silent.getsockname()[1]
                m.client.set_view(MeshView("local", (peer("dead", port),)))
                resp = await within(WAIT_S, "the 503", m.request(node="dead"))
                assert resp.status == 503
                assert dict(resp.headers)[b"retry-after"] == b"2"
                assert json.loads(await resp.body())["error"]["code"] == "peer_unreachable"
            await wait_for("a suspect report", lambda: bool(m.suspects))
            assert m.suspects[0][0] == "dead"

    run(main())


def test_address_of_another_node_is_refused(tmp_path: Path) -> None:
    # A restarted node can reuse the port another node had: the peer id must match.
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never")) as m:
            m.client.set_view(MeshView("local", (peer("other", m.tunnel_port),)))
            resp = await within(WAIT_S, "the 503", m.request(node="other"))
            assert resp.status == 503
            assert "not other" in json.loads(await resp.body())["error"]["message"]
            assert m.llama.requests == []

    run(main())


# -- errors answered by the remote side --------------------------------------------------------


def test_wrong_model_is_503(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never")) as m:
            resp = await within(WAIT_S, "the 503", m.request(model="other-model"))
            assert resp.status == 503 and dict(resp.headers)[b"retry-after"] == b"2"
            error = json.loads(await resp.body())["error"]
            assert error["code"] == "model_not_served" and "other-model" in error["message"]
            m.server.local = LocalServerState(model="demo", state="loading")
            resp = await within(WAIT_S, "the 503", m.request())
            assert resp.status == 503
            assert "loading" in json.loads(await resp.body())["error"]["message"]
            # a big body the host refuses unread (STOP_SENDING) still gets the 503
            big = b'{"model": "other-model", "pad": "' + b"x" * 3_000_000 + b'"}'
            resp = await within(WAIT_S, "the 503", m.request(big, model="other-model"))
            assert resp.status == 503
            assert json.loads(await resp.body())["error"]["code"] == "model_not_served"
            assert m.llama.requests == []
            # the link is still good for the right model
            m.server.local = LocalServerState(model="demo", state="ready", port=m.llama.port)
            resp = await within(WAIT_S, "the answer", m.request())
            assert resp.status == 200

    run(main())


def test_garbage_first_frame_drops_only_that_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"fine")) as m:
            link = await m.local.dial("127.0.0.1", m.tunnel_port)
            frames = [
                b"\x00\x00\x00\x05hello",  # not msgpack of an envelope
                b"\xff\xff\xff\xff",  # oversized
                wire.encode_frame(wire.Probe(7)),  # valid frame, wrong kind
                b"\x00\x00",  # ends before a whole header
            ]
            for i, garbage in enumerate(frames, 1):
                reader, writer = await link.open_stream()
                writer.write(garbage)
                writer.write_eof()
                assert await within(WAIT_S, "the stream to close", reader.read(-1)) == b""
                assert m.server.dropped == i
                assert m.remote.counters.malformed_frames == i
            assert not link.closed.is_set()
            resp = await within(WAIT_S, "a good request", m.request())
            assert resp.status == 200 and await resp.body() == b"fine"
            link.close()

    run(main())


# -- failure mid-request -----------------------------------------------------------------------


async def _first_chunk(m: Mesh, gate: asyncio.Queue[None]) -> tuple[Response, AsyncIterator[bytes]]:
    resp = await m.request(b'{"model": "demo", "stream": true}')
    body = resp.iter_body()
    gate.put_nowait(None)
    assert await within(WAIT_S, "the first chunk", anext(body)) == b"data: 1\n\n"
    return resp, body


async def _expect_cut(body: AsyncIterator[bytes]) -> None:
    async def drain() -> None:
        async for _ in body:
            pass

    with pytest.raises(UpstreamError):
        await within(PROMPT_S, "the broken stream to end", drain())


def test_peer_connection_closed_mid_stream_ends_promptly(tmp_path: Path) -> None:
    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()
        async with mesh(tmp_path, sse_responder([b"data: 1\n\n"] * 3, gate)) as m:
            _, body = await _first_chunk(m, gate)
            m.remote.close()  # the host's QUIC side goes away
            await _expect_cut(body)
            await wait_for("a suspect report", lambda: bool(m.suspects))
            assert m.suspects[0][0] == REMOTE
            await m.llama.wait_closed(0, PROMPT_S)

    run(main())


def test_peer_leaving_the_view_mid_stream_ends_promptly(tmp_path: Path) -> None:
    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()
        async with mesh(tmp_path, sse_responder([b"data: 1\n\n"] * 3, gate)) as m:
            _, body = await _first_chunk(m, gate)
            m.client.set_view(MeshView("local", ()))  # the HealthProber removed it
            await _expect_cut(body)
            # the host stops generating: its llama-server connection is closed
            await m.llama.wait_closed(0, PROMPT_S)
            assert REMOTE not in m.client.links

    run(main())


def test_peer_leaving_before_the_response_head_is_502(tmp_path: Path) -> None:
    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()

        async def slow(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            await _token(gate, r)
            return False

        async with mesh(tmp_path, slow) as m:
            pending = asyncio.ensure_future(m.request())
            await wait_for("the request at the host", lambda: bool(m.llama.requests))
            m.client.set_view(MeshView("local", ()))
            resp = await within(PROMPT_S, "the 502", pending)
            assert resp.status == 502
            assert json.loads(await resp.body())["error"]["code"] == "peer_lost"

    run(main())


def test_client_going_away_stops_the_remote_llama_server(tmp_path: Path) -> None:
    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()
        async with mesh(tmp_path, sse_responder([b"data: 1\n\n"] * 3, gate)) as m:
            resp, _ = await _first_chunk(m, gate)
            resp.conn.close()  # what the Proxy does when its client disconnects
            await m.llama.wait_closed(0, PROMPT_S)
            # the connection to the peer is unharmed
            gate.put_nowait(None)
            gate.put_nowait(None)
            gate.put_nowait(None)
            resp = await within(WAIT_S, "the next request", m.request())
            assert await within(WAIT_S, "its body", resp.body()) == b"data: 1\n\n" * 3
            assert m.suspects == []

    run(main())


def test_sse_error_event_through_the_proxy_when_the_host_dies(tmp_path: Path) -> None:
    async def main() -> None:
        gate: asyncio.Queue[None] = asyncio.Queue()
        async with mesh(tmp_path, sse_responder([b"data: 1\n\n"] * 3, gate)) as m:
            app = ProxyApp(remote=remote_via_tunnel(m.path))
            target = RouteTarget(REMOTE, False, 9337, "demo")
            app.set_table(RouteTable((ModelRoute("demo", (target,), (REMOTE,)),)))
            c = call(app, CHAT, {"model": "demo", "stream": True})
            task = asyncio.ensure_future(c())
            gate.put_nowait(None)
            while (await c.next_message()).get("body") != b"data: 1\n\n":
                pass
            m.remote.close()
            await within(PROMPT_S, "the proxied stream to end", task)
            events = c.body.split(b"\n\n")
            assert events[0] == b"data: 1"
            error = json.loads(events[1].removeprefix(b"data: "))["error"]
            assert error["type"] == "server_error" and error["message"]
            assert c.messages[-1] == {"type": "http.response.body", "body": b""}

    run(main())


# -- the actor: glue to the bus, in-process with fake publishers --------------------------------


class FakeActor:
    """A bus endpoint named like a real actor: publishes, and records what it is told."""

    def __init__(self, run_dir: str, name: str) -> None:
        self.bus = Bus(run_dir, name)
        self.told: list[Message] = []
        self.bus.serve(self._tell, self._ask)

    async def _tell(self, msg: Message) -> None:
        self.told.append(msg)

    async def _ask(self, msg: Message) -> Message:
        return ActorError("fake")


@contextlib.asynccontextmanager
async def tunnel_actor(
    run_dir: str, node_id: str, udp: socket.socket | None = None
) -> AsyncIterator[Tunnel]:
    config = NodeConfig(home=run_dir, run_dir=run_dir, node_id=node_id, mesh_secret=SECRET)
    key = key_to_pem(KEY_OF[node_id])
    actor = Tunnel(config, {"socket": udp, "key": key} if udp else {"key": key})
    task = asyncio.ensure_future(actor.run())
    try:
        await wait_for("the tunnel socket", lambda: exists(config.tunnel_http_path))
        yield actor
    finally:
        actor.stopping.set()
        await within(WAIT_S, "the actor to stop", task)


@pytest.fixture
def run_dirs() -> Iterator[tuple[str, str]]:
    # ipc:// paths must stay short (about 100 bytes), so not pytest's tmp_path.
    dirs = tuple(tempfile.mkdtemp(prefix="mtun-", dir="/tmp") for _ in range(2))
    yield dirs[0], dirs[1]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


DEAD_ID = "00000000000000de"
"""Node ids within the wire's bounds: the mesh view crosses the actors' bus, which checks."""


def test_actor_wiring(run_dirs: tuple[str, str]) -> None:
    local_dir, remote_dir = run_dirs

    async def main() -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        async with FakeServer(closing(b"from the host")) as llama:
            supervisor = FakeActor(remote_dir, "server_supervisor")
            gossiper = FakeActor(local_dir, "gossiper")
            prober = FakeActor(local_dir, "health_prober")
            ready = LocalServerState(model="demo", state="ready", port=llama.port)
            await supervisor.bus.publish("local", ready)
            view = MeshView("local", (peer(REMOTE, port), peer(DEAD_ID, closed_udp_port())))
            await gossiper.bus.publish("mesh", view)
            async with (
                tunnel_actor(remote_dir, REMOTE, udp) as remote,
                tunnel_actor(local_dir, LOCAL) as local,
            ):
                path = local.config.tunnel_http_path
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
                await wait_for("the mesh view", lambda: REMOTE in local.client.addresses)
                await wait_for("the local state", lambda: remote.server.local == ready)
                pool = Pool("meshllm-tunnel", 0, unix_path=path)
                route = TunnelRoute(pool, REMOTE, "demo")
                resp = await within(
                    WAIT_S, "the answer", route.request("POST", "/v1/completions", b"{}", HEADERS)
                )
                assert (resp.status, await resp.body()) == (200, b"from the host")
                local.client.dial_timeout_s = 0.3
                dead = TunnelRoute(pool, DEAD_ID, "demo")
                resp = await within(
                    WAIT_S, "the 503", dead.request("POST", "/v1/completions", b"{}", HEADERS)
                )
                assert resp.status == 503
                pool.close()
                await wait_for("a SuspectPeer", lambda: bool(prober.told))
                assert isinstance(prober.told[0], SuspectPeer)
                assert prober.told[0].node_id == DEAD_ID
            assert not exists(path)  # removed on stop
            for fake in (supervisor, gossiper, prober):
                fake.bus.close()
        udp.close()

    run(main())


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exists(path: str) -> bool:
    return os.path.exists(path)


# -- a hostile host: its bytes are parsed, never trusted ----------------------------------------

HostScript = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def hostile_host(m: Mesh, script: HostScript) -> AsyncIterator[None]:
    """A member "evil" in the client's view whose Tunnel answers every stream with `script`."""

    async def handle(
        link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(-1)  # the whole request, up to its FIN
        try:
            await script(writer)
        finally:
            release_stream(reader, writer)

    evil = MeshEndpoint(EVIL, SECRET, KEYS["evil"], _no_setup, handle)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    await evil.listen(udp)
    port = udp.getsockname()[1]
    m.client.set_view(MeshView("local", (peer(REMOTE, m.tunnel_port), peer(EVIL, port))))
    try:
        yield
    finally:
        evil.close()


async def _inject(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nmine")
    await asyncio.sleep(0.2)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nINJECTED")
    writer.write_eof()


async def _short(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
    writer.write_eof()


async def _close_delimited(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    writer.write_eof()


async def _never_ends(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nmine")
    await asyncio.sleep(3600)


async def _second_response(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nmineHTTP/1.1 200 OK\r\n\r\nextra")
    writer.write_eof()


@pytest.mark.parametrize(
    ("script", "first"),
    [
        (_inject, b"mine"),
        (_never_ends, b"mine"),
        (_second_response, 502),  # in one read: nothing of it is passed on
        (_short, None),
        (_close_delimited, b"until the end"),
    ],
)
def test_a_hostile_host_cannot_answer_the_next_request(
    tmp_path: Path, script: HostScript, first: bytes | int | None
) -> None:
    # The Proxy keeps its unix connections to the Tunnel open: whatever a host sends
    # past its response, or short of it, must not reach the next request (for
    # another node) nor keep it waiting.
    async def main() -> None:
        async with mesh(tmp_path, closing(b"fine")) as m, hostile_host(m, script):
            resp = await within(WAIT_S, "evil's response head", m.request(node=EVIL))
            if first is None:
                with pytest.raises(UpstreamError):
                    await within(WAIT_S, "a response cut short", resp.body())
            elif isinstance(first, int):
                assert resp.status == first
                await within(WAIT_S, "the error's body", resp.body())
            else:
                assert await within(WAIT_S, "evil's body", resp.body()) == first
            for _ in range(3):
                honest = await within(WAIT_S, "the next request", m.request())
                assert honest.status == 200
                assert await within(WAIT_S, "its body", honest.body()) == b"fine"

    run(main())


# -- the host's rules, in-process (black-box: tests/test_tunnel_host.py) ------------------------


async def _send(link: Link, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await link.open_stream()
    writer.write(data)  # at once: aioquic takes a stream id only with its first write
    return reader, writer


def test_body_deadline_is_on_progress_not_on_the_whole_body(tmp_path: Path) -> None:
    stall_s = 1.0
    body = b'{"model": "demo", "pad": "' + b"x" * 20 + b'"}'

    async def main() -> None:
        kwargs = {"body_stall_s": stall_s}
        async with mesh(tmp_path, closing(b"fine"), server_kwargs=kwargs) as m:
            link = await m.local.dial("127.0.0.1", m.tunnel_port)
            head = wire.encode_frame(wire.TunnelOpen("demo")) + with_length(
                frame(body_length=len(body))
            )
            # A byte every stall_s / 20: the body takes longer than stall_s, yet arrives.
            reader, writer = await _send(link, head)
            for byte in body:
                writer.write(bytes([byte]))
                await asyncio.sleep(stall_s / 20)
            writer.write_eof()
            raw = await within(WAIT_S, "the answer", reader.read(-1))
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"fine")
            assert m.llama.requests[0].body == body
            release_stream(reader, writer)
            # Stalled: a 408 once stall_s passed without a byte.
            reader, writer = await _send(link, head + body[:5])
            raw = await within(WAIT_S + stall_s, "the 408", reader.read(-1))
            status, error, _ = error_of(raw)
            assert (status, error["code"]) == (408, "request_timeout")
            release_stream(reader, writer)
            assert len(m.llama.requests) == 1
            await wait_for("quota released", lambda: not m.server.quota.streams)
            assert m.server.quota.body_bytes == {}
            link.close()

    run(main())


def test_streams_over_a_peers_cap_get_429_and_others_go_on(tmp_path: Path) -> None:
    async def main() -> None:
        kwargs = {"max_streams_per_peer": 2}
        async with mesh(tmp_path, closing(b"fine"), server_kwargs=kwargs) as m:
            evil = MeshEndpoint(EVIL, SECRET, KEYS["evil"], _no_setup)
            try:
                link = await evil.dial("127.0.0.1", m.tunnel_port)
                opening = wire.encode_frame(wire.TunnelOpen("demo"))
                held = [await _send(link, opening) for _ in range(2)]
                over = [await _send(link, opening) for _ in range(2)]
                for reader, writer in over:
                    raw = await within(WAIT_S, "the 429", reader.read(-1))
                    status, error, headers = error_of(raw)
                    assert (status, error["code"]) == (429, "too_many_streams")
                    assert headers[b"retry-after"] == b"2"
                    release_stream(reader, writer)
                assert m.server.quota.streams == {EVIL: 2}
                # another peer is not affected
                resp = await within(WAIT_S, "the honest answer", m.request())
                assert resp.status == 200 and await resp.body() == b"fine"
                # a held stream that ends frees its place
                reader, writer = held.pop()
                release_stream(reader, writer, abort=True)
                await wait_for("a freed place", lambda: m.server.quota.streams == {EVIL: 1})
                reader, writer = await _send(link, opening + with_length(frame(body_length=0)))
                writer.write_eof()
                raw = await within(WAIT_S, "the answer", reader.read(-1))
                assert raw.startswith(b"HTTP/1.1 200"), raw
                release_stream(reader, writer)
                link.close()
                await wait_for("the quota emptied", lambda: not m.server.quota.streams)
            finally:
                evil.close()

    run(main())


def test_body_over_the_requesting_nodes_limit_is_413_there(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"never"), max_body_bytes=100) as m:
            resp = await within(WAIT_S, "the 413", m.request(b"{" + b" " * 100 + b"}"))
            assert resp.status == 413
            assert json.loads(await resp.body())["error"]["code"] == "body_too_large"
            assert m.llama.requests == [] and not m.client.links

    run(main())


def test_data_on_the_control_stream_closes_the_link_both_ways(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path, closing(b"fine")) as m:
            # The host's side: guard_control runs for every incoming link.
            m.remote.on_link = guard_control
            link = await m.local.dial("127.0.0.1", m.tunnel_port)
            link.writer.write(b"x" * 10_000)
            await within(WAIT_S, "the link to close", link.closed.wait())
            assert m.remote.counters.malformed_frames == 1

            # The requesting side: a host that writes on the control stream of the
            # link the client dialed loses it.
            async def chatty(link: Link) -> None:
                link.writer.write(b"x" * 10_000)

            evil = MeshEndpoint(EVIL, SECRET, KEYS["evil"], chatty)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            await evil.listen(udp)
            try:
                port = udp.getsockname()[1]
                m.client.set_view(
                    MeshView("local", (peer(REMOTE, m.tunnel_port), peer(EVIL, port)))
                )
                dialed = await within(WAIT_S, "the dial", m.client._link(EVIL, ("127.0.0.1", port)))
                await within(WAIT_S, "the link to close", dialed.closed.wait())
                # the honest host is still served
                resp = await within(WAIT_S, "the answer", m.request())
                assert resp.status == 200 and await resp.body() == b"fine"
            finally:
                evil.close()

    run(main())
