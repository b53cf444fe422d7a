"""QUIC between nodes (meshllm.mesh.quic) over real aioquic on 127.0.0.1: admission by secret.

Each test runs its own event loop under a deadline; sockets are bound to port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import identity, quic, wire
from meshllm.testing import quic_stranger

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
    """A MeshEndpoint listening on 127.0.0.1 that records links and the frames on them.

    `name` is for the test's reader; the node id is its key's, as on every node.
    """

    def __init__(self, name: str, secret: bytes = SECRET) -> None:
        self.name = name
        self.links: list[quic.Link] = []
        self.frames: asyncio.Queue[wire.WireMessage] = asyncio.Queue()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.node_id = identity.node_id_of(self.key)
        self.endpoint = quic.MeshEndpoint(self.node_id, secret, self.key, self.on_link)
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


async def flood_gaps(
    client: QuicConnectionProtocol, stream_ids: Iterable[int], budget: int, patience: int = 20
) -> int:
    """Send one byte at the far end of every window given, on `stream_ids`; the gaps made.

    Nothing arrives in order, so the receiver buffers the gap before each byte
    (aioquic keeps out-of-order data up to the window) and a reader never sees
    a byte. Within the flow-control limits the receiver announces, as a careful
    attacker would: the receiver decides how much it holds. Stops when the
    connection ends, when `budget` bytes of gaps are made, or after `patience`
    rounds in a row without credit.
    """
    conn = client._quic
    made = idle = 0
    while made < budget and idle < patience and not conn._close_event:
        idle += 1
        for stream_id in stream_ids:
            stream = conn._get_or_create_stream_for_send(stream_id)
            sender = stream.sender
            credit = min(
                stream.max_stream_data_remote - sender.highest_offset,
                conn._remote_max_data - conn._remote_max_data_used,
            )
            if stream.is_blocked or credit < 2 or sender._buffer_start != sender._buffer_stop:
                continue  # no room, or the last byte is not acknowledged yet
            # Skip to one byte before the window's end; the gap counts as sent,
            # as the receiver counts it.
            gap = credit - 1
            sender._buffer_start = sender._buffer_stop = sender.highest_offset + gap
            sender.highest_offset += gap
            conn._remote_max_data_used += gap
            conn.send_stream_data(stream_id, b"x")
            client.transmit()  # the byte takes its credit before the next stream's share
            made += gap
            idle = 0
        await asyncio.sleep(0.02)
    return made


async def closed_by_server(client: QuicConnectionProtocol, reader: asyncio.StreamReader) -> bytes:
    """Wait until the server ends the connection; what it sent on the stream before."""
    async with asyncio.timeout(5):
        await client.wait_closed()
        return await reader.read()


def test_same_secret_is_admitted_and_frames_flow_both_ways() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET), ("client", SECRET)) as (server, client):
            link = await client.endpoint.dial("127.0.0.1", server.port)
            assert link.peer_id == server.node_id and link.dialed
            (incoming,) = await eventually(lambda: server.links, "the server's link")
            assert incoming.peer_id == client.node_id and not incoming.dialed
            assert incoming.remote[0] == "127.0.0.1"

            reading = asyncio.ensure_future(client.read(link))
            link.send(wire.Probe(7))
            link.send(wire.Sync((wire.PeerAnnouncement(node_id=client.node_id, generation=1),)))
            assert await server.frames.get() == wire.Probe(7)
            assert isinstance(await server.frames.get(), wire.Sync)
            assert await client.frames.get() == wire.ProbeAck(7)
            incoming.send(wire.Digest({server.node_id: 3}))
            assert await client.frames.get() == wire.Digest({server.node_id: 3})

            # further streams (the Tunnel's) reach the stream handler only after admission
            reader, writer = await link.open_stream()
            writer.write(b"tunnel bytes")
            with pytest.raises(ConnectionResetError):  # the default handler gives it up
                await reader.read()
            # and forgets it: no reader is left to hold what might still come
            stream_id = writer.get_extra_info("stream_id")
            assert stream_id not in incoming.protocol._stream_readers
            assert stream_id in incoming.protocol.abandoned
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
        async with nodes(("server", SECRET)) as (server,), quic_stranger(server.port) as client:
            reader, writer = await client.create_stream()
            key = ec.generate_private_key(ec.SECP256R1())
            hello = wire.Hello(identity.node_id_of(key), os.urandom(16), identity.public_der(key))
            writer.write(wire.encode_frame(hello))
            async with asyncio.timeout(5):
                challenge = await wire.read_frame(reader)
            assert isinstance(challenge, wire.Challenge) and challenge.node_id == server.node_id
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
        async with nodes(("server", SECRET)) as (server,), quic_stranger(server.port) as client:
            reader, writer = await client.create_stream()
            writer.write(garbage)
            if garbage.endswith(b"\x01\x02"):
                writer.write_eof()
            assert await closed_by_server(client, reader) == b"", "served something"
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")
            assert server.links == []

    run(main)


@pytest.mark.parametrize("unidirectional", [False, True], ids=["bidi", "uni"])
def test_a_second_stream_before_admission_is_disconnected_and_counted(
    unidirectional: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quic, "ADMISSION_TIMEOUT_S", 60.0)  # closed for the stream, not late

    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), quic_stranger(server.port) as client:
            first_reader, first = await client.create_stream()
            first.write(b"\x00\x00")  # half a header: admission waits for more
            await asyncio.sleep(0.05)
            # The server allows one stream before admission; a hostile client ignores that.
            client._quic._remote_max_streams_bidi = client._quic._remote_max_streams_uni = 8
            client._quic._remote_max_stream_data_uni = 1 << 20
            _, second = await client.create_stream(is_unidirectional=unidirectional)
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
        async with nodes(("server", SECRET)) as (server,), quic_stranger(server.port) as client:
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


# -- identity bound to keys -------------------------------------------------------


def test_an_endpoint_refuses_a_node_id_that_is_not_its_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not the id of the key"):
        quic.MeshEndpoint("someone-else", SECRET, key, Node("x").on_link)


def test_a_client_claiming_another_nodes_id_is_refused() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET), ("victim", SECRET), ("liar", SECRET)) as (
            server,
            victim,
            liar,
        ):
            liar.endpoint.node_id = victim.node_id  # holds the secret, not the victim's key
            with pytest.raises(quic.AdmissionError, match="closed the connection"):
                await liar.endpoint.dial("127.0.0.1", server.port)
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")
            assert server.links == []
            # The victim itself still links.
            link = await victim.endpoint.dial("127.0.0.1", server.port)
            assert link.peer_id == server.node_id
            (incoming,) = await eventually(lambda: server.links, "the victim's link")
            assert incoming.peer_id == victim.node_id

    run(main)


def test_a_server_claiming_another_nodes_id_is_refused_by_the_client() -> None:
    async def main() -> None:
        async with nodes(("liar", SECRET), ("victim", SECRET), ("client", SECRET)) as (
            liar,
            victim,
            client,
        ):
            liar.endpoint.node_id = victim.node_id  # its certificate still holds its own key
            with pytest.raises(quic.AdmissionError, match="certificate's key is node"):
                await client.endpoint.dial("127.0.0.1", liar.port)
            assert liar.links == [] and client.links == []

    run(main)


def test_a_proof_without_the_clients_signature_is_refused() -> None:
    """The HMAC alone (what any member can compute) does not prove the Hello's id."""

    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), quic_stranger(server.port) as client:
            reader, writer = await client.create_stream()
            key = ec.generate_private_key(ec.SECP256R1())
            node_id, nonce = identity.node_id_of(key), os.urandom(16)
            writer.write(wire.encode_frame(wire.Hello(node_id, nonce, identity.public_der(key))))
            async with asyncio.timeout(5):
                challenge = await wire.read_frame(reader)
            assert isinstance(challenge, wire.Challenge)
            cert = server.endpoint.cert_digest
            mac = quic._mac(SECRET, b"client", challenge.nonce, nonce, node_id.encode(), cert)
            other = ec.generate_private_key(ec.SECP256R1())  # a signature, but not by the key
            signed = quic._transcript(nonce, challenge.nonce, cert, server.node_id, node_id)
            writer.write(wire.encode_frame(wire.Proof(mac, identity.sign(other, signed))))
            async with asyncio.timeout(5):
                assert await wire.read_frame(reader) == wire.Refused("bad signature")
            assert await closed_by_server(client, reader) == b""
            assert server.links == [] and server.counters.refused == 1

    run(main)


