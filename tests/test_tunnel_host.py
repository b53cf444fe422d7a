"""The tunnel host forwards only what the Proxy forwards (issue 9, item 5), black-box.

Two real nodes on loopback (a module fixture): the host serves the demo model,
an honest lite client joined through its token. The hostile member is an
in-test `MeshEndpoint` holding the mesh secret: it dials the host's tunnel
port and writes the tunnel's frames itself (`TunnelOpen`, then a
`hop.TunnelRequest` frame, then the body), as a member's modified Tunnel
could. Every rule is broken once, each answer checked; meanwhile the honest
client's requests through the same host keep getting answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from meshllm.mesh import wire
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.quic import IDLE_TIMEOUT_S, Link, MeshEndpoint, release_stream
from meshllm.mesh.token import decode_token
from meshllm.testing import NodeProcess, chat, http, token_of
from meshllm.tunnel.hop import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_HEADERS, TunnelRequest
from meshllm.tunnel.server import BODY_STALL_S, HEAD_TIMEOUT_S, MAX_STREAMS_PER_PEER

pytestmark = pytest.mark.integration

T = TypeVar("T")
MODEL = "meshllm-demo"
LOOPBACK = ("--bind", "127.0.0.1:0")
SERVING = (*LOOPBACK, "--llama-arg=-t", "--llama-arg=1")
ANSWER_S = 30.0
"""How long an answer the host should give at once may take (a loaded CI machine)."""
MARGIN_S = 10.0
"""Beyond a deadline of the host's, how late its answer may come."""
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def run(coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Pair:
    host: NodeProcess
    client: NodeProcess
    secret: bytes
    tunnel_port: int


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, llama_server: str, demo_model: Path
) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("tunnel-host")
    (root / "no-models").mkdir()
    env = {"MESHLLM_MODELS_DIR": str(root / "no-models")}
    host = NodeProcess(root / "host", "--model", str(demo_model), *SERVING, env=env)
    nodes = [host]
    try:
        host.start().wait_serving()
        token = token_of(host)
        client = NodeProcess(root / "client", "--client", "--join", token, *LOOPBACK, env=env)
        nodes.append(client)
        client.start().wait_ready(MODEL)
        me = host.status()["me"]
        yield Pair(host, client, decode_token(token).secret, int(me["tunnel_port"]))
    finally:
        for node in nodes:
            node.stop()


@contextlib.asynccontextmanager
async def hostile(pair: Pair) -> AsyncIterator[Link]:
    """An admitted link to the host from a member that speaks the frames itself."""
    key = load_or_create_key(None)
    evil = MeshEndpoint(node_id_of(key), pair.secret, key, _no_setup)
    try:
        yield await evil.dial("127.0.0.1", pair.tunnel_port, timeout=ANSWER_S)
    finally:
        evil.close()
        await asyncio.sleep(0.05)  # let the close frame go


async def _no_setup(link: Link) -> None:
    pass


def request_frame(**fields: Any) -> bytes:
    """`TunnelOpen` and a request frame (not checked on the way: a hostile Tunnel's)."""
    base: dict[str, Any] = {
        "node": "host",
        "model": MODEL,
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": ((b"content-type", b"application/json"),),
        "body_length": 0,
    }
    payload = msgspec.msgpack.encode(TunnelRequest(**{**base, **fields}))
    opening = wire.encode_frame(wire.TunnelOpen(MODEL))
    return opening + len(payload).to_bytes(4, "big") + payload


OPENING = len(wire.encode_frame(wire.TunnelOpen(MODEL)))
"""Bytes of the `TunnelOpen` frame that starts each stream."""


def chat_request(**fields: Any) -> bytes:
    """A whole, valid chat request: frames and body."""
    body = json.dumps(CHAT).encode()
    return request_frame(body_length=len(body), **fields) + body


