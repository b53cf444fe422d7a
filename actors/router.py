"""Router: turns what the node knows about the mesh into the Proxy's route table."""

from __future__ import annotations

from meshllm import messages as m
from meshllm.actor import Actor
from meshllm.routing import build_route_table


class Router(Actor):
    name = "router"
    subscriptions = {"server_supervisor": ["local"]}

    async def on_start(self) -> None:
        self.local = m.LocalServerState()
        self.table: m.RouteTable | None = None
        await self._recompute()

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.LocalServerState):
            self.local = msg
        await self._recompute()

    async def _recompute(self) -> None:
        catalog = [spec.name for spec in self.config.models]
        table = build_route_table(self.config.node_id, self.local, catalog=catalog)
        if table != self.table:
            self.table = table
            self.log.info("routes: %s", _summary(table))
            await self.bus.publish("routes", table)


def _summary(table: m.RouteTable) -> str:
    parts = [
        f"{r.name}->{len(r.targets)}" if r.targets else f"{r.name}(cold)" for r in table.models
    ]
    return ", ".join(parts) or "none"
