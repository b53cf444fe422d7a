"""Gossiper: this node's membership in the mesh, over QUIC.

Glue around `meshllm.mesh.gossip.GossipCore`, which decides everything (what
to send, whom to dial, which link to keep): this actor reads frames from
admitted links and feeds them to the core, carries out the actions it
returns, and re-arms one timer for `GossipCore.tick`. Probes of the
HealthProber go out through here.

The node's key (handed over by `meshllm up` as PEM) signs its announcements.
Whatever a peer makes us do is bounded here too: the mesh view and
`peers.json` are refreshed at most every `PUBLISH_INTERVAL_S` however fast
announcements change, and each kind of refused input logs at most one line
per `logs.WARN_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm import __version__
from meshllm.http.backends import healthy_models
from meshllm.mesh import gossip, wire
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.membership import boot_generation
from meshllm.mesh.quic import Link, MeshEndpoint, Traffic, key_from_pem
from meshllm.mesh.status import announced_part
from meshllm.mesh.token import InvalidToken, decode_token, split_address
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.runtime.logs import Throttle
from meshllm.runtime.paths import publish_json

TRAFFIC_FILE_S = 1.0
"""How often the endpoint's traffic counters are written to the run directory."""
TRAFFIC_PUBLISH_S = 2.0
"""How often the endpoint's traffic counters are published (topic `traffic`, for
`/metrics`), when they changed."""
PUBLISH_INTERVAL_S = 0.25
"""Least time between two mesh views (and `peers.json` writes): a peer that bumps its
generation in a loop costs one publish per interval, not one per frame."""


def node_key(resources: dict[str, Any], node_id: str) -> ec.EllipticCurvePrivateKey:
    """The node's key from `meshllm up` (PEM); an ephemeral one for a test that has none."""
    pem = resources.get("key")
    key = load_or_create_key(None) if pem is None else key_from_pem(pem)
    if pem is not None and node_id_of(key) != node_id:
        raise ValueError(f"the node key is not node {node_id}'s")
    return key


def traffic_message(traffic: Traffic) -> m.GossipTraffic:
    """The endpoint's counters as published (copies: the endpoint keeps counting)."""
    return m.GossipTraffic(
        frames_sent=dict(traffic.frames_sent),
        frames_received=dict(traffic.frames_received),
        frame_bytes_sent=dict(traffic.frame_bytes_sent),
        frame_bytes_received=dict(traffic.frame_bytes_received),
        datagrams_sent=traffic.datagrams_sent,
        datagrams_received=traffic.datagrams_received,
        udp_bytes_sent=traffic.udp_bytes_sent,
        udp_bytes_received=traffic.udp_bytes_received,
    )