async def exchange(link: Link, data: bytes, end: bool = True, within: float = ANSWER_S) -> bytes:
    """Send `data` on a new stream (then its end, with `end`); all the host answers."""
    reader, writer = await link.open_stream()
    writer.write(data)
    if end:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(-1), within)
    except TimeoutError:
        raise AssertionError(f"no answer within {within}s to {data[:80]!r}") from None
    finally:
        release_stream(reader, writer)


def answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(status, the OpenAI error object or the JSON body) of a raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    parsed = json.loads(body)
    return int(head.split(b" ")[1]), parsed.get("error", parsed)


def honest_chat(pair: Pair) -> None:
    assert chat(pair.client.port, MODEL, max_tokens=2)["choices"]


# -- each rule, broken once -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/slots/0?action=save"),
        ("POST", "/slots/0?action=erase"),
        ("POST", "/props"),
        ("DELETE", "/v1/chat/completions"),
        ("POST", "/lora-adapters"),
        ("GET", "/v1/stream"),
        ("POST", "/models/load"),
    ],
)
def test_only_what_the_proxy_forwards_reaches_llama_server(
    pair: Pair, method: str, path: str
) -> None:
    async def main() -> None:
        async with hostile(pair) as link:
            status, error = answer(await exchange(link, request_frame(method=method, path=path)))
            assert (status, error["code"]) == (403, "not_forwarded"), error
            # the same raw path carries an allowed request: the refusal is the rule's
            status, body = answer(await exchange(link, chat_request()))
            assert status == 200 and body["choices"], body

    run(main())


def test_llama_servers_other_endpoints_reach_it_from_another_node(pair: Pair) -> None:
    """Through the lite client's Proxy and the tunnel: the aliases, tokenizing, a read
    with its query, Anthropic's API; and what changes a server is refused at the client."""
    port = pair.client.port
    status, _, body = http(port, "POST", "/tokenize", {"model": MODEL, "content": "hi"})
    assert status == 200 and json.loads(body)["tokens"], body
    status, _, body = http(port, "POST", "/completion", {"prompt": "hi", "n_predict": 2})
    assert status == 200 and "content" in json.loads(body), body
    status, _, body = http(port, "GET", f"/props?model={MODEL}")
    assert status == 200 and "default_generation_settings" in json.loads(body), body
    messages = {"model": MODEL, "max_tokens": 2, "messages": CHAT["messages"]}
    status, _, body = http(port, "POST", "/v1/messages", messages)
    assert status == 200 and json.loads(body)["type"] == "message", body
    status, _, body = http(port, "POST", "/slots/0?action=erase", {})
    assert status == 403 and json.loads(body)["error"]["code"] == "not_local", body


def test_body_over_the_proxy_limit_is_413_unread(pair: Pair) -> None:
    async def main() -> None:
        async with hostile(pair) as link:
            # Announced, never sent: answered at once, not after reading 16 MiB.
            frames = request_frame(body_length=MAX_BODY_BYTES + 1)
            status, error = answer(await exchange(link, frames, end=False))
            assert (status, error["code"]) == (413, "body_too_large")
            assert str(MAX_BODY_BYTES) in error["message"]
            assert not link.closed.is_set()

    run(main())


@pytest.mark.parametrize(
    "headers",
    [
        tuple((b"x-h%d" % i, b"v") for i in range(MAX_HEADERS + 1)),
        ((b"x-big", b"v" * (MAX_HEADER_BYTES + 1)),),
    ],
    ids=["too-many", "too-large"],
)
def test_header_caps(pair: Pair, headers: tuple[tuple[bytes, bytes], ...]) -> None:
    async def main() -> None:
        async with hostile(pair) as link:
            status, error = answer(await exchange(link, chat_request(headers=headers)))
            assert (status, error["code"]) == (431, "headers_too_large")

    run(main())


def test_one_request_per_stream(pair: Pair) -> None:
    async def main() -> None:
        async with hostile(pair) as link:
            pipelined = chat_request() + chat_request()
            status, error = answer(await exchange(link, pipelined))
            assert status == 400 and "one request per stream" in error["message"]

    run(main())