def test_admission_frames_fit_under_their_cap() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    node_id, der = identity.node_id_of(key), identity.public_der(key)
    frames: list[wire.WireMessage] = [
        wire.Hello(node_id, os.urandom(16), der),
        wire.Challenge(node_id, os.urandom(16), os.urandom(32)),
        wire.Proof(os.urandom(32), os.urandom(72)),  # DER ECDSA P-256: 72 bytes at most
    ]
    for frame in frames:
        assert len(wire.encode_frame(frame)) <= quic.ADMISSION_FRAME_BYTES


# -- before and after admission ------------------------------------------------------


def test_windows_and_streams_are_tiny_before_admission_and_raised_after() -> None:
    async def main() -> None:
        async with nodes(("server", SECRET), ("client", SECRET)) as (server, client):
            async with quic_stranger(server.port) as stranger:
                assert stranger._quic._retry_count == 1  # its address was validated first
                # What the server's transport parameters allowed a stranger.
                assert stranger._quic._remote_max_data == quic.ADMISSION_WINDOW_BYTES
                assert stranger._quic._remote_max_streams_bidi == 1
                assert stranger._quic._remote_max_streams_uni == 0
            link = await client.endpoint.dial("127.0.0.1", server.port)
            (incoming,) = await eventually(lambda: server.links, "the server's link")
            # A frame far over the admission window flows both ways on the control stream...
            big = wire.Sync(
                tuple(wire.PeerAnnouncement(node_id=f"{i:016x}", generation=1) for i in range(2500))
            )
            assert len(wire.encode_frame(big)) > 100 * quic.ADMISSION_WINDOW_BYTES
            link.send(big)
            assert await server.frames.get() == big
            reading = asyncio.ensure_future(client.read(link))
            incoming.send(big)
            assert await client.frames.get() == big
            reading.cancel()
            # ...and the peer may open as many streams as before.
            remote = link.protocol._quic
            await eventually(
                lambda: remote._remote_max_streams_bidi == quic.PEER_STREAMS,
                "the server's MAX_STREAMS",
            )
            assert remote._remote_max_streams_uni == 0

    run(main)