class Gossiper(Actor):
    name = "gossiper"
    subscriptions = {
        "server_supervisor": ["local"],
        "backends": ["backends"],
        "proxy": ["demand"],
    }

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
            model_sha256={s.name: s.sha256 for s in cfg.models if s.url and s.sha256},
            addresses=(f"{cfg.advertise_host}:{cfg.gossip_port}",),
            tunnel_port=cfg.tunnel_port,
        )
        self.peers_file = Path(cfg.run_dir) / "peers.json"
        self.traffic_file = Path(cfg.run_dir) / "traffic.json"
        joins: list[tuple[str, ...]] = []
        for text in cfg.options.join:
            try:
                joins.append(tuple(decode_token(text).addresses))
            except InvalidToken as exc:
                self.log.warning("ignoring an invite token: %s", exc)
        key = node_key(self.resources, cfg.node_id)
        self.core = gossip.GossipCore(
            me,
            time.monotonic(),
            key=key,
            joins=tuple(joins),
            remembered=self._remembered(),
            check_timeout=cfg.options.probe_timeout_s,
        )
        self.throttle = Throttle()
        self.publish_timer: asyncio.TimerHandle | None = None
        self.published_at = -PUBLISH_INTERVAL_S
        self.remembered_addresses: list[str] | None = None
        self.links: dict[int, Link] = {}
        """The core's link ids -> the links they name."""
        self.link_ids = itertools.count(1)
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.endpoint = MeshEndpoint(cfg.node_id, cfg.mesh_secret, key, self._on_link)
        await self.endpoint.listen(self.resources["socket"])
        self._spawn(self._write_traffic_forever())
        self._spawn(self._publish_traffic_forever())
        await self._run(self.core.start(time.monotonic()))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- carrying out the core's actions -------------------------------------------------

    async def _run(self, actions: list[gossip.Action]) -> None:
        for action in actions:
            match action:
                case gossip.Send(link=link_id, msg=msg):
                    if (link := self.links.get(link_id)) is not None:
                        link.send(msg)
                case gossip.Dial() as dial:
                    self._spawn(self._dial(dial))
                case gossip.CloseLink(link=link_id, peer_id=peer_id, reason=reason):
                    if reason == gossip.FORGED_LINK:
                        self._warn("forged-link", "closed the link to %s: %s", peer_id, reason)
                    if (link := self.links.get(link_id)) is not None:
                        link.close(reason)
                case gossip.Publish():
                    await self._publish()
                case gossip.Suspect(peer_id=peer_id, reason=reason):
                    await self.bus.tell("health_prober", m.SuspectPeer(peer_id, reason))
                case gossip.ProbeAnswered(nonce=nonce):
                    await self.bus.tell("health_prober", m.ProbeAnswered(nonce))
                case gossip.PeerRemoved(node_id=node_id, reason=reason):
                    self.log.info("peer %s gone: %r", node_id, reason)
                case gossip.Refuted(reason=reason):
                    # The reason is a member's words: quoted, cut, and at most a line per
                    # `logs.WARN_INTERVAL_S` (a member can tell us we are dead in a loop).
                    self._warn(
                        "refuted",
                        "the mesh thinks this node is gone (%.200r): refuted",
                        reason,
                    )
                case gossip.Rejected(peer_id=peer_id, node_id=node_id, reason=reason):
                    self.endpoint.counters.malformed_frames += 1
                    self._warn(
                        f"rejected:{reason}",
                        "refused an announcement of %s from %s: %s",
                        node_id,
                        peer_id,
                        reason,
                    )
                case gossip.UnexpectedFrame(peer_id=peer_id, kind=kind):
                    self.endpoint.counters.malformed_frames += 1
                    self._warn("unexpected", "dropped an unexpected %s from %s", kind, peer_id)
        self._arm_timer()

    def _warn(self, kind: str, fmt: str, *args: object) -> None:
        """A warning about what a peer sent, rate-limited per `kind` (`Throttle`)."""
        skipped = self.throttle.allow(kind, time.monotonic())
        if skipped is not None:
            more = f" ({skipped} more like it not logged)" if skipped else ""
            self.log.warning(fmt + "%s", *args, more)

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        delay = max(0.0, self.core.next_timer() - time.monotonic())
        self.timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        try:
            actions = self.core.tick(time.monotonic())
        except Exception:
            # A bug must not stop anti-entropy and redials for good: log it, tick again.
            self.log.exception("gossip timer failed")
            actions = []
        self._spawn(self._run(actions))

    # -- links -----------------------------------------------------------------------------

    async def _on_link(self, link: Link) -> None:
        """An admitted link the peer dialed."""
        link_id = next(self.link_ids)
        self.links[link_id] = link
        await self._run(self.core.link_opened(link_id, link.peer_id, False, time.monotonic()))
        await self._read_link(link_id, link)

    async def _dial(self, dial: gossip.Dial) -> None:
        for address in dial.addresses:
            try:
                link = await self.endpoint.dial(*split_address(address), timeout=dial.timeout)
            # ValueError: an announced name that no resolver takes (a label over 63 bytes).
            except (OSError, ValueError, ConnectionError, wire.WireError) as exc:
                log = self.log.warning if dial.join >= 0 else self.log.debug
                log("dialing %s at %s failed: %s", dial.peer_id or "a node", address, exc)
                continue
            if dial.join >= 0:
                self.log.info("joined the mesh via %s (node %s)", address, link.peer_id)
            link_id = next(self.link_ids)
            self.links[link_id] = link
            now = time.monotonic()
            await self._run(self.core.dial_succeeded(dial, link_id, link.peer_id, now))
            await self._read_link(link_id, link)
            return
        await self._run(self.core.dial_failed(dial, time.monotonic()))

    async def _read_link(self, link_id: int, link: Link) -> None:
        traffic = self.endpoint.traffic
        try:
            while True:
                payload = await wire.read_payload(link.reader)
                try:
                    msg = wire.decode_payload(payload)
                except wire.WireError as exc:
                    self.endpoint.counters.malformed_frames += 1
                    salvaged = wire.salvage_sync(payload)
                    if salvaged is None:
                        self._warn(
                            "malformed", "dropped a frame from %s: %.300r", link.peer_id, exc
                        )
                        continue
                    msg, errors = salvaged
                    self._warn(
                        "malformed-announcement",
                        "dropped %d malformed announcement(s) of a sync from %s: %.300r",
                        len(errors),
                        link.peer_id,
                        errors[0] if errors else "",
                    )
                traffic.frame_received(msg, wire.HEADER + len(payload))
                try:
                    actions = self.core.frame_received(link_id, msg, time.monotonic())
                except Exception:
                    # One frame that trips a bug costs that frame, not the link.
                    self.log.exception(
                        "handling a %s from %s failed", type(msg).__name__, link.peer_id
                    )
                    continue
                await self._run(actions)
        except (asyncio.IncompleteReadError, ConnectionError, wire.WireError) as exc:
            why = "closed" if isinstance(exc, asyncio.IncompleteReadError) else exc or "closed"
            self.log.info("link to %s ended: %s", link.peer_id, why)
        finally:
            del self.links[link_id]
            link.close()
            if not self.stopping.is_set():
                await self._run(self.core.link_closed(link_id, time.monotonic()))

    # -- what the node sees ------------------------------------------------------------------

    async def _publish(self) -> None:
        """Publish the mesh view now, or once `PUBLISH_INTERVAL_S` after the last one."""
        if self.publish_timer is not None:
            return  # one is due already, and will show this change too
        wait = self.published_at + PUBLISH_INTERVAL_S - time.monotonic()
        if wait <= 0:
            await self._publish_now()
            return
        loop = asyncio.get_running_loop()
        self.publish_timer = loop.call_later(wait, lambda: self._spawn(self._publish_now()))

    async def _publish_now(self) -> None:
        self.publish_timer = None
        self.published_at = time.monotonic()
        members = self.core.members
        self._remember_peers()
        view = m.MeshView(members.node_id, members.view(), members.me)
        await self.bus.publish("mesh", view)

    def _remember_peers(self) -> None:
        """Keep peers' addresses in the run directory: a restarted Gossiper redials them.

        Written only when the addresses change (not on every new generation)."""
        peers = self.core.members.peers.values()
        addresses = sorted({a for p in peers for a in p.addresses[:1]})
        if addresses == self.remembered_addresses:
            return
        self.remembered_addresses = addresses
        with contextlib.suppress(OSError):
            self.peers_file.write_bytes(msgspec.json.encode(addresses))

    def _remembered(self) -> tuple[str, ...]:
        try:
            return tuple(msgspec.json.decode(self.peers_file.read_bytes(), type=list[str]))
        except (OSError, msgspec.DecodeError):
            return ()

    async def _write_traffic_forever(self) -> None:
        """The endpoint's byte counters, for the benchmark (`bench/gossip_traffic.py`)."""
        while True:
            data = {"at": time.monotonic(), "links": len(self.links)}
            data.update(asdict(self.endpoint.traffic))
            publish_json(self.traffic_file, data)
            await asyncio.sleep(TRAFFIC_FILE_S)

    async def _publish_traffic_forever(self) -> None:
        """The endpoint's counters on topic `traffic` (`/metrics`), when they changed."""
        published = m.GossipTraffic()
        while True:
            await asyncio.sleep(TRAFFIC_PUBLISH_S)
            traffic = traffic_message(self.endpoint.traffic)
            if traffic != published:
                published = traffic
                await self.bus.publish("traffic", traffic)

    # -- local events ------------------------------------------------------------------------

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.LocalServerState):
            changes: dict[str, Any] = {
                "serving": msg.model or None,
                "server_state": msg.state,
                "paused": msg.paused,
                "also_serving": tuple(x.model for x in msg.ready_extras()),
                # Only the planner's own words: a server's output can name local paths.
                "server_reason": msg.split.note[:200] if msg.split is not None else "",
                **announced_part(msg, self.config.options.client),
            }
            me = self.core.members.me
            if msg.sha256 and msg.model in me.model_urls and msg.model not in me.model_sha256:
                # This node downloaded its own `--model URL` and now knows the file's
                # size and digest: peers take a proposal only with both.
                changes["model_sha256"] = {**me.model_sha256, msg.model: msg.sha256}
                changes["model_sizes"] = {**me.model_sizes, msg.model: msg.size}
            await self._run(self.core.update_self(**changes))
        elif isinstance(msg, m.BackendsState):
            await self._run(self.core.update_self(backend_models=healthy_models(msg)))
        elif isinstance(msg, m.DemandState):
            await self._run(self.core.update_self(demand=msg.models))

    async def on_tell(self, msg: m.Message) -> None:
        now = time.monotonic()
        match msg:
            case m.ProbePeer(node_id=node_id, nonce=nonce):
                await self._run(self.core.probe(node_id, nonce, now))
            case m.ProbeVia(via=via, target=target, nonce=nonce):
                await self._run(self.core.probe_via(via, target, nonce, now))
            case m.PeerDied(node_id=node_id):
                await self._run(self.core.peer_died(node_id, now))
            case _:
                await super().on_tell(msg)

    async def on_stop(self) -> None:
        await self._run(self.core.leave())
        if self.timer is not None:
            self.timer.cancel()
        if self.publish_timer is not None:
            self.publish_timer.cancel()
        await asyncio.sleep(gossip.LEAVE_LINGER_S)  # let the leave notices go out
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            self.endpoint.close()
        await asyncio.sleep(0.02)
