"""QUIC between nodes (meshllm.mesh.quic) over real aioquic on 127.0.0.1: admission by secret.

Each test runs its own event loop under a deadline; sockets are bound to port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import quic, wire

SECRET = b"k" * 32
OTHER_SECRET = b"x" * 32
TEST_DEADLINE_S = 20.0
T = TypeVar("T")


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_DEADLINE_S):
            await test()

    asyncio.run(bounded())


async def eventually(check: Callable[[], T], what: str, timeout: float = 5.0) -> T:
    """Poll `check` until truthy; fail with what it last returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last saw {value!r}")
        await asyncio.sleep(0.01)


class Node:
    """A MeshEndpoint listening on 127.0.0.1 that records links and the frames on them."""

    def __init__(self, node_id: str, secret: bytes = SECRET) -> None:
        self.links: list[quic.Link] = []
        self.frames: asyncio.Queue[wire.WireMessage] = asyncio.Queue()
        key = ec.generate_private_key(ec.SECP256R1())
        self.endpoint = quic.MeshEndpoint(node_id, secret, key, self.on_link)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    async def on_link(self, link: quic.Link) -> None:
        self.links.append(link)
        await self.read(link)

    async def read(self, link: quic.Link) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                msg = await wire.read_frame(link.reader)
                if isinstance(msg, wire.Probe):
                    link.send(wire.ProbeAck(msg.nonce))
                self.frames.put_nowait(msg)

    @property
    def counters(self) -> quic.Counters:
        return self.endpoint.counters


@contextlib.asynccontextmanager
async def nodes(*specs: tuple[str, bytes]) -> AsyncIterator[list[Node]]:
    started = [Node(node_id, secret) for node_id, secret in specs]
    try:
        for node in started:
            await node.endpoint.listen(node.sock)
        yield started
    finally:
        for node in started:
            node.endpoint.close()
        await asyncio.sleep(0.05)  # let the close frames go out


@contextlib.asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[QuicConnectionProtocol]:
    """A plain aioquic client: completes the QUIC handshake, knows nothing of admission."""
    loop = asyncio.get_running_loop()
    config = QuicConfiguration(is_client=True, alpn_protocols=[quic.ALPN])
    config.verify_mode = ssl.CERT_NONE
    config.server_name = "127.0.0.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(QuicConnection(configuration=config)), sock=sock
    )
    assert isinstance(protocol, QuicConnectionProtocol)
    try:
        protocol.connect(("127.0.0.1", port))
        async with asyncio.timeout(5):
            await protocol.wait_connected()
        yield protocol
    finally:
        protocol.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await protocol.wait_closed()
        transport.close()


async def closed_by_server(client: QuicConnectionProtocol, reader: asyncio.StreamReader) -> bytes:
    """Wait until the server ends the connection; what it sent on the stream before."""
    async with asyncio.timeout(5):
        await client.wait_closed()
        return await reader.read()


def test_same_secret_is_admitted_and_frames_flow_both_ways() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET), ("client", SECRET)) as (server, client):
            link = await client.endpoint.dial("127.0.0.1", server.port)
            assert link.peer_id == "server" and link.dialed
            (incoming,) = await eventually(lambda: server.links, "the server's link")
            assert incoming.peer_id == "client" and not incoming.dialed
            assert incoming.remote[0] == "127.0.0.1"

            reading = asyncio.ensure_future(client.read(link))
            link.send(wire.Probe(7))
            link.send(wire.Sync((wire.PeerAnnouncement(node_id="00000000000000c1", generation=1),)))
            assert await server.frames.get() == wire.Probe(7)
            assert isinstance(await server.frames.get(), wire.Sync)
            assert await client.frames.get() == wire.ProbeAck(7)
            incoming.send(wire.Digest({"00000000000000a1": 3}))
            assert await client.frames.get() == wire.Digest({"00000000000000a1": 3})

            # further streams (the Tunnel's) reach the stream handler only after admission
            reader, writer = await link.open_stream()
            writer.write(b"tunnel bytes")
            assert await reader.read() == b""  # default handler closes it
            assert server.counters == quic.Counters()
            assert client.counters == quic.Counters()
            reading.cancel()

    run(main)


def test_wrong_secret_is_refused_on_both_sides() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET), ("impostor", OTHER_SECRET)) as (server, impostor):
            # the client checks the server's proof first: a server without our secret
            with pytest.raises(quic.AdmissionError, match="secret"):
                await impostor.endpoint.dial("127.0.0.1", server.port)
            # and from the other side: a client without the server's secret
            with pytest.raises(quic.AdmissionError, match="secret"):
                await server.endpoint.dial("127.0.0.1", impostor.port)
            await eventually(
                lambda: not server.endpoint.protocols and not impostor.endpoint.protocols,
                "both sides to drop the connections",
            )
            assert server.links == [] and impostor.links == []

    run(main)


