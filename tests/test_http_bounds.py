"""Every HTTP parser on a request's path is bounded, and a slow client holds the upstream back.

In-process: the Proxy's and the console's request parser (`meshllm.http.asgi`)
against clients that never end their head, send too many headers, endless
chunk extensions or trailers. Black-box: a real node whose llama-server is a
hostile HTTP server run by this test (`HOSTILE_SERVER`, given as the node's
llama-server binary), which answers with an endless chunk, a head that never
ends, endless trailers, a chunk-size line with megabytes of extension, or a
body longer than its Content-Length; clients that read nothing while the
Proxy's resident memory is measured; and the node serving on afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshllm.http import asgi
from meshllm.http.asgi import MAX_REQUEST_HEAD_BYTES, MAX_REQUEST_HEADERS, actor_server
from meshllm.testing import NodeProcess, http, token_of, wait_for
from tests.test_upstream import WAIT_S
from tests.test_upstream import run as run_with_deadline

MIB = 1024 * 1024


# -- in process: the request parser uvicorn runs for the Proxy and the console -----------


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body and answers with its length."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"%d" % size
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def bounded_server() -> AsyncIterator[int]:
    """`echo_app` under `actor_server` on 127.0.0.1, port 0; always stopped."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = actor_server(echo_app, graceful_s=1)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT_S):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT_S)
        sock.close()


async def send_and_read(port: int, parts: Iterator[bytes]) -> bytes:
    """Send `parts` until the server has answered and ended; everything it answered
    (nothing, when it reset the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0)  # drain() need not yield: let the server run

    sending = asyncio.ensure_future(send())
    try:
        async with asyncio.timeout(WAIT_S):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        sending.cancel()
        writer.close()


def endless(first: bytes, filler: bytes) -> Iterator[bytes]:
    """`first`, then `filler` for ever (the server has to stop it)."""
    yield first
    while True:
        yield filler


POST = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
CLOSE = b"Connection: close\r\n"
CHUNKED_POST = POST + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("parts", "status"),
    [
        (endless(POST + b"X-Endless: ", b"x" * 4096), b"431"),
        (endless(POST, b"X-Many: 1\r\n" * 64), b"431"),
        (endless(b"GET /", b"a" * 4096), b"431"),  # a URL that never ends
        (iter([POST + b"X: \r\n" * (MAX_REQUEST_HEADERS + 1) + b"\r\n"]), b"431"),
        # After the head (the app is reading): the connection is only closed.
        (endless(CHUNKED_POST + b"5;ext=", b"e" * 4096), None),
        (endless(CHUNKED_POST + b"5\r\nhello\r\n0\r\n", b"X-T: 1\r\n" * 64), None),
    ],
    ids=["endless header", "endless headers", "endless URL", "too many headers",
         "endless chunk extension", "endless trailers"],
)  # fmt: skip
def test_a_request_that_breaks_a_bound_is_refused(parts: Iterator[bytes], status: bytes) -> None:
    async def main() -> None:
        async with bounded_server() as port:
            answer = await send_and_read(port, parts)
            if status is None:
                assert answer == b""
            else:
                assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
                assert b"request_too_large" in answer
            # The server goes on serving.
            ok = await send_and_read(port, iter([POST + CLOSE + b"Content-Length: 5\r\n\r\nhello"]))
            assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"5")

    run_with_deadline(main())


def test_a_head_sent_too_slowly_is_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "HEAD_TIMEOUT_S", 0.2)

    async def main() -> None:
        async with bounded_server() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(POST + b"X-Slow: ")  # and never more
                async with asyncio.timeout(WAIT_S):
                    answer = await reader.read()
            finally:
                writer.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"request_too_slow" in answer

    run_with_deadline(main())


def test_a_request_within_the_bounds_is_served() -> None:
    # A head just under the bound, a chunked body in many chunks with extensions and
    # trailers, and two pipelined requests on one connection.
    big = b"X-Big: " + b"b" * (MAX_REQUEST_HEAD_BYTES - 1024) + b"\r\n"
    chunks = b"".join(b"4;name=value\r\nabcd\r\n" for _ in range(1000))
    request = CHUNKED_POST.replace(b"\r\n\r\n", b"\r\n" + big + b"\r\n")
    request += chunks + b"0\r\nX-Trailer: 1\r\n\r\n"

    async def main() -> None:
        async with bounded_server() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request + request)
                async with asyncio.timeout(WAIT_S):
                    for _ in range(2):
                        head = await reader.readuntil(b"\r\n\r\n")
                        assert head.startswith(b"HTTP/1.1 200"), head
                        length = int(head.lower().split(b"content-length: ")[1].split(b"\r")[0])
                        assert await reader.readexactly(length) == b"4000"
            finally:
                writer.close()

    run_with_deadline(main())


# -- black-box: a node in front of a hostile llama-server ----------------------------------

HOSTILE_SERVER = r'''
"""A llama-server stand-in that answers /health and misbehaves on purpose on completions.

