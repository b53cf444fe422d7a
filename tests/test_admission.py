"""Nothing before admission: strangers against a real node's gossip and tunnel ports.

A stranger here is a plain aioquic client in the test process: it completes
the QUIC handshake (Retry included) but does not hold the mesh secret. Each
kind of stranger must be closed within `ADMISSION_TIMEOUT_S` of connecting,
cost the node no memory, and leave it serving its API and admitting real
nodes. See tests/test_quic.py for admission itself (in-process endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.connection import QuicErrorCode
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import identity, quic, wire
from meshllm.mesh.token import decode_token
from meshllm.testing import (
    NodeProcess,
    chat,
    group_rss_kib,
    http,
    quic_ports,
    quic_stranger,
    running_node,
    token_of,
    wait_for,
)
from tests.test_quic import flood_gaps

pytestmark = pytest.mark.integration

LOOPBACK = ("--bind", "127.0.0.1:0")
CLOSE_SLACK_S = 3.0
"""How much later than `ADMISSION_TIMEOUT_S` a stranger may still be connected
(a loaded machine: the node's timer, the close's round trip)."""
RSS_SLACK_KIB = 32 * 1024
"""Growth of the node's memory a test tolerates: far above what admission lets a
stranger cost (`ADMISSION_WINDOW_BYTES` a connection), far below what the gap flood
makes a node without those limits hold."""
FLOOD_BUDGET_BYTES = 96 * 1024 * 1024
"""How much a gap flood tries to make the node buffer at most (keeps a test run
against a node without the limits from exhausting this machine)."""
FLOOD_STREAMS = 16


def run(test: Callable[[], Coroutine[Any, Any, None]], deadline: float = 60) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(deadline):
            await test()

    asyncio.run(bounded())


@pytest.fixture(scope="module")
def node(llama_server: str, demo_model: Path) -> Iterator[NodeProcess]:
    with running_node("--model", str(demo_model), *LOOPBACK) as node:
        yield node


async def closed_within(client: QuicConnectionProtocol, seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            await client.wait_closed()
    except TimeoutError:
        raise AssertionError(f"{what}: still connected after {seconds:g} s") from None


# -- the strangers ----------------------------------------------------------------


async def silent(client: QuicConnectionProtocol) -> None:
    """Opens no stream at all."""


async def uses_a_unidirectional_stream(client: QuicConnectionProtocol) -> None:
    """Sends a Hello on a unidirectional stream, ignoring that the node allows none."""
    conn = client._quic
    conn._remote_max_streams_uni = 1
    conn._remote_max_stream_data_uni = 1 << 20
    stream_id = conn.get_next_available_stream_id(is_unidirectional=True)
    conn.send_stream_data(stream_id, wire.encode_frame(wire.Hello("0" * 16, os.urandom(16))))
    client.transmit()


async def floods_gaps(client: QuicConnectionProtocol) -> None:
    """Sends one byte at the far end of every window it is given, on many streams."""
    await flood_gaps(client, range(0, 4 * FLOOD_STREAMS, 4), FLOOD_BUDGET_BYTES)


STRANGERS = [silent, floods_gaps, uses_a_unidirectional_stream]


async def attack(port: int, behave: Callable[[QuicConnectionProtocol], Any]) -> None:
    what = f"{behave.__name__} on port {port}"
    async with quic_stranger(port) as client:
        assert client._quic._retry_count == 1, "the node did not validate the address first"
        await asyncio.gather(
            behave(client),
            closed_within(client, quic.ADMISSION_TIMEOUT_S + CLOSE_SLACK_S, what),
        )


def health(node: NodeProcess) -> int:
    return http(node.port, "GET", "/health", timeout=5)[0]


# -- tests --------------------------------------------------------------------------


def test_strangers_are_closed_in_time_cost_no_memory_and_the_node_keeps_serving(
    node: NodeProcess, tmp_path: Path
) -> None:
    gossip_port, tunnel_port = quic_ports(node)
    model = next(iter(wait_for(node.warm_models, 30, "a warm model")))
    before = group_rss_kib(node)

    async def main() -> None:
        attacks = [attack(p, s) for p in (gossip_port, tunnel_port) for s in STRANGERS]
        attacking = asyncio.gather(*attacks)
        # The API answers while the strangers are connected.
        assert await asyncio.to_thread(health, node) == 200
        await attacking

    run(main)
    grown = group_rss_kib(node) - before
    assert grown < RSS_SLACK_KIB, f"the node's memory grew by {grown} KiB"

    # A real node still joins, through both ports: its chat goes over the tunnel.
    joiner = NodeProcess(tmp_path / "joiner", "--client", "--join", token_of(node), *LOOPBACK)
    try:
        joiner.start()
        quic_ports(joiner)  # its Tunnel is up
        wait_for(lambda: "joined the mesh" in joiner.log(), 20, "the joiner to join")
        wait_for(lambda: model in joiner.warm_models(), 20, f"{model} warm at the joiner")
        assert chat(joiner.port, model)["choices"]
    finally:
        joiner.stop()


def test_a_node_id_not_bound_to_the_key_is_refused_by_a_real_node(node: NodeProcess) -> None:
    """A member that holds the secret cannot claim another node's id (nor a made-up one)."""
    gossip_port, _ = quic_ports(node)
    secret = decode_token(token_of(node)).secret
    key = ec.generate_private_key(ec.SECP256R1())
    member = quic.MeshEndpoint(identity.node_id_of(key), secret, key, _no_link)
    victim = _node_id(node)

    async def main() -> None:
        # The member's own id links (the control case)...
        link = await member.dial("127.0.0.1", gossip_port)
        assert link.peer_id == victim
        link.close()
        # ...another node's id with its own key does not.
        member.node_id = victim
        with pytest.raises(quic.AdmissionError, match="closed the connection"):
            await member.dial("127.0.0.1", gossip_port)
        member.close()

    run(main)
    wait_for(
        lambda: "refused a connection" in node.log() and "its key is node" in node.log(),
        10,
        "the node to log the refusal",
    )


