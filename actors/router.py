"""Router: turns what the node knows about the mesh into the Proxy's route table."""

from __future__ import annotations

from meshllm.http.routing import Serving, build_route_table
from meshllm.mesh.membership import mesh_catalog
from meshllm.models.catalog import CATALOG
from meshllm.placement.election import also_served
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.runtime.config import NodeConfig


class Router(Actor):
    name = "router"
    subscriptions = {
        "server_supervisor": ["local"],
        "gossiper": ["mesh"],
        "backends": ["backends"],
    }

    async def on_start(self) -> None:
        self.local = m.LocalServerState()
        self.mesh = m.MeshView(self.config.node_id)
        self.backends = m.BackendsState()
        self.table: m.RouteTable | None = None
        await self._recompute()

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.LocalServerState):
            self.local = msg
        elif isinstance(msg, m.MeshView):
            self.mesh = msg
        elif isinstance(msg, m.BackendsState):
            self.backends = msg
        await self._recompute()

    async def _recompute(self) -> None:
        # The mesh catalog counts this node's own disk too (a cold model may be ours).
        own = {spec.name for spec in (*self.config.models, *self.config.available)}
        own |= set(self.config.backend_models)
        catalog = own | mesh_catalog(self.mesh.peers)
        remote = [
            Serving(
                peer.serving,
                peer.node_id,
                peer.http_port,
                workers=peer.split_workers,
                shares=peer.split_shares,
            )
            for peer in self.mesh.peers
            if peer.serving
            and peer.server_state == "ready"
            and peer.role == "host"
            and not peer.paused
        ]
        remote += [
            Serving(model, peer.node_id, peer.http_port)
            for peer in self.mesh.peers
            for model in also_served(peer)
        ]
        remote += backend_servers(self.config.node_id, self.mesh, self.backends)
        table = build_route_table(
            self.config.node_id,
            self.local,
            remote,
            catalog,
            failure_notes(self.mesh, self.local),
            loadable_models(self.config, self.mesh),
        )
        if table != self.table:
            self.table = table
            self.log.info("routes: %s", _summary(table))
            await self.bus.publish("routes", table)


def loadable_models(config: NodeConfig, mesh: m.MeshView) -> set[str]:
    """Models a node that follows demand could load: one started without `--model` (it
    may switch), not paused, with the file on its disk or a download source (a node's
    `--model URL`, the built-in catalog). A request for another cold model (a down
    backend's, one only `--model` nodes have) gets 503 at once instead of waiting."""
    sources = {entry.name for entry in CATALOG} | {s.name for s in config.models if s.url}
    for peer in mesh.peers:
        sources.update(peer.model_urls)
    names: set[str] = set()
    opts = config.options
    if not opts.client and not config.models and config.vram_bytes > 0 and opts.idle_unload_s:
        names.update(s.name for s in config.available)
        names |= sources
    for peer in mesh.peers:
        movable = peer.role != "client" and not peer.requested_models and not peer.paused
        if movable and peer.vram_bytes > 0:
            names.update(peer.available_models)
            names |= sources
    return names


def backend_servers(node_id: str, mesh: m.MeshView, backends: m.BackendsState) -> list[Serving]:
    """Targets of external backends: each up backend of this node, once per model it
    serves, and every model a peer announces for its backends (reached through the
    tunnel, which hands it to one of them there)."""
    local = [
        Serving(model, node_id, b.port, local=True, host=b.host, backend=True)
        for b in backends.backends
        if b.up
        for model in b.models
    ]
    remote = [
        Serving(model, peer.node_id, peer.http_port, backend=True)
        for peer in mesh.peers
        for model in peer.backend_models
    ]
    return local + remote


def failure_notes(mesh: m.MeshView, local: m.LocalServerState) -> dict[str, str]:
    """Model -> why a node says it does not serve it (e.g. it fits nowhere, even split)."""
    notes = {
        peer.serving: f"{peer.node_id}: {peer.server_reason}"
        for peer in mesh.peers
        if peer.serving and peer.server_state in ("failed", "waiting") and peer.server_reason
    }
    if local.model and local.state in ("failed", "waiting") and local.reason:
        notes[local.model] = f"this node: {local.reason[:200]}"
    return notes


def _summary(table: m.RouteTable) -> str:
    parts = [
        f"{r.name}->{len(r.targets)}" if r.targets else f"{r.name}(cold)" for r in table.models
    ]
    return ", ".join(parts) or "none"