The request body's "hostile" field picks the misbehaviour. Progress goes to
$HOSTILE_STATE as JSON: bytes sent by the latest response, whether it is blocked
(the node has read nothing for STALL_S), and how many responses ended with the
node closing the connection.
"""
import asyncio, json, os, sys

STATE = os.environ["HOSTILE_STATE"]
LIMIT = 256 * 1024 * 1024  # a node without backpressure must not take the machine down
STALL_S = 3.0  # a node that reads, however slowly, does so more often than this
state = {"responses": 0, "sent": 0, "blocked": False, "closed": 0}


def save():
    with open(STATE + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(STATE + ".tmp", STATE)


async def pour(writer, first, filler):
    state["sent"], state["blocked"] = 0, False
    state["responses"] += 1
    save()
    writer.write(first)
    marked = 0
    while state["sent"] < LIMIT:
        writer.write(filler)
        state["sent"] += len(filler)
        if state["sent"] - marked > 4 * 1024 * 1024:
            marked = state["sent"]
            save()
        drained = asyncio.ensure_future(writer.drain())
        done, _ = await asyncio.wait([drained], timeout=STALL_S)
        if not done:  # the node has read nothing for a while: it holds this server back
            state["blocked"] = True
            save()
            try:
                await drained
            finally:
                state["blocked"] = False
                save()
        drained.result()


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


EVENT = b"data: " + b"x" * 4000 + b"\n\n"
CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
           b"transfer-encoding: chunked\r\n\r\n")
BEHAVIOURS = {
    "endless_chunk": (CHUNKED + b"40000000\r\n", EVENT * 16),
    "endless_events": (CHUNKED, chunk(EVENT) * 16),
    "huge_head": (b"HTTP/1.1 200 OK\r\nx-endless: ", b"h" * 65536),
    "endless_trailers": (CHUNKED + chunk(b"data: 1\n\n") + b"0\r\n", b"x-t: 1\r\n" * 8192),
    "endless_extension": (CHUNKED + chunk(b"data: 1\n\n") + b"5;ext=", b"e" * 65536),
}


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            if head.startswith(b"GET /health"):
                data = b'{"status":"ok"}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
                continue
            kind = json.loads(body).get("hostile", "ok")
            if kind in BEHAVIOURS:
                await pour(writer, *BEHAVIOURS[kind])
                return
            if kind == "long_body":
                head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
                writer.write(head + b"0123456789" * 1000)
                continue
            data = b'{"choices":[{"message":{"role":"assistant","content":"fine"}}]}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(data), data))
    except (ConnectionError, asyncio.IncompleteReadError):
        state["closed"] += 1
        save()
    finally:
        writer.close()


async def main():
    port = int(sys.argv[sys.argv.index("--port") + 1])
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    save()
    print(f"main: server is listening on http://127.0.0.1:{port}", flush=True)
    await server.serve_forever()


asyncio.run(main())
'''


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Hostile:
    """The hostile llama-server's script and what it reports."""

    def __init__(self, root: Path) -> None:
        self.script = root / "llama-server"
        self.script.write_text(f"#!{sys.executable}\n{HOSTILE_SERVER}")
        self.script.chmod(self.script.stat().st_mode | stat.S_IXUSR)
        self.state_path = root / "hostile-state.json"

    def env(self, models_dir: Path) -> dict[str, str]:
        return {
            "MESHLLM_LLAMA_SERVER": str(self.script),
            "HOSTILE_STATE": str(self.state_path),
            "MESHLLM_MODELS_DIR": str(models_dir),
        }

    def state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"responses": 0, "sent": 0, "blocked": False, "closed": 0}
        return state