def test_a_server_hanging_up_in_admission_is_an_admission_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not an EOFError: the Gossiper's join and dial loops catch ConnectionError."""
    monkeypatch.setattr(quic, "ADMISSION_TIMEOUT_S", 0.0)  # the server gives up at once

    async def main() -> None:
        async with nodes(("server", SECRET), ("client", SECRET)) as (server, client):
            with pytest.raises(quic.AdmissionError, match="closed the connection"):
                await client.endpoint.dial("127.0.0.1", server.port)
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")
            assert server.links == []

    run(main)


def test_a_wrong_proof_gets_refused_and_counted() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), raw_client(server.port) as client:
            reader, writer = await client.create_stream()
            writer.write(wire.encode_frame(wire.Hello("intruder", os.urandom(16))))
            async with asyncio.timeout(5):
                challenge = await wire.read_frame(reader)
            assert isinstance(challenge, wire.Challenge) and challenge.node_id == "server"
            writer.write(wire.encode_frame(wire.Proof(b"\0" * 32)))
            async with asyncio.timeout(5):
                assert await wire.read_frame(reader) == wire.Refused("wrong mesh secret")
            assert await closed_by_server(client, reader) == b""
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")
            assert server.links == []

    run(main)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # header announces a 1.2 GB frame
        b"\x00\x00\x00\x05hello",  # a frame that is not msgpack
        wire.encode_frame(wire.Probe(1)),  # a valid frame, but not a Hello
        wire.encode_frame(wire.Hello("short nonce", b"123")),
        b"\x00\x00\x00\x05" + b"\x01\x02",  # then the stream ends
    ],
    ids=["http", "not-msgpack", "probe-first", "short-nonce", "truncated"],
)
def test_a_raw_client_sending_garbage_is_disconnected_and_counted(garbage: bytes) -> None:
    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), raw_client(server.port) as client:
            reader, writer = await client.create_stream()
            writer.write(garbage)
            if garbage.endswith(b"\x01\x02"):
                writer.write_eof()
            assert await closed_by_server(client, reader) == b"", "served something"
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")
            assert server.links == []

    run(main)


def test_a_second_stream_before_admission_is_disconnected_and_counted() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), raw_client(server.port) as client:
            first_reader, first = await client.create_stream()
            first.write(b"\x00\x00")  # half a header: admission waits for more
            await asyncio.sleep(0.05)
            _, second = await client.create_stream()
            second.write(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n")
            assert await closed_by_server(client, first_reader) == b""
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")
            await asyncio.sleep(0.1)
            assert server.counters.refused == 1, "counted once per connection"
            assert server.links == []

    run(main)


def test_a_silent_client_is_disconnected_after_the_admission_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quic, "ADMISSION_TIMEOUT_S", 0.3)

    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), raw_client(server.port) as client:
            reader, writer = await client.create_stream()
            writer.write(b"\x00")  # opens the stream, then nothing
            assert await closed_by_server(client, reader) == b""
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")

    run(main)


def test_garbage_datagrams_are_counted_and_the_endpoint_keeps_working() -> None:
    datagrams = [
        b"",
        b"\x00",
        b"\xff" * 50,  # long header with an impossible connection id length
        b"hello garbage",  # parses as a short header for no connection of ours
        b"\x40" + os.urandom(40),
        b"\xc0\x00\x00\x00\x01" + os.urandom(30),  # a truncated long header
    ]

    async def main() -> None:
        async with nodes(("server", SECRET), ("client", SECRET)) as (server, client):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as noise:
                for datagram in datagrams:
                    noise.sendto(datagram, ("127.0.0.1", server.port))
            await eventually(
                lambda: server.counters.garbage_datagrams == len(datagrams),
                f"{len(datagrams)} garbage datagrams counted (have {server.counters})",
            )
            link = await client.endpoint.dial("127.0.0.1", server.port)
            link.send(wire.Probe(1))
            assert await server.frames.get() == wire.Probe(1)
            assert server.counters.refused == 0
            assert server.counters.garbage_datagrams == len(datagrams)

    run(main)


def test_a_dial_that_times_out_leaves_no_unretrieved_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import gc

    async def main() -> None:
        (node,) = [Node("lonely", SECRET)]
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))  # bound, never answers: the handshake cannot finish
        try:
            with pytest.raises(quic.AdmissionError):
                await node.endpoint.dial("127.0.0.1", silent.getsockname()[1], timeout=0.3)
            # aioquic fails its handshake waiter once the abandoned connection has ended.
            await eventually(lambda: not node.endpoint.protocols, "the connection to end", 15)
            gc.collect()
            await asyncio.sleep(0)
        finally:
            silent.close()
            node.sock.close()

    with caplog.at_level("ERROR", logger="asyncio"):
        run(main)
    assert "never retrieved" not in caplog.text
