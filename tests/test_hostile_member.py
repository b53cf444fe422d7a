"""A hostile member (it holds the mesh secret) tries to forge other nodes' gossip (issue 9, item 2).

Real node processes on 127.0.0.1: a host A serving the demo model (the victim)
and a lite client B (the observer, which routes to A). The forger is a
`MeshEndpoint` in this process with its own key and its true id, linked to
both; it answers probes and announces itself validly, so it stays a member
throughout. On its link to B it tries every forgery it can: announcements
about A (unsigned, signed by itself, with A's key but its own signature, a
top-of-range generation), `PeerGone` for A (plain, signed by itself, at the
top of the range), one for B itself at the top of the range, an announcement
of its own id with A's key, and a malformed announcement beside a valid one.
Each is refused: B still routes to A and a chat through B works, and the
forger's valid announcements, sent on the same link after each forgery,
still count; except after a signature that does not verify, where B closes
the link at once (and dials the forger again, a member still). Then A
restarts (same key, new ports) and the forger replays what A really signed
before: its old announcement and its leave. B keeps the new A (a chat
through B reaches A's new tunnel port).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm import PROTOCOL_VERSION
from meshllm.mesh import wire
from meshllm.mesh.identity import node_id_of
from meshllm.mesh.membership import sign_announcement, sign_leave
from meshllm.mesh.quic import Link, MeshEndpoint
from meshllm.mesh.token import decode_token, split_address
from meshllm.testing import NodeProcess, chat, mesh_models, wait_for

pytestmark = pytest.mark.integration

LOOPBACK = ("--bind", "127.0.0.1:0")
ONE_THREAD = ("--llama-arg=-t", "--llama-arg=1")
DEMO = "meshllm-demo"
PROBE_TIMEOUT_S = 1.0
"""The nodes' probe timeout (the default): a death verdict is checked within about this."""
HOLD_S = 3 * PROBE_TIMEOUT_S
"""How long the victim must stay listed after the forged verdicts (past B's own check)."""