@pytest.fixture(scope="module")
def hostile_node(demo_model: Path) -> Iterator[tuple[NodeProcess, Hostile]]:
    root = Path(tempfile.mkdtemp(prefix="meshllm-hostile-"))
    (root / "no-models").mkdir()
    hostile = Hostile(root)
    node = NodeProcess(
        root / "node",
        "--model",
        str(demo_model),
        "--bind",
        "127.0.0.1:0",
        env=hostile.env(root / "no-models"),
    )
    try:
        node.start(timeout=30)
        node.wait_serving(timeout=30)
        yield node, hostile
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def request_bytes(port: int, hostile: str, stream: bool = True) -> bytes:
    body = json.dumps(
        {"model": "meshllm-demo", "messages": [], "stream": stream, "hostile": hostile}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )


def idle_client(port: int, hostile: str) -> socket.socket:
    """A client that sends its request and then reads nothing (a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(WAIT_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request_bytes(port, hostile))
    return sock


def still_serves(node: NodeProcess) -> None:
    # The hostile server may be restarting (an earlier attack can end it): ready again
    # within the deadline is serving on.
    wait_for(lambda: node.warm_models(), 60, "the node to have its model ready")
    status, _, body = http(
        node.port,
        "POST",
        "/v1/chat/completions",
        {"model": "meshllm-demo", "messages": [], "hostile": "ok"},
        timeout=WAIT_S,
    )
    assert status == 200 and json.loads(body)["choices"], body


def held_back(upstream: Hostile, responses: int) -> dict[str, Any]:
    """Wait until the response after the `responses` first is held back, or got out
    more than a node can hold; what the upstream reported then."""

    def check() -> dict[str, Any] | None:
        state = upstream.state()
        fresh = state["responses"] > responses
        return (
            state if fresh and (state["blocked"] or state["sent"] > HELD_BACK_MIB * MIB) else None
        )

    return wait_for(check, 30, "the hostile upstream to be held back", interval=0.05)


HELD_BACK_MIB = 64
"""An upstream that got this much out while the client read nothing was not held back."""
GROWTH_MIB = 32
"""What one response may add to the Proxy's resident memory (it holds a few MiB)."""


@pytest.mark.integration
@pytest.mark.parametrize("hostile", ["endless_chunk", "endless_events"])
def test_a_client_that_reads_nothing_holds_the_upstream_back(
    hostile_node: tuple[NodeProcess, Hostile], hostile: str
) -> None:
    node, upstream = hostile_node
    proxy = node.actor_pids["proxy"]
    still_serves(node)
    before = rss_bytes(proxy)
    closed = upstream.state()["closed"]
    responses = upstream.state()["responses"]
    sock = idle_client(node.port, hostile)
    try:
        state = held_back(upstream, responses)
        sent = state["sent"]
        assert sent < HELD_BACK_MIB * MIB, f"the upstream got {sent} bytes out: no backpressure"
        grown = rss_bytes(proxy) - before
        assert grown < GROWTH_MIB * MIB, f"the Proxy grew by {grown} bytes ({state})"
    finally:
        sock.close()
    # The client going away closes the upstream connection, and the node serves on.
    wait_for(lambda: upstream.state()["closed"] > closed, 10, "the upstream connection to close")
    still_serves(node)