def test_slow_head_and_stalled_body_meet_their_deadlines(pair: Pair) -> None:
    async def main() -> None:
        async with hostile(pair) as link:
            half_head = chat_request()[: OPENING + 10]  # TunnelOpen, part of the request frame
            body = json.dumps(CHAT).encode()
            part_body = request_frame(body_length=len(body)) + body[:5]
            loop = asyncio.get_running_loop()
            started = loop.time()
            slow_head, stalled = await asyncio.gather(
                exchange(link, half_head, end=False, within=HEAD_TIMEOUT_S + MARGIN_S),
                exchange(link, part_body, end=False, within=BODY_STALL_S + MARGIN_S),
            )
            status, error = answer(slow_head)
            assert (status, error["code"]) == (408, "request_timeout")
            assert "head" in error["message"]
            status, error = answer(stalled)
            assert (status, error["code"]) == (408, "request_timeout")
            assert "stalled" in error["message"]
            assert loop.time() - started >= min(HEAD_TIMEOUT_S, BODY_STALL_S)
            # the link is still good
            status, body_ = answer(await exchange(link, chat_request()))
            assert status == 200, body_

    run(main())


def test_a_stream_flood_is_capped_and_an_honest_node_is_unaffected(pair: Pair) -> None:
    extra = 16

    async def main() -> None:
        async with hostile(pair) as link:
            # Streams that hold the host's attention: a head that never finishes.
            half_head = chat_request()[: OPENING + 10]
            streams = []
            for _ in range(MAX_STREAMS_PER_PEER + extra):
                # Written at once: aioquic makes a stream id taken only by its first write.
                reader, writer = await link.open_stream()
                writer.write(half_head)
                streams.append((reader, writer))
            waits = [asyncio.ensure_future(r.read(-1)) for r, _ in streams]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ANSWER_S
            while sum(w.done() for w in waits) < extra and loop.time() < deadline:
                await asyncio.wait(
                    waits, timeout=deadline - loop.time(), return_when="FIRST_COMPLETED"
                )
            done = [w for w in waits if w.done()]
            # Exactly the streams over the cap are refused, at once; the rest are held.
            assert len(done) == extra, f"{len(done)} answered of {len(waits)}"
            for w in done:
                status, error = answer(w.result())
                assert (status, error["code"]) == (429, "too_many_streams")
            # The honest node's requests through the same host go through meanwhile
            # (well within the head deadline the held streams wait out).
            for _ in range(3):
                await asyncio.to_thread(honest_chat, pair)
            assert sum(w.done() for w in waits) == extra
            for w in waits:
                w.cancel()
            for reader, writer in streams:
                release_stream(reader, writer, abort=True)
        # Its connection gone (once the host has seen it end: QUIC's draining period),
        # the member's streams no longer count against it.
        async with hostile(pair) as link:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ANSWER_S
            while True:
                status, body = answer(await exchange(link, chat_request()))
                if status != 429 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert status == 200, body

    run(main())


def test_data_on_the_control_stream_closes_the_link(pair: Pair) -> None:
    async def main() -> None:
        async with hostile(pair) as link:
            # Nothing reads that stream: what is sent there would stay buffered (a
            # little, not enough to trip anything else, is the test).
            link.writer.write(b"x" * 10_000)
            try:
                # Closed at once, well before QUIC's idle timeout would close it anyway.
                await asyncio.wait_for(link.closed.wait(), IDLE_TIMEOUT_S / 2)
            except TimeoutError:
                raise AssertionError(
                    "the host kept a link with data on its control stream"
                ) from None
        # the member may come back, and honest traffic never noticed
        async with hostile(pair) as link:
            status, body = answer(await exchange(link, chat_request()))
            assert status == 200, body
        honest_chat(pair)

    run(main())
