"""Gossiper: this node's membership in the mesh, over QUIC.

Glue around `meshllm.mesh.membership.Membership`: admitted links carry framed
`Sync`, `Fingerprint`/`Digest`, `PeerGone` and probe messages. Our own changes go to every
peer at once (spec: "State changes ... trigger a regossip to all peers");
news about third parties is forwarded once, and a periodic digest exchange
repairs whatever was missed. Membership is transitive: a peer learnt through
gossip is dialed directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec

from meshllm import __version__
from meshllm.mesh import wire
from meshllm.mesh.identity import load_or_create_key
from meshllm.mesh.membership import Membership, boot_generation
from meshllm.mesh.quic import Link, MeshEndpoint
from meshllm.mesh.token import InvalidToken, decode_token, split_address
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor

ANTI_ENTROPY_S = 2.0
DUPLICATE_RACE_S = 3.0
REDIAL_AFTER_S = 2.0
JOIN_BACKOFF_MAX_S = 10.0


class Gossiper(Actor):
    name = "gossiper"
    subscriptions = {"server_supervisor": ["local"]}

    async def on_start(self) -> None:
        cfg = self.config
        me = wire.PeerAnnouncement(
            node_id=cfg.node_id,
            generation=boot_generation(),
            version=__version__,
            role="client" if cfg.options.client else "idle",
            http_port=cfg.http_port,
            requested_models=tuple(spec.name for spec in cfg.models),
            available_models=tuple(spec.name for spec in cfg.available),
            vram_bytes=cfg.vram_bytes,
            model_sizes={s.name: s.size for s in (*cfg.models, *cfg.available) if s.size},
            model_urls={s.name: s.url for s in cfg.models if s.url},
            addresses=(f"{cfg.advertise_host}:{cfg.gossip_port}",),
            tunnel_port=cfg.tunnel_port,
        )
        self.members = Membership(me)
        self.links: dict[str, Link] = {}
        self.dialing: set[str] = set()
        self.unlinked_since: dict[str, float] = {}
        self.relays: dict[int, tuple[str, int, float]] = {}
        self.relay_nonce = 1 << 40
        self.unsent_probes: dict[str, int] = {}
        """peer id -> nonce of a probe that waits for the link being dialed."""
        self.endpoint = MeshEndpoint(
            cfg.node_id, cfg.mesh_secret, load_or_create_key(None), self._on_link
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.peers_file = Path(cfg.run_dir) / "peers.json"
        await self.endpoint.listen(self.resources["socket"])
        self._spawn(self._anti_entropy())
        for token in cfg.options.join:
            self._spawn(self._join(token))
        self._spawn(self._redial_remembered())
        await self._publish()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- links -------------------------------------------------------------------

    async def _on_link(self, link: Link) -> None:
        old = self.links.get(link.peer_id)
        if old is not None and not old.closed.is_set():
            # Both sides dialed at once: keep the link dialed by the lower node id, the
            # same choice on both sides. A link older than that race may be dead (the
            # peer's Gossiper restarted), so the fresh one replaces it.
            racing = link.opened_at - old.opened_at < DUPLICATE_RACE_S
            keep_new = (
                not racing
                or (link.dialed and self.members.node_id < link.peer_id)
                or (not link.dialed and link.peer_id < self.members.node_id)
            )
            if not keep_new:
                link.close("duplicate link")
                return
            old.close("duplicate link")
        self.links[link.peer_id] = link
        self.unlinked_since.pop(link.peer_id, None)
        link.send(wire.Sync(tuple(self.members.all())))
        if (nonce := self.unsent_probes.pop(link.peer_id, None)) is not None:
            link.send(wire.Probe(nonce))
        await self._read_link(link)

    async def _read_link(self, link: Link) -> None:
        try:
            while True:
                try:
                    msg = await wire.read_frame(link.reader)
                except wire.FrameTooLarge:
                    raise  # the stream cannot be resynchronised
                except wire.WireError as exc:
                    self.endpoint.counters.malformed_frames += 1
                    self.log.warning("dropped a frame from %s: %s", link.peer_id, exc)
                    continue
                await self._on_frame(link, msg)
        except (asyncio.IncompleteReadError, ConnectionError, wire.WireError) as exc:
            self.log.info("link to %s ended: %s", link.peer_id, exc or "closed")
        finally:
            if self.links.get(link.peer_id) is link:
                del self.links[link.peer_id]
                link.close()
                if link.peer_id in self.members.peers and not self.stopping.is_set():
                    self.unlinked_since[link.peer_id] = time.monotonic()
                    await self.bus.tell("health_prober", m.SuspectPeer(link.peer_id, "link"))

    async def _on_frame(self, link: Link, msg: wire.WireMessage) -> None:
        now = time.monotonic()
        match msg:
            case wire.Sync(announcements=anns):
                fresh = [a for a in anns if self.members.merge(a, now)]
                stone = self.members.tombstones.get(link.peer_id)
                if stone and any(a.node_id == link.peer_id for a in anns):
                    # It talks to us, yet we hold it dead (it never got the PeerGone:
                    # frozen, cut off): tell it, so it refutes with a newer generation.
                    link.send(wire.PeerGone(link.peer_id, stone[0], "declared dead"))
                if fresh:
                    self._forward(wire.Sync(tuple(fresh)), exclude=link.peer_id)
                    await self._changed()
            case wire.Fingerprint(value=value):
                if value != self.members.fingerprint():
                    link.send(wire.Fingerprint(self.members.fingerprint()))
            case wire.Digest(generations=gens, reply=reply):
                missing = self.members.newer_than(gens)
                if missing:
                    link.send(wire.Sync(tuple(missing)))
                if not reply and self.members.lacks(gens):
                    link.send(wire.Digest(self.members.digest(), reply=True))
            case wire.PeerGone(node_id=node_id, generation=gen, reason=reason):
                await self._remove(node_id, gen, reason, exclude=link.peer_id)
            case wire.Probe(nonce=nonce):
                link.send(wire.ProbeAck(nonce))
            case wire.ProbeAck(nonce=nonce):
                relay = self.relays.pop(nonce, None)
                if relay is not None:
                    if (back := self.links.get(relay[0])) is not None:
                        back.send(wire.ProbeAck(relay[1]))
                else:
                    await self.bus.tell("health_prober", m.ProbeAnswered(nonce))
            case wire.ProbeRequest(target=target, nonce=nonce):
                if (to := self.links.get(target)) is not None:
                    self.relay_nonce += 1
                    self.relays[self.relay_nonce] = (link.peer_id, nonce, now + 10)
                    to.send(wire.Probe(self.relay_nonce))
            case _:
                self.endpoint.counters.malformed_frames += 1

    def _forward(self, msg: wire.WireMessage, exclude: str = "") -> None:
        for peer_id, link in list(self.links.items()):
            if peer_id != exclude:
                link.send(msg)

    async def _remove(self, node_id: str, generation: int, reason: str, exclude: str = "") -> None:
        if node_id == self.members.node_id:
            self.log.warning("the mesh thinks this node is gone (%s): refuting", reason)
            self.members.remove(node_id, generation, time.monotonic())
            self._forward(wire.Sync((self.members.me,)))
            return
        if not self.members.remove(node_id, generation, time.monotonic()):
            return
        self.log.info("peer %s gone: %s", node_id, reason)
        self.unlinked_since.pop(node_id, None)
        # Not to the removed node itself: closing its link would discard the notice.
        link = self.links.pop(node_id, None)
        self._forward(wire.PeerGone(node_id, generation, reason), exclude=exclude)
        if link is not None:
            link.close(reason)
        await self._changed()

    async def _changed(self) -> None:
        await self._publish()
        self._dial_unlinked()

    async def _publish(self) -> None:
        self._remember_peers()
        view = m.MeshView(self.members.node_id, self.members.view(), self.members.me)
        await self.bus.publish("mesh", view)

    # -- dialing -------------------------------------------------------------------

    def _dial_unlinked(self) -> None:
        now = time.monotonic()
        for peer_id, ann in self.members.peers.items():
            if peer_id in self.links or peer_id in self.dialing or not ann.addresses:
                continue
            since = self.unlinked_since.setdefault(peer_id, now)
            # The lower node id dials; the other waits a little before dialing too.
            if self.members.node_id < peer_id or now - since > REDIAL_AFTER_S:
                self.dialing.add(peer_id)
                self._spawn(self._dial_peer(peer_id, ann.addresses))

    async def _dial_peer(self, peer_id: str, addresses: tuple[str, ...]) -> None:
        try:
            for address in addresses:
                try:
                    link = await self.endpoint.dial(*split_address(address), timeout=3.0)
                except (OSError, ConnectionError, wire.WireError) as exc:
                    self.log.debug("dialing %s at %s failed: %s", peer_id, address, exc)
                    continue
                self._spawn(self._on_link(link))
                return
        finally:
            self.dialing.discard(peer_id)

    async def _join(self, text: str) -> None:
        """Dial the token's addresses until admitted; dial again whenever that link ends.

        Rejoining covers a seed node that restarted: it knows nobody, so the
        nodes that joined through it reach out again.
        """
        token = decode_token(text)
        delay = 0.2
        joined: str | None = None
        while not self.stopping.is_set():
            if joined is not None and joined in self.links:
                await asyncio.sleep(1.0)
                continue
            for address in token.addresses:
                try:
                    link = await self.endpoint.dial(*split_address(address), timeout=3.0)
                except (OSError, ConnectionError, wire.WireError) as exc:
                    self.log.warning("joining via %s failed: %s; retrying", address, exc)
                    continue
                self.log.info("joined the mesh via %s (node %s)", address, link.peer_id)
                joined, delay = link.peer_id, 0.2
                await self._on_link(link)
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_BACKOFF_MAX_S)

    def _remember_peers(self) -> None:
        """Keep peers' addresses in the run directory: a restarted Gossiper redials them."""
        addresses = sorted({a for p in self.members.peers.values() for a in p.addresses[:1]})
        with contextlib.suppress(OSError):
            self.peers_file.write_bytes(msgspec.json.encode(addresses))

    async def _redial_remembered(self) -> None:
        try:
            addresses = msgspec.json.decode(self.peers_file.read_bytes(), type=list[str])
        except (OSError, msgspec.DecodeError):
            return
        for address in addresses:
            with contextlib.suppress(OSError, ConnectionError, wire.WireError, InvalidToken):
                link = await self.endpoint.dial(*split_address(address), timeout=2.0)
                self._spawn(self._on_link(link))

    async def _anti_entropy(self) -> None:
        while True:
            await asyncio.sleep(ANTI_ENTROPY_S)
            now = time.monotonic()
            self.members.expire(now)
            self.relays = {k: v for k, v in self.relays.items() if v[2] > now}
            if self.links:
                link = random.choice(list(self.links.values()))
                link.send(wire.Digest(self.members.digest()))
            self._dial_unlinked()

    # -- local events --------------------------------------------------------------

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.LocalServerState):
            serving = msg.model or None
            role = "client" if self.config.options.client else ("host" if serving else "idle")
            if self.members.update_self(serving=serving, server_state=msg.state, role=role):
                self._forward(wire.Sync((self.members.me,)))
                await self._publish()

    async def on_tell(self, msg: m.Message) -> None:
        match msg:
            case m.ProbePeer(node_id=node_id, nonce=nonce):
                if (link := self.links.get(node_id)) is not None:
                    link.send(wire.Probe(nonce))
                elif (ann := self.members.peers.get(node_id)) is not None:
                    # No link (it ended while we were frozen or cut off): a dropped
                    # probe would get a live peer declared dead. Dial it; the probe
                    # follows on the new link (meshllm/mesh/simulation.py shows the storm).
                    self.unsent_probes[node_id] = nonce
                    if node_id not in self.dialing and ann.addresses:
                        self.dialing.add(node_id)
                        dial = self._dial_peer(node_id, ann.addresses)
                        self._spawn(dial)
            case m.ProbeVia(via=via, target=target, nonce=nonce):
                if (link := self.links.get(via)) is not None:
                    link.send(wire.ProbeRequest(target, nonce))
            case m.PeerDied(node_id=node_id):
                ann = self.members.peers.get(node_id)
                if ann is not None:
                    await self._remove(node_id, ann.generation, "did not answer probes")
            case _:
                await super().on_tell(msg)

    async def on_stop(self) -> None:
        me = self.members.me
        self._forward(wire.PeerGone(me.node_id, me.generation, "left"))
        await asyncio.sleep(0.05)  # let the leave notices go out before closing
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            self.endpoint.close()
        await asyncio.sleep(0.02)