def test_over_the_pending_cap_the_network_with_the_most_waiting_makes_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new connection is never refused for room: the oldest of the biggest /24 is closed."""
    monkeypatch.setattr(quic, "MAX_PENDING", 4)

    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), contextlib.AsyncExitStack() as held:
            clients: dict[str, QuicConnectionProtocol] = {}

            async def connect(host: str) -> None:
                clients[host] = await held.enter_async_context(quic_stranger(server.port, host))

            def closed() -> list[str]:
                return sorted(host for host, c in clients.items() if c._quic._close_event)

            for host in ("127.0.2.1", "127.0.1.1", "127.0.1.2", "127.0.3.1"):
                await connect(host)
            # Full: 127.0.1.0/24 has the most waiting, its oldest goes (not the oldest of all).
            await connect("127.0.1.3")
            await eventually(lambda: closed() == ["127.0.1.1"], "127.0.1.1 closed")
            await connect("127.0.4.1")
            await eventually(lambda: closed() == ["127.0.1.1", "127.0.1.2"], "127.0.1.2 closed")
            # One each now: the oldest of all goes.
            await connect("127.0.5.1")
            expected = ["127.0.1.1", "127.0.1.2", "127.0.2.1"]
            await eventually(lambda: closed() == expected, "127.0.2.1 closed")
            assert server.counters.over_pending_cap == 3
            assert sorted(p.remote_address()[0] for p in server.endpoint.pending) == [
                "127.0.1.3",
                "127.0.3.1",
                "127.0.4.1",
                "127.0.5.1",
            ]
            close = clients["127.0.1.1"]._quic._close_event
            assert close is not None and close.reason_phrase == (
                "too many connections waiting for admission"
            )
            await held.aclose()
            # Closed connections leave the count.
            await eventually(lambda: not server.endpoint.pending, "the pending list to empty")

    run(main)


def test_a_member_is_admitted_while_strangers_fill_every_pending_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quic, "MAX_PENDING", 4)

    async def main() -> None:
        async with (
            nodes(("server", SECRET), ("member", SECRET)) as (server, member),
            contextlib.AsyncExitStack() as held,
        ):
            for i in range(quic.MAX_PENDING):
                await held.enter_async_context(quic_stranger(server.port, f"127.0.{10 + i}.1"))
            assert len(server.endpoint.pending) == quic.MAX_PENDING
            link = await member.endpoint.dial("127.0.0.1", server.port)
            assert link.peer_id == server.node_id
            assert server.counters.over_pending_cap == 1

    run(main)


@pytest.mark.parametrize(
    ("address", "prefix"),
    [
        ("192.0.2.7", "192.0.2.0/24"),
        ("192.0.2.255", "192.0.2.0/24"),
        ("::ffff:192.0.2.9", "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_pending_connections_are_counted_by_source_network(address: str, prefix: str) -> None:
    assert quic.source_prefix(address) == prefix


def test_the_warning_throttle_lets_a_burst_through_then_a_rate_and_counts_the_rest() -> None:
    throttle = quic.WarningThrottle(burst=2, per_s=0.5)
    assert [throttle.allow(0.0), throttle.allow(0.0)] == [0, 0]
    assert [throttle.allow(0.0), throttle.allow(1.0)] == [None, None]  # half a token back
    # A whole token: this warning goes out and says how many were left out.
    assert [throttle.allow(2.0), throttle.allow(2.0)] == [2, None]
    # Quiet for long: the burst is back (not more).
    assert [throttle.allow(100.0), throttle.allow(100.0), throttle.allow(100.0)] == [1, 0, None]


def test_refusal_warnings_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with nodes(("server", SECRET), ("stranger", OTHER_SECRET)) as (server, stranger):
            # No refill: however slow the dials, only the burst gets through.
            server.endpoint.throttle = quic.WarningThrottle(per_s=0.0)
            for _ in range(quic.WARNING_BURST + 3):
                with pytest.raises(quic.AdmissionError):
                    await stranger.endpoint.dial("127.0.0.1", server.port)
            refused = quic.WARNING_BURST + 3
            await eventually(lambda: server.counters.refused == refused, "every refusal counted")
            assert server.counters.warnings_suppressed == 3

    with caplog.at_level("WARNING", logger="meshllm.mesh.quic"):
        run(main)
    lines = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(lines) == quic.WARNING_BURST


def test_a_member_that_does_not_read_its_control_stream_is_disconnected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It gives no credit, so nothing we send is acknowledged: the link closes at the cap."""
    cap = 2 * quic.STREAM_WINDOW_BYTES
    monkeypatch.setattr(quic, "CONTROL_SEND_BUFFER_BYTES", cap)
    table = wire.Sync(
        tuple(wire.PeerAnnouncement(node_id=f"{i:016x}", generation=1) for i in range(2500))
    )
    frame_bytes = len(wire.encode_frame(table))

    async def main() -> None:
        async with nodes(("server", SECRET), ("member", SECRET)) as (server, member):
            link = await member.endpoint.dial("127.0.0.1", server.port)
            link.protocol._quic._write_stream_limits = quic._no_credit  # type: ignore[method-assign]
            link.protocol._quic._write_connection_limits = quic._no_credit  # type: ignore[method-assign]
            (incoming,) = await eventually(lambda: server.links, "the server's link")
            most = sent = 0
            while not incoming.closing and sent < 4 * cap:
                incoming.send(table)  # each answer to a Digest would be the table
                sent += frame_bytes
                most = max(most, incoming.unacknowledged())
                await asyncio.sleep(0)
            assert incoming.closing, f"still open after {sent} bytes"
            assert most <= cap + frame_bytes
            assert server.counters.unread_control == 1
            await eventually(link.closed.is_set, "the member to see the link close")
            close = link.protocol._quic._close_event
            assert (
                close is not None and close.reason_phrase == "peer does not read its control stream"
            )
            await eventually(lambda: incoming.closed.is_set(), "the server's side to end")
            incoming.send(table)  # a closed link sends nothing (and does not raise)

    run(main)