@pytest.mark.integration
def test_an_endless_chunk_streams_through_to_a_client_that_reads(
    hostile_node: tuple[NodeProcess, Hostile],
) -> None:
    node, _ = hostile_node
    proxy = node.actor_pids["proxy"]
    before = rss_bytes(proxy)
    with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT_S) as sock:
        sock.sendall(request_bytes(node.port, "endless_chunk"))
        got = 0
        while got < 3 * HELD_BACK_MIB * MIB:  # more than the Proxy could hold
            data = sock.recv(1 << 20)
            assert data, "the stream ended"
            got += len(data)
        grown = rss_bytes(proxy) - before
        assert grown < GROWTH_MIB * MIB, f"the Proxy grew by {grown} bytes"
    still_serves(node)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """Head and body (dechunked when chunked) of one response, until it ends or closes."""
    data = b""
    with contextlib.suppress(TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep and b"chunked" not in head.lower():
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r")[0])
                if len(rest) >= length:
                    break
            if sep and rest.endswith(b"0\r\n\r\n"):
                break
    head, _, rest = data.partition(b"\r\n\r\n")
    if b"chunked" not in head.lower():
        return head, rest
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return head, body


@pytest.mark.integration
@pytest.mark.parametrize(
    ("hostile", "expect"),
    [
        ("huge_head", "502"),
        ("endless_trailers", "sse error"),
        ("endless_extension", "sse error"),
        ("long_body", "exactly Content-Length"),
    ],
)
def test_a_broken_upstream_response_is_a_clean_error(
    hostile_node: tuple[NodeProcess, Hostile], hostile: str, expect: str
) -> None:
    node, _ = hostile_node
    proxy = node.actor_pids["proxy"]
    before = rss_bytes(proxy)
    with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT_S) as sock:
        sock.sendall(request_bytes(node.port, hostile))
        head, body = read_response(sock)
    if expect == "502":
        assert head.startswith(b"HTTP/1.1 502"), head
        assert json.loads(body)["error"]["code"] == "upstream_error"
        assert b"too large" in body
    elif expect == "sse error":
        assert head.startswith(b"HTTP/1.1 200"), head
        events = [e for e in body.split(b"\n\n") if e]
        assert events[0] == b"data: 1"
        error = json.loads(events[-1].removeprefix(b"data: "))["error"]
        assert "upstream failed mid-stream" in error["message"]
    else:
        assert head.startswith(b"HTTP/1.1 200"), head
        assert body == b"0123456789"
    assert rss_bytes(proxy) - before < GROWTH_MIB * MIB
    still_serves(node)


@pytest.mark.integration
@pytest.mark.parametrize(
    "parts",
    [
        endless(b"POST /v1/chat/completions HTTP/1.1\r\nX-Endless: ", b"x" * 65536),
        endless(b"POST /v1/chat/completions HTTP/1.1\r\n", b"X-Many: 1\r\n" * 4096),
    ],
    ids=["endless header", "endless headers"],
)
def test_a_client_that_never_ends_its_head_is_refused(
    hostile_node: tuple[NodeProcess, Hostile], parts: Iterator[bytes]
) -> None:
    node, _ = hostile_node
    proxy = node.actor_pids["proxy"]
    before = rss_bytes(proxy)
    with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT_S) as sock:
        for sent, part in enumerate(parts):
            if select.select([sock], [], [], 0)[0]:
                break  # answered
            sock.sendall(part)
            assert sent < 64 * MIB // len(part), "64 MiB of head taken in"
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert rss_bytes(proxy) - before < GROWTH_MIB * MIB
    still_serves(node)


# -- black-box through the Tunnel: the hostile host is another node -----------------------


@pytest.mark.integration
def test_through_the_tunnel_a_client_that_reads_nothing_holds_the_remote_upstream_back(
    hostile_node: tuple[NodeProcess, Hostile], tmp_path: Path
) -> None:
    host, upstream = hostile_node
    client = NodeProcess(
        tmp_path / "client",
        "--client",
        "--join",
        token_of(host),
        "--bind",
        "127.0.0.1:0",
        env={"MESHLLM_MODELS_DIR": str(tmp_path)},
    )
    try:
        client.start(timeout=30)

        def routed() -> bool:
            status, _, _ = http(
                client.port,
                "POST",
                "/v1/chat/completions",
                {"model": "meshllm-demo", "messages": [], "hostile": "ok"},
                timeout=WAIT_S,
            )
            return status == 200

        wait_for(routed, 30, "the client node to route to the host", interval=0.2)
        pids = {a["name"]: int(a["pid"]) for a in client.status().get("actors", [])}
        watched = {
            "client proxy": pids["proxy"],
            "client tunnel": pids["tunnel"],
            "host tunnel": host.actor_pids["tunnel"],
        }
        before = {name: rss_bytes(pid) for name, pid in watched.items()}
        responses = upstream.state()["responses"]
        sock = idle_client(client.port, "endless_chunk")
        try:
            sent = held_back(upstream, responses)["sent"]
            grown = {name: rss_bytes(pid) - before[name] for name, pid in watched.items()}
            assert sent < HELD_BACK_MIB * MIB and all(
                g < GROWTH_MIB * MIB for g in grown.values()
            ), f"upstream sent {sent} bytes; memory grown: {grown}"
        finally:
            sock.close()
    finally:
        client.stop()
    still_serves(host)
