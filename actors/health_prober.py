"""HealthProber: finds dead peers and has the Gossiper remove them (docs/design.md).

Glue around `meshllm.mesh.health.FailureDetector`; probes travel through the Gossiper.
It publishes the round trips its probes measure on topic `rtt` (split planning picks
the nearest members): when a member gets its first one or leaves at once, otherwise
at most every `RTT_PUBLISH_S` and only when one moved by more than a fifth. What its
probes did (sent, answered, timed out; peers declared dead) goes out on topic `probes`
for `/metrics`, cumulative, at most every `PROBES_PUBLISH_S` and only when it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict

from meshllm.mesh import health
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor

RTT_PUBLISH_S = 2.0
PROBES_PUBLISH_S = 2.0


def rtts_moved(old: dict[str, float], new: dict[str, float]) -> bool:
    """Whether `new` differs from what was last published enough to say so."""
    return any(abs(v - old[k]) > max(1.0, 0.2 * old[k]) for k, v in new.items() if k in old)


class HealthProber(Actor):
    name = "health_prober"
    subscriptions = {"gossiper": ["mesh"]}

    async def on_start(self) -> None:
        self.detector = health.FailureDetector(
            interval=self.config.options.probe_interval_s,
            timeout=self.config.options.probe_timeout_s,
        )
        self.wake = asyncio.Event()
        self.published: dict[str, float] = {}
        self.published_at = 0.0
        self.counts = m.ProbeCounts()
        self.counts_at = 0.0
        self.task = asyncio.create_task(self._run())

    async def _publish_rtts(self) -> None:
        now = time.monotonic()
        rtts = dict(self.detector.rtt_ms)
        if set(rtts) != set(self.published) or (
            now - self.published_at >= RTT_PUBLISH_S and rtts_moved(self.published, rtts)
        ):
            self.published, self.published_at = rtts, now
            await self.bus.publish("rtt", m.PeerRtts(rtts))

    async def _publish_counts(self) -> None:
        now = time.monotonic()
        if now - self.counts_at < PROBES_PUBLISH_S:
            return
        counts = m.ProbeCounts(**asdict(self.detector.stats))
        if counts != self.counts:
            self.counts, self.counts_at = counts, now
            await self.bus.publish("probes", counts)

    async def _run(self) -> None:
        while True:
            await self._act(self.detector.tick(time.monotonic()))
            await self._publish_counts()
            delay = max(0.0, self.detector.next_deadline() - time.monotonic())
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)

    async def _act(self, actions: list[health.Action]) -> None:
        for action in actions:
            match action:
                case health.SendProbe(node_id=node_id, nonce=nonce):
                    await self.bus.tell("gossiper", m.ProbePeer(node_id, nonce))
                case health.SendProbeRequest(via=via, target=target, nonce=nonce):
                    await self.bus.tell("gossiper", m.ProbeVia(via, target, nonce))
                case health.DeclareDead(node_id=node_id):
                    self.log.warning("peer %s is not answering: declaring it dead", node_id)
                    await self.bus.tell("gossiper", m.PeerDied(node_id))

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.MeshView):
            self.detector.set_members({peer.node_id for peer in msg.peers})
            self.wake.set()
            await self._publish_rtts()

    async def on_tell(self, msg: m.Message) -> None:
        match msg:
            case m.ProbeAnswered(nonce=nonce):
                self.detector.on_ack(nonce, time.monotonic())
                await self._publish_rtts()
            case m.SuspectPeer(node_id=node_id, reason=reason):
                self.log.info("suspecting %s (%s)", node_id, reason)
                await self._act(self.detector.suspect(node_id, time.monotonic()))
                self.wake.set()
            case _:
                await super().on_tell(msg)

    async def on_stop(self) -> None:
        self.task.cancel()