async def _no_link(link: quic.Link) -> None:
    link.close()


def _node_id(node: NodeProcess) -> str:
    """The id a node logs at start ("node ID serving ...")."""
    match = re.search(r"node ([0-9a-f]{16}) serving", node.log())
    assert match, "no node id in the log"
    return match.group(1)


# -- floods: last in this module, since they use up the node's warning budget
# (`quic.WarningThrottle`), and the tests above read its log ------------------------


def test_over_the_pending_cap_the_network_with_the_most_waiting_makes_way(
    node: NodeProcess,
) -> None:
    gossip_port, _ = quic_ports(node)
    # Other networks than the other tests': their connections may still drain.
    crowd = [f"127.0.3.{i}" for i in range(1, quic.MAX_PENDING + 2)]

    async def main() -> None:
        async with contextlib.AsyncExitStack() as held:
            clients = [
                await held.enter_async_context(quic_stranger(gossip_port, h))
                for h in crowd[: quic.MAX_PENDING]
            ]
            # Full. A connection from another network closes the crowd's oldest...
            other = await held.enter_async_context(quic_stranger(gossip_port, "127.0.4.1"))
            await closed_within(clients[0], quic.ADMISSION_TIMEOUT_S, "the crowd's oldest")
            # ...by the cap (the admission deadline ends a connection with another code).
            close = clients[0]._quic._close_event
            assert close is not None and close.error_code == QuicErrorCode.CONNECTION_REFUSED
            assert close.reason_phrase == "too many connections waiting for admission"
            # The crowd's next one closes its own oldest, not the other network's.
            clients.append(await held.enter_async_context(quic_stranger(gossip_port, crowd[-1])))
            await closed_within(clients[1], quic.ADMISSION_TIMEOUT_S, "the crowd's next oldest")
            assert other._quic._close_event is None
            assert all(client._quic._close_event is None for client in clients[2:])

    run(main)
    assert health(node) == 200


async def _keep_connecting(port: int, host: str, connected: list[int]) -> None:
    """A stranger that connects again as soon as the node closes it (until cancelled).

    `connected[0]` counts how many of its kind are connected right now.
    """
    while True:
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with quic_stranger(port, host) as client:
                connected[0] += 1
                try:
                    await client.wait_closed()
                finally:
                    connected[0] -= 1


def test_a_flood_of_pending_connections_cannot_keep_a_member_out(node: NodeProcess) -> None:
    """More strangers than the node keeps waiting, from one /24 and from many: a member's
    dials all succeed while they keep reconnecting, and the log stays short."""
    gossip_port, _ = quic_ports(node)
    secret = decode_token(token_of(node)).secret
    # More than the node keeps waiting: most from one /24, the rest from four others.
    hosts = [f"127.0.20.{i}" for i in range(1, quic.MAX_PENDING)]
    hosts += [f"127.0.{21 + n}.{i}" for n in range(4) for i in range(1, 5)]
    log_before = len(node.log())
    started = time.monotonic()

    async def main() -> None:
        connected = [0]
        flood = [asyncio.ensure_future(_keep_connecting(gossip_port, h, connected)) for h in hosts]
        try:
            while connected[0] < quic.MAX_PENDING:  # every slot taken
                await asyncio.sleep(0.05)
            for _ in range(3):  # each a new member (a node would close a second link of one)
                key = ec.generate_private_key(ec.SECP256R1())
                member = quic.MeshEndpoint(identity.node_id_of(key), secret, key, _no_link)
                link = await member.dial("127.0.0.1", gossip_port)
                link.close()
                member.close()
            assert connected[0] >= quic.MAX_PENDING // 2, "the flood stopped"
        finally:
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)

    run(main)
    assert health(node) == 200
    elapsed = time.monotonic() - started
    log = node.log()[log_before:]
    lines = sum(
        "waiting for admission" in line or "refused a connection" in line
        for line in log.splitlines()
    )
    most = quic.WARNING_BURST + quic.WARNING_PER_S * elapsed
    assert lines <= most, f"{lines} warnings in {elapsed:.1f} s"
