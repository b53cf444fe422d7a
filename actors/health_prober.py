"""HealthProber: finds dead peers and has the Gossiper remove them (docs/design.md).

Glue around `meshllm.mesh.health.FailureDetector`; probes travel through the Gossiper.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from meshllm.mesh import health
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor


class HealthProber(Actor):
    name = "health_prober"
    subscriptions = {"gossiper": ["mesh"]}

    async def on_start(self) -> None:
        self.detector = health.FailureDetector(
            interval=self.config.options.probe_interval_s,
            timeout=self.config.options.probe_timeout_s,
        )
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._act(self.detector.tick(time.monotonic()))
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

    async def on_tell(self, msg: m.Message) -> None:
        match msg:
            case m.ProbeAnswered(nonce=nonce):
                self.detector.on_ack(nonce)
            case m.SuspectPeer(node_id=node_id, reason=reason):
                self.log.info("suspecting %s (%s)", node_id, reason)
                await self._act(self.detector.suspect(node_id, time.monotonic()))
                self.wake.set()
            case _:
                await super().on_tell(msg)

    async def on_stop(self) -> None:
        self.task.cancel()