class Forger:
    """A member with the secret and a key of its own, speaking the gossip protocol by hand."""

    def __init__(self, secret: bytes) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.node_id = node_id_of(self.key)
        self.endpoint = MeshEndpoint(self.node_id, secret, self.key, self._on_link)
        self.links: dict[str, Link] = {}
        self.seen: dict[str, wire.PeerAnnouncement] = {}
        """The latest announcement of each node that reached us."""
        self.leaves: list[wire.PeerGone] = []
        """Every `PeerGone` that reached us (a signed leave, to replay)."""
        self.syncs = 0
        self.table_syncs = 0
        """Syncs of more than one announcement: answers to a digest, not a node's own
        news (which a node sends whenever it changes, its demand counts included)."""
        """How many `Sync` frames reached us."""
        self.acks: set[int] = set()
        """The nonces of the `ProbeAck`s that reached us."""
        self.generation = 1_000
        self.models: list[str] = []
        """What we announce: every `announcement` adds one, so each is seen in B's catalog."""
        self.address = ""
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{udp.getsockname()[1]}"
        await self.endpoint.listen(udp)

    def announcement(self, model: str) -> wire.PeerAnnouncement:
        """A valid announcement of ourselves, with one more model (and a newer generation)."""
        self.generation += 1
        self.models.append(model)
        me = wire.PeerAnnouncement(
            node_id=self.node_id,
            generation=self.generation,
            role="client",
            available_models=tuple(self.models),
            addresses=(self.address,),
        )
        return sign_announcement(me, self.key)

    async def dial(self, address: str, timeout: float) -> None:
        """Dial until admitted (the node may still be starting its Gossiper)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                link = await self.endpoint.dial(*split_address(address), timeout=1)
            except (OSError, ConnectionError, wire.WireError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                await self._linked(link)
                return

    async def _on_link(self, link: Link) -> None:
        await self._linked(link)

    async def _linked(self, link: Link) -> None:
        self.links[link.peer_id] = link
        link.send(wire.Sync((self.announcement("hostile-a"),)))
        task = asyncio.create_task(self._read(link))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self, link: Link) -> None:
        """Answer probes (a silent member would be declared dead) and record announcements."""
        try:
            while True:
                match await wire.read_frame(link.reader):
                    case wire.Probe(nonce=nonce):
                        link.send(wire.ProbeAck(nonce))
                    case wire.ProbeAck(nonce=nonce):
                        self.acks.add(nonce)
                    case wire.Sync(announcements=anns):
                        self.syncs += 1
                        self.table_syncs += len(anns) > 1
                        for ann in anns:
                            known = self.seen.get(ann.node_id)
                            if known is None or known.generation < ann.generation:
                                self.seen[ann.node_id] = ann
                    case wire.Digest(reply=False):
                        # A new link starts with digests: we lack everything, send it all.
                        link.send(wire.Digest({self.node_id: self.generation}, reply=True))
                    case wire.PeerGone() as gone:
                        self.leaves.append(gone)
                    case _:
                        pass
        except (asyncio.IncompleteReadError, ConnectionError, wire.WireError):
            if self.links.get(link.peer_id) is link:
                del self.links[link.peer_id]

    async def flush(self, peer_id: str, nonce: int) -> None:
        """Wait until `peer_id` has handled everything sent so far (it acks in order)."""
        self.links[peer_id].send(wire.Probe(nonce))
        await until(lambda: nonce in self.acks, 10, f"the ack of probe {nonce}")

    def send_raw(self, peer_id: str, msg: dict[str, Any]) -> None:
        """A frame built by hand (what no `wire` struct would encode)."""
        payload = msgspec.msgpack.encode([PROTOCOL_VERSION, msg])
        self.links[peer_id].writer.write(len(payload).to_bytes(wire.HEADER, "big") + payload)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.endpoint.close()


async def until(predicate: Any, timeout: float, what: str) -> Any:
    """`wait_for` in a thread, so the forger keeps answering probes meanwhile."""
    return await asyncio.to_thread(wait_for, predicate, timeout, what, 0.1)


def lists(port: int, model: str, nodes: list[str] | None = None) -> bool:
    entry = mesh_models(port, timeout=2).get(model)
    return entry is not None and (nodes is None or entry["nodes"] == nodes)


async def hold(b: NodeProcess, a_id: str) -> None:
    """For `HOLD_S` (past B's own check of A after a verdict): B routes the demo model to A
    and lists no forged model; then a chat through B is answered (by A)."""
    hold_until = time.monotonic() + HOLD_S
    while time.monotonic() < hold_until:
        models = await asyncio.to_thread(mesh_models, b.port, 2)
        assert models[DEMO]["nodes"] == [a_id], models
        assert "forged-model" not in models and "stolen-key" not in models, models
        await asyncio.sleep(0.2)
    answer = await asyncio.to_thread(chat, b.port, DEMO)
    assert answer["choices"][0]["message"]["content"]


async def forge(nodes: Nodes) -> None:
    a = nodes.start_a()
    token = await until(a.token_from_log, 30, "A's invite token")
    b = nodes.add_b(token)
    forger = Forger(decode_token(token).secret)
    await forger.start()
    try:
        await forger.dial(decode_token(token).addresses[0], timeout=30)
        await asyncio.to_thread(a.wait_serving, 60)
        a_id: str = (await asyncio.to_thread(a.status))["node_id"]
        await asyncio.to_thread(b.start)
        b_id: str = (await asyncio.to_thread(b.status))["node_id"]
        # B learns of us from A and dials us.
        await until(lambda: b_id in forger.links, 15, "B's link to the forger")
        await until(lambda: lists(b.port, DEMO, [a_id]), 30, "B to route the demo model to A")
        await until(lambda: lists(b.port, "hostile-a"), 10, "B to list the forger's model")
        current = forger.seen[a_id]
        a_key = current.public_key

        forged = wire.PeerAnnouncement(
            node_id=a_id,
            generation=current.generation + 10,
            role="idle",
            available_models=("forged-model",),
            addresses=(forger.address,),
        )
        top = wire.GENERATION_MAX - 1
        by_forger = sign_announcement(forged, forger.key)
        own = wire.PeerAnnouncement(
            node_id=forger.node_id,
            generation=forger.generation + 1_000,
            available_models=("stolen-key",),
            addresses=(forger.address,),
        )
        own_id_victims_key = msgspec.structs.replace(
            sign_announcement(own, forger.key), public_key=a_key
        )
        forgeries: list[wire.WireMessage] = [
            wire.Sync((forged,)),  # unsigned
            wire.Sync((by_forger,)),  # signed by the forger, with its own key
            wire.Sync((own_id_victims_key,)),
            wire.PeerGone(a_id, current.generation, "died"),
            wire.PeerGone(a_id, top, "died"),
            sign_leave(wire.PeerGone(a_id, current.generation, "left"), forger.key),
        ]
        link = forger.links[b_id]
        for index, msg in enumerate(forgeries):
            link.send(msg)
            # The forger's own valid news, on the same link right after: it still counts.
            link.send(wire.Sync((forger.announcement(f"valid-{index}"),)))
        # A malformed announcement beside a valid one: only the malformed one is dropped.
        valid = msgspec.to_builtins(forger.announcement("after-malformed"), builtin_types=(bytes,))
        malformed = {**valid, "node_id": "../../etc", "generation": 1}
        forger.send_raw(b_id, {"type": "Sync", "announcements": [malformed, valid]})
        # Told that it is dead at the top of the range, B refutes one above its own.
        b_generation = forger.seen[b_id].generation
        link.send(wire.PeerGone(b_id, top, "declared dead"))

        await until(lambda: lists(b.port, "after-malformed"), 10, "the forger's last valid news")
        for index in range(len(forgeries)):
            assert lists(b.port, f"valid-{index}"), index
        refuted = await until(
            lambda: (seen := forger.seen[b_id]).generation > b_generation and seen, 10, "refute"
        )
        assert refuted.generation == b_generation + 1
        await hold(b, a_id)
        assert "refused an announcement" in b.log()

        # A signature that does not verify (A's key, or A's announcement with another
        # generation) costs a check each: B closes the link on the first, and reads no more.
        for bad in (
            msgspec.structs.replace(by_forger, public_key=a_key),
            msgspec.structs.replace(current, generation=top),
        ):
            link.send(wire.Sync((bad,)))

            def closed(old: Link = link) -> bool:
                return forger.links.get(b_id) is not old

            await until(closed, 10, "B to close the link")
            assert "closed the link to " + forger.node_id in b.log()
            # The forger is still a member: B dials it again, and they link again.
            link = await until(lambda: forger.links.get(b_id), 15, "B to dial the forger again")
        await hold(b, a_id)
        await floods(forger, a, b, b_id)

        # Replays: A restarts (same key and gossip port, new tunnel port), then the forger
        # sends B what A signed in its previous run.
        old = forger.seen[a_id]
        await asyncio.to_thread(a.stop)
        (leave,) = {g for g in forger.leaves if g.node_id == a_id and g.signature}
        a = nodes.start_a(gossip=decode_token(token).addresses[0])
        await forger.dial(decode_token(token).addresses[0], timeout=30)
        await asyncio.to_thread(a.wait_serving, 60)
        await until(lambda: forger.seen[a_id].generation > old.generation, 30, "A's new run")
        assert forger.seen[a_id].tunnel_port != old.tunnel_port
        await until(lambda: lists(b.port, DEMO, [a_id]), 30, "B to route to the new A")
        link = forger.links[b_id]
        link.send(wire.Sync((old,)))
        link.send(leave)
        link.send(wire.Sync((forger.announcement("after-replay"),)))
        await until(lambda: lists(b.port, "after-replay"), 10, "the forger's news after replays")
        await hold(b, a_id)
    finally:
        forger.close()


async def floods(forger: Forger, a: NodeProcess, b: NodeProcess, b_id: str) -> None:
    """What the forger can make B do in a loop is bounded (the attacker's review, issue 9)."""
    link = forger.links[b_id]
    # A digest that lacks everything buys the whole table: answered once, not 100 times.
    await forger.flush(b_id, 1)
    syncs = forger.table_syncs
    for _ in range(100):
        link.send(wire.Digest({}))
    await forger.flush(b_id, 2)
    assert 1 <= forger.table_syncs - syncs <= 2, forger.table_syncs - syncs
    # "You are dead", 100 times: B refutes at once, then once more a second later.
    generation = forger.seen[b_id].generation
    for _ in range(100):
        link.send(wire.PeerGone(b_id, generation, "x" * 200))
    await until(lambda: forger.seen[b_id].generation >= generation + 2, 10, "two refutes")
    await forger.flush(b_id, 3)
    assert forger.seen[b_id].generation == generation + 2
    assert b.log().count("refuted") <= 3  # one here, one before (throttled per 10 s)
    # 256 download proposals that A (which B passes them to) refuses, having no size or
    # digest: one line, not 256.
    proposals = {f"proposal-{i:03}": f"https://example.com/{i}.gguf" for i in range(256)}
    mine = forger.announcement("proposals")
    link.send(
        wire.Sync(
            (sign_announcement(msgspec.structs.replace(mine, model_urls=proposals), forger.key),)
        )
    )
    await until(lambda: lists(b.port, "proposals"), 10, "B to take the proposals")
    await until(lambda: "has no download source here" in a.log(), 10, "a refused proposal")
    assert a.log().count("has no download source here") == 1


class Nodes:
    """A (the victim, serving) and B (a lite client joined through A), always stopped."""

    def __init__(self, root: Path, demo_model: Path) -> None:
        (root / "no-models").mkdir()
        self.root = root
        self.env = {"MESHLLM_MODELS_DIR": str(root / "no-models")}
        self.demo_model = demo_model
        self.started: list[NodeProcess] = []

    def start_a(self, gossip: str = "127.0.0.1:0") -> NodeProcess:
        args = ("--model", str(self.demo_model), "--bind", gossip, *ONE_THREAD)
        a = NodeProcess(self.root / "A", *args, env=self.env)
        self.started.append(a)
        a.start(wait=False)
        return a

    def add_b(self, token: str) -> NodeProcess:
        b = NodeProcess(self.root / "B", "--client", "--join", token, *LOOPBACK, env=self.env)
        self.started.append(b)
        return b

    def stop(self) -> None:
        for node in self.started:
            node.stop()


def test_a_hostile_member_cannot_forge_another_node(
    tmp_path: Path, llama_server: str, demo_model: Path
) -> None:
    nodes = Nodes(tmp_path, demo_model)
    try:
        asyncio.run(asyncio.wait_for(forge(nodes), 180))
    finally:
        nodes.stop()