def test_a_member_that_reads_takes_bursts_under_the_control_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control case: the same bytes, in bursts under the cap to a reader, keep the link."""
    cap = 2 * quic.STREAM_WINDOW_BYTES
    monkeypatch.setattr(quic, "CONTROL_SEND_BUFFER_BYTES", cap)
    table = wire.Sync(
        tuple(wire.PeerAnnouncement(node_id=f"{i:016x}", generation=1) for i in range(2500))
    )
    burst = cap // len(wire.encode_frame(table))

    async def main() -> None:
        async with nodes(("server", SECRET), ("member", SECRET)) as (server, member):
            link = await member.endpoint.dial("127.0.0.1", server.port)
            reading = asyncio.ensure_future(member.read(link))
            (incoming,) = await eventually(lambda: server.links, "the server's link")
            for _ in range(2):  # more than the cap in all
                for _ in range(burst):
                    incoming.send(table)
                for _ in range(burst):
                    assert await member.frames.get() == table
            assert not incoming.closing and server.counters.unread_control == 0
            reading.cancel()

    run(main)


def test_an_unauthenticated_node_id_is_logged_quoted(caplog: pytest.LogCaptureFixture) -> None:
    forged = "\x1b[2J0123456789abcdef\nINFO  gossiper: joined the mesh"

    async def main() -> None:
        async with nodes(("server", SECRET)) as (server,), quic_stranger(server.port) as client:
            reader, writer = await client.create_stream()
            key = ec.generate_private_key(ec.SECP256R1())
            hello = wire.Hello(forged, os.urandom(16), identity.public_der(key))
            writer.write(wire.encode_frame(hello))
            assert await closed_by_server(client, reader) == b""
            await eventually(lambda: server.counters.refused == 1, "the refusal to be counted")

    with caplog.at_level("WARNING", logger="meshllm.mesh.quic"):
        run(main)
    (record,) = [r for r in caplog.records if "refused" in r.getMessage()]
    message = record.getMessage()
    assert "\x1b" not in message and "\n" not in message and "joined the mesh" not in message
    assert "'\\x1b[2J0123456789abcdef\\nINFO" in message, message


def test_gaps_do_not_grow_a_members_windows() -> None:
    """After admission too: windows grow with data read, not with gaps."""
    budget = 4 * quic.CONNECTION_WINDOW_BYTES

    async def main() -> None:
        async with nodes(("server", SECRET), ("member", SECRET)) as (server, member):
            link = await member.endpoint.dial("127.0.0.1", server.port)
            (incoming,) = await eventually(lambda: server.links, "the server's link")
            made = await flood_gaps(link.protocol, range(4, 4 * 17, 4), budget)
            held = sum(len(s.receiver._buffer) for s in incoming.protocol._quic._streams.values())
            assert made <= quic.CONNECTION_HELD_BYTES, f"the member made {made} bytes of gaps"
            assert held <= quic.CONNECTION_HELD_BYTES, f"the server holds {held} bytes"

    run(main)


def test_credit_follows_reading_a_stalled_reader_holds_the_sender_back() -> None:
    """A stream whose reader stops holds at most a window (and its connection at most
    the connection's); once it reads again everything arrives, in order, and a writer
    that waits with `drained` keeps its own buffer within a window meanwhile."""
    total = 6 * quic.STREAM_WINDOW_BYTES
    piece = bytes(range(256)) * 256  # 64 KiB

    async def main() -> None:
        async with nodes(("server", SECRET), ("member", SECRET)) as (server, member):
            accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

            async def keep(link: quic.Link, reader: asyncio.StreamReader, _: Any) -> None:
                await accepted.put(reader)  # and read nothing, for now

            server.endpoint.stream_handler = keep
            link = await member.endpoint.dial("127.0.0.1", server.port)
            _, writer = await link.open_stream()
            sent = 0

            async def send_all() -> None:
                nonlocal sent
                while sent < total:
                    writer.write(piece)
                    sent += len(piece)
                    await quic.drained(writer)
                writer.write_eof()

            sending = asyncio.ensure_future(send_all())
            stalled = await asyncio.wait_for(accepted.get(), 5)
            # The sender stops once the reader's credit is used up: nothing more moves.
            previous = -1
            while previous != sent:
                previous = sent
                await asyncio.sleep(0.2)
            (incoming,) = server.links
            held = sum(
                s.receiver.highest_offset - s.receiver._buffer_start
                for s in incoming.protocol._quic._streams.values()
            ) + len(stalled._buffer)  # type: ignore[attr-defined]
            assert held <= quic.STREAM_HELD_BYTES, f"the server holds {held} bytes"
            assert sent < total, "the whole transfer went through to a reader that reads nothing"
            stream = link.protocol._quic._streams[writer.get_extra_info("stream_id")]
            assert len(stream.sender._buffer) <= quic.SEND_BUFFER_BYTES + len(piece)
            # Reading again resumes the transfer to the end, every byte in order.
            received = await asyncio.wait_for(stalled.read(), 20)
            await asyncio.wait_for(sending, 5)
            assert len(received) == total and received == piece * (total // len(piece))

    run(main)
